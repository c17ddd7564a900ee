"""`python -m kvmem ...`: the same as the `kvmem` command."""

import sys

from kvmem.cli import main

if __name__ == "__main__":
    sys.exit(main())
