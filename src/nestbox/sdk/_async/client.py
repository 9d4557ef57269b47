"""The async client: `AsyncNestbox` and what hangs off it. This file is the one source of the
surface: `_codegen.py` turns it into the blocking `_sync/client.py` (`Nestbox`, ...) by
dropping `async`/`await` and the `Async` prefixes; the few places where the two flavours
really differ (sleeping, local file I/O, the WebSocket library) are in `_io.py`, one per flavour.

Wire formats: the public API as the control plane serves it (protocol/*, the Wrenn surface):
REST + JSON, WebSockets for process output and terminals, server-sent events for the event
streams, multipart for uploads.
"""

from __future__ import annotations

import base64
import json
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from nestbox.protocol.accounts import ApiKeyView, MeView
from nestbox.protocol.builds import BuildEvent, BuildView
from nestbox.protocol.capsules import CapsuleStatus, CapsuleView, ExecResultView, ProcessView
from nestbox.protocol.events import EventView
from nestbox.protocol.files import EntryListView, EntryView, FileEntryView
from nestbox.protocol.lifetime import ForkView
from nestbox.protocol.stdio import WatchEventView
from nestbox.protocol.templates import TemplateView
from nestbox.sdk import _core
from nestbox.sdk._async._io import (
    ClientConnection,
    monotonic,
    open_file,
    read_chunk,
    run_sync,
    sleep,
    write_chunk,
    ws_connect,
    ws_recv,
)
from nestbox.sdk._core import DEFAULT
from nestbox.sdk.config import resolve
from nestbox.sdk.errors import (
    CommandExitError,
    InvalidRequest,
    NestboxConnectionError,
    NestboxError,
    NestboxTimeout,
    NotFound,
    Unauthorized,
)
from nestbox.sdk.models import CommandResult, ProcessEvent

if TYPE_CHECKING:
    import builtins
    from collections.abc import AsyncIterator, Callable, Mapping, Sequence
    from types import TracebackType

    from nestbox.sdk._core import SseMessage

LIFECYCLE_TIMEOUT_S = 180.0
"""Default HTTP timeout of the calls that start, stop or snapshot a VM (a busy host is slow)."""

Source = str | bytes | os.PathLike[str] | BinaryIO
"""What an upload reads: a local path (str or PathLike), bytes, or a binary file object."""
Sink = str | os.PathLike[str] | BinaryIO


# ── the HTTP core ──


