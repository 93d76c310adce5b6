"""The Celery app for ``make bench-peers``: the same two tasks as taskfleet's examples.

Imported both by the worker (``celery -A celery_tasks worker``) and by the client in
celery_side.py, so both must agree on the broker and result backend. celery_side.py
starts a Redis server on a free port for each run and names it in the environment,
which is how a worker and its clients usually share that setting.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL_ENV = "TASKFLEET_BENCH_REDIS_URL"

redis_url = os.environ.get(REDIS_URL_ENV)
if not redis_url:
    raise RuntimeError(f"{REDIS_URL_ENV} must name the Redis server, e.g. redis://127.0.0.1:6379/0")

# Redis as both broker and result backend; everything else left at Celery's
# defaults (json serializer, prefetch multiplier 4, acks on receipt, results kept
# for a day), as a user who follows the first-steps guide gets them.
app = Celery("celery_tasks", broker=redis_url, backend=redis_url)
# The value 5.x uses anyway; set only so that each worker start does not warn that
# the default changes in Celery 6.
app.conf.broker_connection_retry_on_startup = True


@app.task
def noop() -> None:
    """W1's task: no work at all, so the figure is the system's own cost per task."""


@app.task
def square(n: int) -> int:
    """W2's and W3's task, as taskfleet.worker.examples.square."""
    return n * n
