"""What the sync and async clients share: settings, request bodies, answers, SSE."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

DEFAULT_URL = "http://127.0.0.1:8080"
#: Seconds an HTTP call may take beyond the code's own time limit.
SLACK_SECONDS = 30.0
#: Seconds a call that runs no code may take.
DEFAULT_TIMEOUT = 60.0
#: Retries of a 429 or 503 answer.
DEFAULT_RETRIES = 3

OutputCallback = Callable[[str], None]
FileInput = Union[str, bytes]


@dataclass(frozen=True)
class Settings:
    """Where the server is and how to call it."""

    api_key: Optional[str]
    base_url: str
    timeout: float
    max_retries: int

    @staticmethod
    def resolve(
        api_key: Optional[str],
        base_url: Optional[str],
        timeout: Optional[float],
        max_retries: Optional[int],
    ) -> "Settings":
        return Settings(
            api_key=api_key if api_key is not None else os.environ.get("FORKVM_API_KEY"),
            base_url=(base_url or os.environ.get("FORKVM_URL") or DEFAULT_URL).rstrip("/"),
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
            max_retries=DEFAULT_RETRIES if max_retries is None else max_retries,
        )

    def headers(self) -> Dict[str, str]:
        headers = {"User-Agent": "forkvm-python/0.1"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass(frozen=True)
class ExecutionError:
    """Why an execution ended other than by finishing: ``kind`` is ``timeout``,
    ``cpu_time_limit``, ``memory_limit``, ``output_limit``, ``fault``, ... ."""

    kind: str
    message: str


@dataclass(frozen=True)
class Timings:
    """Where an execution's time went, in milliseconds."""

    fork_ms: float
    exec_ms: float
    total_ms: float
    queue_ms: float


@dataclass(frozen=True)
class Execution:
    """How some code ran."""

    stdout: str
    stderr: str
    exit_code: int
    #: ``None`` when the code ran to its end (whatever its exit code).
    error: Optional[ExecutionError]
    timings: Timings
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    id: str = ""
    #: The exact output bytes (``stdout`` is their UTF-8 text, invalid bytes replaced).
    stdout_bytes: bytes = field(default=b"", repr=False)
    stderr_bytes: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        """The code ran to its end and exited 0."""
        return self.error is None and self.exit_code == 0

    @property
    def text(self) -> str:
        """What the code printed (stdout)."""
        return self.stdout

    def __str__(self) -> str:
        return self.stdout


@dataclass(frozen=True)
class SessionInfo:
    """A session as ``Sandbox.list()`` sees it."""

    id: str
    template: str
    alive: bool
    memory_bytes: int
    created_at: int
    last_used_at: int
    expires_at: int
    ttl_seconds: int
    metadata: Dict[str, str]
    #: ``running`` (it has a VM) or ``paused`` (stored on disk; any call resumes it).
    state: str = "running"
    #: Bytes its paused state takes on disk (0 while running).
    stored_bytes: int = 0


def execution_from(data: Mapping[str, Any]) -> Execution:
    """An ``Execution`` from the API's JSON result."""
    error = data.get("error") or {}
    kind = error.get("kind", "none")

    def raw(name: str) -> bytes:
        encoded = data.get(f"{name}_base64")
        if encoded:
            return base64.b64decode(encoded)
        return str(data.get(name, "")).encode()

    return Execution(
        stdout=data.get("stdout", ""),
        stderr=data.get("stderr", ""),
        exit_code=int(data.get("exit_code", -1)),
        error=None if kind == "none" else ExecutionError(kind, error.get("message", "")),
        timings=Timings(
            fork_ms=float(data.get("fork_time_ms", 0.0)),
            exec_ms=float(data.get("exec_time_ms", 0.0)),
            total_ms=float(data.get("total_time_ms", 0.0)),
            queue_ms=float(data.get("queue_time_ms", 0.0)),
        ),
        stdout_truncated=bool(data.get("stdout_truncated", False)),
        stderr_truncated=bool(data.get("stderr_truncated", False)),
        id=str(data.get("id", "")),
        stdout_bytes=raw("stdout"),
        stderr_bytes=raw("stderr"),
    )


