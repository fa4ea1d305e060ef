"""``python -m buseg`` (and ``torchrun -m buseg train ...``) runs the command line."""

import sys

from buseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
