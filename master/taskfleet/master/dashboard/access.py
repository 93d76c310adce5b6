"""Who may see and who may act on the dashboard, and which requests a browser
may have been tricked into sending.

With ``--token`` nothing but the login page and its static files is served
without a token. A token comes either as ``Authorization: Bearer <token>``
(scripts) or as the session cookie the login form sets (browsers). The cookie
holds a digest of the token, not the token: it opens the dashboard, never the
gRPC API. ``--dashboard-read-token`` may view but not act.

Requests that change something (every POST) must come from the dashboard's
own pages: a browser names the page's origin in ``Origin`` and says
``Sec-Fetch-Site: same-origin``; anything else is refused, so another site
cannot make a logged-in browser cancel or purge tasks. A script that sends
neither header is not a browser and is judged by its token alone.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
from collections.abc import Callable

from aiohttp import web

COOKIE = "taskfleet_dashboard"
_COOKIE_CONTEXT = b"taskfleet dashboard session v1"


class Role(enum.IntEnum):
    """What a caller may do; a higher role may do what a lower one may."""

    NONE = 0
    VIEW = 1
    ACT = 2


class Access:
    """The dashboard's tokens and the checks made on every request."""

    def __init__(self, token: str, read_token: str, *, loopback_only: bool) -> None:
        self._tokens = [
            (t.encode(), role) for t, role in ((token, Role.ACT), (read_token, Role.VIEW)) if t
        ]
        # Without a token, only this machine can reach a loopback listener; a web
        # page could still reach it through a name it rebinds to 127.0.0.1 (DNS
        # rebinding), so such a listener answers only to an IP address or localhost.
        self._check_host = loopback_only and not self._tokens

    def __repr__(self) -> str:  # never show the tokens
        return "Access(***)"

    @property
    def open(self) -> bool:
        """No token set: everyone who reaches the listener may view and act."""
        return not self._tokens

    def role(self, request: web.Request) -> Role:
        """What the caller's token (header or cookie) lets it do."""
        if self.open:
            return Role.ACT
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and presented:
            return self.role_of_token(presented)
        cookie = request.cookies.get(COOKIE, "")
        if cookie:
            return self._role_of(cookie.encode(), cookie_value)
        return Role.NONE

    def role_of_token(self, presented: str) -> Role:
        return self._role_of(presented.encode(), lambda token: token)

    def cookie_for(self, presented: str) -> str:
        """The session cookie's value for a token already checked."""
        return cookie_value(presented.encode()).decode()

    def _role_of(self, presented: bytes, form: Callable[[bytes], bytes]) -> Role:
        best = Role.NONE
        for token, role in self._tokens:
            # Every token is compared, in constant time, whichever matches.
            if hmac.compare_digest(presented, form(token)):
                best = max(best, role)
        return best

    def host_allowed(self, request: web.Request) -> bool:
        if not self._check_host:
            return True
        host = _hostname(request.host)
        if host == "localhost":
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True


def _hostname(host: str) -> str:
    """The name or address in a Host header, without its port or IPv6 brackets."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0]


def cookie_value(token: bytes) -> bytes:
    """A digest of ``token``: it proves the login without being the gRPC token."""
    return hmac.new(token, _COOKIE_CONTEXT, hashlib.sha256).hexdigest().encode()


def cross_site(request: web.Request) -> str:
    """Why a state-changing request looks sent by another site, or "" if not."""
    fetch_site = request.headers.get("Sec-Fetch-Site", "")
    if fetch_site and fetch_site != "same-origin":
        return f"Sec-Fetch-Site is {fetch_site}"
    origin = request.headers.get("Origin", "")
    if origin and origin != f"{request.scheme}://{request.host}":
        return f"Origin {origin} is not this dashboard"
    if request.cookies.get(COOKIE) and not (fetch_site or origin):
        return "a request carrying the session cookie must name its Origin"
    return ""
