"""The one place files are written: whole or not at all.

Every writer puts its bytes in a temporary file beside the target and renames it over the
target once complete (`os.replace` is atomic on one filesystem), so a reader, a crash or a
full disk never leaves a half-written result. `atomic_dir` does the same for a folder that
must appear complete (an exported SAE, a dashboard); it marks the folders it creates with a
`.saejax-output` file naming their kind and never replaces a folder without that mark, so an
output can never destroy a folder saejax did not write. JSON is strict: NaN and ±Inf become
null, NumPy values become plain numbers.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

MARKER = ".saejax-output"  # in every folder atomic_dir creates; holds the folder's kind


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_beside(path: str) -> tuple[int, str]:
    """A temporary file beside `path` with the mode a plain open() would give it (mkstemp
    makes it 0600, which would leave a shared store's meta.json unreadable to others)."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str, fsync: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), fsync=fsync)


def jsonable(value):
    """`value` with NumPy types made plain and non-finite floats made None."""
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def json_text(obj, indent: int | None = 2, sort_keys: bool = False) -> str:
    return json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(
    path: str, obj, indent: int | None = 2, sort_keys: bool = False, fsync: bool = False
) -> None:
    write_text(path, json_text(obj, indent, sort_keys) + "\n", fsync=fsync)


def write_npy(path: str, array) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    write_bytes(path, buf.getvalue())


def write_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def save_figure(fig, path: str) -> str:
    """A matplotlib figure, in the format its extension names."""
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(path)[1].lstrip(".") or "png")
    write_bytes(path, buf.getvalue())
    return path


class OutputRefused(OSError):
    """An output folder that must not be written (the command line reports it in one line,
    exit 2, like any OSError). io.py imports nothing of saejax, hence not a SaejaxError."""

    def __init__(self, message: str):
        super().__init__(errno.EEXIST, message)


def is_url(path: str) -> bool:
    """`gs://bucket/x`, `s3://...`, `https://...`: a path only TensorStore's drivers reach."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.isalnum()


def check_local(path: str, what: str) -> None:
    """Sweeps, exports and dashboards are written with plain file operations (atomic
    renames, locks), so an object-storage URL would end in a local folder named `gs:`:
    refuse it before any work. (`train`'s run directory is mirrored: train.remote_run.)"""
    if is_url(path):
        raise OutputRefused(
            f"{what} {path} is an object-storage URL; {what}s must be local (or a mounted "
            "bucket) for now — only activation stores and train's run directories are read "
            "and written on gs:// and s3://"
        )


def output_kind(folder: str) -> str | None:
    """The kind atomic_dir recorded in `folder` (None when saejax did not create it)."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies below it (both absolute, resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(out: str, kind: str, reads=(), allowed=()) -> str:
    """`out` resolved, once it is safe for an output of `kind`: not one of the folders the
    command `reads` (nor inside one, nor an ancestor of one) unless listed in `allowed`, and
    not an existing folder that saejax did not create as the same kind (an empty one is fine:
    nothing is lost)."""
    check_local(out, f"the {kind} folder")
    final = os.path.realpath(out)
    if final not in {os.path.realpath(a) for a in allowed}:
        for src in reads:
            src_real = os.path.realpath(src)
            if _within(final, src_real) or _within(src_real, final):
                raise OutputRefused(
                    f"refusing to write {kind} output to {out}: it is, holds or lies inside "
                    f"{src}, which this command reads; choose another --out"
                )
    if os.path.lexists(final):
        if not os.path.isdir(final):
            raise OutputRefused(
                f"refusing to write {kind} output to {out}: it exists and is a file"
            )
        found = output_kind(final)
        if found != kind and os.listdir(final):
            what = f"a saejax {found} folder" if found else "a folder saejax did not create"
            raise OutputRefused(
                f"refusing to replace {out}: it is {what}, not a {kind} output; "
                "choose another --out or remove it yourself"
            )
    return final


@contextlib.contextmanager
def atomic_dir(final: str, kind: str = "output") -> Iterator[str]:
    """A temporary sibling folder to fill; it replaces `final` only once the block completes,
    and is removed if the block (or the swap) fails. `final` may only be replaced when it is
    empty or atomic_dir created it with the same `kind` (see `check_output_dir`)."""
    final = check_output_dir(final, kind)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide an export from other users
    try:
        yield tmp
        write_text(os.path.join(tmp, MARKER), kind + "\n")
        check_output_dir(final, kind)  # again: something may have appeared there meanwhile
        _swap_in(tmp, final, parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: str, final: str, parent: str) -> None:
    """Rename `tmp` to `final`; an old `final` is moved aside first and put back on failure."""
    if not os.path.exists(final):
        os.replace(tmp, final)
        return
    old = tempfile.mkdtemp(prefix=".old-", dir=parent)
    os.rmdir(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
