"""`python -m services.router` is `pdserve router`."""

import sys

from pdserve.cli import main

sys.exit(main(["router", *sys.argv[1:]]))
