"""The asynchronous client: ``AsyncSandbox``, the same surface as ``Sandbox``, awaited."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union
from urllib.parse import quote

import httpx

from . import _core
from ._core import Execution, FileInput, OutputCallback, SessionInfo, Settings
from ._errors import ForkvmError, NotFoundError, error_from_response
from ._http import TransportErrors, error_of, should_retry


class AsyncSandbox:
    """A forkvm sandbox, used with ``await``: see ``forkvm.Sandbox``.

    ``sb = await AsyncSandbox.create()`` makes a session; ``async with sb:`` deletes it at
    the end of the block.
    """

    def __init__(
        self,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
        max_retries: Optional[int] = None,
        _session_id: Optional[str] = None,
        _http: Optional[httpx.AsyncClient] = None,
        _settings: Optional[Settings] = None,
    ) -> None:
        self._settings = _settings or Settings.resolve(api_key, base_url, timeout, max_retries)
        self._owns_http = _http is None
        self._http = _http or httpx.AsyncClient(
            base_url=self._settings.base_url,
            headers=self._settings.headers(),
            timeout=self._settings.timeout,
        )
        self.id = _session_id
        self.files = AsyncFiles(self)
        self.commands = AsyncCommands(self)

    @classmethod
    async def create(
        cls,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        *,
        template: Optional[str] = None,
        ttl: Optional[int] = None,
        metadata: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        max_retries: Optional[int] = None,
    ) -> "AsyncSandbox":
        """A new session (a fork of ``template``, idle for at most ``ttl`` seconds)."""
        client = cls(api_key, base_url, timeout=timeout, max_retries=max_retries)
        body = _core.create_body(template, ttl, metadata)
        try:
            info = (await client._request("POST", "/v1/sandboxes", json=body)).json()
        except BaseException:
            await client.close()
            raise
        client.id = str(info["id"])
        return client

    @classmethod
    async def connect(
        cls,
        session_id: str,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        **kw: Any,
    ) -> "AsyncSandbox":
        """The session `session_id`, checked to exist for this key."""
        sandbox = cls(api_key, base_url, _session_id=str(session_id), **kw)
        try:
            await sandbox.info()
        except BaseException:
            await sandbox.close()
            raise
        return sandbox

    @classmethod
    async def list(
        cls,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        **kw: Any,
    ) -> List[SessionInfo]:
        """The key's live sessions."""
        client = cls(api_key, base_url, **kw)
        try:
            data = (await client._request("GET", "/v1/sandboxes")).json()
        finally:
            await client.close()
        return [_core.session_from(s) for s in data.get("sandboxes", [])]

    async def info(self) -> SessionInfo:
        """This session as the server sees it now."""
        return _core.session_from((await self._request("GET", self._session_path())).json())

    async def fork(self, n: int = 1) -> List["AsyncSandbox"]:
        """``n`` new sessions that start from this one's exact state."""
        response = await self._request("POST", self._session_path("/fork"), json={"count": n})
        return [
            AsyncSandbox(_session_id=str(i), _http=self._http, _settings=self._settings)
            for i in response.json()["ids"]
        ]

    async def pause(self) -> SessionInfo:
        """Stores the session's complete state on the server's disk and frees its VM. It
        survives server restarts; the next call (or ``resume``) brings it back as it was."""
        response = await self._request("POST", self._session_path("/pause"))
        return _core.session_from(response.json())

    async def resume(self) -> SessionInfo:
        """Brings a paused session back now (any call would); running: nothing to do."""
        response = await self._request("POST", self._session_path("/resume"))
        return _core.session_from(response.json())

    async def kill(self) -> None:
        """Deletes the session (its sandbox and files). A session already gone is fine."""
        if self.id is None:
            return
        try:
            await self._request("DELETE", self._session_path())
        except NotFoundError:
            pass

    async def run(
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
        """Runs ``code`` and returns how it ran (see ``Sandbox.run``)."""
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
        return await self._execute(path, body, timeout, on_stdout, on_stderr)

    async def run_batch(self, items: Iterable[Union[str, Mapping[str, Any]]]) -> List[Execution]:
        """Runs several snippets at once, each in its own fresh sandbox."""
        body = _core.batch_body(items)
        longest = max((e.get("timeout_seconds", 30.0) for e in body["executions"]), default=30.0)
        response = await self._request(
            "POST",
            "/v1/exec/batch",
            json=body,
            timeout=_core.call_timeout(self._settings, longest),
        )
        return [_core.execution_from(r) for r in response.json()["results"]]

    def _session_path(self, rest: str = "") -> str:
        if self.id is None:
            raise ForkvmError("this AsyncSandbox is not a session: use AsyncSandbox.create()")
        return f"/v1/sandboxes/{self.id}{rest}"

    async def _execute(
        self,
        path: str,
        body: Dict[str, Any],
        timeout: Optional[float],
        on_stdout: Optional[OutputCallback],
        on_stderr: Optional[OutputCallback],
    ) -> Execution:
        call_timeout = _core.call_timeout(self._settings, timeout)
        if not body.get("stream"):
            response = await self._request("POST", path, json=body, timeout=call_timeout)
            return _core.execution_from(response.json())
        for attempt in range(self._settings.max_retries + 1):
            with TransportErrors():
                async with self._http.stream("POST", path, json=body, timeout=call_timeout) as r:
                    if r.status_code == 200:
                        parser = _core.SseParser()
                        async for line in r.aiter_lines():
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
                    await r.aread()
                    error = error_of(r)
            if not should_retry(error, attempt, self._settings.max_retries):
                raise error
            await asyncio.sleep(_core.retry_delay(attempt, getattr(error, "retry_after", None)))
        raise AssertionError("unreachable")

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: Optional[bytes] = None,
        timeout: Optional[float] = None,
    ) -> httpx.Response:
        for attempt in range(self._settings.max_retries + 1):
            with TransportErrors():
                response = await self._http.request(
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
            await asyncio.sleep(_core.retry_delay(attempt, getattr(error, "retry_after", None)))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Closes the HTTP connections (not the session: see ``kill``)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    def __repr__(self) -> str:
        what = f"session {self.id}" if self.id else "fresh"
        return f"<forkvm.AsyncSandbox {what} at {self._settings.base_url}>"


class AsyncFiles:
    """A session's files."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    def _path(self, path: str) -> str:
        return self._sandbox._session_path("/files/" + quote(path.lstrip("/")))

    async def write(self, path: str, data: Union[str, bytes]) -> None:
        content = data.encode() if isinstance(data, str) else data
        await self._sandbox._request("PUT", self._path(path), content=content)

    async def read(self, path: str) -> bytes:
        return (await self._sandbox._request("GET", self._path(path))).content


class AsyncCommands:
    """Shell commands in a session."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def run(
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
        streaming = on_stdout is not None or on_stderr is not None
        body = _core.command_body(
            cmd, timeout=timeout, env=env, stdin=stdin, cwd=cwd, stream=streaming
        )
        path = self._sandbox._session_path("/commands")
        return await self._sandbox._execute(path, body, timeout, on_stdout, on_stderr)
