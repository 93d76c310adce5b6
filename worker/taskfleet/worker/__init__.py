"""The taskfleet worker runtime. Task authors need only these two names."""

from taskfleet.worker.context import TaskContext, current_task
from taskfleet.worker.registry import task

__all__ = ["TaskContext", "current_task", "task"]
