"""One exception type for every input the user can get wrong.

The command line turns it into one line on stderr and a non-zero exit; anything
else that escapes is a bug in saejax, reported as such.
"""

import errno
import os
import re


class SaejaxError(Exception):
    """A problem with the user's input or environment, explained in one line."""


# a write that failed for want of space: no space left, over a disk quota, past a file-size limit
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(exc: BaseException | None) -> OSError | None:
    """The disk-full error behind `exc` (or its causes), else None: an OSError with a DISK_FULL
    errno, or the ValueError TensorStore (and orbax through it) raises for one, whose message
    names the `os_error_code`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        found = re.search(r"os_error_code='?(\d+)", str(exc))
        if found and int(found.group(1)) in DISK_FULL:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None
