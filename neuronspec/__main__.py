"""``python -m neuronspec COMMAND ...`` (see :mod:`neuronspec.cli`)."""

import sys

from neuronspec.cli import main

if __name__ == "__main__":
    sys.exit(main())
