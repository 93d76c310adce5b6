"""What ``@task`` makes of a function: still the function, plus ``submit``.

Calling it runs the function here, so unit tests of task code need no master;
``submit`` and ``submit_with`` send it to the workers and return a
``TaskHandle`` typed with the function's return type.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from taskfleet.common.model import DEFAULT_QUEUE

if TYPE_CHECKING:
    from taskfleet.client.canvas import Signature
    from taskfleet.common.client import Client
    from taskfleet.common.handle import TaskHandle

P = ParamSpec("P")
R = TypeVar("R")


class TaskFunction(Generic[P, R]):
    """A function registered as the task ``name``."""

    def __init__(self, func: Callable[P, R], name: str) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.name = name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def __reduce__(self) -> str:
        # By reference, as pickle takes a function: the module's attribute is this.
        return str(self.__qualname__)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<task {self.name!r} {self.func!r}>"

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """This call as a signature, not submitted: a step of ``chain``, ``group`` or
        ``chord`` (taskfleet.client.canvas). Loose types: a chain step is also
        passed the previous step's result."""
        from taskfleet.client.canvas import Signature

        return Signature(self.name, args, kwargs)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Run on a worker with these arguments, through the default client."""
        return self.submit_with(args=args, kwargs=kwargs)

    def submit_with(
        self,
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int = 0,
        timeout_s: float = 0.0,
        delay_s: float = 0.0,
        expires_s: float = 0.0,
        idempotency_key: str = "",
        metadata: Mapping[str, str] | None = None,
        concurrency_key: str = "",
        concurrency_limit: int | None = None,
        client: Client | None = None,
    ) -> TaskHandle[R]:
        """Run on a worker with options: ``timeout_s`` is the task's own time
        limit (how long a caller waits is ``handle.result(timeout_s=...)``),
        ``delay_s`` holds it back that long, ``expires_s`` cancels it (error type
        Expired) if it has not started within that long, at most
        ``concurrency_limit`` tasks of ``concurrency_key`` run at once (a key
        alone: one); ``client`` overrides the default."""
        from taskfleet.client.defaults import default_client
        from taskfleet.common.handle import TaskHandle

        if delay_s < 0 or expires_s < 0:
            raise ValueError("delay_s and expires_s must not be negative")
        now = time.time()
        through = client if client is not None else default_client()
        task_id = through.submit(
            self.name,
            args,
            kwargs,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            not_before=now + delay_s if delay_s else None,
            expires_at=now + expires_s if expires_s else None,
            idempotency_key=idempotency_key,
            metadata=metadata,
            concurrency_key=concurrency_key,
            concurrency_limit=concurrency_limit,
        )
        return TaskHandle(task_id, through)
