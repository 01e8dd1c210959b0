"""``python -m scoregrad`` runs the ``scoregrad`` command line (``python -m scoregrad bench``)."""

import sys

from scoregrad.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
