"""`CapsuleEnvd`: the agent's one client of a capsule's envd, over that capsule's own pools.

One per capsule *run*: the lifecycle makes it as soon as the VM is up and closes it through the
run's undo stack (after a restore the guest's old TCP connections are dead: new netns, new TAP).
It carries everything the agent asks of envd: `/init` (readiness and init in one round trip),
`/health`, `/snapshot/prepare` and `/metrics` here; processes, PTYs and files from the mixins in
`process.py`, `pty.py` and `files.py`. Before a snapshot: `close_idle()`, then
`prepare_snapshot()`.

Every request carries the capsule's envd access token (`X-Access-Token`). The token changes at
each create and resume: the `/init` that sets a new one is authenticated with the old one (the
template's, or the capsule's before its pause) and, once envd has answered it, the client sends
the new one, with no extra round trip.

Deadlines belong to the caller (`anyio.fail_after` around `init_when_ready`, `wait_ready`, ...);
the timeouts inside only bound one attempt or guard against a wedged connection.
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import anyio
from pydantic import ValidationError
from pyqwest import ReadError, RemoteProtocolError, WriteError

from nestbox.hostagent.envdconn.errors import TooLarge, Unavailable, from_http, from_transport
from nestbox.hostagent.envdconn.files import (
    TRANSPORT_ERRORS,
    FileOps,
    _read_limited,
    _request,
)
from nestbox.hostagent.envdconn.pty import PtyOps
from nestbox.hostagent.envdconn.transport import ConnStatistics, EnvdConnection, PoolSettings
from nestbox.protocol.envd import (
    ENVD_PORT,
    LOG_ANSWER_BYTES,
    LOG_LINES,
    InitRequest,
    LogEntry,
    LogPage,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from pyqwest import FullResponse

HEALTH_ATTEMPT_S = 1.0
"""One `/health` attempt; a guest that is not up yet may drop SYNs."""
POLL_S = 0.02
"""Pause between attempts while envd does not take connections yet."""
LOST_BEFORE_ANSWER = (ReadError, WriteError, RemoteProtocolError)


def envd_url(host_address: str) -> str:
    """envd's base URL at a slot's host-facing address."""
    return f"http://{host_address}:{ENVD_PORT}"


def new_access_token() -> str:
    """A fresh envd access token: 256 random bits, URL-safe (a valid header value)."""
    return secrets.token_urlsafe(32)


def init_request(
    *,
    capsule_id: str,
    template_id: str,
    default_user: str = "root",
    env_vars: dict[str, str] | None = None,
    access_token: str | None = None,
    default_workdir: str | None = None,
) -> InitRequest:
    """The `/init` body sent after every boot and restore: the host's time now, 32 fresh random
    bytes for the guest RNG, and the capsule's identity, default user and environment."""
    return InitRequest.model_validate(
        {
            "timestamp": datetime.now(UTC).isoformat(),
            "entropy": base64.b64encode(secrets.token_bytes(32)).decode(),
            "capsuleId": capsule_id,
            "templateId": template_id,
            "defaultUser": default_user,
            "envVars": env_vars or {},
            "accessToken": access_token,
            "defaultWorkdir": default_workdir or None,
        }
    )


