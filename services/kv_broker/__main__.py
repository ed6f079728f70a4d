"""`python -m services.kv_broker` is `pdserve kv-broker`."""

import sys

from pdserve.cli import main

sys.exit(main(["kv-broker", *sys.argv[1:]]))
