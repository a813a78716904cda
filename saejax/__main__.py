"""`python -m saejax` is the `saejax` command."""

import sys

from saejax.cli import main

sys.exit(main())
