"""`python -m qconv`: the `qconv` command (with no arguments, its help)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
