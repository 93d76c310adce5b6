"""taskfleet's Python client, in one import:

    from taskfleet.client import Client, AsyncClient, TaskHandle, TaskFailed, TaskCancelled
    from taskfleet.client import chain, chord, group, signature  # workflows

``Client`` is the blocking client (``taskfleet.common.client``, where it lives,
keeps working). ``configure`` sets the client that ``@task`` functions submit
through; without it, one is made from ``TASKFLEET_MASTER`` and the other
variables the CLI reads.
"""

from taskfleet.client.aio import AsyncClient, AsyncTaskHandle
from taskfleet.client.canvas import Signature, chain, chord, group, signature
from taskfleet.client.defaults import configure, default_client
from taskfleet.common.client import Client
from taskfleet.common.errors import TaskCancelled, TaskFailed
from taskfleet.common.handle import TaskHandle, TaskSnapshot
from taskfleet.common.model import TaskProgress

__all__ = [
    "AsyncClient",
    "AsyncTaskHandle",
    "Client",
    "Signature",
    "TaskCancelled",
    "TaskFailed",
    "TaskHandle",
    "TaskProgress",
    "TaskSnapshot",
    "chain",
    "chord",
    "configure",
    "default_client",
    "group",
    "signature",
]
