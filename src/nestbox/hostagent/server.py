"""Serve the agent's ASGI app with uvicorn: HTTP/1.1 only (h11; uvicorn speaks no HTTP/2),
WebSockets for the port proxy, the seed's timeouts.

- Request head: must be complete within `header_timeout_s` (10 s) of the connection opening,
  or of the first byte of a later request on a kept-alive connection (Go's
  `ReadHeaderTimeout`). uvicorn has no such limit, so `HeaderTimeoutProtocol` adds it: a
  client that trickles a head byte by byte cannot hold a connection open for ever.
- Idle keep-alive connections close after `keepalive_idle_s` (620 s: longer than the 600 s a
  load balancer in front typically keeps them, so the balancer always closes first).
- No body or response timeouts: exec streams, PTYs and file transfers may run for hours.
- SIGTERM/SIGINT: uvicorn stops accepting, lets requests finish for a few seconds, then the
  app's lifespan shutdown pauses every running capsule.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    import asyncio

    from nestbox.hostagent.app import AgentApp
    from nestbox.hostagent.settings import AgentSettings

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5
"""On SIGTERM, how long requests in flight (streams) may run before they are cancelled."""


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing connections whose request head is not complete
    within `header_timeout_s`."""

    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the first bytes of the next request on this connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_timer()  # the head is parsed (or the connection is upgraded)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug(
                "closing a connection: no complete request head in %ss", self.header_timeout_s
            )
            self.transport.close()


def protocol_class(header_timeout_s: float) -> type[HeaderTimeoutProtocol]:
    return type(
        "AgentH11Protocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s}
    )


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets). :raise ValueError:"""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address must be host:port, not {listen!r}")
    return host.strip("[]"), int(port)


async def serve(app: AgentApp, settings: AgentSettings) -> None:
    """Serve `app` on `settings.listen` until SIGTERM/SIGINT or `app` asks to stop.

    :raise AgentFailed: the app stopped because its background work failed.
    """
    host, port = split_listen(settings.listen)
    config = uvicorn.Config(
        app=app,
        host=host,
        port=port,
        http=protocol_class(settings.header_timeout_s),
        ws="websockets-sansio",
        lifespan="on",
        timeout_keep_alive=math.ceil(settings.keepalive_idle_s),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,
        log_config=None,  # `common.logging.configure()` set up the handlers
        server_header=False,
    )
    server = uvicorn.Server(config)
    app.on_stop = lambda: setattr(server, "should_exit", True)
    await server.serve()
    if app.startup_error is not None:
        raise app.startup_error
    if app.failure is not None:
        raise AgentFailed(f"the agent stopped on an error: {app.failure!r}") from app.failure


class AgentFailed(Exception):
    """The agent's background work failed while it served; it stopped (exit status 1)."""
