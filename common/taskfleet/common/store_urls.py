"""Store URLs (``--store``) as they may be shown: in a log line, an error, a repr."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_KEYWORD_PASSWORD = re.compile(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def redacted(url: str) -> str:
    """``url`` without any password it carries, in the userinfo or the query of
    any ``scheme://`` URL (a mistyped one too), or as ``password=`` in a libpq
    keyword string; ``memory`` and ``sqlite:PATH`` are returned as they are."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub("password=***", url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")
        userinfo = netloc[0].partition(":")[0]
        host = f"{userinfo}@{netloc[2]}" if netloc[1] else netloc[2]
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
        return urlunsplit((parts.scheme, host, parts.path, query, ""))
    except ValueError:
        return f"{url.partition('://')[0]}://(a URL that cannot be parsed)"
