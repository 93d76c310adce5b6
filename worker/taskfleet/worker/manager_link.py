"""A client for one queue of a plain ``multiprocessing.managers`` server.

It speaks BaseManager's wire protocol itself (authenticate, ``create`` the
registered object, ``accept_connection``, then ``(id, method, args, kwargs)``
requests) rather than use BaseManager proxies, because a proxy keeps one
connection per thread and manager address and never drops it once the
manager has gone: a worker that must reconnect needs fresh connections it
owns. Every reply is awaited with a deadline, so a manager that vanishes
without closing the connection is noticed too.
"""

from __future__ import annotations

import contextlib
import socket
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

from taskfleet.common.errors import TaskfleetError

CONNECT_TIMEOUT_S = 10.0
REPLY_MARGIN_S = 10.0  # allowed on top of any wait the call itself asks the manager for


class ManagerRefused(TaskfleetError):
    """The manager answered a request with an error it raised while serving it."""


class ManagerLink:
    """One remote queue, registered on the manager as ``typeid``, over a connection
    of its own. Raises OSError or EOFError when the manager is unreachable or goes
    away, ``multiprocessing.AuthenticationError`` for a wrong key."""

    def __init__(self, address: tuple[str, int], authkey: bytes, typeid: str) -> None:
        self._address = address
        self._authkey = authkey
        ident, _exposed = self._request("create", typeid)
        self._ident: str = ident
        self._conn = self._open()
        try:
            _call(self._conn, None, "accept_connection", ("taskfleet-worker",), {}, REPLY_MARGIN_S)
        except BaseException:
            self._conn.close()
            raise

    def get(self, timeout_s: float) -> Any:
        """The next item, waiting up to ``timeout_s`` on the manager; raises queue.Empty."""
        return self.call("get", (True, timeout_s), wait_s=timeout_s)

    def put(self, item: Any, timeout_s: float) -> None:
        """Put ``item``, waiting up to ``timeout_s`` for room; raises queue.Full."""
        self.call("put", (item, True, timeout_s), wait_s=timeout_s)

    def call(self, method: str, args: tuple[Any, ...] = (), *, wait_s: float = 0.0) -> Any:
        return _call(self._conn, self._ident, method, args, {}, wait_s + REPLY_MARGIN_S)

    def close(self) -> None:
        self._conn.close()
        with contextlib.suppress(OSError, EOFError, TaskfleetError):
            self._request("decref", self._ident)  # fails only if the manager is gone

    def __enter__(self) -> ManagerLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> Connection[Any, Any]:
        sock = socket.create_connection(self._address, timeout=CONNECT_TIMEOUT_S)
        sock.settimeout(None)
        conn: Connection[Any, Any] = Connection(sock.detach())
        try:
            answer_challenge(conn, self._authkey)
            deliver_challenge(conn, self._authkey)
        except BaseException:
            conn.close()
            raise
        return conn

    def _request(self, method: str, *args: Any) -> Any:
        """One request on a connection of its own, as the manager serves them."""
        conn = self._open()
        try:
            return _call(conn, None, method, args, {}, REPLY_MARGIN_S)
        finally:
            conn.close()


def _call(
    conn: Connection[Any, Any],
    ident: str | None,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    reply_timeout_s: float,
) -> Any:
    conn.send((ident, method, args, kwargs))
    if not conn.poll(reply_timeout_s):
        raise TimeoutError(f"the manager did not answer {method} within {reply_timeout_s:g} s")
    kind, result = conn.recv()
    if kind == "#RETURN":
        return result
    if kind == "#ERROR" and isinstance(result, BaseException):
        raise result
    raise ManagerRefused(f"the manager failed {method}: {result}")
