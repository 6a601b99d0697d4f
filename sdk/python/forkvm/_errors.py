"""Exceptions: one class per kind of API error, all under ``ForkvmError``."""

from __future__ import annotations

import builtins
from typing import Any, Optional


class ForkvmError(Exception):
    """An error the forkvm server answered with (or the call to it failed).

    ``kind`` is the API's stable error kind (``unauthorized``, ``rate_limited``, ...),
    ``status`` the HTTP status (0 when no answer came), ``field`` the request field at
    fault when the server named one.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "error",
        status: int = 0,
        field: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status
        self.field = field

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, kind={self.kind!r}, status={self.status})"


class AuthenticationError(ForkvmError):
    """401: the API key is missing or not known to the server."""


class NotFoundError(ForkvmError):
    """404: no such session (for this key), file or route."""


class InvalidRequestError(ForkvmError):
    """400, 408, 413 or 422: the request was refused as it was; ``field`` names the culprit."""


class ConflictError(ForkvmError):
    """409: the session cannot do that now (its code exited, or a process is mid-``vfork``)."""


class RateLimitError(ForkvmError):
    """429: the key's request rate (``rate_limited``) or quota (``quota_exceeded``) is
    reached; ``retry_after`` says how many seconds to wait."""

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(ForkvmError):
    """5xx: a fault of the server's, never of the code that ran."""


class UnavailableError(ServerError):
    """503: the server cannot take the request now (starting, shutting down, full)."""


class TimeoutError(ForkvmError, builtins.TimeoutError):
    """The HTTP call got no answer in time (the code's own time limit is not an exception:
    it ends the execution with ``error.kind == "timeout"``)."""


class ConnectionError(ForkvmError, builtins.ConnectionError):
    """The server could not be reached."""


def error_from_response(status: int, body: Any, retry_after: Optional[str]) -> ForkvmError:
    """The exception for an error answer: ``body`` is its parsed JSON (or text)."""
    detail = body.get("error", {}) if isinstance(body, dict) else {}
    kind = detail.get("kind") or "error"
    message = detail.get("message") or (body if isinstance(body, str) else "") or f"HTTP {status}"
    kw: dict[str, Any] = {"kind": kind, "status": status, "field": detail.get("field")}
    if status == 401:
        return AuthenticationError(message, **kw)
    if status == 404:
        return NotFoundError(message, **kw)
    if status == 409:
        return ConflictError(message, **kw)
    if status == 429:
        seconds = None
        if retry_after is not None:
            try:
                seconds = float(retry_after)
            except ValueError:
                seconds = None
        return RateLimitError(message, retry_after=seconds, **kw)
    if status == 503:
        return UnavailableError(message, **kw)
    if status >= 500:
        return ServerError(message, **kw)
    if 400 <= status < 500:
        return InvalidRequestError(message, **kw)
    return ForkvmError(message, **kw)
