"""The taskfleet worker runtime. Task authors need only these names."""

from taskfleet.worker.context import TaskContext, current_task
from taskfleet.worker.registry import Retry, task

__all__ = ["Retry", "TaskContext", "current_task", "task"]
