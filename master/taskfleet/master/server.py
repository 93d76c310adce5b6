"""Builds and runs the master: gRPC server, store, reaper, shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from types import FrameType
from typing import Any

import grpc

from taskfleet.common.channel import SERVER_OPTIONS
from taskfleet.common.config import MasterConfig
from taskfleet.common.errors import ConfigError
from taskfleet.master.auth import TokenInterceptor
from taskfleet.master.manager import ManagerEndpoint
from taskfleet.master.runtime import MasterRuntime
from taskfleet.master.store import open_store
from taskfleet.master.task_service import TaskService
from taskfleet.master.worker_service import WorkerService
from taskfleet.v1 import tasks_pb2_grpc, worker_pb2_grpc

log = logging.getLogger("taskfleet.master")

EXIT_FORCED = 130  # a second SIGTERM/SIGINT: stop at once
RPC_THREADS = 256  # each worker stream and each WaitTasks call holds one


class Master:
    """A running master; ``start`` binds, ``stop`` drains and closes the store."""

    def __init__(self, config: MasterConfig) -> None:
        self.config = config
        self.runtime = MasterRuntime(config, open_store(config.store))
        interceptors: list[grpc.ServerInterceptor[Any, Any]] = (
            [TokenInterceptor(config.token)] if config.token else []
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="rpc"),
            options=SERVER_OPTIONS,
            interceptors=interceptors,
        )
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(TaskService(self.runtime), self._server)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerService(self.runtime), self._server
        )
        self._reaper = threading.Thread(target=self.runtime.run_reaper, name="reaper", daemon=True)
        self._manager = ManagerEndpoint(self.runtime) if config.manager_listen else None
        self.port = 0

    def start(self) -> None:
        try:  # grpc raises RuntimeError or returns 0, depending on the failure
            self.port = self._server.add_insecure_port(self.config.listen)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise ConfigError(f"--listen: cannot bind {self.config.listen} (in use?)")
        if self._manager is not None:
            self._manager.start()
        self._server.start()
        self._reaper.start()
        log.info("master listening on %s (store %s)", self.config.listen, self.config.store)

    def stop(self) -> None:
        """Stop handing out work, let open calls finish within the grace, close the store."""
        self.runtime.stopping.set()
        self.runtime.sessions.close_all()
        self.runtime.hub.wake_all()
        self._server.stop(self.config.grace_s).wait()
        self._reaper.join()
        if self._manager is not None:
            self._manager.stop()
        self.runtime.store.close()
        log.info("master stopped")

    def wait(self) -> None:
        self._server.wait_for_termination()


def run_master(config: MasterConfig) -> int:
    """Run until SIGTERM/SIGINT; a second signal exits at once with EXIT_FORCED."""
    master = Master(config)
    master.start()
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop_requested.is_set():
            log.warning("second signal: exiting at once")
            os._exit(EXIT_FORCED)
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"taskfleet master listening on {config.listen}", flush=True)
    stop_requested.wait()
    master.stop()
    return 0
