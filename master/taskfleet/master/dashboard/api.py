"""The dashboard's JSON API: what its pages read and do, and what scripts may use.

Reads and actions go through the same store and lifecycle calls as the gRPC
servicers (``ListTasks`` paging, ``CancelTask``, ``RetryTask``, ``PurgeTasks``),
on the producers' lane, so the API shows what every other client sees.
Errors come back as ``{"error": message}`` with the HTTP status of the
taskfleet error's gRPC code (one table, below).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiohttp import web

from taskfleet.common.errors import FailedPrecondition, InvalidArgument, NotFound, TaskfleetError
from taskfleet.common.model import Task, TaskState
from taskfleet.master import queries
from taskfleet.master.dashboard import views
from taskfleet.master.dashboard.live import LiveFeed
from taskfleet.master.runtime import MasterRuntime
from taskfleet.master.store.base import FINAL_STATES, MAX_PAGE_SIZE, TaskQuery

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 503,
}
MAX_BODY_BYTES = 64 * 1024  # a filter, never more
KEEPALIVE_S = 15.0  # a comment line on a quiet event stream, so proxies keep it open


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def taskfleet_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A taskfleet error raised by a handler becomes its HTTP status and message."""
    try:
        response: web.StreamResponse = await handler(request)
    except TaskfleetError as exc:
        return error_response(HTTP_STATUS.get(exc.code, 500), str(exc))
    return response


