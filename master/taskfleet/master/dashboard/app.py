"""The master's HTTP listener (``--http-listen``): the dashboard's pages, its
JSON API, its live feed and Prometheus ``/metrics``, on the master's own
asyncio loop (aiohttp), so an open page costs a few objects, not a thread.

The pages are static files shipped in the package and read through
``importlib.resources``, so they work from a wheel or a zipapp alike. Every
response forbids inline scripts and framing (Content-Security-Policy).
"""

from __future__ import annotations

import html
import logging
import ssl
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from taskfleet.common.addresses import host_port, is_loopback
from taskfleet.common.config import MasterConfig
from taskfleet.common.errors import ConfigError
from taskfleet.common.tls import ServerTls
from taskfleet.master.dashboard.access import COOKIE, Access, Role, cross_site
from taskfleet.master.dashboard.api import MAX_BODY_BYTES, Api, error_response, taskfleet_errors
from taskfleet.master.dashboard.live import LiveFeed
from taskfleet.master.runtime import MasterRuntime

log = logging.getLogger("taskfleet.master.dashboard")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: with it a browser sends "Origin: null" on its own form posts.
    "Referrer-Policy": "same-origin",
}
CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
PAGES = {"/": "overview.html", "/tasks": "tasks.html"}
PUBLIC = ("/login", "/static/")  # served without a token: no data in them
SHUTDOWN_S = 2.0  # open event streams end first, so little is left to wait for


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files(__package__) / "static"
    return {
        entry.name: (entry.read_bytes(), CONTENT_TYPES[entry.name[entry.name.rfind(".") :]])
        for entry in folder.iterdir()
        if entry.name[entry.name.rfind(".") :] in CONTENT_TYPES
    }


class Dashboard:
    """Serves ``config.http_listen`` on the running loop; ``start`` binds."""

    def __init__(self, runtime: MasterRuntime, config: MasterConfig) -> None:
        self._rt = runtime
        self._config = config
        self.feed = LiveFeed(runtime)
        runtime.lifecycle.add_listener(self.feed)
        self._access = Access(
            config.token,
            config.dashboard_read_token,
            loopback_only=is_loopback(config.http_listen),
        )
        self._files = _static_files()
        self._app = web.Application(
            middlewares=[self._headers, self._guard, taskfleet_errors],
            client_max_size=MAX_BODY_BYTES,
        )
        self._app.add_routes(
            [
                *(web.get(path, self._page) for path in PAGES),
                web.get("/tasks/{task_id}", self._page),
                web.get("/static/{file}", self._static),
                web.get("/login", self._login_page),
                web.post("/login", self._login),
                web.post("/logout", self._logout),
                web.get("/metrics", self._metrics),
                web.get("/api/session", self._session),
                *Api(runtime, self.feed).routes(),
            ]
        )
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=SHUTDOWN_S)

    async def start(self) -> None:
        host, port = host_port(self._config.http_listen)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=_ssl(self._config.tls))
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                f"--http-listen: cannot bind {self._config.http_listen} ({exc.strerror})"
            ) from None
        self.feed.start()
        scheme = "http" if self._config.tls is None else "https"
        log.info("dashboard at %s://%s/", scheme, self._config.http_listen)

    async def stop(self) -> None:
        self.feed.close()
        await self._runner.cleanup()

    # -- every request ---------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:  # redirects and 404s are raised, not returned
            _secure(request, exc)
            raise
        _secure(request, response)
        return response

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Who may see this, and may this request act: see ``access``."""
        if not self._access.host_allowed(request):
            return error_response(403, f"Host {request.host!r}: use an IP address or localhost")
        if request.method not in ("GET", "HEAD"):
            reason = cross_site(request)
            if reason:
                return error_response(403, f"cross-site request refused: {reason}")
        if request.path == "/login" or request.path.startswith("/static/"):
            return await handler(request)  # type: ignore[no-any-return]
        role = self._access.role(request)
        if role is Role.NONE:
            if request.path.startswith("/api/") or request.path == "/metrics":
                return error_response(
                    401, "this dashboard needs a token: Authorization: Bearer <token>"
                )
            raise web.HTTPSeeOther(f"/login?next={request.path_qs}")
        if request.method not in ("GET", "HEAD") and role < Role.ACT:
            return error_response(403, "the read-only token may view but not act")
        return await handler(request)  # type: ignore[no-any-return]

    # -- pages -----------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        name = PAGES.get(request.path, "task.html")
        return self._file(name)

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name.endswith(".html") or name not in self._files:
            raise web.HTTPNotFound()
        return self._file(name)

    def _file(self, name: str, replace: tuple[str, str] | None = None) -> web.Response:
        body, content_type = self._files[name]
        if replace is not None:
            body = body.replace(replace[0].encode(), replace[1].encode())
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    async def _login_page(self, request: web.Request, message: str = "") -> web.Response:
        if self._access.open:
            raise web.HTTPSeeOther("/")
        text = f'<p class="error">{html.escape(message)}</p>' if message else ""
        response = self._file("login.html", ("<!--message-->", text))
        if message:
            response.set_status(401)
        return response

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        token = form.get("token", "")
        if not isinstance(token, str) or self._access.role_of_token(token) is Role.NONE:
            return await self._login_page(request, "Wrong token.")
        response = web.HTTPSeeOther(_local_path(request.query.get("next", "/")))
        response.set_cookie(
            COOKIE,
            self._access.cookie_for(token),
            httponly=True,
            samesite="Strict",
            secure=self._config.tls is not None,
            path="/",
        )
        raise response

    async def _logout(self, request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    async def _session(self, request: web.Request) -> web.Response:
        """What the caller may do, so pages hide what it may not."""
        role = "act" if self._access.role(request) is Role.ACT else "view"
        return web.json_response({"role": role, "login": not self._access.open})

    async def _metrics(self, request: web.Request) -> web.Response:
        registry = self._rt.metrics.registry
        body = await self._rt.bridge.producers.run(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _secure(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if request.path.startswith("/api/") or request.path == "/metrics":
        response.headers.setdefault("Cache-Control", "no-store")


def _local_path(target: str) -> str:
    """Where to go after the login: a path on this dashboard, never another site."""
    parts = urlsplit(target)
    # Browsers read a backslash as a slash: "/\\evil.example" is another site.
    if parts.scheme or parts.netloc or not target.startswith("/") or "\\" in target:
        return "/"
    if target.startswith("//") or not target.isprintable():
        return "/"
    return target


def _ssl(tls: ServerTls | None) -> ssl.SSLContext | None:
    """The gRPC listener's certificate, served over HTTPS too (and client
    certificates required where gRPC requires them)."""
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca:
        context.load_verify_locations(tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
