"""Names for processes that others list: masters and workers."""

from __future__ import annotations

import os
import secrets
import socket


def process_name() -> str:
    """``HOST-PID-XXXX``: who and where at a glance, unique across restarts (the
    random suffix tells a restarted process from its predecessor with a reused pid)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