class Api:
    """The handlers of ``/api/...``."""

    def __init__(self, runtime: MasterRuntime, feed: LiveFeed) -> None:
        self._rt = runtime
        self._feed = feed

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/overview", self.overview),
            web.get("/api/events", self.events),
            web.get("/api/tasks", self.list_tasks),
            web.get("/api/count", self.count),
            web.get("/api/tasks/{task_id}", self.get_task),
            web.post("/api/tasks/{task_id}/cancel", self.cancel),
            web.post("/api/tasks/{task_id}/retry", self.retry),
            web.post("/api/retry-all", self.retry_all),
            web.post("/api/purge", self.purge),
        ]

    # -- reading ---------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        return web.json_response(await self._feed.overview())

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the overview now, then whenever it changes (at most
        once a second). Pages reload what they show on each one."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        with self._feed.subscribe() as subscriber:
            overview: dict[str, Any] | None = await self._feed.overview()
            try:
                while overview is not None:
                    await response.write(f"data: {json.dumps(overview)}\n\n".encode())
                    try:
                        overview = await subscriber.next(KEEPALIVE_S)
                    except TimeoutError:
                        await response.write(b": keep-alive\n\n")
            except ConnectionResetError:
                pass  # the page went away
        return response

    async def list_tasks(self, request: web.Request) -> web.Response:
        """One page, newest first; ``next_cursor`` (null on the last page) asks for
        the next. The same keyset paging as ListTasks, so it stays fast however
        many tasks the store holds."""
        query = _query(
            request.query.get("queue", ""),
            request.query.get("name", ""),
            request.query.getall("state", []),
        )
        limit = _int(request.query.get("limit", "0"), "limit")
        cursor = queries.cursor_from_token(request.query.get("cursor", ""))
        page = await self._rt.bridge.producers.run(
            self._rt.store.list_tasks, query, queries.page_size(limit), cursor
        )
        return web.json_response(
            {
                "tasks": [views.task_summary(t) for t in page.tasks],
                "next_cursor": queries.token_from_cursor(page.next_cursor) or None,
            }
        )

    async def get_task(self, request: web.Request) -> web.Response:
        task_id = _task_id(request)
        task = await self._rt.bridge.producers.run(self._rt.store.get, task_id)
        return web.json_response(views.task_detail(task))

    async def count(self, request: web.Request) -> web.Response:
        """How many tasks a filter matches: what a bulk action would touch."""
        query = _query(
            request.query.get("queue", ""),
            request.query.get("name", ""),
            request.query.getall("state", []),
        )
        return web.json_response({"count": await self._count(query)})

    async def _count(self, query: TaskQuery) -> int:
        if not query.name:  # the store's counts answer at once
            stats = await self._rt.bridge.producers.run(self._rt.store.stats)
            return sum(
                n
                for q in stats
                if query.queue in ("", q.queue)
                for state, n in q.counts.items()
                if not query.states or state in query.states
            )
        total = 0
        async for tasks in self._pages(query):  # a name filter: walk the pages
            total += len(tasks)
        return total

    async def _pages(self, query: TaskQuery) -> AsyncIterator[list[Task]]:
        """Every task ``query`` matches, a page per store call."""
        cursor = None
        while True:
            page = await self._rt.bridge.producers.run(
                self._rt.store.list_tasks, query, MAX_PAGE_SIZE, cursor
            )
            yield page.tasks
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # -- acting ----------------------------------------------------------------

    async def cancel(self, request: web.Request) -> web.Response:
        task = await self._rt.bridge.producers.run(self._rt.lifecycle.cancel, _task_id(request))
        return web.json_response(views.task_detail(task))

    async def retry(self, request: web.Request) -> web.Response:
        task = await self._rt.bridge.producers.run(self._rt.lifecycle.retry, _task_id(request))
        return web.json_response(views.task_detail(task))

    async def retry_all(self, request: web.Request) -> web.Response:
        """Retry every task the filter matches (FAILED unless it names states, which
        may be FAILED and CANCELLED); the count retried, and the filter applied."""
        body = await _body(request)
        query = _query(body.get("queue", ""), body.get("name", ""), body.get("states", ["failed"]))
        if not query.states <= {TaskState.FAILED, TaskState.CANCELLED}:
            raise InvalidArgument("states: only FAILED and CANCELLED tasks can be retried")
        query = TaskQuery(query.queue, query.name, query.states or frozenset({TaskState.FAILED}))
        total = 0
        async for tasks in self._pages(query):
            total += await self._rt.bridge.producers.run(self._retry_each, [t.id for t in tasks])
        return web.json_response({"count": total, "filter": _filter(query)})

    def _retry_each(self, task_ids: list[str]) -> int:
        retried = 0
        for task_id in task_ids:
            try:
                self._rt.lifecycle.retry(task_id)
                retried += 1
            except (NotFound, FailedPrecondition):
                pass  # pruned, purged or retried by someone else meanwhile
        return retried

    async def purge(self, request: web.Request) -> web.Response:
        """Delete the finished tasks of a queue and states (PurgeTasks); the count
        deleted, and the filter applied."""
        body = await _body(request)
        if body.get("name"):
            raise InvalidArgument("name: purge filters by queue and states only")
        query = _query(body.get("queue", ""), "", body.get("states", []))
        count = await self._rt.bridge.producers.run(self._rt.lifecycle.purge, query)
        shown = TaskQuery(query.queue, "", query.states or FINAL_STATES)
        return web.json_response({"count": count, "filter": _filter(shown)})


def _query(queue: object, name: object, states: object) -> TaskQuery:
    if not isinstance(queue, str):
        raise InvalidArgument("queue: must be a string")
    if not isinstance(name, str):
        raise InvalidArgument("name: must be a string")
    if not isinstance(states, list):
        raise InvalidArgument("states: must be a list of state names")
    chosen = []
    for i, state_name in enumerate(states):
        state = views.state_from_name(state_name) if isinstance(state_name, str) else None
        if state is None:
            raise InvalidArgument(f"states[{i}]: {state_name!r} is not a task state")
        chosen.append(int(state))
    return queries.task_query(queue, name, chosen)


def _filter(query: TaskQuery) -> dict[str, Any]:
    return {
        "queue": query.queue,
        "name": query.name,
        "states": sorted(views.STATE_NAMES[s] for s in query.states),
    }


def _int(text: str, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"{field}: not a whole number: {text!r}") from None


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    if len(task_id) > 200:
        raise InvalidArgument("task_id: longer than 200 characters")
    return task_id


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise InvalidArgument(f"body: larger than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeError):
        raise InvalidArgument("body: not JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body: must be a JSON object")
    return body
