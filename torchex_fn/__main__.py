"""``python -m torchex_fn``: the command line (:mod:`torchex_fn.cli`)."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