class AsyncApi:
    """One httpx client with the key, the default timeout, retries and error mapping."""

    def __init__(self, url: str, key: str, *, timeout: float | None, retries: int,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:  # fmt: skip
        self.url = url
        self.key = key
        self.timeout = timeout
        self.retries = retries
        self.headers = {"X-API-Key": key, "User-Agent": _core.USER_AGENT}
        self.http = httpx.AsyncClient(
            base_url=url, headers=self.headers, timeout=_core.timeout_of(timeout),
            trust_env=False, transport=transport,
        )  # fmt: skip

    async def aclose(self) -> None:
        await self.http.aclose()

    def _timeout(self, request_timeout: float | None) -> httpx.Timeout:
        return _core.timeout_of(self.timeout if request_timeout is DEFAULT else request_timeout)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        content: Any = None,
        files: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        request_timeout: float | None = DEFAULT,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send, retrying what is safe: a connection never made (any method), and broken
        connections or 502/503/504 answers of idempotent calls, with backoff. A body read
        from a stream or a file is never sent twice.

        :raise NestboxError: the API's error, a connection error or a timeout."""
        return await self._send(
            method, path, stream=False, replayable=content is None and files is None,
            idempotent=idempotent, request_timeout=request_timeout,
            json=json, params=params, content=content, files=files, data=data, headers=headers,
        )  # fmt: skip

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        request_timeout: float | None = DEFAULT,
        idempotent: bool | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A streamed answer (checked: an error answer raises before the block runs)."""
        response = await self._send(
            method, path, stream=True, replayable=True, idempotent=idempotent,
            request_timeout=request_timeout, json=json, params=params,
        )  # fmt: skip
        try:
            yield response
        except httpx.TimeoutException as err:
            raise NestboxTimeout(f"{method} {path}: the answer stalled") from err
        except httpx.TransportError as err:
            raise NestboxConnectionError(f"{method} {path}: {err!r}") from err
        finally:
            await response.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        stream: bool,
        replayable: bool,
        idempotent: bool | None,
        request_timeout: float | None,
        **parts: Any,
    ) -> httpx.Response:
        """The one retry loop of `request` and `stream`: an error answer raises (its body
        read and the response closed), a success is returned (unread when `stream`)."""
        safe = method in _core.IDEMPOTENT if idempotent is None else idempotent
        attempt = 0
        while True:
            attempt += 1
            again = replayable and attempt <= self.retries
            request = self.http.build_request(
                method, path, timeout=self._timeout(request_timeout), **parts
            )
            try:
                response = await self.http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                if again:
                    await sleep(_core.backoff(attempt))
                    continue
                raise NestboxConnectionError(f"cannot reach {self.url}: {err}") from err
            except httpx.TimeoutException as err:
                raise NestboxTimeout(f"{method} {path}: no answer in time") from err
            except httpx.TransportError as err:
                if again and safe:
                    await sleep(_core.backoff(attempt))
                    continue
                raise NestboxConnectionError(f"{method} {path}: {err!r}") from err
            if response.status_code < 400:
                return response
            body = await response.aread()
            await response.aclose()
            if response.status_code in _core.RETRY_STATUSES and again and safe:
                await sleep(_core.backoff(attempt, _core.retry_after(response)))
                continue
            raise _core.error_of(response, body)

    async def sse(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[SseMessage]:
        """Server-sent events of `path`, as they come (no timeout: the stream is long-lived)."""
        async with self.stream("GET", path, params=params, request_timeout=None) as response:
            parser = _core.SseParser()
            async for line in response.aiter_lines():
                message = parser.feed(line)
                if message is not None:
                    yield message

    async def ws(self, path: str, request_timeout: float | None = DEFAULT) -> ClientConnection:
        """A WebSocket to the API. :raise NestboxError: the refusal (404, 409, ...)."""
        timeout = self.timeout if request_timeout is DEFAULT else request_timeout
        try:
            return await ws_connect(_core.ws_url(self.url, path), self.headers, timeout)
        except InvalidStatus as err:
            raise _core.ws_refusal(
                err.response.status_code, bytes(err.response.body or b"")
            ) from err
        except TimeoutError as err:
            raise NestboxTimeout(f"WebSocket {path}: no answer in time") from err
        except (OSError, InvalidHandshake) as err:
            raise NestboxConnectionError(f"WebSocket {path}: {err!r}") from err

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self.request(method, path, **kwargs)).json()


def _closed_error(err: ConnectionClosed) -> NestboxError | None:
    close = err.rcvd
    return _core.ws_close_error(close.code if close else None, close.reason if close else "")


# ── the client ──


class AsyncNestbox:
    """The API client. `api_url` and `api_key` default to `NESTBOX_API_URL` /
    `NESTBOX_API_KEY`, then the CLI's config file; `timeout` is every call's default HTTP
    timeout (None: none), `retries` how often a safe call is retried."""

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | None = _core.DEFAULT_TIMEOUT_S,
        retries: int = _core.RETRIES,
        config_file: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        settings = resolve(api_url, api_key, config_file)
        if not settings.api_key:
            raise Unauthorized(
                "unauthorized",
                "no API key: pass api_key, set NESTBOX_API_KEY or run `nestbox login`",
            )
        self.api_url = settings.api_url
        self._api = AsyncApi(settings.api_url, settings.api_key, timeout=timeout,
                             retries=retries, transport=transport)  # fmt: skip
        self.capsules = AsyncCapsules(self._api)
        self.templates = AsyncTemplates(self._api)
        self.builds = AsyncBuilds(self._api)
        self.keys = AsyncKeys(self._api)

    async def __aenter__(self) -> AsyncNestbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._api.aclose()

    async def me(self, *, request_timeout: float | None = DEFAULT) -> MeView:
        """Who the key acts for (`GET /v1/me`): a cheap check of URL and key."""
        doc = await self._api.json("GET", "/v1/me", request_timeout=request_timeout)
        return MeView.model_validate(doc)

    async def events(self) -> AsyncIterator[EventView]:
        """The team's events as they happen (`/v1/events/stream`, `connected` first; never
        ends by itself)."""
        async for message in self._api.sse("/v1/events/stream"):
            yield EventView.model_validate(_core.sse_json(message))


# ── capsules ──


class AsyncCapsules:
    def __init__(self, api: AsyncApi) -> None:
        self._api = api

    async def create(
        self,
        template: str | None = None,
        *,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        idle_timeout: int | None = None,
        metadata: Mapping[str, str] | None = None,
        internet: bool | None = None,
        lifetime: int | None = None,
        on_timeout: str | None = None,
        auto_resume: bool | None = None,
        envs: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        request_timeout: float | None = LIFECYCLE_TIMEOUT_S,
    ) -> AsyncCapsule:
        """A new running capsule from `template` (the server's default: `minimal`).
        `idle_timeout`: seconds without activity before it is paused (0: never);
        `internet`: outbound access; `lifetime`: seconds each run may last, then
        `on_timeout` (pause or destroy); `auto_resume`: calls to it while paused resume it;
        `envs`: its processes' default environment; `extra`: body fields of newer servers."""
        more = {"ttl_sec": lifetime, "on_timeout": on_timeout, "auto_resume": auto_resume,
                "envs": dict(envs) if envs else None, **(extra or {})}  # fmt: skip
        body = _core.create_body(template, vcpus, memory_mb, idle_timeout, metadata, internet,
                                 {k: v for k, v in more.items() if v is not None})  # fmt: skip
        doc = await self._api.json("POST", "/v1/capsules", json=body,
                                   request_timeout=request_timeout)  # fmt: skip
        return AsyncCapsule(self._api, CapsuleView.model_validate(doc))

    async def info(
        self, capsule_id: str, *, request_timeout: float | None = DEFAULT
    ) -> CapsuleView:
        doc = await self._api.json("GET", f"/v1/capsules/{capsule_id}",
                                   request_timeout=request_timeout)  # fmt: skip
        return CapsuleView.model_validate(doc)

    async def get(
        self, capsule_id: str, *, request_timeout: float | None = DEFAULT
    ) -> AsyncCapsule:
        """The capsule (any state). :raise NotFound: unknown, another team's or destroyed."""
        return AsyncCapsule(self._api, await self.info(capsule_id, request_timeout=request_timeout))

    async def connect(
        self, capsule_id: str, *, request_timeout: float | None = LIFECYCLE_TIMEOUT_S
    ) -> AsyncCapsule:
        """The capsule, resumed first if it is paused."""
        capsule = await self.get(capsule_id)
        if capsule.info.status == CapsuleStatus.PAUSED:
            await capsule.resume(request_timeout=request_timeout)
        return capsule

    async def list(
        self,
        *,
        status: str | Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        page_size: int | None = None,
        request_timeout: float | None = DEFAULT,
    ) -> AsyncIterator[CapsuleView]:
        """The team's capsules, page by page as the iteration goes (filters: `status`, and
        `metadata` pairs that must all match)."""
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            params = _core.list_params(status, metadata, page_size, cursor)
            response = await self._api.request("GET", "/v1/capsules", params=params,
                                               request_timeout=request_timeout)  # fmt: skip
            items, cursor = _core.page_of(response)
            for item in items:
                view = CapsuleView.model_validate(item)
                if view.id not in seen:  # a page boundary may repeat one under inserts
                    seen.add(view.id)
                    yield view
            if not cursor or not items:
                return

    async def pause(
        self, capsule_id: str, *, request_timeout: float | None = LIFECYCLE_TIMEOUT_S
    ) -> CapsuleView:
        doc = await self._api.json("POST", f"/v1/capsules/{capsule_id}/pause",
                                   request_timeout=request_timeout)  # fmt: skip
        return CapsuleView.model_validate(doc)

    async def resume(
        self, capsule_id: str, *, request_timeout: float | None = LIFECYCLE_TIMEOUT_S
    ) -> CapsuleView:
        doc = await self._api.json("POST", f"/v1/capsules/{capsule_id}/resume",
                                   request_timeout=request_timeout)  # fmt: skip
        return CapsuleView.model_validate(doc)

    async def destroy(
        self, capsule_id: str, *, request_timeout: float | None = LIFECYCLE_TIMEOUT_S
    ) -> None:
        await self._api.request("DELETE", f"/v1/capsules/{capsule_id}",
                                request_timeout=request_timeout)  # fmt: skip

    async def set_timeout(
        self,
        capsule_id: str,
        idle_timeout: int | None = None,
        *,
        lifetime: int | None = None,
        on_timeout: str | None = None,
        request_timeout: float | None = DEFAULT,
    ) -> CapsuleView:
        """Change a live capsule's idle timeout (0: never pause it) and/or its lifetime from
        now (`lifetime` seconds, 0: none; `on_timeout`: pause or destroy at its end)."""
        body = {"timeout_sec": idle_timeout, "ttl_sec": lifetime, "on_timeout": on_timeout}
        doc = await self._api.json("POST", f"/v1/capsules/{capsule_id}/timeout",
                                   json={k: v for k, v in body.items() if v is not None},
                                   idempotent=True, request_timeout=request_timeout)  # fmt: skip
        return CapsuleView.model_validate(doc)

    async def fork(
        self,
        capsule_id: str,
        count: int = 1,
        *,
        request_timeout: float | None = LIFECYCLE_TIMEOUT_S,
    ) -> builtins.list[AsyncCapsule]:
        """`count` new capsules, copies of the running one as it is now (memory, processes,
        files), each with its own identity."""
        doc = await self._api.json("POST", f"/v1/capsules/{capsule_id}/fork",
                                   json={"count": count},
                                   request_timeout=request_timeout)  # fmt: skip
        return [AsyncCapsule(self._api, view) for view in ForkView.model_validate(doc).capsules]

    async def ping(self, capsule_id: str, *, request_timeout: float | None = DEFAULT) -> None:
        """Reset the idle timer."""
        await self._api.request("POST", f"/v1/capsules/{capsule_id}/ping", idempotent=True,
                                request_timeout=request_timeout)  # fmt: skip


class AsyncCapsule:
    """One capsule: its last known `info`, its `commands`, `files` and `pty`. As a context
    manager it is destroyed when the block ends."""

    def __init__(self, api: AsyncApi, info: CapsuleView) -> None:
        self._api = api
        self.info = info
        self.id = info.id
        self.commands = AsyncCommands(api, info.id)
        self.files = AsyncFiles(api, info.id)
        self.pty = AsyncPty(api, info.id)

    def __repr__(self) -> str:
        return f"<Capsule {self.id} {self.info.status}>"

    async def __aenter__(self) -> AsyncCapsule:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.destroy()
        except NotFound:
            pass
        except NestboxError:
            if kind is None:  # the block's own error matters more than the clean-up's
                raise

    @property
    def status(self) -> CapsuleStatus:
        return self.info.status

    async def refresh(self, *, request_timeout: float | None = DEFAULT) -> CapsuleView:
        doc = await self._api.json("GET", f"/v1/capsules/{self.id}",
                                   request_timeout=request_timeout)  # fmt: skip
        self.info = CapsuleView.model_validate(doc)
        return self.info

    async def pause(self, *, request_timeout: float | None = LIFECYCLE_TIMEOUT_S) -> CapsuleView:
        self.info = await AsyncCapsules(self._api).pause(self.id, request_timeout=request_timeout)
        return self.info

    async def resume(self, *, request_timeout: float | None = LIFECYCLE_TIMEOUT_S) -> CapsuleView:
        self.info = await AsyncCapsules(self._api).resume(self.id, request_timeout=request_timeout)
        return self.info

    async def destroy(self, *, request_timeout: float | None = LIFECYCLE_TIMEOUT_S) -> None:
        await AsyncCapsules(self._api).destroy(self.id, request_timeout=request_timeout)

    async def set_timeout(
        self,
        idle_timeout: int | None = None,
        *,
        lifetime: int | None = None,
        on_timeout: str | None = None,
        request_timeout: float | None = DEFAULT,
    ) -> CapsuleView:
        """See `Capsules.set_timeout`."""
        self.info = await AsyncCapsules(self._api).set_timeout(
            self.id, idle_timeout, lifetime=lifetime, on_timeout=on_timeout,
            request_timeout=request_timeout,
        )  # fmt: skip
        return self.info

    async def fork(
        self, count: int = 1, *, request_timeout: float | None = LIFECYCLE_TIMEOUT_S
    ) -> builtins.list[AsyncCapsule]:
        return await AsyncCapsules(self._api).fork(self.id, count, request_timeout=request_timeout)

    async def ping(self, *, request_timeout: float | None = DEFAULT) -> None:
        await AsyncCapsules(self._api).ping(self.id, request_timeout=request_timeout)

    async def snapshot(
        self,
        name: str | None = None,
        *,
        overwrite: bool = False,
        request_timeout: float | None = LIFECYCLE_TIMEOUT_S,
    ) -> TemplateView:
        """A template made of this capsule as it is now (the capsule is left paused)."""
        return await AsyncTemplates(self._api).snapshot(
            self.id, name, overwrite=overwrite, request_timeout=request_timeout
        )

    def get_url(self, port: int, path: str = "/") -> str:
        """The public URL of `port` in the capsule (the control plane's port proxy)."""
        return f"{self._api.url}/proxy/{self.id}/{port}/{path.lstrip('/')}"


# ── commands ──


class AsyncCommands:
    def __init__(self, api: AsyncApi, capsule_id: str) -> None:
        self._api = api
        self._base = f"/v1/capsules/{capsule_id}"

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: int | None = 30,
        check: bool = False,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        request_timeout: float | None = DEFAULT,
    ) -> CommandResult:
        """Run to the end: a string through `/bin/sh -c`, a sequence as argv. With
        `on_stdout`/`on_stderr` the output streams to them as it comes. A non-zero exit is
        a result, unless `check` (then `CommandExitError`). `timeout`: seconds the command
        may run (None: no limit when streaming, the server's 30 s otherwise)."""
        if on_stdout is not None or on_stderr is not None:
            handle = await self.start(cmd, envs=envs, cwd=cwd, user=user,
                                      request_timeout=request_timeout)  # fmt: skip
            async with handle:
                result = await handle.wait(on_stdout=on_stdout, on_stderr=on_stderr,
                                           timeout=timeout, kill_on_timeout=True)  # fmt: skip
        else:
            if request_timeout is DEFAULT:
                request_timeout = (timeout or 30) + _core.COMMAND_GRACE_S
            body = _core.exec_body(cmd, envs=envs, cwd=cwd, user=user, timeout=timeout)
            doc = await self._api.json("POST", f"{self._base}/exec", json=body,
                                       request_timeout=request_timeout)  # fmt: skip
            result = _core.result_of(ExecResultView.model_validate(doc))
        if check and result.exit_code != 0:
            raise CommandExitError(result)
        return result

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        tag: str | None = None,
        request_timeout: float | None = DEFAULT,
    ) -> AsyncCommandHandle:
        """Start a command in the background and return its handle once it runs: its output
        (iterate the handle, or `wait`), `kill`, and with `stdin=True` `send_stdin` and
        `close_stdin`. Closing the handle leaves it running (`connect` re-attaches).

        Without stdin the handle sees all the output; with it (a detached process with a
        stdin pipe, then attached) what it printed before the attach is not replayed, which
        matters little for a process that waits for its input."""
        if stdin or tag is not None:
            body = _core.exec_body(cmd, envs=envs, cwd=cwd, user=user, timeout=None,
                                   background=True, tag=tag, stdin=stdin)  # fmt: skip
            doc = await self._api.json("POST", f"{self._base}/exec", json=body,
                                       request_timeout=request_timeout)  # fmt: skip
            handle = await self.connect(int(doc["pid"]), request_timeout=request_timeout)
            handle.tag = doc.get("tag")
            return handle
        ws = await self._api.ws(f"{self._base}/exec/stream", request_timeout=request_timeout)
        try:
            await ws.send(_core.stream_start(cmd, envs, cwd, user))
            handle = AsyncCommandHandle(self._api, self._base, ws, pid=None)
            await handle.started(request_timeout)
        except BaseException:
            await ws.close()
            raise
        return handle

    async def connect(
        self, pid_or_tag: int | str, *, request_timeout: float | None = DEFAULT
    ) -> AsyncCommandHandle:
        """Attach to a running process (by pid, or by the tag of a detached one): its output
        from now on, and its exit."""
        path = f"{self._base}/processes/{pid_or_tag}/stream"
        ws = await self._api.ws(path, request_timeout=request_timeout)
        pid = pid_or_tag if isinstance(pid_or_tag, int) else None
        return AsyncCommandHandle(self._api, self._base, ws, pid=pid)

    async def run_detached(
        self,
        cmd: str | Sequence[str],
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tag: str | None = None,
        request_timeout: float | None = DEFAULT,
    ) -> ProcessView:
        """Start a command without watching it (it gets `tag`, or one is made); its pid and
        tag. Re-attach with `connect`."""
        body = _core.exec_body(cmd, envs=envs, cwd=cwd, user=user, timeout=None,
                               background=True, tag=tag)  # fmt: skip
        doc = await self._api.json("POST", f"{self._base}/exec", json=body,
                                   request_timeout=request_timeout)  # fmt: skip
        return ProcessView(pid=doc["pid"], tag=doc.get("tag"), cmd=doc.get("cmd", ""),
                           args=body["args"])  # fmt: skip

    async def list(self, *, request_timeout: float | None = DEFAULT) -> builtins.list[ProcessView]:
        doc = await self._api.json("GET", f"{self._base}/processes",
                                   request_timeout=request_timeout)  # fmt: skip
        return [ProcessView.model_validate(p) for p in doc["processes"]]

    async def kill(
        self,
        pid_or_tag: int | str,
        *,
        signal: str = "SIGKILL",
        request_timeout: float | None = DEFAULT,
    ) -> None:
        await self._api.request("DELETE", f"{self._base}/processes/{pid_or_tag}",
                                params={"signal": signal},
                                request_timeout=request_timeout)  # fmt: skip

    async def send_stdin(
        self,
        pid_or_tag: int | str,
        data: str | bytes,
        *,
        request_timeout: float | None = DEFAULT,
    ) -> None:
        """Write to the stdin of a process started with `stdin=True`."""
        if isinstance(data, str):
            body = {"data": data, "encoding": "utf-8"}
        else:
            body = {"data": base64.b64encode(data).decode(), "encoding": "base64"}
        await self._api.request("POST", f"{self._base}/processes/{pid_or_tag}/stdin", json=body,
                                request_timeout=request_timeout)  # fmt: skip

    async def close_stdin(
        self, pid_or_tag: int | str, *, request_timeout: float | None = DEFAULT
    ) -> None:
        """Close a process's stdin (it reads end-of-file)."""
        await self._api.request("DELETE", f"{self._base}/processes/{pid_or_tag}/stdin",
                                request_timeout=request_timeout)  # fmt: skip


