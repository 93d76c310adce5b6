"""The Celery app for ``make bench-peers``: the same two tasks as taskfleet's examples.

Imported both by the worker (``celery -A celery_tasks worker``) and by the client in
celery_side.py, so both must agree on the broker and result backend. peers.py
starts a Redis server on a free port for each run and names it in the environment,
which is how a worker and its clients usually share that setting.
"""

from __future__ import annotations

from celery import Celery
from peers import redis_url_from_env

REDIS_URL = redis_url_from_env()

# Redis as both broker and result backend; everything else left at Celery's
# defaults (json serializer, prefetch multiplier 4, acks on receipt, results kept
# for a day), as a user who follows the first-steps guide gets them.
app = Celery("celery_tasks", broker=REDIS_URL, backend=REDIS_URL)
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
