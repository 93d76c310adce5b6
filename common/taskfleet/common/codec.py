"""Payload and result encoding.

gRPC payloads are bytes with an explicit content type; only JSON is built in,
and only standard JSON: Python's json module would otherwise write and read
NaN and Infinity, which jq, JavaScript and most other readers reject, so a
task would hand its callers bytes they cannot parse.
Nothing that arrives over gRPC is ever unpickled.
"""

from __future__ import annotations

import json
import math
from typing import Any

from taskfleet.common.errors import InvalidArgument
from taskfleet.common.model import JSON

_NO_ARGS = b'{"args":[],"kwargs":{}}'  # what json.dumps gives for a call without arguments
_NON_STANDARD_HINT = "is not standard JSON (jq and JavaScript reject it); use null or a string"


def encode_args(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> bytes:
    """The JSON payload for a call with ``args`` and ``kwargs``."""
    if not args and not kwargs:
        return _NO_ARGS
    try:
        return _dumps({"args": list(args), "kwargs": kwargs}, "payload")
    except NonFiniteNumber as exc:
        raise InvalidArgument(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"payload: arguments are not JSON-serialisable: {exc}") from None


def decode_args(payload: bytes, content_type: str) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments a payload carries.

    Raises InvalidArgument naming the field when the payload has the wrong shape.
    """
    if content_type != JSON:
        raise InvalidArgument(f"content_type: unsupported {content_type!r}; use {JSON!r}")
    if payload == _NO_ARGS:  # the commonest payload, read without the parser
        return [], {}
    body = loads(payload, "payload") if payload else {}
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
    """A task's return value as JSON; raises TypeError or ValueError if it is not
    serialisable (ValueError naming the spot for NaN and Infinity)."""
    if value is None:  # what most tasks return, written without the encoder
        return b"null"
    return _dumps(value, "result")


def utf8_text(text: str) -> str:
    """``text`` as a protobuf string can carry it: a lone surrogate, which an
    undecodable file name brings into Python, written as its backslash escape
    (it is no UTF-8, and setting such a field raises)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def decode_result(data: bytes, content_type: str) -> Any:
    """A stored result as a Python value (raw bytes for unknown content types)."""
    if content_type in ("", JSON):
        return json.loads(data) if data else None
    return data


def loads(data: bytes, field: str) -> Any:
    """``data`` parsed as standard JSON; InvalidArgument naming ``field`` (and the
    spot inside it, for NaN and Infinity) when it is not."""
    try:
        # UTF-8, as RFC 8259 requires; a decoder built once costs half what json.loads does.
        return _STRICT.decode(data.decode())
    except _NonStandard as exc:
        raise InvalidArgument(
            f"{field}{_spot_in(data)}: {exc.token} {_NON_STANDARD_HINT}"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidArgument(f"{field}: JSON nested too deeply") from None


class NonFiniteNumber(ValueError):
    """A value to encode holds NaN or an infinity; the message names where."""


class _NonStandard(Exception):
    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.token = token


def _refuse_constant(token: str) -> Any:
    raise _NonStandard(token)


_STRICT = json.JSONDecoder(parse_constant=_refuse_constant)


def _dumps(value: Any, field: str) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        spot = _non_finite_spot(value, field, set())
        if spot is None:
            raise  # a circular reference: json's own message says so
        where, number = spot
        raise NonFiniteNumber(f"{where}: {_token(number)} {_NON_STANDARD_HINT}") from None


def _spot_in(data: bytes) -> str:
    """Where in ``data`` the first NaN or Infinity is, as ``.args[0]``; "" if unknown."""
    try:
        spot = _non_finite_spot(json.loads(data), "", set())
    except (ValueError, RecursionError):
        return ""  # the text is also broken further on
    return "" if spot is None else spot[0]


def _non_finite_spot(value: Any, path: str, open_ids: set[int]) -> tuple[str, float] | None:
    """The path to the first NaN or infinity in ``value`` and that number, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, dict):
        items: Any = ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    if id(value) in open_ids:
        return None  # a cycle: json.dumps refuses it on its own
    open_ids.add(id(value))
    for item_path, item in items:
        spot = _non_finite_spot(item, item_path, open_ids)
        if spot is not None:
            return spot
    open_ids.discard(id(value))
    return None


def _token(number: float) -> str:
    """How Python's json module writes ``number``: the token readers refuse."""
    if math.isnan(number):
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"
