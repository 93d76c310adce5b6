"""The master's classic ``multiprocessing.managers`` endpoint (``--manager-listen``).

It serves ``get_task_queue`` and ``get_result_queue`` exactly as the classic
``task_master.py`` registers them on a ``BaseManager``, so programs written
for that pattern connect unchanged; the queues are bridged to the store (see
``manager_bridge``). The endpoint unpickles what authenticated clients send,
so the authkey is a password; it binds only the address it is given.

``BaseManager.get_server()`` builds the server; the accept loop is ours, so
that each connection is served inside the bridge (which must see it close)
and so that ``stop`` can end it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from multiprocessing.connection import Connection, Listener
from multiprocessing.managers import BaseManager
from typing import Any, Protocol, cast

from taskfleet.common.addresses import host_port, is_loopback
from taskfleet.common.errors import ConfigError
from taskfleet.master.manager_bridge import ManagerBridge
from taskfleet.master.runtime import MasterRuntime

log = logging.getLogger("taskfleet.master.manager")

QUEUE_METHODS = ("put", "get", "put_nowait", "get_nowait", "qsize", "empty", "full")


class TaskQueue:
    """What ``get_task_queue()`` serves: a put submits a task, a get takes one."""

    def __init__(self, bridge: ManagerBridge) -> None:
        self._bridge = bridge

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        # Never full, so there is nothing for block and timeout to wait for.
        self._bridge.submit(item)

    def put_nowait(self, item: Any) -> None:
        self._bridge.submit(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self._bridge.take(block, timeout)

    def get_nowait(self) -> Any:
        return self._bridge.take(False, None)

    def qsize(self) -> int:
        return self._bridge.pending()

    def empty(self) -> bool:
        return self._bridge.pending() == 0

    def full(self) -> bool:
        return False


class ResultQueue:
    """What ``get_result_queue()`` serves: a put records the result of the task the
    connection took, a get returns the results of tasks manager clients put."""

    def __init__(self, bridge: ManagerBridge) -> None:
        self._bridge = bridge

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._bridge.give_result(item)

    def put_nowait(self, item: Any) -> None:
        self._bridge.give_result(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self._bridge.take_result(block, timeout)

    def get_nowait(self) -> Any:
        return self._bridge.take_result(False, None)

    def qsize(self) -> int:
        return self._bridge.results.qsize()

    def empty(self) -> bool:
        return self._bridge.results.qsize() == 0

    def full(self) -> bool:
        return False


class _ServerInternals(Protocol):
    """The parts of ``multiprocessing.managers.Server`` we use that typeshed omits."""

    listener: Listener
    stop_event: threading.Event
    public: list[str]

    def handle_request(self, conn: Any) -> None: ...


class ManagerEndpoint:
    """The endpoint of one master: ``start`` binds and serves, ``stop`` ends it."""

    def __init__(self, runtime: MasterRuntime) -> None:
        self.listen = runtime.config.manager_listen
        self._authkey = runtime.config.authkey.encode()
        self._bridge = ManagerBridge(runtime)
        self._server: _ServerInternals | None = None
        self._stopping = threading.Event()
        self._accepter = threading.Thread(
            target=self._accept_forever, name="manager-accept", daemon=True
        )

    def start(self) -> None:
        manager_class = _manager_class(TaskQueue(self._bridge), ResultQueue(self._bridge))
        manager = manager_class(address=host_port(self.listen), authkey=self._authkey)
        try:
            server = cast(_ServerInternals, manager.get_server())
        except OSError as exc:
            raise ConfigError(f"--manager-listen: cannot bind {self.listen}: {exc}") from None
        server.stop_event = threading.Event()  # read by serve_client; serve_forever would set it
        # A client must not be able to stop the master's endpoint.
        server.public = [name for name in server.public if name != "shutdown"]
        self._server = server
        self._bridge.start()
        self._accepter.start()
        log.info(
            "manager endpoint listening on %s: task %s, queue %s",
            self.listen,
            self._bridge.task_name,
            self._bridge.queue,
        )
        if not is_loopback(self.listen):
            log.warning(
                "manager endpoint %s is reachable from other machines: its traffic is "
                "unencrypted pickle, and anyone with the authkey can run code in the master",
                self.listen,
            )

    def stop(self) -> None:
        """Stop accepting, end served connections after their current call, and give
        back the tasks manager clients hold."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.stop_event.set()
        _wake_accept(server.listener.address)
        self._accepter.join(timeout=5.0)
        server.listener.close()
        self._bridge.close()

    def _accept_forever(self) -> None:
        assert self._server is not None
        server = self._server
        while not self._stopping.is_set():
            try:
                conn: Connection[Any, Any] = server.listener.accept()
            except OSError as exc:
                if not self._stopping.is_set():
                    log.warning("manager endpoint: accept failed (%s)", exc)
                    self._stopping.wait(0.1)
                continue
            if self._stopping.is_set():
                conn.close()
                return
            peer = _peer(server.listener.last_accepted)
            threading.Thread(
                target=self._bridge.serve,
                args=(conn, peer, server.handle_request),
                name=f"manager-client-{peer}",
                daemon=True,
            ).start()


def _manager_class(task_queue: TaskQueue, result_queue: ResultQueue) -> type[BaseManager]:
    class QueueManager(BaseManager):
        """The two queues of the classic pattern, registered as task_master.py does."""

    QueueManager.register("get_task_queue", callable=lambda: task_queue, exposed=QUEUE_METHODS)
    QueueManager.register("get_result_queue", callable=lambda: result_queue, exposed=QUEUE_METHODS)
    return QueueManager


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


def _wake_accept(address: Any) -> None:
    """Unblock the accept loop with a connection of our own: closing a listening
    socket does not wake a thread blocked in accept() on every platform."""
    host, port = str(address[0]), int(address[1])
    if host in ("", "0.0.0.0", "::"):
        host = "::1" if host == "::" else "127.0.0.1"
    with contextlib.suppress(OSError):
        socket.create_connection((host, port), timeout=1.0).close()
