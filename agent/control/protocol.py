"""The control socket's wire format: one JSON object per line, both ways.

Request:   {"id": 7, "cmd": "status", "args": {...}}
Replies:   {"id": 7, "ok": true, "result": ...}
           {"id": 7, "ok": false, "error": "human text", "code": "unknown_command"}
Streaming: zero or more {"id": 7, "event": ...} lines, then one of the final replies above.
A reply with "id": null concerns the connection itself (refused, line too long, ...).

Standard library only: cabinetctl imports this without the daemon's dependencies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SOCKET_PATH = Path("/run/cabinet-agent/control.sock")
TECHNICIAN_GROUP = "cabinet-tech"

# Error codes. Handlers may raise CommandError with their own codes too.
BAD_REQUEST = "bad_request"
UNKNOWN_COMMAND = "unknown_command"
FORBIDDEN = "forbidden"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
BUSY = "busy"
TIMEOUT = "timeout"
INTERNAL = "internal"
SHUTTING_DOWN = "shutting_down"
INVALID_ARGS = "invalid_args"

RequestId = int | str


class CommandError(Exception):
    """Raised by a handler: becomes an ``ok: false`` reply with this code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    id: RequestId
    cmd: str
    args: dict[str, Any]


class RequestError(Exception):
    """A request line that can't be served; ``id`` is echoed when it could be read."""

    def __init__(self, code: str, message: str, request_id: RequestId | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Reply:
    """One decoded server line: an event (``final`` False) or the final result or error."""

    id: RequestId | None
    final: bool
    ok: bool
    result: Any = None
    event: Any = None
    error: str | None = None
    code: str | None = None


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line (JSON never contains a raw newline)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def ok_reply(request_id: RequestId | None, result: Any) -> dict[str, Any]:
    """The final success line."""
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: RequestId | None, code: str, message: str) -> dict[str, Any]:
    """The final failure line."""
    return {"id": request_id, "ok": False, "error": message, "code": code}


def event_reply(request_id: RequestId, event: Any) -> dict[str, Any]:
    """One streamed event line."""
    return {"id": request_id, "event": event}


MAX_INT_DIGITS = 20  # any 64-bit integer


def _valid_id(value: object) -> bool:
    # bool is an int subclass; true/false are not ids.
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**53) <= value <= 2**53
    return isinstance(value, str) and 0 < len(value) <= 64


def _bounded_int(text: str) -> int:
    # Python refuses > 4300 digits with a ValueError that names sys.set_int_max_str_digits;
    # nothing in this protocol needs more than a 64-bit integer.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} characters is too long")
    return int(text)


def _loads(line: bytes) -> object:
    return json.loads(line, parse_int=_bounded_int)


def parse_request(line: bytes) -> Request:
    """Decode and check one request line; raise RequestError naming what is wrong."""
    try:
        data = _loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RequestError(BAD_REQUEST, f"malformed request: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise RequestError(BAD_REQUEST, "malformed request: expected a JSON object")
    request_id = data.get("id")
    if not _valid_id(request_id):
        raise RequestError(
            BAD_REQUEST, "malformed request: 'id' must be an integer or short string"
        )
    assert isinstance(request_id, int | str)
    unknown = sorted(set(data) - {"id", "cmd", "args"})
    if unknown:
        raise RequestError(BAD_REQUEST, f"unknown request key(s): {', '.join(unknown)}", request_id)
    cmd = data.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise RequestError(BAD_REQUEST, "malformed request: 'cmd' must be a string", request_id)
    args = data.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError(BAD_REQUEST, "malformed request: 'args' must be an object", request_id)
    return Request(request_id, cmd, args)


def parse_reply(line: bytes) -> Reply:
    """Decode one server line; ValueError if it is not a valid reply."""
    try:
        data = _loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"daemon sent a line that is not JSON: {err}") from None
    if not isinstance(data, dict) or "id" not in data:
        raise ValueError("daemon sent a reply without an id")
    request_id = data["id"]
    if request_id is not None and not _valid_id(request_id):
        raise ValueError(f"daemon sent a reply with a bad id: {request_id!r}")
    if "event" in data:
        return Reply(request_id, final=False, ok=True, event=data["event"])
    ok = data.get("ok")
    if ok is True:
        return Reply(request_id, final=True, ok=True, result=data.get("result"))
    if ok is False:
        return Reply(
            request_id,
            final=True,
            ok=False,
            error=str(data.get("error", "unspecified error")),
            code=str(data.get("code", INTERNAL)),
        )
    raise ValueError("daemon sent a reply that is neither an event nor a result")
