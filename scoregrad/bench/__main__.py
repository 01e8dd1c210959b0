"""``python -m scoregrad.bench`` runs the ``scoregrad`` command line."""

import sys

from scoregrad.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
