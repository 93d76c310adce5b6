"""Configuration: one frozen dataclass per process, filled from flags and
``TASKFLEET_*`` environment variables in this one module.

Every flag ``--some-flag`` also reads ``TASKFLEET_SOME_FLAG``; a flag given on
the command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskfleet.common.batching import MAX_ITEM_BYTES
from taskfleet.common.errors import ConfigError
from taskfleet.common.model import MAX_DURATION_S, MAX_UNIX_S
from taskfleet.common.tls import ClientTls, ServerTls, client_tls, server_tls

DEFAULT_MASTER = "127.0.0.1:50051"
MiB = 1024 * 1024
# A task's result is stored by the master and sent whole to whoever waits on
# it; 16 MiB is a quarter of the gRPC message limit, so a result, its task's
# payload and the rest of the Task message always fit in one message. Larger
# results belong on shared storage, passed by path or URL like large payloads.
DEFAULT_MAX_RESULT_BYTES = 16 * MiB


@dataclass(frozen=True, slots=True)
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
    metrics_listen: str = ""  # HOST:PORT serving Prometheus /metrics; off while ""
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

    def __repr__(self) -> str:  # never show the token
        return f"MasterConfig(listen={self.listen!r}, store={self.store!r})"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a worker runs. ``concurrency`` 0 means one slot per CPU core."""

    master: str = DEFAULT_MASTER
    tasks: tuple[str, ...] = ()
    queues: tuple[str, ...] = ("default",)
    concurrency: int = 0
    pool: str = "process"
    # Most tasks held beyond one per slot; the worker holds as many as its pool
    # finishes in one round trip to the master, so long tasks get just one.
    prefetch: int = 100
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


def env_name(flag: str) -> str:
    """The environment variable a flag reads: ``--some-flag`` -> ``TASKFLEET_SOME_FLAG``."""
    return "TASKFLEET_" + flag.lstrip("-").replace("-", "_").upper()


