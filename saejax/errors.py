"""One exception type for every input the user can get wrong.

The command line turns it into one line on stderr and a non-zero exit; anything
else that escapes is a bug in saejax, reported as such.
"""


class SaejaxError(Exception):
    """A problem with the user's input or environment, explained in one line."""
