"""The agent's ASGI application: wiring only.

    /hostagent.v1.HostAgentService/*   the Connect RPC service (`api.AgentService`)
    /proxy/{capsule_id}/{port}/...     the port proxy (`proxy.PortProxy`, HTTP and WebSocket)
    /envd/{capsule_id}/...             the envd gateway (`envdgateway.EnvdGateway`, agent token)
    /health                            liveness, no secret needed, says nothing else

RPCs must carry the control plane's RPC secret, proxied requests its proxy secret (`auth`),
else 401; neither secret is accepted for the other's requests. The
lifespan owns everything that runs: the VM runtime, the capsule manager and its task group,
which holds the idle reaper, the heartbeats to the control plane (a registered agent), the
metrics samplers and the stream pumps. Start-up re-adopts what an earlier run left
(`recovery`); shutdown pauses every running capsule (their VMs are left running if that
fails: the next start re-adopts them).
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.api import READ_MAX_BYTES, AgentService
from nestbox.hostagent.envdgateway import EnvdGateway
from nestbox.hostagent.errors import AgentNotReady
from nestbox.hostagent.manager import CapsuleManager
from nestbox.hostagent.proxy import PortProxy, answer_error, refuse, send_json
from nestbox.hostagent.proxytrack import Lease, TargetUnavailable
from nestbox.hostagent.reaper import reap_idle
from nestbox.hostagent.recovery import recover
from nestbox.hostagent.registration import heartbeat_loop, host_load
from nestbox.hostagent.runtime import VmRuntime
from nestbox.hostagent.system import RealSystem
from nestbox.hostagent.views import ErrorMapper
from nestbox.protocol.envdgateway import AGENT_PREFIX
from nestbox.protocol.errors import ErrorCode
from nestbox.protocol.gen.hostagent.v1.hostagent_connect import HostAgentServiceASGIApplication
from nestbox.protocol.hosts import PROXY_TOKEN_HEADER

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from anyio.abc import TaskStatus
    from starlette.types import Receive, Scope, Send

    from nestbox.hostagent.auth import AgentAuth
    from nestbox.hostagent.registration import HostCredentials
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.system import System
    from nestbox.protocol.hosts import HeartbeatRequest

log = logging.getLogger(__name__)

RPC_PREFIX = "/hostagent.v1.HostAgentService/"


class AgentApp:
    """ASGI entry of the host agent. `on_stop` is set by the server; Terminate calls it, and so
    does a failure of the background work while serving (`_lifespan`)."""

    def __init__(
        self,
        settings: AgentSettings,
        auth: AgentAuth,
        *,
        credentials: HostCredentials | None = None,
        system: System | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.credentials = credentials
        self._system = system
        self.manager: CapsuleManager | None = None
        self.on_stop: Callable[[], None] = lambda: None
        self.startup_error: BaseException | None = None
        self.failure: BaseException | None = None
        """What ended the agent's background work while it was serving (`serve` raises it)."""
        self.proxy = PortProxy(self, rescan=self._scan_ports)
        self.envd_gateway = EnvdGateway(auth, lambda: self.manager)
        service = AgentService(self._require_manager, lambda: self.on_stop())
        self.rpc = HostAgentServiceASGIApplication(
            service, interceptors=[ErrorMapper()], read_max_bytes=READ_MAX_BYTES
        )

    # ── dispatch ────────────────────────────────────────────────────────────────────────

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        path = str(scope.get("path", ""))
        headers = scope.get("headers") or []
        assert isinstance(headers, list)
        if path.startswith(RPC_PREFIX) and kind == "http":
            if not self.auth.allows_rpc(headers):
                await answer_error(send, 401, ErrorCode.UNAUTHORIZED,
                                   "a valid agent secret is required")  # fmt: skip
                return
            await self.rpc(scope, receive, send)
        elif path.startswith("/proxy/"):
            if not self.auth.allows_proxy(headers):
                await refuse(scope, send, 401, ErrorCode.UNAUTHORIZED,
                             f"a valid {PROXY_TOKEN_HEADER} is required")  # fmt: skip
                return
            await self.proxy(scope, receive, send)
        elif path.startswith(AGENT_PREFIX):
            await self.envd_gateway(scope, receive, send)  # checks the agent token itself
        elif path == "/health" and kind == "http":
            body = json.dumps({"status": "ok" if self.manager else "starting"}).encode()
            await send_json(send, 200, body)
        else:
            await refuse(scope, send, 404, ErrorCode.NOT_FOUND, "no such endpoint")

    # ── the proxy's CapsuleTargets ──────────────────────────────────────────────────────

    def acquire(self, capsule_id: str) -> Lease:
        if self.manager is None:
            raise TargetUnavailable("the agent is starting or stopping")
        return self.manager.acquire(capsule_id)

    async def _scan_ports(self, capsule_id: str) -> None:
        """A proxied dial into the capsule was refused: its envd looks for new loopback
        listeners now (an idle envd does not poll). :raise: whatever the call raises."""
        run = self._require_manager().runtime.get(capsule_id).run
        if run is not None:
            await run.envd.scan_ports()

    def _require_manager(self) -> CapsuleManager:
        if self.manager is None:
            raise AgentNotReady("the agent is starting or stopping")
        return self.manager

    # ── lifespan ────────────────────────────────────────────────────────────────────────

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        started = False
        try:
            async with self.running():
                started = True
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        except BaseException as err:
            if not started:
                self.startup_error = err
                log.error("agent start-up failed: %r", err)
                await send({"type": "lifespan.startup.failed", "message": repr(err)})
                return
            # The manager's task group failed: without it the agent could only answer "starting
            # or stopping". Stop serving, so that the process exits with an error and its
            # supervisor starts it again (its capsules were paused just now, and are re-adopted).
            log.error("agent stopped on an error: %r", err, exc_info=err)
            self.failure = err
            self.on_stop()
            await send({"type": "lifespan.shutdown.failed", "message": repr(err)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    @asynccontextmanager
    async def running(self) -> AsyncIterator[CapsuleManager]:
        """The runtime, the manager and the background loops, for the app's life."""
        settings = self.settings
        async with (
            VmRuntime.open(settings, self._system or RealSystem()) as runtime,
            anyio.create_task_group() as tg,
        ):
            manager = CapsuleManager(settings, runtime, tg, on_evict=self._evict)
            report = await recover(manager)
            self.manager = manager
            tg.start_soon(reap_idle, manager, settings.reap_interval_s)
            if self.credentials is not None:
                await tg.start(self._heartbeats, self.credentials)
            log.info(
                "agent %s serving on %s (%s; %d running and %d paused capsules re-adopted)",
                settings.agent_id, settings.listen, self.auth.source,
                len(report.running), len(report.paused),
            )  # fmt: skip
            try:
                yield manager
            finally:
                with anyio.CancelScope(shield=True):
                    await self._shut_down(manager)
                self.manager = None
                tg.cancel_scope.cancel()

    async def _shut_down(self, manager: CapsuleManager) -> None:
        with anyio.move_on_after(self.settings.shutdown_timeout_s) as scope:
            paused, failed = await manager.pause_all(destroy_failed=False)
            if paused or failed:
                log.info("shutdown: %d capsules paused, %d left running", len(paused), len(failed))
        if scope.cancelled_caught:
            log.error("shutdown: pausing the capsules took too long; some are left running")
        await manager.close()
        await self.proxy.aclose()
        await self.envd_gateway.aclose()

    async def _evict(self, capsule_id: str) -> None:
        await self.proxy.evict(capsule_id)
        await self.envd_gateway.evict(capsule_id)

    async def _heartbeats(
        self,
        creds: HostCredentials,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        manager = self._require_manager()

        async def load() -> HeartbeatRequest:
            running = [c for c in manager.runtime.capsules() if c.state == "running"]
            return await host_load(
                self.settings.data_dir,
                capsules_running=len(running),
                capsules_paused=manager.statistics().paused,
                vcpus_allocated=sum(c.record.machine.vcpus for c in running),
                memory_allocated_mb=sum(c.record.machine.memory_mib for c in running),
            )

        await heartbeat_loop(
            creds,
            self.settings.heartbeat_interval_s,
            load,
            state_dir=self.settings.state_dir,
            task_status=task_status,
        )
