"""The taskfleet worker runtime. Task authors need only these names."""

from taskfleet.worker.registry import Retry, task
from taskfleet.worker.task_context import TaskContext, current_task

__all__ = ["Retry", "TaskContext", "current_task", "task"]
