"""Payload and result encoding.

gRPC payloads are bytes with an explicit content type; only JSON is built in.
Nothing that arrives over gRPC is ever unpickled.
"""

from __future__ import annotations

import json
from typing import Any

from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import JSON

_NO_ARGS = b'{"args":[],"kwargs":{}}'  # what json.dumps gives for a call without arguments


def encode_args(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> bytes:
    """The JSON payload for a call with ``args`` and ``kwargs``."""
    if not args and not kwargs:
        return _NO_ARGS
    try:
        return json.dumps({"args": list(args), "kwargs": kwargs}, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"payload: arguments are not JSON-serialisable: {exc}") from None


def decode_args(payload: bytes, content_type: str) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments a payload carries.

    Raises InvalidArgument naming the field when the payload has the wrong shape.
    """
    if content_type != JSON:
        raise InvalidArgument(f"content_type: unsupported {content_type!r}; use {JSON!r}")
    try:
        body = json.loads(payload) if payload else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"payload: not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidArgument("payload: JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidArgument('payload: must be a JSON object {"args": [...], "kwargs": {...}}')
    unknown = set(body) - {"args", "kwargs"}
    if unknown:
        raise InvalidArgument(f"payload: unexpected keys {sorted(unknown)}; only args and kwargs")
    args = body.get("args", [])
    kwargs = body.get("kwargs", {})
    if not isinstance(args, list):
        raise InvalidArgument("payload.args: must be a JSON array")
    if not isinstance(kwargs, dict):
        raise InvalidArgument("payload.kwargs: must be a JSON object")
    return args, kwargs


def encode_result(value: Any) -> bytes:
    """A task's return value as JSON; raises TypeError if it is not serialisable."""
    return json.dumps(value, separators=(",", ":")).encode()


def decode_result(data: bytes, content_type: str) -> Any:
    """A stored result as a Python value (raw bytes for unknown content types)."""
    if content_type in ("", JSON):
        return json.loads(data) if data else None
    return data
