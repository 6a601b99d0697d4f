"""What both clients do with httpx the same way: errors from answers and failures, and
which answers are retried."""

from __future__ import annotations

from typing import Any

import httpx

from ._errors import ConnectionError, ForkvmError, RateLimitError, TimeoutError
from ._errors import UnavailableError, error_from_response


def error_of(response: httpx.Response) -> ForkvmError:
    """The exception for an error answer (its body read already)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_from_response(response.status_code, body, response.headers.get("retry-after"))


def should_retry(error: ForkvmError, attempt: int, max_retries: int) -> bool:
    """429 and 503 are retried, up to ``max_retries`` times."""
    retryable = isinstance(error, (RateLimitError, UnavailableError))
    return retryable and attempt < max_retries


class TransportErrors:
    """Turns httpx's transport failures into the SDK's exceptions."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, tb: Any) -> bool:
        if isinstance(error, httpx.TimeoutException):
            raise TimeoutError(f"no answer in time: {error}", kind="timeout") from error
        if isinstance(error, httpx.TransportError):
            raise ConnectionError(f"cannot reach the server: {error}", kind="connection") from error
        return False
