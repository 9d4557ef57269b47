"""Which HTTP connections envd holds, and closing them around a snapshot (Go envd's semantics).

A memory snapshot freezes every TCP socket; after restore the host side has a new network
namespace, so the guest's old sockets are zombies that never see a FIN. `ConnTracker` closes idle
connections before the snapshot, remembers the active ones and closes those on the first
request after restore. `TrackingH11Protocol` is uvicorn's HTTP/1.1 protocol reporting to it;
it also keeps the `Date` header current (envd's server has no periodic tick: `server.py`).
It does not decide *when* (that is `lifecycle.py`) and never touches the port forwarder.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING, ClassVar, Protocol

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    import asyncio

CLOSE_HEADER = (b"connection", b"close")


class ConnState(enum.Enum):
    """Go's `http.ConnState`, minus hijacked (envd serves no WebSocket) and closed (untracked)."""

    NEW = "new"
    """Accepted; no byte of a request read yet."""
    ACTIVE = "active"
    """Reading a request or writing its response."""
    IDLE = "idle"
    """Between requests, kept open for keep-alive."""


class TrackedConnection(Protocol):
    """What the tracker needs of one connection; fakes implement it in the unit tests."""

    def state(self) -> ConnState: ...

    def close(self) -> None:
        """Close now, politely (FIN after anything already written)."""

    def abort(self) -> None:
        """Close now, dropping anything unsent: the peer is gone."""

    def end_keep_alive(self) -> None:
        """Make the request in flight (if any) the last one: `Connection: close`, then close."""

    def resume_keep_alive(self) -> None:
        """Undo `end_keep_alive()` if the response has not started yet."""


@dataclass(frozen=True, slots=True)
class ConnStatistics:
    new: int
    idle: int
    active: int
    pre_snapshot: int
    keep_alive: bool


class ConnTracker:
    """Every open envd connection, and the ones that were open when a snapshot was prepared.

    Only the event loop's thread touches it (protocol callbacks and request handlers both run
    there), so it needs no lock.
    """

    def __init__(self) -> None:
        self._conns: set[TrackedConnection] = set()
        self._pre_snapshot: set[TrackedConnection] = set()
        self.keep_alive = True
        """False between `prepare_for_snapshot()` and `restore_after_snapshot()`: every response
        then carries `Connection: close`."""

    def opened(self, conn: TrackedConnection) -> None:
        self._conns.add(conn)

    def closed(self, conn: TrackedConnection) -> None:
        self._conns.discard(conn)
        self._pre_snapshot.discard(conn)

    def request_started(self, conn: TrackedConnection) -> None:
        if not self.keep_alive:
            conn.end_keep_alive()

    def prepare_for_snapshot(self) -> tuple[int, int]:
        """Disable keep-alive, close idle connections now, remember the rest as pre-snapshot.
        Returns (closed, remembered) for the caller's log line.

        The caller's own connection is active, so it is remembered and its response is sent with
        `Connection: close`; it is normally gone before the VM freezes.
        """
        self.keep_alive = False
        closed = 0
        for conn in list(self._conns):
            if conn.state() is ConnState.IDLE:
                conn.close()
                self.closed(conn)
                closed += 1
            else:
                conn.end_keep_alive()
                self._pre_snapshot.add(conn)
        return closed, len(self._pre_snapshot)

    def restore_after_snapshot(self) -> int:
        """Close every pre-snapshot connection (zombies after restore), re-enable keep-alive.
        Returns how many were closed, for the caller's log line.

        Connections opened since the prepare, such as the `/init` request calling this, are left
        open, and keep-alive comes back for their responses not yet started (as in Go, which
        decides keep-alive when the response is written): the `/init` connection stays usable.
        On a first boot there is nothing remembered and this only re-enables keep-alive.
        """
        zombies = list(self._pre_snapshot)
        for conn in zombies:
            conn.abort()
            self.closed(conn)
        self._pre_snapshot.clear()
        self.keep_alive = True
        for conn in self._conns:
            conn.resume_keep_alive()
        return len(zombies)

    def statistics(self) -> ConnStatistics:
        states = [c.state() for c in self._conns]
        return ConnStatistics(
            new=states.count(ConnState.NEW),
            idle=states.count(ConnState.IDLE),
            active=states.count(ConnState.ACTIVE),
            pre_snapshot=len(self._pre_snapshot),
            keep_alive=self.keep_alive,
        )


_DATE_SECOND = "_nestbox_date_second"
"""The server state's attribute naming the second its `Date` header shows."""


class TrackingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that reports to a `ConnTracker` and can be closed by it.

    Use `tracking_protocol(tracker)` to get a class bound to one tracker: uvicorn instantiates the
    class itself, so the tracker travels as a class attribute.
    """

    tracker: ClassVar[ConnTracker]
    _served = False
    """A response has been completed on this connection (NEW until then)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # (uvicorn narrows BaseTransport to Transport the same way)
        no_delay(transport)
        super().connection_made(transport)
        self.tracker.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tracker.closed(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        # A new `cycle` is a new request; its ASGI task is created but has not run yet, so
        # changing its keep-alive here is in time for its response headers.
        self._refresh_date()
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:
            self.tracker.request_started(self)

    def _refresh_date(self) -> None:
        """uvicorn's server refreshes the headers every second on its tick; here, when bytes
        arrive (a request's cycle copies them when it starts), at most once a second."""
        now, state = int(time.time()), self.server_state
        if now == getattr(state, _DATE_SECOND, 0) or not self.config.date_header:
            return
        setattr(state, _DATE_SECOND, now)
        date = (b"date", formatdate(now, usegmt=True).encode())
        self.server_state.default_headers = [date, *self.config.encoded_headers]

    def on_response_complete(self) -> None:
        self._served = True
        super().on_response_complete()

    # TrackedConnection

    def state(self) -> ConnState:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return ConnState.ACTIVE
        if self.conn.trailing_data[0]:
            return ConnState.ACTIVE  # part of the next request is buffered
        return ConnState.IDLE if self._served else ConnState.NEW

    def close(self) -> None:
        if self.transport.is_closing():
            return
        with contextlib.suppress(h11.LocalProtocolError):  # mid-message: just close
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    def end_keep_alive(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return  # the next request, if any, will see `tracker.keep_alive` is off
        cycle.keep_alive = False
        if not cycle.response_started and CLOSE_HEADER not in cycle.default_headers:
            cycle.default_headers = [*cycle.default_headers, CLOSE_HEADER]

    def resume_keep_alive(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            return
        cycle.keep_alive = True
        cycle.default_headers = [h for h in cycle.default_headers if h != CLOSE_HEADER]


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on a TCP connection.

    asyncio does it only for sockets whose `proto` is IPPROTO_TCP, and a connection accepted
    from a listener made by `socket.create_server` (envd's dual-stack one) has `proto` 0. With
    Nagle on, the body of a response (written after its headers) waits for the client's delayed
    ACK: every request after the first on a keep-alive connection took 40 ms more.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tracking_protocol(tracker: ConnTracker) -> type[TrackingH11Protocol]:
    """A `TrackingH11Protocol` subclass reporting to `tracker`, for uvicorn's `Config(http=...)`."""
    return type("BoundTrackingH11Protocol", (TrackingH11Protocol,), {"tracker": tracker})
