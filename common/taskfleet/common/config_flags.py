"""The flags of ``taskfleet master``, ``worker`` and the client commands, and
the configs built from them once parsed (cross-flag checks included)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from taskfleet.common.addresses import check_address, is_loopback, parse_address_list
from taskfleet.common.config import DEFAULT_MASTER, MasterConfig, WorkerConfig
from taskfleet.common.errors import ConfigError
from taskfleet.common.flags import (
    EnvDefaultsParser,
    comma_list,
    item_bytes,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    rate_limit,
    utf8_text,
)
from taskfleet.common.tls import client_tls, server_tls

MASTER_HELP = "HOST:PORT of the master, or HOST:PORT,HOST:PORT,... to fail over between masters"


def add_master_flags(parser: EnvDefaultsParser) -> None:
    d = MasterConfig()
    parser.add_flag("--listen", default=d.listen, help="HOST:PORT for the gRPC API")
    parser.add_flag(
        "--store",
        default=d.store,
        help="sqlite:PATH (durable), memory (volatile) or postgresql://USER@HOST[:PORT]/DB",
    )
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
    parser.add_flag(
        "--poll-only",
        action="store_true",
        help="masters sharing a PostgreSQL store poll instead of LISTEN/NOTIFY "
        "(PgBouncer in transaction mode)",
    )
    parser.add_flag(
        "--rate-limit",
        action="append",
        type=rate_limit,
        metavar="NAME=N/s",
        help="lease tasks of NAME at most N per second (or /m, /h) across all workers "
        "and masters (repeatable)",
    )
    _add_metrics_flag(parser)
    parser.add_flag(
        "--http-listen",
        default=d.http_listen,
        help="HOST:PORT for the web dashboard, its JSON API and /metrics (off by default)",
    )
    parser.add_flag(
        "--dashboard-read-token",
        default=d.dashboard_read_token,
        help="a token that may view the dashboard but not act; --token may do both",
    )
    parser.add_flag(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen or --http-listen without a token or TLS",
    )
    _add_manager_endpoint_flags(parser)
    _add_log_flags(parser)


def master_config(args: argparse.Namespace) -> MasterConfig:
    if args.heartbeat_s >= args.lease_s:
        raise ConfigError("--heartbeat-s: must be shorter than --lease-s")
    listen = check_address("--listen", args.listen)
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_client_ca)
    _check_exposure(args, "--listen", listen, tls is not None)
    if args.worker_token and args.worker_token == args.token:
        raise ConfigError("--worker-token: must differ from --token, or there is no point")
    rate_limits = dict(args.rate_limit)
    if len(rate_limits) < len(args.rate_limit):
        raise ConfigError("--rate-limit: each task name may be limited once")
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
        poll_only=args.poll_only,
        rate_limits=rate_limits,
        metrics_listen=_metrics_listen(args, listen),
        **_dashboard_settings(args, listen, tls is not None),
        insecure=args.insecure,
        log_level=args.log_level,
        log_format=args.log_format,
        **_manager_endpoint_settings(args, listen),
    )


def _check_exposure(args: argparse.Namespace, flag: str, address: str, tls: bool) -> None:
    """Refuse a listener that other machines reach while nothing checks who calls."""
    if not is_loopback(address) and not args.token and not tls and not args.insecure:
        raise ConfigError(
            f"{flag}: {address} is reachable from other machines; set --token or "
            "--tls-cert/--tls-key (or pass --insecure to accept anyone who can connect)"
        )


def _dashboard_settings(args: argparse.Namespace, listen: str, tls: bool) -> dict[str, Any]:
    read_token = args.dashboard_read_token
    if read_token and not args.token:
        raise ConfigError(
            "--dashboard-read-token: needs --token; without it the dashboard is open to all"
        )
    if read_token and read_token == args.token:
        raise ConfigError("--dashboard-read-token: must differ from --token")
    if not args.http_listen:
        return {"http_listen": "", "dashboard_read_token": read_token}
    http_listen = check_address("--http-listen", args.http_listen)
    if http_listen == listen:
        raise ConfigError(f"--http-listen: {http_listen} is the gRPC --listen address")
    if http_listen == args.metrics_listen:
        raise ConfigError(f"--http-listen: {http_listen} is the --metrics-listen address")
    _check_exposure(args, "--http-listen", http_listen, tls)
    return {"http_listen": http_listen, "dashboard_read_token": read_token}


def add_worker_flags(parser: EnvDefaultsParser) -> None:
    d = WorkerConfig()
    parser.add_flag("--master", default=d.master, help=MASTER_HELP)
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
        master=",".join(parse_address_list("--master", args.master)),
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
        if "," in args.master:
            raise ConfigError("--master: one HOST:PORT with --transport manager, got a list")
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
    parser.add_flag("--master", default=DEFAULT_MASTER, type=utf8_text, help=MASTER_HELP)
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
