"""`python -m pyserve`: the same as the `pyserve` console script."""

import sys

from pyserve.cli import main

if __name__ == "__main__":
    sys.exit(main())
