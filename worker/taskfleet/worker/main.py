"""Entry point of ``taskfleet worker``."""

from __future__ import annotations

import logging

from taskfleet.common.config import WorkerConfig
from taskfleet.common.errors import ConfigError
from taskfleet.common.heap import settle_after_startup
from taskfleet.worker.master_transport import Worker
from taskfleet.worker.registry import import_task_modules

log = logging.getLogger("taskfleet.worker")


def run_worker(config: WorkerConfig) -> int:
    """Import the task modules, start the pool, serve the master until drained."""
    registry = import_task_modules(config.tasks)
    if not registry:
        raise ConfigError(f"--tasks: {', '.join(config.tasks)} registered no @task functions")
    log.info("tasks: %s", ", ".join(sorted(registry)))
    settle_after_startup()
    if config.transport == "manager":
        from taskfleet.worker.manager_transport import ManagerTransport

        return ManagerTransport(config, registry).run()
    return Worker(config, registry).run()
