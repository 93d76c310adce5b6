"""Imported by the command line before anything imports grpc.

gRPC core reads ``GRPC_VERBOSITY`` once, when grpc is imported, and by default
prints INFO lines on stderr (one per failed TLS handshake, for instance) around
taskfleet's own one-line errors. A ``GRPC_VERBOSITY`` the user sets still wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
