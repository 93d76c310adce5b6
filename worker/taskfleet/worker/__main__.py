"""``python -m taskfleet.worker``: the same as ``taskfleet worker``; also the
entry point of the single-file worker ``dist/taskfleet-worker.pyz``."""

import sys

from taskfleet.common.cli import main as cli_main


def main() -> int:
    """Run ``taskfleet worker`` with this process's arguments."""
    return cli_main(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
