"""``python -m taskfleet.worker``: the same as ``taskfleet worker``."""

import sys

from taskfleet.common.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
