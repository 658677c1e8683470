"""``python -m hf_weightstream``: the same command line as the ``hf-weightstream`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
