"""``python -m softcal [COMMAND ...]``, the same as ``softcal``: see :mod:`softcal.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
