"""python -m qbdl.fidelity RUN_DIR."""

import sys

from qbdl.fidelity.cli import main

if __name__ == "__main__":
    sys.exit(main())
