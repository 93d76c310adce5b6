"""The Dramatiq app for ``make bench-peers``: the same two tasks as taskfleet's examples.

Imported both by the workers (``dramatiq dramatiq_tasks``) and by the client in
dramatiq_side.py. Redis is the broker, and the Results middleware with its Redis
backend keeps each return value, as Dramatiq's docs set them up for callers
that need results; everything else is left at Dramatiq's defaults.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from peers import redis_url_from_env

REDIS_URL = redis_url_from_env()
results = RedisBackend(url=REDIS_URL)
broker = RedisBroker(url=REDIS_URL)
broker.add_middleware(Results(backend=results))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True)
def noop() -> None:
    """W1's task: no work at all, so the figure is the system's own cost per task."""


@dramatiq.actor(store_results=True)
def square(n: int) -> int:
    """W2's and W3's task, as taskfleet.worker.examples.square."""
    return n * n
