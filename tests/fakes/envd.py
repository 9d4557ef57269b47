"""`FakeEnvd`: a tiny in-process envd (HTTP/1.1 on loopback) for the agent's real envd client.

It serves `GET /health`, `POST /init`, `POST /snapshot/prepare` and `GET /metrics` with envd's
access-token rule (once a token is set every request but `/health` must carry it, 401 otherwise;
`/init` with the current token may set a new one), for any number of fake guests: the first
path segment names the guest (`/<key>/init`), and `guest_for(key)` finds its `FakeGuest` (None:
nothing answers there, the connection is closed before any answer, as a VM that is not running
would leave a client). `FakeHypervisor` keeps the guests of its VMs, so a snapshot carries the
token and a restore brings it back.

Each request is recorded (`FakeGuest.seen`). `/snapshot/prepare` does what envd's connection
tracker does: it closes the guest's other *idle* connections before it answers (recording how
many, and how many others stayed open: only active ones may), and answers with `Connection:
close`, so no idle connection of the client lives into the snapshot.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.lowlevel
import h11

from nestbox.protocol.envd import ACCESS_TOKEN_HEADER

MAX_BODY = 1 << 20


@dataclass
class Seen:
    method: str
    path: str
    token: str | None
    body: dict[str, object] | None
    connection: int
    """Which connection to the fake envd carried it (numbered from 1)."""


@dataclass
class FakeGuest:
    """One guest's envd: its token (None: open, a cold boot before its first `/init`), what it
    was sent, and knobs: `status` answers a path with that status, `hang` takes a path's
    request and never answers it, `drop` closes the connection of the next that many requests
    before any answer, `lose` carries the next that many out and closes the connection instead
    of answering (the answer lost on the way back)."""

    token: str | None = None
    seen: list[Seen] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    drop: int = 0
    lose: int = 0
    open_connections: int = 0
    others_open_at_prepare: list[int] = field(default_factory=list)
    """Per prepare: the other connections still open once the idle ones were closed."""
    idle_closed_at_prepare: list[int] = field(default_factory=list)
    """Per prepare: the idle connections it closed (as envd's tracker does)."""
    open_at_pause: list[int] = field(default_factory=list)
    """Per `Hypervisor.pause` of its VM: the connections open when the vCPUs stopped."""
    idle: dict[int, anyio.CancelScope] = field(default_factory=dict)
    """Connection number -> the scope serving it, while it waits between requests."""

    @property
    def inits(self) -> list[Seen]:
        return [s for s in self.seen if s.path == "/init"]

    @property
    def prepares(self) -> int:
        return sum(1 for s in self.seen if s.path == "/snapshot/prepare")


class FakeEnvd:
    """See the module docstring. Open it with `async with FakeEnvd.serving(guest_for)`."""

    def __init__(self, guest_for: Callable[[str], FakeGuest | None], port: int) -> None:
        self.guest_for = guest_for
        self.url = f"http://127.0.0.1:{port}"
        self.connections = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def serving(
        cls, guest_for: Callable[[str], FakeGuest | None], *, port: int = 0
    ) -> AsyncIterator[FakeEnvd]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        envd = cls(guest_for, port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, envd._serve)
            try:
                yield envd
            finally:
                tg.cancel_scope.cancel()

    async def _serve(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        guest: FakeGuest | None = None
        closed = False
        async with stream:
            try:
                while True:
                    with anyio.CancelScope() as waiting:
                        if guest is not None:
                            guest.idle[number] = waiting
                        try:
                            request, body = await _read_request(conn, stream)
                        finally:
                            if guest is not None:
                                guest.idle.pop(number, None)
                    if waiting.cancelled_caught:  # closed by a prepare while idle
                        assert guest is not None
                        guest.open_connections -= 1
                        closed = True
                        return
                    if request is None:
                        return
                    key, _, path = request.target.decode().lstrip("/").partition("/")
                    path = "/" + path
                    found = self.guest_for(key)
                    if found is None:
                        return  # nothing runs there: the connection goes without an answer
                    if found.drop:
                        found.drop -= 1
                        found.seen.append(Seen(request.method.decode(), path, None, None, number))
                        return
                    if guest is None:
                        guest = found
                        guest.open_connections += 1
                    status, payload, close = await _answer(guest, request, path, body, number)
                    if guest.lose:
                        guest.lose -= 1
                        guest.open_connections -= 1
                        closed = True
                        return
                    if close:  # gone for the guest from now on (envd counts it so)
                        guest.open_connections -= 1
                        closed = True
                    await _respond(conn, stream, status, payload, close=close)
                    if close or conn.our_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
            except (anyio.BrokenResourceError, anyio.EndOfStream, h11.RemoteProtocolError):
                return
            finally:
                if guest is not None and not closed:
                    guest.open_connections -= 1


async def _read_request(
    conn: h11.Connection, stream: anyio.abc.SocketStream
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                data = b""
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                return None, b""
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None, b""


async def _answer(
    guest: FakeGuest, request: h11.Request, path: str, body: bytes, connection: int
) -> tuple[int, bytes, bool]:
    """(status, JSON body or b"", close the connection after)."""
    headers = {k.decode().lower(): v.decode() for k, v in request.headers}
    token = headers.get(ACCESS_TOKEN_HEADER.lower())
    method = request.method.decode()
    doc = json.loads(body) if body else None
    if path == "/snapshot/prepare":
        # envd's tracker: every idle connection is closed before the answer.
        idle = [scope for number, scope in guest.idle.items() if number != connection]
        for scope in idle:
            scope.cancel()
        while any(n != connection for n in guest.idle):  # each cancelled one leaves at once
            await anyio.lowlevel.checkpoint()
        guest.idle_closed_at_prepare.append(len(idle))
        guest.others_open_at_prepare.append(guest.open_connections - 1)
    guest.seen.append(Seen(method, path, token, doc, connection))
    if path in guest.hang:
        await anyio.sleep_forever()
    if path in guest.status:
        return guest.status[path], b"", False
    if (method, path) == ("GET", "/health"):
        return 200, json.dumps({"version": "fake"}).encode(), False
    if guest.token is not None and token != guest.token:
        error = {"error": {"code": "unauthorized", "message": "bad access token"}}
        return 401, json.dumps(error).encode(), False
    if (method, path) == ("POST", "/init"):
        new = doc.get("accessToken") if isinstance(doc, dict) else None
        if isinstance(new, str) and new:
            guest.token = new
        return 204, b"", False
    if (method, path) == ("POST", "/snapshot/prepare"):
        return 204, b"", True  # envd turns keep-alive off while it prepares
    if (method, path) == ("GET", "/metrics"):
        return 200, json.dumps({"cpu_count": 1}).encode(), False
    return 404, b"", False


async def _respond(
    conn: h11.Connection,
    stream: anyio.abc.SocketStream,
    status: int,
    payload: bytes,
    *,
    close: bool,
) -> None:
    headers = [] if status == 204 else [("content-length", str(len(payload)))]
    if payload:
        headers.append(("content-type", "application/json"))
    if close:
        headers.append(("connection", "close"))
    data = conn.send(h11.Response(status_code=status, headers=headers))
    if payload:
        data = (data or b"") + (conn.send(h11.Data(data=payload)) or b"")
    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send(data)
