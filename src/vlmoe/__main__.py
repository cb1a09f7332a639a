"""`python -m vlmoe ...` is the same as the `vlmoe` command (used under torchrun)."""

import sys

from vlmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