class AsyncCommandHandle:
    """A process's output stream (WebSocket). Iterate it for `ProcessEvent`s, or `wait` for
    the result; `exit_code` is set once it ended. Closing it (or leaving its `with` block)
    leaves the process running."""

    def __init__(self, api: AsyncApi, base: str, ws: ClientConnection, pid: int | None) -> None:
        self._api = api
        self._base = base
        self._ws = ws
        self.pid = pid
        self.tag: str | None = None
        self.exit_code: int | None = None
        self._ended = False

    async def __aenter__(self) -> AsyncCommandHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop watching (the process goes on)."""
        await self._ws.close()

    async def started(self, request_timeout: float | None = DEFAULT) -> None:
        """Wait for the `start` frame (the pid)."""
        timeout = self._api.timeout if request_timeout is DEFAULT else request_timeout
        event = await self._next(timeout)
        if event is None or event.type != "start" or event.pid is None:
            raise NestboxError("internal_error", f"the stream did not start: {event}")
        self.pid = event.pid

    async def _next(self, timeout: float | None) -> ProcessEvent | None:
        """The next frame as an event; None once the stream is over."""
        if self._ended:
            return None
        try:
            message = await ws_recv(self._ws, timeout)
        except ConnectionClosed as err:
            self._ended = True
            error = _closed_error(err)
            if error is not None:
                raise error from err
            return None
        except TimeoutError as err:
            raise NestboxTimeout("no output in time") from err
        doc = json.loads(message)
        event = ProcessEvent.model_validate(doc)
        if event.type == "exit":
            self.exit_code = event.exit_code
            self._ended = True
        elif event.type == "error":
            self._ended = True
        return event

    async def events(self, timeout: float | None = None) -> AsyncIterator[ProcessEvent]:
        """Output events until the process ends (`exit`) or the stream fails (`error`);
        `timeout`: the whole iteration's limit."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - monotonic())
            event = await self._next(left)
            if event is None:
                return
            yield event

    def __aiter__(self) -> AsyncIterator[ProcessEvent]:
        return self.events()

    async def wait(
        self,
        *,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        timeout: float | None = None,
        check: bool = False,
        kill_on_timeout: bool = False,
    ) -> CommandResult:
        """Read the output to the end; the result (what this handle saw of the output)."""
        collected = _core.Collected(pid=self.pid, exit_code=self.exit_code)
        started = monotonic()
        try:
            async for event in self.events(timeout):
                if event.type == "stdout":
                    collected.stdout.append(event.data)
                    if on_stdout is not None:
                        on_stdout(event.data)
                elif event.type == "stderr":
                    collected.stderr.append(event.data)
                    if on_stderr is not None:
                        on_stderr(event.data)
                elif event.type == "error":
                    raise NestboxError("internal_error", event.data)
        except NestboxTimeout:
            if kill_on_timeout and self.pid is not None:
                await self.kill()
            raise
        collected.exit_code = self.exit_code
        result = collected.result(int((monotonic() - started) * 1000))
        if check and result.exit_code != 0:
            raise CommandExitError(result)
        return result

    async def kill(self, signal: str = "SIGKILL") -> None:
        if self.pid is None:
            raise InvalidRequest("invalid_request", "the process has no pid yet")
        await self._api.request("DELETE", f"{self._base}/processes/{self.pid}",
                                params={"signal": signal})  # fmt: skip

    async def send_stdin(self, data: str | bytes) -> None:
        if self.pid is None:
            raise InvalidRequest("invalid_request", "the process has no pid yet")
        await AsyncCommands(self._api, self._base.rsplit("/", 1)[1]).send_stdin(self.pid, data)

    async def close_stdin(self) -> None:
        if self.pid is None:
            raise InvalidRequest("invalid_request", "the process has no pid yet")
        await AsyncCommands(self._api, self._base.rsplit("/", 1)[1]).close_stdin(self.pid)


