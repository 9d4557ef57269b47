"""A minimal async client for one capsule's envd: readiness, `/init`, `/snapshot/prepare`, and
running a command through the Connect `process.Process/Start` stream.

Every request carries the capsule's envd access token (`X-Access-Token`). The token changes
at each create and resume: the `/init` that sets a new one is authenticated with the old one
(the template's, or the capsule's before its pause) and, once envd has answered it, the client
sends the new one (`init_when_ready`), with no extra round trip.

One client per capsule *run*: after a restore the guest's old TCP connections are dead (new
netns, new TAP), so the lifecycle makes a fresh client and closes the old one before a snapshot
(its FINs then reach the guest while envd prepares). Two transports, as the seed's
`envdclient` has them: unary calls with an overall timeout, process streams without one. Both
ignore proxy environment variables: envd is only ever reached on the slot's own address.

Deadlines belong to the caller (`anyio.fail_after` around `wait_ready`, `init`, ...); the
timeouts here only bound one attempt or guard against a wedged connection.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import anyio
import httpx
from protobuf import Oneof
from pyqwest import Client as QwestClient
from pyqwest import HTTPTransport, Proxy

from nestbox.protocol.envd import ACCESS_TOKEN_HEADER, ENVD_PORT, InitRequest
from nestbox.protocol.gen.process.process_connect import ProcessClient
from nestbox.protocol.gen.process.process_pb import ProcessConfig, ProcessEvent, StartRequest

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

HEALTH_ATTEMPT_S = 1.0
"""One `/health` attempt; the guest may drop SYNs while it is not up yet."""
POLL_S = 0.02
CONNECT_ATTEMPT_S: Final = (0.5, 1.0, 2.0)
"""Connect timeouts of successive `/init` attempts while envd is not up (the last repeats): a
SYN sent before the guest's network runs again is retried soon, a slow guest gets longer."""
UNARY_TIMEOUT_S = 120.0
"""Overall bound for one unary call (the seed's 2 minutes); callers set tighter deadlines."""


class EnvdError(Exception):
    """envd answered a request with an unexpected status."""

    def __init__(self, path: str, status: int, body: str) -> None:
        super().__init__(f"envd {path}: HTTP {status}: {body[:300]}")
        self.path = path
        self.status = status
        self.body = body


@dataclass(frozen=True, slots=True)
class CommandResult:
    pid: int
    exit_code: int
    stdout: bytes
    stderr: bytes


def envd_url(host_address: str) -> str:
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
        }
    )


