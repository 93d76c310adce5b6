"""Builds and runs the master: gRPC server, store, reaper, shutdown."""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
from typing import TYPE_CHECKING

import grpc

from taskfleet.common.channel import SERVER_OPTIONS
from taskfleet.common.config import MasterConfig
from taskfleet.common.errors import ConfigError, StoreUnavailable, StoreUnusable
from taskfleet.common.heap import settle_after_startup
from taskfleet.common.model import TaskState
from taskfleet.common.shutdown import on_stop_signals_async
from taskfleet.master.auth import TokenInterceptor
from taskfleet.master.health import Health
from taskfleet.master.manager import ManagerEndpoint
from taskfleet.master.metrics import MasterMetrics
from taskfleet.master.rpc import DecodeRequests, ServerInterceptor
from taskfleet.master.runtime import MasterRuntime
from taskfleet.master.store import StorePolicy, open_store, redacted
from taskfleet.master.task_service import TaskService
from taskfleet.master.worker_service import WorkerService
from taskfleet.v1 import tasks_pb2_grpc, worker_pb2_grpc

if TYPE_CHECKING:
    from taskfleet.master.dashboard.app import Dashboard

log = logging.getLogger("taskfleet.master")

DRAIN_POLL_S = 0.1
# gRPC core queues calls that arrive faster than the loop takes them and, past
# 1,000 queued (its default), cancels some: a burst of reconnecting workers or
# of new waits would lose calls. --max-streams is the limit that counts.
PENDING_CALLS = 20_000
OPEN_FILES = 65_536  # the soft limit asked for when the hard one is unlimited


def _dashboard(runtime: MasterRuntime, config: MasterConfig) -> Dashboard:
    """The dashboard, imported only when served: aiohttp is most of the master's
    import time, which every start (and every test) would otherwise pay."""
    from taskfleet.master.dashboard.app import Dashboard

    return Dashboard(runtime, config)


