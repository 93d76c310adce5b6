"""The client that ``@task`` functions submit through when none is given.

From the same variables the CLI reads (``TASKFLEET_MASTER``, ``TASKFLEET_TOKEN``,
``TASKFLEET_TLS_CA``, ``TASKFLEET_TLS_CERT``, ``TASKFLEET_TLS_KEY``), made on
first use; or from one explicit ``configure(...)`` call at start-up.
"""

from __future__ import annotations

import os
import threading

from taskfleet.common.client import Client
from taskfleet.common.config import DEFAULT_MASTER

_lock = threading.Lock()
_client: Client | None = None


def configure(
    master: str | None = None,
    *,
    token: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> Client:
    """Make the default client: each argument left out comes from its variable.
    A client configured before is closed."""
    global _client
    client = _made(master, token, tls_ca, tls_cert, tls_key)
    with _lock:
        previous, _client = _client, client
    if previous is not None:
        previous.close()
    return client


def default_client() -> Client:
    """The configured client, or one made from the environment on first use."""
    global _client
    with _lock:
        if _client is None:
            _client = _made(None, None, None, None, None)
        return _client


def _made(
    master: str | None,
    token: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> Client:
    def setting(value: str | None, name: str, default: str = "") -> str:
        return value if value is not None else os.environ.get(f"TASKFLEET_{name}", default)

    return Client(
        setting(master, "MASTER", DEFAULT_MASTER),
        token=setting(token, "TOKEN"),
        tls_ca=setting(tls_ca, "TLS_CA"),
        tls_cert=setting(tls_cert, "TLS_CERT"),
        tls_key=setting(tls_key, "TLS_KEY"),
    )
