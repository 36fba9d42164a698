"""``python -m convlens.cli``: the ``convlens`` command (as ``python -m convlens``)."""

import sys

from convlens.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
