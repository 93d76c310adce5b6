"""Configuration: one frozen dataclass per process (master, worker).

They are filled from flags and ``TASKFLEET_*`` environment variables by
``config_flags``; this module only says what a process can be told.
"""

from __future__ import annotations

import os
from dataclasses import field

from taskfleet.common.frozen import frozen
from taskfleet.common.store_urls import redacted
from taskfleet.common.tls import ClientTls, ServerTls

DEFAULT_MASTER = "127.0.0.1:50051"
MiB = 1024 * 1024
# A task's result is stored by the master and sent whole to whoever waits on
# it; 16 MiB is a quarter of the gRPC message limit, so a result, its task's
# payload and the rest of the Task message always fit in one message. Larger
# results belong on shared storage, passed by path or URL like large payloads.
DEFAULT_MAX_RESULT_BYTES = 16 * MiB


@frozen
class MasterConfig:
    """How a master runs.

    ``lease_s`` is how long a worker's lease lasts without a heartbeat; workers
    heartbeat every ``heartbeat_s``. A SIGKILLed worker's tasks are handed out
    again within about ``lease_s + heartbeat_s``.
    """

    listen: str = DEFAULT_MASTER
    store: str = "sqlite:./taskfleet.db"
    token: str = ""
    # Set: WorkerService calls need this token and TaskService calls need ``token``,
    # so a producer cannot pose as a worker.
    worker_token: str = ""
    tls: ServerTls | None = None  # None: plaintext
    max_payload_bytes: int = MiB  # payload plus metadata keys and values
    # Results (or error message plus traceback) from workers that do not keep
    # to this limit themselves end their task FAILED with ResultTooLarge.
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    lease_s: float = 6.0
    heartbeat_s: float = 2.0
    grace_s: float = 10.0  # how long a stopping master lets open calls finish
    # How long a stopping master, already reporting NOT_SERVING to health checks,
    # waits for connected workers to finish and report their running tasks.
    drain_s: float = 0.0
    # Open streaming calls (WaitTasks, WaitTasksBatched, SubmitAndWait and worker
    # streams together) beyond this get RESOURCE_EXHAUSTED; unary calls never do.
    max_streams: int = 10_000
    # Task name -> tasks per second it is leased at most, across all masters.
    rate_limits: dict[str, float] = field(default_factory=dict)
    metrics_listen: str = ""  # HOST:PORT serving Prometheus /metrics; off while ""
    # HOST:PORT serving the web dashboard, its JSON API and /metrics; off while "".
    http_listen: str = ""
    # May view the dashboard but not act (cancel, retry, purge); --token may do both.
    dashboard_read_token: str = ""
    insecure: bool = False  # allow a non-loopback listen address without a token or TLS
    log_level: str = "INFO"
    log_format: str = "text"
    # The classic multiprocessing.managers endpoint; off while manager_listen is "".
    manager_listen: str = ""
    authkey: str = ""  # a password: whoever holds it can make the master unpickle data
    manager_task: str = ""  # the task that objects put by manager clients become
    manager_queue: str = "default"
    manager_lease_s: float = 60.0  # how long a manager client may hold a task it took
    # A finished task (and its idempotency key) is deleted this long after it
    # ended, unless its spec names its own TTL; 0 keeps finished tasks forever.
    result_ttl_s: float = 86_400.0
    # How many times a task's lease may lapse before the next lapse ends it
    # FAILED WorkerLost: a task that kills its worker must not run forever.
    max_lost_leases: int = 3
    # Masters sharing a PostgreSQL store learn of each other's changes by polling
    # alone, without LISTEN/NOTIFY or prepared statements: for PgBouncer in
    # transaction mode, which can hold neither.
    poll_only: bool = False

    def __repr__(self) -> str:  # never show the token, nor the store's password
        return f"MasterConfig(listen={self.listen!r}, store={redacted(self.store)!r})"


@frozen
class WorkerConfig:
    """How a worker runs. ``concurrency`` 0 means one slot per CPU core."""

    master: str = DEFAULT_MASTER
    tasks: tuple[str, ...] = ()
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 0
    pool: str = "process"
    # Most tasks held beyond one per slot; the worker holds as many as its pool
    # finishes in four round trips to the master (credit.py), so long tasks get
    # just one.
    prefetch: int = 1000
    token: str = ""  # the master's worker token when it has one, else its token
    tls: ClientTls | None = None  # None: plaintext
    grace_s: float = 30.0  # how long a draining worker lets running tasks finish
    # A larger result ends its task FAILED with ResultTooLarge; a longer error
    # message plus traceback is cut short.
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    metrics_listen: str = ""  # HOST:PORT serving Prometheus /metrics; off while ""
    log_level: str = "INFO"
    log_format: str = "text"
    transport: str = "grpc"  # or "manager": serve a plain multiprocessing.managers master
    authkey: str = ""  # the manager's authkey (--transport manager)
    manager_task: str = ""  # the task each item taken from the manager runs

    @property
    def slots(self) -> int:
        return self.concurrency or os.cpu_count() or 1

    def __repr__(self) -> str:  # never show the token
        return f"WorkerConfig(master={self.master!r}, tasks={self.tasks!r}, pool={self.pool!r})"
