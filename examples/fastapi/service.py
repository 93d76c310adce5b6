"""A web service that hands its work to taskfleet workers, with AsyncClient.

    pip install fastapi uvicorn
    TASKFLEET_MASTER=127.0.0.1:50051 uvicorn service:app --app-dir examples/fastapi

One AsyncClient (one gRPC channel) serves every request at once: a request
waiting for its task holds no thread. The workers run ``square`` (any tasks
module registering it, e.g. ``taskfleet worker --tasks taskfleet.worker.examples``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException

from taskfleet.client import AsyncClient, AsyncTaskHandle, TaskFailed
from taskfleet.common.errors import NotFound


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncClient(
        os.environ.get("TASKFLEET_MASTER", "127.0.0.1:50051"),
        token=os.environ.get("TASKFLEET_TOKEN", ""),
    ) as client:
        app.state.tasks = client
        yield


app = FastAPI(title="squares", lifespan=lifespan)


@app.post("/square/{n}")
async def square(n: int) -> dict[str, Any]:
    """Run ``square(n)`` on a worker and answer with its result."""
    try:
        result = await app.state.tasks.run("square", [n], timeout_s=30)
    except TaskFailed as exc:
        raise HTTPException(status_code=502, detail=str(exc)) from None
    return {"n": n, "square": result}


@app.post("/jobs", status_code=202)
async def submit(n: int) -> dict[str, str]:
    """Queue ``square(n)`` and answer at once with its id, to look up later."""
    handle = await app.state.tasks.submit("square", [n])
    return {"id": handle.id}


@app.get("/jobs/{task_id}")
async def job(task_id: str) -> dict[str, Any]:
    """A job's state, and its result once it has one."""
    try:
        snapshot = await AsyncTaskHandle(task_id, app.state.tasks).get()
    except NotFound:
        raise HTTPException(status_code=404, detail=f"no job {task_id}") from None
    error = snapshot.error
    return {
        "id": snapshot.id,
        "state": snapshot.state.name,
        "result": snapshot.result,
        "error": None if error is None else f"{error.type}: {error.message}",
    }
