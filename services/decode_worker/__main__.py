"""`python -m services.decode_worker` is `pdserve decode-worker`."""

import sys

from pdserve.cli import main

sys.exit(main(["decode-worker", *sys.argv[1:]]))
