"""Plain HTTP calls to a master's dashboard, for tests (no redirects followed)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from typing import Any

from procs import MasterProc, free_port


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def call(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> Answer:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _opener.open(request, timeout=10) as response:
            return Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.headers, exc.read())


def dashboard_master(start_master: Any, *flags: str, **kwargs: Any) -> tuple[MasterProc, str]:
    """A master serving its dashboard; the master and the dashboard's base URL."""
    port = free_port()
    master = start_master(extra=["--http-listen", f"127.0.0.1:{port}", *flags], **kwargs)
    return master, f"http://127.0.0.1:{port}"
