"""ConnTracker (Go envd semantics) with fake connections, and the uvicorn protocol it hooks,
driven through a fake transport: no sockets."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from nestbox.envd.conntrack import ConnState, ConnStatistics, ConnTracker, tracking_protocol
from tests.conftest import eventually


@dataclass(eq=False)
class FakeConn:
    current: ConnState
    events: list[str] = field(default_factory=list)

    def state(self) -> ConnState:
        return self.current

    def close(self) -> None:
        self.events.append("close")

    def abort(self) -> None:
        self.events.append("abort")

    def end_keep_alive(self) -> None:
        self.events.append("end_keep_alive")

    def resume_keep_alive(self) -> None:
        self.events.append("resume_keep_alive")


def test_prepare_closes_idle_and_remembers_the_rest() -> None:
    tracker = ConnTracker()
    idle, active, new = (FakeConn(s) for s in (ConnState.IDLE, ConnState.ACTIVE, ConnState.NEW))
    for c in (idle, active, new):
        tracker.opened(c)

    tracker.prepare_for_snapshot()

    assert idle.events == ["close"]
    assert active.events == ["end_keep_alive"]
    assert new.events == ["end_keep_alive"]
    assert tracker.statistics() == ConnStatistics(
        new=1, idle=0, active=1, pre_snapshot=2, keep_alive=False
    )


def test_restore_closes_only_pre_snapshot_connections() -> None:
    tracker = ConnTracker()
    old = FakeConn(ConnState.ACTIVE)
    tracker.opened(old)
    tracker.prepare_for_snapshot()
    fresh = FakeConn(ConnState.NEW)  # e.g. the /init request after restore
    tracker.opened(fresh)
    tracker.request_started(fresh)  # keep-alive still off until the restore
    assert fresh.events == ["end_keep_alive"]

    tracker.restore_after_snapshot()

    assert old.events == ["end_keep_alive", "abort"]
    assert fresh.events == ["end_keep_alive", "resume_keep_alive"]
    stats = tracker.statistics()
    assert (stats.pre_snapshot, stats.keep_alive, stats.new) == (0, True, 1)
    tracker.request_started(fresh)
    assert fresh.events == ["end_keep_alive", "resume_keep_alive"]  # keep-alive is back on


def test_a_connection_that_closes_before_restore_is_forgotten() -> None:
    tracker = ConnTracker()
    conn = FakeConn(ConnState.ACTIVE)
    tracker.opened(conn)
    tracker.prepare_for_snapshot()
    tracker.closed(conn)  # its response finished with Connection: close
    tracker.restore_after_snapshot()
    assert "abort" not in conn.events
    assert tracker.statistics().pre_snapshot == 0


def test_restore_on_first_boot_is_harmless() -> None:
    tracker = ConnTracker()
    conn = FakeConn(ConnState.IDLE)
    tracker.opened(conn)
    tracker.restore_after_snapshot()
    assert conn.events == ["resume_keep_alive"]  # a no-op on a connection that kept it
    assert tracker.statistics().idle == 1


# --- the real uvicorn protocol -------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 49983), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def make_protocol(tracker: ConnTracker) -> tuple[Any, FakeTransport]:
    config = Config(app=app, lifespan="off", log_config=None)
    config.load()
    proto = tracking_protocol(tracker)(config=config, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport


GET = b"GET / HTTP/1.1\r\nHost: envd\r\n\r\n"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_protocol_reports_new_active_idle_and_closes_on_lost() -> None:
    tracker = ConnTracker()
    proto, transport = make_protocol(tracker)
    assert proto.state() is ConnState.NEW
    proto.data_received(GET)
    assert proto.state() is ConnState.ACTIVE
    await settle()
    assert proto.state() is ConnState.IDLE
    assert b"connection: close" not in bytes(transport.written).lower()
    proto.data_received(b"GET / HT")  # half a request: active, as Go counts it
    assert proto.state() is ConnState.ACTIVE
    proto.connection_lost(None)
    assert tracker.statistics() == ConnStatistics(0, 0, 0, 0, keep_alive=True)


async def test_prepare_closes_an_idle_protocol_and_ends_keep_alive_of_an_active_one() -> None:
    tracker = ConnTracker()
    idle, idle_transport = make_protocol(tracker)
    idle.data_received(GET)
    await settle()
    active, active_transport = make_protocol(tracker)
    active.data_received(b"POST / HTTP/1.1\r\nHost: envd\r\nContent-Length: 4\r\n\r\nab")

    tracker.prepare_for_snapshot()

    assert idle_transport.closed
    assert not active_transport.closed
    active.data_received(b"cd")  # the body completes: the response is its last
    await settle()
    response = bytes(active_transport.written).lower()
    assert response.startswith(b"http/1.1 200")
    assert b"connection: close" in response
    assert (active_transport.closed, active_transport.aborted) == (True, False)


async def test_new_requests_after_prepare_get_connection_close_until_restore() -> None:
    tracker = ConnTracker()
    tracker.prepare_for_snapshot()
    tracker.restore_after_snapshot()
    tracker.prepare_for_snapshot()  # keep-alive off, no connections yet
    proto, transport = make_protocol(tracker)
    proto.data_received(GET)
    await settle()
    assert b"connection: close" in bytes(transport.written).lower()
    assert transport.closed

    tracker.restore_after_snapshot()
    proto2, transport2 = make_protocol(tracker)
    proto2.data_received(GET)
    await settle()
    assert b"connection: close" not in bytes(transport2.written).lower()
    assert not transport2.closed


async def test_a_request_started_before_restore_keeps_its_connection_after_it() -> None:
    # The /init request itself: it starts while keep-alive is off, and the restore it triggers
    # turns keep-alive back on before its response is written.
    tracker = ConnTracker()
    tracker.prepare_for_snapshot()
    proto, transport = make_protocol(tracker)
    proto.data_received(b"POST / HTTP/1.1\r\nHost: envd\r\nContent-Length: 2\r\n\r\n")
    tracker.restore_after_snapshot()
    proto.data_received(b"{}")
    await settle()
    assert bytes(transport.written).startswith(b"HTTP/1.1 200")
    assert b"connection: close" not in bytes(transport.written).lower()
    assert not transport.closed
    assert proto.state() is ConnState.IDLE


async def test_restore_aborts_a_connection_still_active_from_before() -> None:
    tracker = ConnTracker()
    proto, transport = make_protocol(tracker)
    proto.data_received(b"POST / HTTP/1.1\r\nHost: envd\r\nContent-Length: 10\r\n\r\nab")
    tracker.prepare_for_snapshot()
    tracker.restore_after_snapshot()
    assert transport.aborted
    proto.connection_lost(None)  # what asyncio reports after abort()
    await settle()
    assert tracker.statistics().active == 0


@pytest.mark.parametrize("state", list(ConnState))
def test_statistics_count_every_state(state: ConnState) -> None:
    tracker = ConnTracker()
    tracker.opened(FakeConn(state))
    stats = tracker.statistics()
    assert (stats.new, stats.active, stats.idle) == (
        int(state is ConnState.NEW),
        int(state is ConnState.ACTIVE),
        int(state is ConnState.IDLE),
    )


async def test_connections_from_envds_listener_have_nagle_off() -> None:
    """envd's listener comes from `socket.create_server` (proto 0), whose connections asyncio
    leaves with Nagle on: the protocol turns it off, or every response body on a keep-alive
    connection waits for the client's delayed ACK."""
    tracker = ConnTracker()
    config = Config(app=app, lifespan="off", log_config=None)
    config.load()
    made: list[Any] = []

    def factory() -> Any:
        proto = tracking_protocol(tracker)(config=config, server_state=ServerState(), app_state={})
        made.append(proto)
        return proto

    listener = socket.create_server(("127.0.0.1", 0))
    assert listener.proto == 0  # the case asyncio does not cover
    server = await asyncio.get_running_loop().create_server(factory, sock=listener)
    async with server:
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        try:
            await eventually(lambda: made, what="the server's protocol for the connection")
            [proto] = made
            sock = proto.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            writer.close()
            await writer.wait_closed()