def session_from(data: Mapping[str, Any]) -> SessionInfo:
    return SessionInfo(
        id=str(data["id"]),
        template=str(data.get("template", "")),
        alive=bool(data.get("alive", True)),
        memory_bytes=int(data.get("memory_bytes", 0)),
        created_at=int(data.get("created_at", 0)),
        last_used_at=int(data.get("last_used_at", 0)),
        expires_at=int(data.get("expires_at", 0)),
        ttl_seconds=int(data.get("ttl_seconds", 0)),
        metadata=dict(data.get("metadata") or {}),
        state=str(data.get("state", "running")),
        stored_bytes=int(data.get("stored_bytes", 0)),
    )


def files_body(files: Optional[Mapping[str, FileInput]]) -> Optional[List[Dict[str, Any]]]:
    if not files:
        return None
    out = []
    for path, content in files.items():
        if isinstance(content, bytes):
            out.append({"path": path, "content_base64": base64.b64encode(content).decode()})
        else:
            out.append({"path": path, "content": content})
    return out


def exec_body(
    code: str,
    *,
    language: Optional[str] = None,
    template: Optional[str] = None,
    timeout: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    stdin: Optional[str] = None,
    files: Optional[Mapping[str, FileInput]] = None,
    cwd: Optional[str] = None,
    memory_mb: Optional[int] = None,
    output_limit_bytes: Optional[int] = None,
    stream: bool = False,
) -> Dict[str, Any]:
    """The JSON of an execution request (only what was given)."""
    body: Dict[str, Any] = {"code": code}
    optional = {
        "language": language,
        "template": template,
        "timeout_seconds": timeout,
        "env": dict(env) if env else None,
        "stdin": stdin,
        "files": files_body(files),
        "cwd": cwd,
        "memory_mb": memory_mb,
        "output_limit_bytes": output_limit_bytes,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if stream:
        body["stream"] = True
    return body


def command_body(
    cmd: str,
    *,
    timeout: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    stdin: Optional[str] = None,
    cwd: Optional[str] = None,
    stream: bool = False,
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"cmd": cmd}
    optional = {
        "timeout_seconds": timeout,
        "env": dict(env) if env else None,
        "stdin": stdin,
        "cwd": cwd,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if stream:
        body["stream"] = True
    return body


def batch_body(items: Iterable[Union[str, Mapping[str, Any]]]) -> Dict[str, Any]:
    """A batch: each item is code, or a dict of ``run``'s keyword arguments plus ``code``."""
    executions = []
    for item in items:
        if isinstance(item, str):
            executions.append(exec_body(item))
        else:
            kw = dict(item)
            executions.append(exec_body(kw.pop("code"), **kw))
    return {"executions": executions}


def create_body(
    template: Optional[str], ttl: Optional[int], metadata: Optional[Mapping[str, str]]
) -> Dict[str, Any]:
    """The JSON of a new session's request (only what was given)."""
    body: Dict[str, Any] = {}
    if template is not None:
        body["template"] = template
    if ttl is not None:
        body["ttl_seconds"] = ttl
    if metadata:
        body["metadata"] = dict(metadata)
    return body


def call_timeout(settings: Settings, code_timeout: Optional[float]) -> float:
    """How long an HTTP call that runs code may take."""
    return max(settings.timeout, (code_timeout or 30.0) + SLACK_SECONDS)


def retry_delay(attempt: int, retry_after: Optional[float]) -> float:
    """Seconds to wait before retry number ``attempt`` (from 0)."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), 30.0)
    return min(0.25 * (2**attempt), 8.0)


class SseParser:
    """Server-Sent Events, fed line by line: yields ``(event, data)`` per event."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: List[str] = []

    def feed(self, line: str) -> Optional[tuple]:
        if line == "":
            if not self.data:
                self.event = "message"
                return None
            event, data = self.event, "\n".join(self.data)
            self.event, self.data = "message", []
            return event, data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def handle_event(
    event: str,
    data: str,
    on_stdout: Optional[OutputCallback],
    on_stderr: Optional[OutputCallback],
) -> Optional[Any]:
    """Delivers an output event; returns the parsed body of a ``result`` or ``error``."""
    if event == "stdout" and on_stdout is not None:
        on_stdout(json.loads(data))
    elif event == "stderr" and on_stderr is not None:
        on_stderr(json.loads(data))
    elif event in ("result", "error"):
        return json.loads(data)
    return None
