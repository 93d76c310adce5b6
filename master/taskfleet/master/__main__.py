"""``python -m taskfleet.master``: the same as ``taskfleet master``."""

import sys

from taskfleet.common.cli import main

sys.exit(main(["master", *sys.argv[1:]]))