class _AppendOverEnv(argparse.Action):
    """``action="append"`` whose items on the command line replace the one item
    from the environment instead of adding to it: the flag wins."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        items = getattr(namespace, self.dest)
        if not isinstance(items, list) or items is self.default:
            items = []
        setattr(namespace, self.dest, [*items, values])


class EnvDefaultsParser(argparse.ArgumentParser):
    """argparse that reads each flag's default from ``TASKFLEET_<FLAG>`` and
    reports bad input as one line instead of usage plus traceback.

    A value from the environment goes through the flag's type like one typed on
    the command line, and is checked only when its command runs.
    """

    def add_flag(
        self, flag: str, *, default: Any = None, env: str = "", **kwargs: Any
    ) -> argparse.Action:
        """Add ``flag``, reading ``env`` (by default ``TASKFLEET_<FLAG>``) for its default.

        ``env`` is for a flag whose usual variable means something else for
        another command."""
        env = env or env_name(flag)
        value = os.environ.get(env)
        if kwargs.get("action") == "store_true":
            default = default if value is None else value.lower() in ("1", "true", "yes", "on")
        elif kwargs.get("action") == "append":
            kwargs["action"] = _AppendOverEnv
            # A string default is converted by the flag's type at the end of parsing;
            # parse_known_args then makes it the list's one item.
            default = value if value is not None else (default if default is not None else [])
        elif value is not None:
            default = value
        help_text = kwargs.pop("help", "")
        action = self.add_argument(flag, default=default, help=f"{help_text} [env {env}]", **kwargs)
        action.env = env  # type: ignore[attr-defined]  # for the test that every flag has one
        return action

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        for action in self._actions:
            if isinstance(action, _AppendOverEnv):
                items = getattr(parsed, action.dest, [])
                if not isinstance(items, list):  # the one item from the environment
                    setattr(parsed, action.dest, [items])
        return parsed, rest

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_float(text: str) -> float:
    """Seconds above 0 that a protobuf Duration can hold (no inf, no nan)."""
    return _seconds(text, high=MAX_DURATION_S, allow_zero=False)


def non_negative_float(text: str) -> float:
    """Seconds from 0 that a protobuf Duration can hold (no inf, no nan)."""
    return _seconds(text, high=MAX_DURATION_S, allow_zero=True)


def delay_float(text: str) -> float:
    """Seconds above 0 from now until at most 9999-12-31, the end of a protobuf Timestamp."""
    return _seconds(text, high=MAX_UNIX_S - time.time(), allow_zero=False)


def _seconds(text: str, *, high: float, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # nan compares false with everything, so it fails both checks.
    if not ((value >= 0 if allow_zero else value > 0) and value <= high):
        low = "from 0" if allow_zero else "more than 0"
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds {low} and at most {high:.0f}, got {text!r}"
        )
    return value


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """A flag type for integers from ``low`` to ``high`` (a protobuf field's range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {low} to {high}, got {text!r}"
            )
        return value

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def utf8_text(text: str) -> str:
    """Text that can travel in a protobuf string: the command line and the
    environment can carry bytes that are not UTF-8 (Python keeps them as
    surrogates), and protobuf refuses those with an exception."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"must be UTF-8 text, got {text!r}") from None
    return text


def item_bytes(text: str) -> int:
    """A size limit on one payload or result: one must fit in a gRPC message."""
    value = int(text)
    if not 0 <= value <= MAX_ITEM_BYTES:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_ITEM_BYTES}, got {text}")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_master_flags(parser: EnvDefaultsParser) -> None:
    d = MasterConfig()
    parser.add_flag("--listen", default=d.listen, help="HOST:PORT for the gRPC API")
    parser.add_flag("--store", default=d.store, help="sqlite:PATH (durable) or memory (volatile)")
    parser.add_flag("--token", default=d.token, help="require this bearer token on every call")
    parser.add_flag(
        "--worker-token",
        default=d.worker_token,
        help="a separate bearer token for workers; then --token is for producers only",
    )
    parser.add_flag("--tls-cert", default="", help="serve TLS with this certificate (PEM)")
    parser.add_flag("--tls-key", default="", help="the private key of --tls-cert (PEM)")
    parser.add_flag(
        "--tls-client-ca",
        default="",
        help="require client certificates signed by this CA (PEM): mutual TLS",
    )
    parser.add_flag(
        "--max-payload-bytes",
        default=d.max_payload_bytes,
        type=item_bytes,
        help="refuse tasks whose payload plus metadata is larger than this",
    )
    _add_max_result_flag(parser, d.max_result_bytes)
    parser.add_flag("--lease-s", default=d.lease_s, type=positive_float, help="lease length")
    parser.add_flag(
        "--heartbeat-s",
        default=d.heartbeat_s,
        type=positive_float,
        help="worker heartbeat interval",
    )
    parser.add_flag("--grace-s", default=d.grace_s, type=positive_float, help="shutdown grace")
    parser.add_flag(
        "--result-ttl-s",
        default=d.result_ttl_s,
        type=non_negative_float,
        help="delete a finished task this long after it ended (0: keep forever)",
    )
    parser.add_flag(
        "--max-lost-leases",
        default=d.max_lost_leases,
        type=non_negative_int,
        help="lapsed leases a task survives; the next ends it FAILED WorkerLost",
    )
    parser.add_flag(
        "--drain-s",
        default=d.drain_s,
        type=non_negative_float,
        help="on SIGTERM, report NOT_SERVING and let workers finish running tasks this long",
    )
    parser.add_flag(
        "--max-streams",
        default=d.max_streams,
        type=positive_int,
        help="refuse streaming calls (waits and worker streams) beyond this many open ones",
    )
    _add_metrics_flag(parser)
    parser.add_flag(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen without a token or TLS",
    )
    _add_manager_endpoint_flags(parser)
    _add_log_flags(parser)


def master_config(args: argparse.Namespace) -> MasterConfig:
    if args.heartbeat_s >= args.lease_s:
        raise ConfigError("--heartbeat-s: must be shorter than --lease-s")
    listen = check_address("--listen", args.listen)
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_client_ca)
    if not is_loopback(listen) and not args.token and tls is None and not args.insecure:
        raise ConfigError(
            f"--listen: {listen} is reachable from other machines; set --token or "
            "--tls-cert/--tls-key (or pass --insecure to accept anyone who can connect)"
        )
    if args.worker_token and args.worker_token == args.token:
        raise ConfigError("--worker-token: must differ from --token, or there is no point")
    return MasterConfig(
        listen=listen,
        store=args.store,
        token=args.token,
        worker_token=args.worker_token,
        tls=tls,
        max_payload_bytes=args.max_payload_bytes,
        max_result_bytes=args.max_result_bytes,
        lease_s=args.lease_s,
        heartbeat_s=args.heartbeat_s,
        grace_s=args.grace_s,
        drain_s=args.drain_s,
        result_ttl_s=args.result_ttl_s,
        max_lost_leases=args.max_lost_leases,
        max_streams=args.max_streams,
        metrics_listen=_metrics_listen(args, listen),
        insecure=args.insecure,
        log_level=args.log_level,
        log_format=args.log_format,
        **_manager_endpoint_settings(args, listen),
    )


def add_worker_flags(parser: EnvDefaultsParser) -> None:
    d = WorkerConfig()
    parser.add_flag("--master", default=d.master, help="HOST:PORT of the master")
    parser.add_flag(
        "--tasks",
        type=comma_list,
        required="TASKFLEET_TASKS" not in os.environ,
        help="modules that register tasks, comma-separated",
    )
    parser.add_flag(
        "--queues",
        default=",".join(d.queues),
        type=comma_list,
        help="queues to take tasks from, comma-separated",
    )
    parser.add_flag(
        "--concurrency",
        default=d.concurrency,
        type=non_negative_int,
        help="pool slots (0: one per CPU core)",
    )
    parser.add_flag(
        "--pool",
        default=d.pool,
        choices=("process", "thread"),
        help="process for CPU-bound tasks, thread for IO-bound ones",
    )
    parser.add_flag(
        "--prefetch",
        default=d.prefetch,
        type=non_negative_int,
        help="most tasks held beyond one per slot (0: none)",
    )
    parser.add_flag(
        "--token",
        default=d.token,
        help="bearer token for the master: its --worker-token if it has one, else its --token",
    )
    _add_client_tls_flags(parser)
    parser.add_flag(
        "--grace-s",
        default=d.grace_s,
        type=positive_float,
        help="how long a draining worker waits for running tasks",
    )
    _add_max_result_flag(parser, d.max_result_bytes)
    _add_metrics_flag(parser)
    _add_manager_transport_flags(parser)
    _add_log_flags(parser)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    if not args.queues:
        raise ConfigError("--queues: name at least one queue")
    return WorkerConfig(
        master=check_address("--master", args.master),
        tasks=args.tasks,
        queues=args.queues,
        concurrency=args.concurrency,
        pool=args.pool,
        prefetch=args.prefetch,
        token=args.token,
        tls=client_tls(args.tls_ca, args.tls_cert, args.tls_key),
        grace_s=args.grace_s,
        max_result_bytes=args.max_result_bytes,
        metrics_listen=_metrics_listen(args, ""),
        log_level=args.log_level,
        log_format=args.log_format,
        **_manager_transport_settings(args),
    )


def _add_manager_endpoint_flags(parser: EnvDefaultsParser) -> None:
    d = MasterConfig()
    parser.add_flag(
        "--manager-listen",
        default=d.manager_listen,
        help="HOST:PORT for the classic multiprocessing.managers endpoint (off by default)",
    )
    parser.add_flag(
        "--authkey",
        default=d.authkey,
        help="the manager endpoint's authkey, required with --manager-listen; a password",
    )
    parser.add_flag(
        "--manager-task",
        default=d.manager_task,
        help="task that objects put by manager clients become (required with --manager-listen)",
    )
    parser.add_flag(
        "--manager-queue",
        default=d.manager_queue,
        help="queue of those tasks; manager clients also take tasks from it",
    )
    parser.add_flag(
        "--manager-lease-s",
        default=d.manager_lease_s,
        type=positive_float,
        help="how long a manager client may hold a task before it goes back to the queue",
    )


def _manager_endpoint_settings(args: argparse.Namespace, listen: str) -> dict[str, Any]:
    settings = {
        "manager_listen": args.manager_listen,
        "authkey": args.authkey,
        "manager_task": args.manager_task,
        "manager_queue": args.manager_queue,
        "manager_lease_s": args.manager_lease_s,
    }
    if not args.manager_listen:
        return settings
    manager_listen = check_address("--manager-listen", args.manager_listen)
    if manager_listen == listen:
        raise ConfigError(f"--manager-listen: {manager_listen} is the gRPC --listen address")
    if not args.authkey:
        raise ConfigError(
            "--authkey: required with --manager-listen; there is no default key, and whoever "
            "holds it can make the master unpickle data, so choose it like a password"
        )
    if not args.manager_task.strip():
        raise ConfigError(
            "--manager-task: required with --manager-listen: the task name that objects put "
            "on the manager's task queue become"
        )
    if not args.manager_queue.strip():
        raise ConfigError("--manager-queue: must not be empty")
    return settings


def _add_manager_transport_flags(parser: EnvDefaultsParser) -> None:
    d = WorkerConfig()
    parser.add_flag(
        "--transport",
        default=d.transport,
        choices=("grpc", "manager"),
        help="grpc: serve a taskfleet master; manager: serve a plain multiprocessing.managers one",
    )
    parser.add_flag(
        "--authkey", default=d.authkey, help="the manager's authkey (--transport manager)"
    )
    parser.add_flag(
        "--manager-task",
        default=d.manager_task,
        help="task to run on each item taken from the manager (--transport manager)",
    )


def _manager_transport_settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.transport == "manager":
        if not args.authkey:
            raise ConfigError("--authkey: required with --transport manager")
        if not args.manager_task.strip():
            raise ConfigError(
                "--manager-task: required with --transport manager: the task each item runs"
            )
    return {
        "transport": args.transport,
        "authkey": args.authkey,
        "manager_task": args.manager_task,
    }


def add_client_flags(parser: EnvDefaultsParser) -> None:
    parser.add_flag(
        "--master", default=DEFAULT_MASTER, type=utf8_text, help="HOST:PORT of the master"
    )
    parser.add_flag("--token", default="", type=utf8_text, help="bearer token for the master")
    _add_client_tls_flags(parser)
    parser.add_flag("--json", action="store_true", help="print JSON for scripts")


def _add_client_tls_flags(parser: EnvDefaultsParser) -> None:
    parser.add_flag(
        "--tls-ca", default="", help="connect over TLS, trusting this CA for the master (PEM)"
    )
    parser.add_flag(
        "--tls-cert", default="", help="client certificate (PEM) for a master that requires one"
    )
    parser.add_flag("--tls-key", default="", help="the private key of --tls-cert (PEM)")


def _add_max_result_flag(parser: EnvDefaultsParser, default: int) -> None:
    parser.add_flag(
        "--max-result-bytes",
        default=default,
        type=item_bytes,
        help="fail a task (ResultTooLarge) whose result is larger than this; "
        "cut error text longer than this",
    )


def _add_metrics_flag(parser: EnvDefaultsParser) -> None:
    parser.add_flag(
        "--metrics-listen",
        default="",
        help="HOST:PORT to serve Prometheus metrics at /metrics (off by default)",
    )


def _metrics_listen(args: argparse.Namespace, grpc_listen: str) -> str:
    if not args.metrics_listen:
        return ""
    address = check_address("--metrics-listen", args.metrics_listen)
    if address == grpc_listen:
        raise ConfigError(f"--metrics-listen: {address} is the gRPC --listen address")
    return address


def _add_log_flags(parser: EnvDefaultsParser) -> None:
    parser.add_flag(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="log level",
    )
    parser.add_flag("--log-format", default="text", choices=("text", "json"), help="log format")


def check_address(flag: str, address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag}: expected HOST:PORT, got {address!r}")
    return address


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT can only be reached from this machine."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