class EnvdClient:
    """Talks to envd at `base_url` (`http://<slot host address>:49983`), presenting
    `access_token` (None: envd has none yet, a cold boot before its first `/init`)."""

    def __init__(self, base_url: str, *, access_token: str | None = None) -> None:
        self.base_url = base_url
        self.access_token = access_token
        self._headers = {ACCESS_TOKEN_HEADER: access_token} if access_token else {}
        # verify=False: envd is plain HTTP, and building the default TLS context (reading the
        # CA bundle) would cost tens of milliseconds on every run's critical path.
        self._http = httpx.AsyncClient(
            base_url=base_url, trust_env=False, headers=self._headers, verify=False,
            timeout=httpx.Timeout(UNARY_TIMEOUT_S, connect=10.0),
            limits=httpx.Limits(max_keepalive_connections=10, keepalive_expiry=90.0),
        )  # fmt: skip
        self._stream_http: QwestClient | None = None
        self._stream_transport: HTTPTransport | None = None

    async def __aenter__(self) -> EnvdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection."""
        await self._http.aclose()
        if self._stream_transport is not None:
            await self._stream_transport.aclose()
        self._stream_http = self._stream_transport = None

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    async def is_healthy(self) -> bool:
        """One `/health` attempt with a short timeout; never raises for network errors."""
        try:
            r = await self._http.get("/health", timeout=HEALTH_ATTEMPT_S)
        except httpx.TransportError:
            return False
        return r.status_code in (200, 204)

    async def wait_ready(self) -> None:
        """Poll `/health` until envd answers. Set the deadline around it."""
        while not await self.is_healthy():  # noqa: ASYNC110 (polling a remote server)
            await anyio.sleep(POLL_S)

    async def init_when_ready(
        self, request: Callable[[], InitRequest], *, answer_within: float
    ) -> None:
        """`POST /init` as soon as envd takes connections: readiness and `/init` in one round
        trip (envd's first `/init` after a restore also runs its post-restore recovery, as
        `/health` would). An attempt that cannot connect, or loses its connection before the
        answer, is retried (`/init` may be applied twice: it is idempotent but for the extra
        entropy); the body is built per attempt, so its timestamp is when it is sent. Set the
        overall deadline around it.

        The request carries the client's token; once envd has answered it, a token the body set
        (`accessToken`) is the one the client sends from then on.

        :raise EnvdError: envd refused the request (401: not the token envd holds).
        :raise httpx.TimeoutException: envd took the request but did not answer within
            `answer_within` seconds.
        """
        attempt = 0
        while True:
            connect = CONNECT_ATTEMPT_S[min(attempt, len(CONNECT_ATTEMPT_S) - 1)]
            timeout = httpx.Timeout(answer_within, connect=connect)
            body = request().model_dump(by_alias=True, exclude_none=True)
            try:
                r = await self._http.post("/init", json=body, timeout=timeout)
            except httpx.ConnectTimeout:
                attempt += 1
            except (httpx.ReadTimeout, httpx.WriteTimeout):
                raise
            except httpx.TransportError:
                pass  # refused (envd not listening yet), reset, or closed before the answer
            else:
                _check(r, "/init")
                if token := body.get("accessToken"):
                    self._use_token(token)
                return
            await anyio.sleep(POLL_S)

    def _use_token(self, token: str) -> None:
        """Present `token` from now on, on both transports (`run` passes `_headers`)."""
        self.access_token = token
        self._headers[ACCESS_TOKEN_HEADER] = token
        self._http.headers[ACCESS_TOKEN_HEADER] = token

    async def prepare_snapshot(self) -> None:
        """`POST /snapshot/prepare`: envd drops idle connections, stops port forwarding and
        syncs the disks. :raise EnvdError: :raise httpx.TransportError:"""
        r = await self._http.post("/snapshot/prepare")
        _check(r, "/snapshot/prepare")

    async def run(
        self, cmd: str, *args: str, envs: dict[str, str] | None = None, cwd: str | None = None
    ) -> CommandResult:
        """Run a command through `process.Process/Start` and collect its output and exit code.

        :raise connectrpc.errors.ConnectError: envd refused or the stream broke.
        """
        request = StartRequest(
            process=ProcessConfig(cmd=cmd, args=list(args), envs=envs or {}, cwd=cwd)
        )
        pid, code = 0, -1
        out: list[bytes] = []
        err: list[bytes] = []
        async with ProcessClient(self.base_url, http_client=self._streaming()) as client:
            async for response in client.start(request, headers=self._headers):
                match response.event.event if response.event else None:
                    case Oneof("start", ProcessEvent.StartEvent() as start):
                        pid = start.pid
                    case Oneof("data", ProcessEvent.DataEvent() as data):
                        match data.output:
                            case Oneof("stdout", bytes() as chunk):
                                out.append(chunk)
                            case Oneof("stderr", bytes() as chunk):
                                err.append(chunk)
                    case Oneof("end", ProcessEvent.EndEvent() as end):
                        code = end.exit_code
        return CommandResult(pid=pid, exit_code=code, stdout=b"".join(out), stderr=b"".join(err))

    def _streaming(self) -> QwestClient:
        if self._stream_http is None:
            transport = HTTPTransport(
                connect_timeout=10.0, pool_idle_timeout=90.0, tcp_keepalive_interval=30.0,
                # Exempt every IP address from proxying, whatever HTTP_PROXY says (envd is
                # always reached by address; pyqwest ignores a bare '*'). Should that ever
                # fail, the "proxy" is the discard port on loopback: nothing leaves the host.
                proxy=Proxy("http://127.0.0.1:9", no_proxy="0.0.0.0/0,::/0"),
            )  # fmt: skip
            self._stream_transport = transport
            self._stream_http = QwestClient(transport)
        return self._stream_http


def _check(r: httpx.Response, path: str) -> None:
    if r.status_code >= 300:
        raise EnvdError(path, r.status_code, r.text)
