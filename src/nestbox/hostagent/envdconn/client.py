"""`CapsuleEnvd`: everything the agent asks of one capsule's envd, over that capsule's own pools.

Lifecycle calls live here (health, `/init`, `/snapshot/prepare`, metrics); processes, PTYs and
files come from the mixins in `process.py`, `pty.py` and `files.py`. Deadlines belong to the
caller (`anyio.fail_after` around `wait_ready`, `init`, ...); the timeouts inside only bound one
attempt or guard against a wedged connection.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio

from nestbox.hostagent.envdconn.errors import Unavailable, from_http, from_transport
from nestbox.hostagent.envdconn.files import TRANSPORT_ERRORS, FileOps
from nestbox.hostagent.envdconn.pty import PtyOps
from nestbox.hostagent.envdconn.transport import ConnStatistics, EnvdConnection, PoolSettings

if TYPE_CHECKING:
    from types import TracebackType

    from pyqwest import FullResponse

    from nestbox.protocol.envd import InitRequest

HEALTH_ATTEMPT_S = 1.0
"""One `/health` attempt; a guest that is not up yet may drop SYNs."""
POLL_S = 0.02


class CapsuleEnvd(PtyOps, FileOps):
    """The agent's client of one capsule's envd at `base_url` (`http://<address>:49983`).

    Make one per capsule *run*; after a restore, make a new one (the old sockets are dead).
    Before a snapshot: `close_idle()`, then `prepare_snapshot()`.
    """

    def __init__(
        self, base_url: str, *, access_token: str | None = None, pool: PoolSettings | None = None
    ) -> None:
        self._conn = EnvdConnection(base_url, access_token=access_token, pool=pool)

    @property
    def base_url(self) -> str:
        return self._conn.base_url

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
        """Close both pools (idle sockets at once). Later calls raise `Unavailable`."""
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
        """`POST /init` (after every boot and restore), presenting the current token; a token
        the request sets is the one later calls present. :raise EnvdCallError:"""
        body = json.dumps(request.model_dump(by_alias=True, exclude_none=True)).encode()
        await self._call("POST", "/init", content=body, json_body=True)
        if request.access_token:
            self._conn.access_token = request.access_token

    async def prepare_snapshot(self) -> None:
        """`POST /snapshot/prepare`: envd closes idle connections, stops port forwarding and
        syncs the disks. Call `close_idle()` first. :raise EnvdCallError:"""
        await self._call("POST", "/snapshot/prepare")

    async def metrics(self) -> dict[str, Any]:
        """`GET /metrics`: the guest's CPU, memory and disk use."""
        doc = _json(await self._call("GET", "/metrics"))
        return doc if isinstance(doc, dict) else {}

    async def _call(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        json_body: bool = False,
        attempt_s: float | None = None,
    ) -> FullResponse:
        headers = self._conn.headers()
        if json_body:
            headers["Content-Type"] = "application/json"
        client = self._conn.pools().unary
        try:
            with anyio.fail_after(attempt_s):
                response = await client.execute(method, self._conn.url(path), headers, content)
        except TRANSPORT_ERRORS as err:
            raise from_transport(err, path) from err
        if response.status >= 300:
            raise from_http(response.status, response.content, path)
        return response


def _json(response: FullResponse) -> object:
    try:
        return json.loads(response.content) if response.content else None
    except ValueError:
        raise Unavailable("envd answered with malformed JSON") from None