class CapsuleEnvd(PtyOps, FileOps):
    """The agent's client of one capsule's envd at `base_url` (`http://<address>:49983`),
    presenting `access_token` (None: envd has none yet, a cold boot before its first `/init`).

    Two transports inside (`transport.py`): a unary pool whose requests have a 2-minute bound
    and a streaming pool without one. See the module docstring.
    """

    def __init__(
        self, base_url: str, *, access_token: str | None = None, pool: PoolSettings | None = None
    ) -> None:
        self._conn = EnvdConnection(base_url, access_token=access_token, pool=pool)

    @property
    def base_url(self) -> str:
        return self._conn.base_url

    @property
    def access_token(self) -> str | None:
        """The token every request presents (the one envd holds)."""
        return self._conn.access_token

    @property
    def is_closed(self) -> bool:
        return self._conn.statistics().closed

    async def __aenter__(self) -> CapsuleEnvd:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def close_idle(self) -> None:
        """Close the idle connections of both pools now, so that their FINs reach the guest
        before `/snapshot/prepare`. Streams in flight run on; later calls use fresh pools."""
        await self._conn.close_idle()

    async def aclose(self) -> None:
        """Close both pools (idle sockets at once). Later calls raise `Unavailable`.
        Idempotent."""
        await self._conn.aclose()

    def statistics(self) -> ConnStatistics:
        return self._conn.statistics()

    async def health(self) -> str:
        """envd's version. The first call after a snapshot prepare runs envd's post-restore
        recovery. :raise Unavailable: no answer."""
        doc = _json(await self._call("GET", "/health", attempt_s=HEALTH_ATTEMPT_S))
        return str(doc.get("version", "")) if isinstance(doc, dict) else ""

    async def is_healthy(self) -> bool:
        """One short `/health` attempt; never raises for network errors."""
        try:
            await self.health()
        except Unavailable:
            return False
        return True

    async def wait_ready(self) -> None:
        """Poll `/health` until envd answers. Set the deadline around it."""
        while not await self.is_healthy():  # noqa: ASYNC110 (polling a remote server)
            await anyio.sleep(POLL_S)

    async def init(self, request: InitRequest) -> None:
        """One `POST /init`, presenting the current token; a token the request sets is the one
        later calls present. :raise EnvdCallError:"""
        await self._call("POST", "/init", content=_init_body(request), json_body=True)
        if request.access_token:
            self._conn.access_token = request.access_token

    async def init_when_ready(
        self, request: Callable[[], InitRequest], *, answer_within: float
    ) -> None:
        """`POST /init` as soon as envd takes connections: readiness and `/init` in one round
        trip (envd's first `/init` after a restore also runs its post-restore recovery, as
        `/health` would). An attempt that cannot connect (refused, unreachable, no SYN-ACK
        within the pool's connect timeout), or loses its connection before the answer, is
        retried (`/init` may be applied twice: it is idempotent but for the extra entropy); the
        body is built per attempt, so its timestamp is when it is sent. Set the overall
        deadline around it.

        The request carries the client's token; once envd has answered it, a token the body set
        (`accessToken`) is the one the client sends from then on. After an attempt lost before
        its answer, a 401 is retried once with that new token (the lost attempt set it).

        :raise Unauthorized: envd refused the token (it holds another one).
        :raise DeadlineExceeded: envd took the request but did not answer within
            `answer_within` seconds (after the connect).
        :raise EnvdCallError: any other refusal.
        """
        attempt_s = self._conn.pool.connect_timeout_s + answer_within
        lost, before = False, self._conn.access_token
        while True:
            body = request()
            try:
                response = await self._send(
                    "POST", "/init", _init_body(body), json_body=True, attempt_s=attempt_s
                )
            except LOST_BEFORE_ANSWER:
                lost = True  # envd may have carried it out (and switched tokens) meanwhile
                await anyio.sleep(POLL_S)
                continue
            except ConnectionError:
                # envd not listening yet or the guest not answering yet (pyqwest's
                # ConnectTimeout is a ConnectionError too).
                await anyio.sleep(POLL_S)
                continue
            except TRANSPORT_ERRORS as err:
                raise from_transport(err, "/init") from err
            new_token = body.access_token
            if (response.status == 401 and lost and new_token
                    and self._conn.access_token != new_token):  # fmt: skip
                # An earlier attempt was carried out but its answer lost: envd holds the token
                # only that `/init` could have set. Present it (the `/init` is idempotent).
                self._conn.access_token = new_token
                continue
            if response.status >= 300:
                self._conn.access_token = before  # refused: the client's token stays as it was
                raise from_http(response.status, response.content, "/init")
            if body.access_token:
                self._conn.access_token = body.access_token
            return

    async def prepare_snapshot(self) -> None:
        """`POST /snapshot/prepare`: envd closes idle connections, stops port forwarding and
        syncs the disks. Call `close_idle()` first. :raise EnvdCallError:"""
        await self._call("POST", "/snapshot/prepare")

    async def scan_ports(self) -> None:
        """`POST /ports/scan`: envd looks for loopback listeners now and answers once their
        forwarders listen (an idle envd does not poll). :raise EnvdCallError:"""
        await self._call("POST", "/ports/scan")

    async def metrics(self) -> dict[str, Any]:
        """`GET /metrics`: the guest's CPU, memory and disk use."""
        doc = _json(await self._call("GET", "/metrics"))
        return doc if isinstance(doc, dict) else {}

    async def logs(self, start_ms: int = 0, limit: int = LOG_LINES) -> list[LogEntry]:
        """`GET /logs`: envd's last log lines from `start_ms` on, oldest first. The guest is
        untrusted: the answer is read up to `LOG_ANSWER_BYTES` and each line is cleaned and
        cut by `LogEntry`'s validation. :raise EnvdCallError: (`Unavailable` for a bad answer)"""
        query = urlencode({"start": max(start_ms, 0), "limit": min(max(limit, 0), LOG_LINES)})
        async with _request(self._conn.pools().unary, "GET", self._conn.url("/logs?" + query),
                            self._conn.headers(), None, "/logs") as response:  # fmt: skip
            try:
                body = await _read_limited(response, LOG_ANSWER_BYTES, "/logs")
            except TooLarge:
                raise Unavailable("envd's /logs answer is too large") from None
        try:
            page = LogPage.model_validate(json.loads(body.decode("utf-8", "replace")))
        except (ValueError, ValidationError):
            raise Unavailable("envd answered /logs with malformed JSON") from None
        return page.entries[:limit]

    async def _call(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        json_body: bool = False,
        attempt_s: float | None = None,
    ) -> FullResponse:
        """One request on the unary pool; a non-2xx answer raised. :raise EnvdCallError:"""
        try:
            response = await self._send(
                method, path, content, json_body=json_body, attempt_s=attempt_s
            )
        except TRANSPORT_ERRORS as err:
            raise from_transport(err, path) from err
        if response.status >= 300:
            raise from_http(response.status, response.content, path)
        return response

    async def _send(
        self,
        method: str,
        path: str,
        content: bytes | None,
        *,
        json_body: bool,
        attempt_s: float | None,
    ) -> FullResponse:
        """One request on the unary pool, any answer returned; transport errors (and
        `attempt_s` running out: TimeoutError) raised as pyqwest raises them.
        :raise Unavailable: the client is closed."""
        headers = self._conn.headers()
        if json_body:
            headers["Content-Type"] = "application/json"
        client = self._conn.pools().unary
        with anyio.fail_after(attempt_s):
            return await client.execute(method, self._conn.url(path), headers, content)


def _init_body(request: InitRequest) -> bytes:
    return json.dumps(request.model_dump(by_alias=True, exclude_none=True)).encode()


def _json(response: FullResponse) -> object:
    try:
        return json.loads(response.content) if response.content else None
    except ValueError:
        raise Unavailable("envd answered with malformed JSON") from None


__all__ = ["CapsuleEnvd", "envd_url", "init_request", "new_access_token"]
