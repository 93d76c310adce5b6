"""Builds and runs the master: gRPC server, store, reaper, shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures
from types import FrameType
from typing import Any

import grpc

from taskfleet.common.channel import SERVER_OPTIONS
from taskfleet.common.config import MasterConfig
from taskfleet.common.errors import ConfigError, StoreUnusable
from taskfleet.common.model import TaskState
from taskfleet.master.auth import TokenInterceptor
from taskfleet.master.health import Health
from taskfleet.master.manager import ManagerEndpoint
from taskfleet.master.metrics import MasterMetrics
from taskfleet.master.rpc import DecodeRequests
from taskfleet.master.runtime import MasterRuntime
from taskfleet.master.store import StorePolicy, open_store
from taskfleet.master.task_service import TaskService
from taskfleet.master.worker_service import WorkerService
from taskfleet.v1 import tasks_pb2_grpc, worker_pb2_grpc

log = logging.getLogger("taskfleet.master")

EXIT_FORCED = 130  # a second SIGTERM/SIGINT: stop at once
RPC_THREADS = 256  # each worker stream and each WaitTasks call holds one
DRAIN_POLL_S = 0.1


class Master:
    """A running master; ``start`` binds, ``stop`` drains and closes the store."""

    def __init__(self, config: MasterConfig) -> None:
        self.config = config
        self.runtime = MasterRuntime(
            config,
            open_store(config.store, StorePolicy(config.result_ttl_s, config.max_lost_leases)),
            metrics=MasterMetrics(bool(config.metrics_listen)),
        )
        interceptors: list[grpc.ServerInterceptor[Any, Any]] = (
            [TokenInterceptor(config.token, config.worker_token)]
            if config.token or config.worker_token
            else []
        )
        interceptors.append(DecodeRequests())  # innermost: after the token check
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="rpc"),
            options=SERVER_OPTIONS,
            interceptors=interceptors,
        )
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(TaskService(self.runtime), self._server)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerService(self.runtime), self._server
        )
        self._health = Health(self._server)
        # A damaged store file: NOT_SERVING for good, as when draining.
        self.runtime.store.on_unusable = self._health.draining
        self._reaper = threading.Thread(target=self.runtime.run_reaper, name="reaper", daemon=True)
        self._manager = ManagerEndpoint(self.runtime) if config.manager_listen else None
        self.port = 0

    def start(self) -> None:
        try:  # grpc raises RuntimeError or returns 0, depending on the failure
            if self.config.tls is None:
                self.port = self._server.add_insecure_port(self.config.listen)
            else:
                self.port = self._server.add_secure_port(
                    self.config.listen, self.config.tls.credentials()
                )
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise ConfigError(f"--listen: cannot bind {self.config.listen} (in use?)")
        if self.config.metrics_listen:
            self._serve_metrics()
        if self._manager is not None:
            self._manager.start()
        self._server.start()
        self._reaper.start()
        log.info(
            "master listening on %s (store %s, %s)",
            self.config.listen,
            self.config.store,
            _security_text(self.config),
        )

    def stop(self) -> None:
        """Stop handing out work, let open calls finish within the grace, close the store."""
        self.runtime.stopping.set()
        self._health.draining()
        self._drain()
        self.runtime.sessions.close_all()
        self.runtime.hub.wake_all()
        self._server.stop(self.config.grace_s).wait()
        self._reaper.join()
        if self._manager is not None:
            self._manager.stop()
        self.runtime.metrics.close()  # before the store its scrapes read
        self.runtime.store.close()
        log.info("master stopped")

    def _drain(self) -> None:
        """Up to ``drain_s``, while health checks already say NOT_SERVING and no new
        work is handed out, let connected workers finish and report what runs."""
        deadline = time.monotonic() + self.config.drain_s
        while time.monotonic() < deadline and self._work_running():
            time.sleep(DRAIN_POLL_S)

    def _work_running(self) -> bool:
        """Whether any task is RUNNING while a worker is connected. The store is the
        authority (a session's own count lags behind its heartbeats), and the
        reaper has stopped, so lapsed leases are returned here."""
        if not self.runtime.sessions.infos():
            return False
        try:
            self.runtime.reap_expired_leases()
            return any(q.counts.get(TaskState.RUNNING, 0) for q in self.runtime.store.stats())
        except StoreUnusable:
            return False  # nothing to wait for: no result could be recorded

    def _serve_metrics(self) -> None:
        metrics = self.runtime.metrics
        metrics.watch(self.runtime.store.stats, self.runtime.sessions.infos)
        try:
            metrics.serve(self.config.metrics_listen)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-listen: cannot bind {self.config.metrics_listen} ({exc.strerror})"
            ) from None

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


def _security_text(config: MasterConfig) -> str:
    """How callers are checked, for the start-up log line; never the tokens."""
    transport = "plaintext" if config.tls is None else "TLS"
    if config.tls is not None and config.tls.client_ca:
        transport = "mTLS"
    parts = [transport]
    if config.token:
        parts.append("token")
    if config.worker_token:
        parts.append("worker token")
    return " + ".join(parts)
