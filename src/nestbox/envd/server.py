"""Build envd's runtime and serve it with uvicorn (HTTP/1.1 via h11, connection tracking on,
upload bodies read straight off the connection).

`build_runtime()` runs before the event loop starts: it reads the guest's kernel command line
(in a VM) for the cold-boot identity and the forward address, and constructs every subsystem.
`serve()` owns the listening socket and the uvicorn server; the app's lifespan starts and
stops the subsystems.

uvicorn's server wakes every 0.1 s to refresh its `Date` header and to see whether a signal
asked it to stop: ten wake-ups a second in every idle guest. `QuietServer` sleeps until a signal
instead, and the protocol (`conntrack.py`) refreshes the `Date` header when a request arrives.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from typing import TYPE_CHECKING

import uvicorn

from nestbox.envd import guest, lifecycle
from nestbox.envd.app import EnvdApp
from nestbox.envd.conntrack import ConnTracker
from nestbox.envd.filesystem.watch import WatcherRegistry
from nestbox.envd.ports import PortSubsystem
from nestbox.envd.process.registry import ProcessRegistry
from nestbox.envd.rawbody import raw_body_protocol
from nestbox.envd.state import Identity, Runtime

if TYPE_CHECKING:
    from types import FrameType

    from nestbox.envd.settings import EnvdSettings

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 3
"""On SIGTERM, how long in-flight requests (process streams) may run before they are cancelled;
then the lifespan stops port forwarding, watchers and processes."""


def build_runtime(settings: EnvdSettings, *, in_vm: bool) -> Runtime:
    """Every envd subsystem, wired to `settings`. Blocking (reads /proc, may write files).

    :raise ValueError: the forward address is unusable (a loopback address).
    """
    machine = guest.GuestMachine(in_vm=in_vm)
    params = machine.kernel_params()
    identity = Identity()
    guest.identity_from_params(params, identity)
    forward = settings.forward_address or machine.forward_address(params)
    if in_vm and forward is None:
        log.warning("no guest IPv4 address known: loopback port forwarding is off")
    runtime = Runtime(
        settings=settings,
        in_vm=in_vm,
        processes=ProcessRegistry(settings),
        watchers=WatcherRegistry(),
        tracker=ConnTracker(),
        ports=PortSubsystem(
            forward,
            settings.port_scan_interval_s,
            ignore_ports=frozenset({settings.port}),
            idle_interval=settings.port_scan_idle_interval_s,
            active_s=settings.port_scan_active_s,
        ),
        identity=identity,
    )
    if in_vm:
        lifecycle.write_identity(runtime)
    return runtime


class QuietServer(uvicorn.Server):
    """uvicorn's server without its 0.1 s tick (see the module's text)."""

    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if await self.on_tick(0):  # the headers, once; False unless already asked to stop
            return
        while not self.should_exit:
            await self._stop.wait()
            self._stop.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A signal handler runs between the loop's steps, maybe while it sleeps in `select`:
        # `call_soon_threadsafe` writes the loop's self-pipe, so it wakes.
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)


def listen_socket(host: str, port: int) -> socket.socket | None:
    """For `::`, one dual-stack socket taking IPv4 and IPv6 (IPv4-only if the kernel has no
    IPv6). Other hosts return None: uvicorn binds every address the name resolves to."""
    if host != "::":
        return None
    if socket.has_ipv6 and socket.has_dualstack_ipv6():
        try:
            return socket.create_server(
                (host, port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=False
            )
        except OSError as err:
            log.warning("no IPv6 listener (%s); listening on IPv4 only", err)
    return socket.create_server(("0.0.0.0", port), family=socket.AF_INET, reuse_port=False)


async def serve(runtime: Runtime) -> None:
    """Serve envd until SIGINT/SIGTERM, then shut down gracefully (uvicorn's signal handling)."""
    settings = runtime.settings
    config = uvicorn.Config(
        app=EnvdApp(runtime),
        host=settings.host,
        port=settings.port,
        # Connection tracking, and upload bodies read without h11 (`rawbody.py`).
        http=raw_body_protocol(runtime.tracker, frozenset({"/files"})),
        ws="none",
        lifespan="on",
        # Well above the host clients' pool expiry, so the client drops an idle connection
        # first and never sends a request on one envd is closing at that moment.
        timeout_keep_alive=math.ceil(settings.keepalive_idle_s),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,
        log_config=None,  # `common.logging.configure()` already set up the handlers
        server_header=False,
    )
    server = QuietServer(config)
    sock = listen_socket(settings.host, settings.port)
    if sock is None:
        await server.serve()
        return
    with sock:
        log.info("envd listening on %s", sock.getsockname()[:2])
        await server.serve(sockets=[sock])
