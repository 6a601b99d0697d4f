"""forkvm: run untrusted code in hardware-isolated KVM sandboxes forked in microseconds.

    from forkvm import Sandbox
    print(Sandbox("fvk_...").run("print(1 + 1)").stdout)   # 2

See ``Sandbox`` (and ``AsyncSandbox``) for sessions, forks, files, commands and streaming.
"""

from ._async import AsyncSandbox
from ._core import Execution, ExecutionError, SessionInfo, Timings
from ._errors import (
    AuthenticationError,
    ConflictError,
    ConnectionError,
    ForkvmError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
    TimeoutError,
    UnavailableError,
)
from ._sync import Sandbox

__all__ = [
    "AsyncSandbox",
    "AuthenticationError",
    "ConflictError",
    "ConnectionError",
    "Execution",
    "ExecutionError",
    "ForkvmError",
    "InvalidRequestError",
    "NotFoundError",
    "RateLimitError",
    "Sandbox",
    "ServerError",
    "SessionInfo",
    "TimeoutError",
    "Timings",
    "UnavailableError",
]