class Master:
    """A running master; ``start`` binds, ``stop`` drains and closes the store.

    Built and run on one asyncio loop: every RPC is a task on it, so an open
    stream (a worker, a WaitTasks) holds no thread."""

    def __init__(self, config: MasterConfig) -> None:
        self.config = config
        self.runtime = MasterRuntime(
            config,
            open_store(
                config.store,
                StorePolicy(config.result_ttl_s, config.max_lost_leases),
                poll_only=config.poll_only,
            ),
            metrics=MasterMetrics(bool(config.metrics_listen or config.http_listen)),
        )
        interceptors: list[ServerInterceptor] = (
            [TokenInterceptor(config.token, config.worker_token)]
            if config.token or config.worker_token
            else []
        )
        interceptors.append(DecodeRequests())  # innermost: after the token check
        options = [
            *SERVER_OPTIONS,
            ("grpc.server.max_pending_requests", PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
        ]
        self._server = grpc.aio.server(options=options, interceptors=interceptors)
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(TaskService(self.runtime), self._server)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerService(self.runtime), self._server
        )
        self._health = Health(self._server)
        # A damaged store file: NOT_SERVING for good, as when draining. A lost
        # database: NOT_SERVING until it answers again.
        self.runtime.store.on_unusable = self._store_unusable
        self.runtime.store.on_unavailable = self.runtime.store_watch.trouble
        self._reaper = threading.Thread(target=self.runtime.run_reaper, name="reaper", daemon=True)
        self._manager = ManagerEndpoint(self.runtime) if config.manager_listen else None
        self._dashboard = _dashboard(self.runtime, config) if config.http_listen else None
        self._due: asyncio.Task[None] | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.port = 0

    def _store_unusable(self) -> None:
        """NOT_SERVING, handed to the loop from the thread whose store call found
        the damage."""
        bridge = self.runtime.bridge
        bridge.call(lambda: bridge.spawn(self._health.draining()))

    async def start(self) -> None:
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
        self._serve_metrics()
        if self._dashboard is not None:
            await self._dashboard.start()
        if self._manager is not None:
            self._manager.start()
        if self.runtime.cluster is not None:
            await asyncio.to_thread(self.runtime.cluster.start)
        await self._health.serving()
        await self._server.start()
        self._reaper.start()
        self._due = asyncio.create_task(self.runtime.due.run(), name="due-timer")
        self._scheduler = asyncio.create_task(self.runtime.scheduler.run(), name="scheduler")
        self._watch = asyncio.create_task(
            self.runtime.store_watch.run(self._health, redacted(self.config.store)),
            name="store-watch",
        )
        log.info(
            "master listening on %s (store %s, %s)",
            self.config.listen,
            redacted(self.config.store),
            _security_text(self.config),
        )

    async def stop(self) -> None:
        """Stop handing out work, let open calls finish within the grace, close the store.

        What blocks (joining threads, closing the store) runs off the loop, so a
        second signal is still heard."""
        rt = self.runtime
        rt.stopping.set()
        if self._scheduler is not None:
            self._scheduler.cancel()  # a stopping master fires no more ticks; the others do
        await self._health.draining()
        await self._drain()
        rt.sessions.close_all()
        rt.hub.wake_all()
        if self._dashboard is not None:
            await self._dashboard.stop()
        await self._server.stop(self.config.grace_s)
        for task in (self._due, self._watch):
            if task is not None:
                task.cancel()
        await asyncio.to_thread(self._reaper.join)
        if self._manager is not None:
            await asyncio.to_thread(self._manager.stop)
        if rt.cluster is not None:
            await asyncio.to_thread(rt.cluster.stop)
        await asyncio.to_thread(rt.metrics.close)  # before the store its scrapes read
        await asyncio.to_thread(rt.bridge.close)
        await asyncio.to_thread(rt.store.close)
        log.info("master stopped")

    async def _drain(self) -> None:
        """Up to ``drain_s``, while health checks already say NOT_SERVING and no new
        work is handed out, let connected workers finish and report what runs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_s
        while loop.time() < deadline and await self.runtime.bridge.producers.run(
            self._work_running
        ):
            await asyncio.sleep(DRAIN_POLL_S)

    def _work_running(self) -> bool:
        """Whether any task is RUNNING while a worker is connected. The store is the
        authority (a session's own count lags behind its heartbeats), and the
        reaper has stopped, so lapsed leases are returned here."""
        if not self.runtime.sessions.infos():
            return False
        try:
            self.runtime.lifecycle.expire()
            return any(q.counts.get(TaskState.RUNNING, 0) for q in self.runtime.store.stats())
        except (StoreUnusable, StoreUnavailable):
            return False  # nothing to wait for: no result could be recorded

    def _serve_metrics(self) -> None:
        """Prometheus metrics, read at --metrics-listen and --http-listen alike."""
        metrics = self.runtime.metrics
        metrics.watch(self.runtime.queue_stats, self.runtime.sessions.infos)
        if not self.config.metrics_listen:
            return
        try:
            metrics.serve(self.config.metrics_listen)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-listen: cannot bind {self.config.metrics_listen} ({exc.strerror})"
            ) from None


def run_master(config: MasterConfig) -> int:
    """Run until SIGTERM/SIGINT; a second signal exits at once with EXIT_FORCED."""
    return asyncio.run(_serve(config))


async def _serve(config: MasterConfig) -> int:
    _raise_open_files_limit()
    master = Master(config)
    await master.start()
    settle_after_startup()
    stop_requested = asyncio.Event()

    on_stop_signals_async(asyncio.get_running_loop(), stop_requested, log, "shutting down")
    print(f"taskfleet master listening on {config.listen}", flush=True)
    await stop_requested.wait()
    await master.stop()
    return 0


def _raise_open_files_limit() -> None:
    """Every worker and every client connection holds a file descriptor, and the
    usual soft limit of 1,024 would stop a master that holds streams cheaply
    well short of ``--max-streams``; the hard limit is the operator's word."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d: %s", soft, exc)


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