# ── terminals ──


class AsyncPty:
    def __init__(self, api: AsyncApi, capsule_id: str) -> None:
        self._api = api
        self._path = f"/v1/capsules/{capsule_id}/pty"

    async def create(
        self,
        cmd: str = "/bin/bash",
        *,
        args: Sequence[str] | None = None,
        cols: int = 80,
        rows: int = 24,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        request_timeout: float | None = DEFAULT,
    ) -> AsyncPtySession:
        """A new terminal running `cmd`; it outlives the session (reconnect by its tag)."""
        ws = await self._api.ws(self._path, request_timeout=request_timeout)
        frame = _core.pty_start(cmd, args, cols, rows, envs, cwd, user)
        return await AsyncPtySession.open(self._api, ws, frame, request_timeout)

    async def connect(
        self, tag: str, *, request_timeout: float | None = DEFAULT
    ) -> AsyncPtySession:
        """Re-attach to the terminal `tag` (same process, same size)."""
        ws = await self._api.ws(self._path, request_timeout=request_timeout)
        frame = json.dumps({"type": "connect", "tag": tag})
        return await AsyncPtySession.open(self._api, ws, frame, request_timeout)


class AsyncPtySession:
    """An open terminal: `write` input, `resize`, iterate its output (bytes), `kill`.
    Closing the session leaves the terminal running. `exit_code` is set once it ended."""

    def __init__(self, ws: ClientConnection, tag: str, pid: int) -> None:
        self._ws = ws
        self.tag = tag
        self.pid = pid
        self.exit_code: int | None = None
        self._ended = False

    @classmethod
    async def open(
        cls, api: AsyncApi, ws: ClientConnection, frame: str, request_timeout: float | None
    ) -> AsyncPtySession:
        timeout = api.timeout if request_timeout is DEFAULT else request_timeout
        try:
            await ws.send(frame)
            while True:
                message = await ws_recv(ws, timeout)
                if isinstance(message, str):
                    doc = json.loads(message)
                    if doc.get("type") == "started":
                        return cls(ws, str(doc["tag"]), int(doc["pid"]))
                    if doc.get("type") == "error":
                        raise NestboxError("invalid_request", str(doc.get("data")))
        except ConnectionClosed as err:
            await ws.close()
            raise _closed_error(err) or NestboxConnectionError("the terminal closed") from err
        except TimeoutError as err:
            await ws.close()
            raise NestboxTimeout("the terminal did not start in time") from err
        except BaseException:
            await ws.close()
            raise

    async def __aenter__(self) -> AsyncPtySession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._ws.close()

    async def write(self, data: str | bytes) -> None:
        await self._ws.send(data.encode() if isinstance(data, str) else data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def kill(self) -> None:
        await self._ws.send(json.dumps({"type": "kill"}))

    async def output(self, timeout: float | None = None) -> AsyncIterator[bytes]:
        """Output as it comes, until the terminal's process exits (`exit_code` set) or the
        socket closes; `timeout` bounds each wait for output."""
        while not self._ended:
            try:
                message = await ws_recv(self._ws, timeout)
            except ConnectionClosed as err:
                self._ended = True
                error = _closed_error(err)
                if error is not None:
                    raise error from err
                return
            except TimeoutError as err:
                raise NestboxTimeout("no terminal output in time") from err
            if isinstance(message, bytes):
                yield message
                continue
            doc = json.loads(message)
            kind = doc.get("type")
            if kind == "exit":
                self.exit_code = int(doc.get("exit_code", -1))
                self._ended = True
            elif kind == "error" and doc.get("fatal", True):
                self._ended = True
                raise NestboxError("internal_error", str(doc.get("data")))
            elif kind in ("ping", None, ""):
                await self._ws.send(json.dumps({"type": "pong"}))

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.output()

    async def wait(self, timeout: float | None = None) -> int:
        """Read (and drop) output until the process exits; its exit code."""
        async for _ in self.output(timeout):
            pass
        return self.exit_code if self.exit_code is not None else -1


# ── files ──


class AsyncFiles:
    def __init__(self, api: AsyncApi, capsule_id: str) -> None:
        self._api = api
        self._base = f"/v1/capsules/{capsule_id}/files"

    async def read(self, path: str, *, request_timeout: float | None = DEFAULT) -> str:
        """A text file (UTF-8; undecodable bytes replaced), at most 100 MiB."""
        return (await self.read_bytes(path, request_timeout=request_timeout)).decode(
            errors="replace"
        )

    async def read_bytes(self, path: str, *, request_timeout: float | None = DEFAULT) -> bytes:
        """A file's bytes, at most 100 MiB (`download` streams any size)."""
        response = await self._api.request("POST", f"{self._base}/read", json={"path": path},
                                           idempotent=True,
                                           request_timeout=request_timeout)  # fmt: skip
        return response.content

    async def write(
        self, path: str, data: str | bytes, *, request_timeout: float | None = DEFAULT
    ) -> None:
        """Write a whole file (parents made), at most 100 MiB (`upload` streams any size)."""
        raw = data.encode() if isinstance(data, str) else data
        await self._api.request(
            "POST", f"{self._base}/write", data={"path": path},
            files={"file": ("upload", raw, "application/octet-stream")},
            request_timeout=request_timeout,
        )  # fmt: skip

    async def upload(
        self,
        path: str,
        source: Source,
        *,
        on_progress: Callable[[int], object] | None = None,
        request_timeout: float | None = None,
    ) -> int:
        """Stream `source` (a local path, bytes or a binary file object) to `path`, 1 MiB at a
        time (constant memory at any size); the bytes sent. `on_progress(sent)` after each
        chunk. `request_timeout` bounds each chunk's wait, not the whole transfer."""
        opened: BinaryIO | None = None
        if isinstance(source, bytes):
            reader: BinaryIO | None = None
        elif isinstance(source, (str, os.PathLike)):
            opened = await open_file(source, "rb")
            reader = opened
        else:
            reader = source
        boundary = _core.new_boundary()
        sent = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            yield _core.multipart_head(boundary, path)
            if reader is None:
                assert isinstance(source, bytes)
                for start in range(0, len(source), _core.CHUNK):
                    chunk = source[start : start + _core.CHUNK]
                    sent += len(chunk)
                    yield chunk
                    if on_progress is not None:
                        on_progress(sent)
            else:
                while chunk := await read_chunk(reader, _core.CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if on_progress is not None:
                        on_progress(sent)
            yield _core.multipart_tail(boundary)

        try:
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            await self._api.request("POST", f"{self._base}/stream/write", content=body(),
                                    headers=headers, request_timeout=request_timeout)  # fmt: skip
        finally:
            if opened is not None:
                opened.close()
        return sent

    async def download(
        self,
        path: str,
        dest: Sink,
        *,
        on_progress: Callable[[int], object] | None = None,
        request_timeout: float | None = DEFAULT,
    ) -> int:
        """Stream `path` into `dest` (a local path, written whole or not at all, or a binary
        file object) in constant memory; the bytes received."""
        received = 0
        if isinstance(dest, (str, os.PathLike)):
            target = Path(dest)
            partial = target.with_name(f".{target.name}.nestbox-partial")
            f = await open_file(partial, "wb")
            try:
                async for chunk in self.iter_bytes(path, request_timeout=request_timeout):
                    await write_chunk(f, chunk)
                    received += len(chunk)
                    if on_progress is not None:
                        on_progress(received)
                f.close()
                await run_sync(os.replace, partial, target)
            except BaseException:
                f.close()
                partial.unlink(missing_ok=True)
                raise
            return received
        async for chunk in self.iter_bytes(path, request_timeout=request_timeout):
            await write_chunk(dest, chunk)
            received += len(chunk)
            if on_progress is not None:
                on_progress(received)
        return received

    async def iter_bytes(
        self, path: str, *, request_timeout: float | None = DEFAULT
    ) -> AsyncIterator[bytes]:
        """A file's bytes as they arrive (any size)."""
        async with self._api.stream("POST", f"{self._base}/stream/read", json={"path": path},
                                    idempotent=True,
                                    request_timeout=request_timeout) as response:  # fmt: skip
            async for chunk in response.aiter_bytes(_core.CHUNK):
                yield chunk

    async def list(
        self, path: str, *, depth: int = 1, request_timeout: float | None = DEFAULT
    ) -> builtins.list[FileEntryView]:
        doc = await self._api.json("POST", f"{self._base}/list",
                                   json={"path": path, "depth": depth}, idempotent=True,
                                   request_timeout=request_timeout)  # fmt: skip
        return EntryListView.model_validate(doc).entries

    async def stat(self, path: str, *, request_timeout: float | None = DEFAULT) -> FileEntryView:
        doc = await self._api.json("POST", f"{self._base}/stat", json={"path": path},
                                   idempotent=True, request_timeout=request_timeout)  # fmt: skip
        return EntryView.model_validate(doc).entry

    async def exists(self, path: str, *, request_timeout: float | None = DEFAULT) -> bool:
        try:
            await self.stat(path, request_timeout=request_timeout)
        except NotFound:
            return False
        return True

    async def mkdir(
        self, path: str, *, exist_ok: bool = True, request_timeout: float | None = DEFAULT
    ) -> FileEntryView:
        """Make a directory and its parents; an existing directory is fine if `exist_ok`."""
        try:
            doc = await self._api.json("POST", f"{self._base}/mkdir", json={"path": path},
                                       request_timeout=request_timeout)  # fmt: skip
        except NestboxError as err:
            if not exist_ok or err.code != "conflict":
                raise
            entry = await self.stat(path, request_timeout=request_timeout)
            if entry.type != "directory":
                raise
            return entry
        return EntryView.model_validate(doc).entry

    async def remove(self, path: str, *, request_timeout: float | None = DEFAULT) -> None:
        """Remove a file or a whole directory tree."""
        await self._api.request("POST", f"{self._base}/remove", json={"path": path},
                                request_timeout=request_timeout)  # fmt: skip

    async def move(
        self, source: str, destination: str, *, request_timeout: float | None = DEFAULT
    ) -> FileEntryView:
        doc = await self._api.json("POST", f"{self._base}/move",
                                   json={"source": source, "destination": destination},
                                   request_timeout=request_timeout)  # fmt: skip
        return EntryView.model_validate(doc).entry

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncIterator[WatchEventView]:
        """Changes under the directory `path` as they happen: once the watch is set, a
        `start` event, then create/write/remove/rename/chmod (ends when the capsule stops)."""
        params = {"path": path, "recursive": "true" if recursive else "false"}
        async for message in self._api.sse(f"{self._base}/watch", params=params):
            yield WatchEventView.model_validate(_core.sse_json(message))


# ── templates, builds, keys ──


class AsyncTemplates:
    def __init__(self, api: AsyncApi) -> None:
        self._api = api

    async def list(
        self, *, type: str | None = None, request_timeout: float | None = DEFAULT
    ) -> builtins.list[TemplateView]:
        """Your team's and the platform's templates (`type`: base or snapshot)."""
        params = {"type": type} if type else None
        doc = await self._api.json("GET", "/v1/snapshots", params=params,
                                   request_timeout=request_timeout)  # fmt: skip
        return [TemplateView.model_validate(t) for t in doc]

    async def delete(self, name: str, *, request_timeout: float | None = DEFAULT) -> None:
        await self._api.request("DELETE", f"/v1/snapshots/{name}", request_timeout=request_timeout)

    async def snapshot(
        self,
        capsule_id: str,
        name: str | None = None,
        *,
        overwrite: bool = False,
        request_timeout: float | None = LIFECYCLE_TIMEOUT_S,
    ) -> TemplateView:
        body: dict[str, Any] = {"sandbox_id": capsule_id}
        if name:
            body["name"] = name
        params = {"overwrite": "true"} if overwrite else None
        doc = await self._api.json("POST", "/v1/snapshots", json=body, params=params,
                                   request_timeout=request_timeout)  # fmt: skip
        return TemplateView.model_validate(doc)


class AsyncBuilds:
    """Template builds from recipes (`/v1/admin/builds`; progress as server-sent events)."""

    def __init__(self, api: AsyncApi) -> None:
        self._api = api

    async def create(
        self,
        name: str,
        recipe: str | os.PathLike[str],
        directory: str | os.PathLike[str] | None = None,
        *,
        base_template: str | None = None,
        extra: Mapping[str, Any] | None = None,
        wait: bool = True,
        on_event: Callable[[BuildEvent], object] | None = None,
        request_timeout: float | None = LIFECYCLE_TIMEOUT_S,
    ) -> BuildView:
        """Build the template `name` from the recipe file `recipe`, with `directory` (its
        COPY sources) sent as a tar.gz archive. With `wait`, follow its events (each to
        `on_event`) and return the finished build (its `status` says how it ended)."""
        text = await run_sync(Path(recipe).read_text)
        config = _core.build_config(name, _core.parse_recipe(text), base_template, extra)
        if directory is None:
            doc = await self._api.json("POST", "/v1/admin/builds", json=config,
                                       request_timeout=request_timeout)  # fmt: skip
        else:
            archive = await run_sync(_core.archive_directory, Path(directory))
            try:
                f = await open_file(archive, "rb")
                try:
                    files = {"config": (None, json.dumps(config), "application/json"),
                             "archive": ("archive.tar.gz", f, "application/gzip")}  # fmt: skip
                    doc = await self._api.json("POST", "/v1/admin/builds", files=files,
                                               request_timeout=request_timeout)  # fmt: skip
                finally:
                    f.close()
            finally:
                archive.unlink(missing_ok=True)
        build = BuildView.model_validate(doc)
        if not wait:
            return build
        return await self.wait(build.id, on_event=on_event)

    async def wait(
        self, build_id: str, *, on_event: Callable[[BuildEvent], object] | None = None
    ) -> BuildView:
        """Follow the build's events to its end; the finished build."""
        build = await self.get(build_id)
        if not build.status.final:
            async for event in self.events(build_id):
                if on_event is not None:
                    on_event(event)
        build = await self.get(build_id)
        while not build.status.final:  # the stream ended early (a restart): poll the rest
            await sleep(1.0)
            build = await self.get(build_id)
        return build

    async def events(self, build_id: str) -> AsyncIterator[BuildEvent]:
        """The build's events (step starts, output lines, step ends) until it ends."""
        async for message in self._api.sse(f"/v1/admin/builds/{build_id}/events"):
            yield BuildEvent.model_validate(_core.sse_json(message))

    async def get(self, build_id: str, *, request_timeout: float | None = DEFAULT) -> BuildView:
        doc = await self._api.json("GET", f"/v1/admin/builds/{build_id}",
                                   request_timeout=request_timeout)  # fmt: skip
        return BuildView.model_validate(doc)

    async def list(self, *, request_timeout: float | None = DEFAULT) -> builtins.list[BuildView]:
        doc = await self._api.json("GET", "/v1/admin/builds", request_timeout=request_timeout)
        return [BuildView.model_validate(b) for b in doc]

    async def cancel(self, build_id: str, *, request_timeout: float | None = DEFAULT) -> BuildView:
        doc = await self._api.json("POST", f"/v1/admin/builds/{build_id}/cancel",
                                   idempotent=True, request_timeout=request_timeout)  # fmt: skip
        return BuildView.model_validate(doc)


class AsyncKeys:
    """The team's API keys."""

    def __init__(self, api: AsyncApi) -> None:
        self._api = api

    async def list(self, *, request_timeout: float | None = DEFAULT) -> builtins.list[ApiKeyView]:
        doc = await self._api.json("GET", "/v1/api-keys", request_timeout=request_timeout)
        return [ApiKeyView.model_validate(k) for k in doc]

    async def create(self, name: str, *, request_timeout: float | None = DEFAULT) -> ApiKeyView:
        """A new key; its `key` (the secret) is in this answer only."""
        doc = await self._api.json("POST", "/v1/api-keys", json={"name": name},
                                   request_timeout=request_timeout)  # fmt: skip
        return ApiKeyView.model_validate(doc)

    async def delete(self, key_id: str, *, request_timeout: float | None = DEFAULT) -> None:
        await self._api.request("DELETE", f"/v1/api-keys/{key_id}",
                                request_timeout=request_timeout)  # fmt: skip
