"""The synchronous client: ``Sandbox``."""

from __future__ import annotations

import atexit
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union
from urllib.parse import quote

import httpx

from . import _core
from ._core import Execution, FileInput, OutputCallback, SessionInfo, Settings
from ._errors import ForkvmError, NotFoundError, error_from_response
from ._http import TransportErrors, error_of, should_retry


class Sandbox:
    """A forkvm sandbox.

    ``Sandbox(key).run(code)`` runs code in a fresh sandbox each time. A *session* —
    ``Sandbox.create()`` — keeps its state (variables, files, processes) between runs,
    can be forked, and is deleted by ``kill()`` or on leaving a ``with`` block.

    The key and the server's URL default to ``FORKVM_API_KEY`` and ``FORKVM_URL``.
    """

    def __init__(
        self,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
        max_retries: Optional[int] = None,
        _session_id: Optional[str] = None,
        _http: Optional[httpx.Client] = None,
        _settings: Optional[Settings] = None,
    ) -> None:
        self._settings = _settings or Settings.resolve(api_key, base_url, timeout, max_retries)
        # Connections are pooled per server and key, shared by every Sandbox using them:
        # `Sandbox(key).run(code)` in a loop neither leaks nor reconnects.
        self._http = _http or _shared_client(self._settings)
        #: The session's id; ``None`` for a sandbox that runs each request fresh.
        self.id = _session_id
        self.files = Files(self)
        self.commands = Commands(self)

    # -- sessions ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        *,
        template: Optional[str] = None,
        ttl: Optional[int] = None,
        metadata: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        max_retries: Optional[int] = None,
    ) -> "Sandbox":
        """A new session (a fork of ``template``, idle for at most ``ttl`` seconds)."""
        client = cls(api_key, base_url, timeout=timeout, max_retries=max_retries)
        body = _core.create_body(template, ttl, metadata)
        info = client._request("POST", "/v1/sandboxes", json=body).json()
        client.id = str(info["id"])
        return client

    @classmethod
    def connect(
        cls,
        session_id: str,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        **kw: Any,
    ) -> "Sandbox":
        """The session `session_id` (made earlier, perhaps by another process), checked to
        exist for this key (``NotFoundError`` otherwise)."""
        sandbox = cls(api_key, base_url, _session_id=str(session_id), **kw)
        sandbox.info()
        return sandbox

    @classmethod
    def list(
        cls,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        **kw: Any,
    ) -> List[SessionInfo]:
        """The key's live sessions."""
        data = cls(api_key, base_url, **kw)._request("GET", "/v1/sandboxes").json()
        return [_core.session_from(s) for s in data.get("sandboxes", [])]

    def info(self) -> SessionInfo:
        """This session as the server sees it now."""
        return _core.session_from(self._request("GET", self._session_path()).json())

    def fork(self, n: int = 1) -> List["Sandbox"]:
        """``n`` new sessions that start from this one's exact state."""
        data = self._request("POST", self._session_path("/fork"), json={"count": n}).json()
        return [
            Sandbox(_session_id=str(i), _http=self._http, _settings=self._settings)
            for i in data["ids"]
        ]

    def pause(self) -> SessionInfo:
        """Stores the session's complete state on the server's disk and frees its VM. It
        survives server restarts; the next call (or ``resume``) brings it back as it was."""
        return _core.session_from(self._request("POST", self._session_path("/pause")).json())

    def resume(self) -> SessionInfo:
        """Brings a paused session back now (any call would); running: nothing to do."""
        return _core.session_from(self._request("POST", self._session_path("/resume")).json())

    def kill(self) -> None:
        """Deletes the session (its sandbox and files). A session already gone is fine."""
        if self.id is None:
            return
        try:
            self._request("DELETE", self._session_path())
        except NotFoundError:
            pass

    # -- running code -----------------------------------------------------------------

    def run(
        self,
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
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> Execution:
        """Runs ``code`` and returns how it ran. ``language`` (``python``, ``javascript``,
        ``typescript``, ``bash``...) defaults to the template's own; ``template`` picks one
        of the server's templates (default: the first that runs ``language``).

        ``timeout`` is the code's wall-clock limit in seconds. With ``on_stdout`` or
        ``on_stderr`` the output is delivered as it is written (Server-Sent Events).
        """
        streaming = on_stdout is not None or on_stderr is not None
        body = _core.exec_body(
            code,
            language=language,
            template=template,
            timeout=timeout,
            env=env,
            stdin=stdin,
            files=files,
            cwd=cwd,
            memory_mb=memory_mb,
            output_limit_bytes=output_limit_bytes,
            stream=streaming,
        )
        path = "/v1/exec" if self.id is None else self._session_path("/exec")
        return self._execute(path, body, timeout, on_stdout, on_stderr)

    def run_batch(self, items: Iterable[Union[str, Mapping[str, Any]]]) -> List[Execution]:
        """Runs several snippets at once, each in its own fresh sandbox. An item is code,
        or a dict of ``run``'s keyword arguments with ``code``."""
        body = _core.batch_body(items)
        longest = max((e.get("timeout_seconds", 30.0) for e in body["executions"]), default=30.0)
        data = self._request(
            "POST",
            "/v1/exec/batch",
            json=body,
            timeout=_core.call_timeout(self._settings, longest),
        ).json()
        return [_core.execution_from(r) for r in data["results"]]

    # -- plumbing ---------------------------------------------------------------------

    def _session_path(self, rest: str = "") -> str:
        if self.id is None:
            raise ForkvmError("this Sandbox is not a session: use Sandbox.create()")
        return f"/v1/sandboxes/{self.id}{rest}"

    def _execute(
        self,
        path: str,
        body: Dict[str, Any],
        timeout: Optional[float],
        on_stdout: Optional[OutputCallback],
        on_stderr: Optional[OutputCallback],
    ) -> Execution:
        call_timeout = _core.call_timeout(self._settings, timeout)
        if not body.get("stream"):
            data = self._request("POST", path, json=body, timeout=call_timeout).json()
            return _core.execution_from(data)
        for attempt in range(self._settings.max_retries + 1):
            with TransportErrors():
                with self._http.stream("POST", path, json=body, timeout=call_timeout) as r:
                    if r.status_code == 200:
                        parser = _core.SseParser()
                        for line in r.iter_lines():
                            event = parser.feed(line)
                            if event is None:
                                continue
                            last = _core.handle_event(*event, on_stdout, on_stderr)
                            if last is None:
                                continue
                            if event[0] == "error":
                                raise error_from_response(500, last, None)
                            return _core.execution_from(last)
                        raise ForkvmError("the event stream ended without a result")
                    r.read()
                    error = error_of(r)
            if not should_retry(error, attempt, self._settings.max_retries):
                raise error
            time.sleep(_core.retry_delay(attempt, getattr(error, "retry_after", None)))
        raise AssertionError("unreachable")

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: Optional[bytes] = None,
        timeout: Optional[float] = None,
    ) -> httpx.Response:
        """One call, retried on 429 and 503 (honouring ``Retry-After``); errors raised."""
        for attempt in range(self._settings.max_retries + 1):
            with TransportErrors():
                response = self._http.request(
                    method,
                    path,
                    json=json,
                    content=content,
                    timeout=timeout if timeout is not None else self._settings.timeout,
                )
            if response.is_success:
                return response
            error = error_of(response)
            if not should_retry(error, attempt, self._settings.max_retries):
                raise error
            time.sleep(_core.retry_delay(attempt, getattr(error, "retry_after", None)))
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Nothing to release: connections are pooled per server and key, and closed at
        exit. (Kept so that ``Sandbox`` can be used like a resource; see ``kill`` for
        deleting a session.)"""

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()

    def __repr__(self) -> str:
        what = f"session {self.id}" if self.id else "fresh"
        return f"<forkvm.Sandbox {what} at {self._settings.base_url}>"


_clients: Dict[tuple, httpx.Client] = {}
_clients_lock = threading.Lock()


def _shared_client(settings: Settings) -> httpx.Client:
    key = (settings.base_url, settings.api_key, settings.timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None or client.is_closed:
            client = httpx.Client(
                base_url=settings.base_url,
                headers=settings.headers(),
                timeout=settings.timeout,
            )
            _clients[key] = client
        return client


@atexit.register
def _close_clients() -> None:
    with _clients_lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


class Files:
    """A session's files."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def _path(self, path: str) -> str:
        return self._sandbox._session_path("/files/" + quote(path.lstrip("/")))

    def write(self, path: str, data: Union[str, bytes]) -> None:
        """Writes ``data`` (text is UTF-8) to ``path`` in the session."""
        content = data.encode() if isinstance(data, str) else data
        self._sandbox._request("PUT", self._path(path), content=content)

    def read(self, path: str) -> bytes:
        """The bytes of ``path`` in the session."""
        return self._sandbox._request("GET", self._path(path)).content


class Commands:
    """Shell commands in a session."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def run(
        self,
        cmd: str,
        *,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        stdin: Optional[str] = None,
        cwd: Optional[str] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> Execution:
        """Runs the command line with ``bash -c`` in the session."""
        streaming = on_stdout is not None or on_stderr is not None
        body = _core.command_body(
            cmd, timeout=timeout, env=env, stdin=stdin, cwd=cwd, stream=streaming
        )
        path = self._sandbox._session_path("/commands")
        return self._sandbox._execute(path, body, timeout, on_stdout, on_stderr)
