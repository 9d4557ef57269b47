"""Hosts: creating them (with a one-time registration token), the agent side of registration,
token refresh and heartbeats (the contract in `protocol/hosts.py`), and managing them.

Credentials, all random and stored hashed but the last:
- registration token `nbr_…`: one use, `host_registration_ttl_s` (1 h), a new one voids the old;
- host token: a JWT (`typ: "host"`, `sub: <host id>`) signed with the sessions' key, which user
  sessions refuse (their `typ` is empty); `HOST_TOKEN_TTL_S`, renewed with the refresh token;
- refresh token `nbh_…`: 60 days, rotated on every use;
- agent token `nba_…`: what the control plane presents with RPCs (`X-Agent-Token`), and proxy
  token `nbp_…`: what it presents with proxied requests (`X-Nestbox-Proxy-Token`); the agent
  accepts each for its own purpose only. Both are kept sealed (`secretbox`, AES-GCM under the
  control plane's secret key) and opened only to be sent (`agent_token` / `proxy_token`).

Who may manage hosts: platform admins any; a team's admins its own BYOC hosts. Another team's
host is `NotFound`. The address an agent registers is checked by `AddressPolicy` (host:port
only; a BYOC host not on loopback, link-local, or the control plane's machine) before its
one-time token is spent: a refused address is 400 `invalid_request`.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from nestbox.controlplane.agent_client import AgentCallError
from nestbox.controlplane.db.audit import AuditEvent
from nestbox.controlplane.db.hosts import Registration
from nestbox.controlplane.errors import (
    HostHasCapsules,
    HostUnavailable,
    InvalidRequest,
    NotFound,
    Unauthorized,
)
from nestbox.controlplane.secretbox import SecretError, host_context
from nestbox.controlplane.services import jwt
from nestbox.controlplane.services.auth import key_hash
from nestbox.controlplane.services.events import publish_audit, publish_state_change
from nestbox.controlplane.services.views import host_view
from nestbox.protocol.accounts import Role
from nestbox.protocol.capsules import CapsuleStatus
from nestbox.protocol.hosts import (
    HeartbeatResponse,
    HostCreatedView,
    HostRefreshResponse,
    HostRegisterResponse,
    HostStatus,
    HostTokenView,
    HostType,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from nestbox.controlplane.agent_client import AgentPool
    from nestbox.controlplane.db import Database
    from nestbox.controlplane.db.hosts import Host
    from nestbox.controlplane.secretbox import SecretBox
    from nestbox.controlplane.services.addresses import AddressPolicy
    from nestbox.controlplane.services.principal import Principal
    from nestbox.protocol.hosts import (
        HeartbeatRequest,
        HostCreate,
        HostRefreshRequest,
        HostRegisterRequest,
        HostView,
    )

log = logging.getLogger(__name__)

HOST_TOKEN_TYP = "host"
HOST_TOKEN_TTL_S = 24 * 3600
REFRESH_TOKEN_TTL = timedelta(days=60)
LIVE_STATUSES = tuple(s.value for s in CapsuleStatus if s is not CapsuleStatus.STOPPED)
"""Capsules a host holds: everything but `stopped` (and `destroyed`)."""


class HostService:
    def __init__(
        self,
        db: Database,
        agents: AgentPool,
        *,
        secret: bytes,
        box: SecretBox,
        addresses: AddressPolicy,
        registration_ttl_s: int,
        on_drift: Callable[[str], None] = lambda host_id: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._agents = agents
        self._secret = secret
        self._box = box
        self._addresses = addresses
        self._registration_ttl = timedelta(seconds=registration_ttl_s)
        self._on_drift = on_drift
        self._clock = clock

    # ── management ──

    async def create(self, principal: Principal, req: HostCreate) -> HostCreatedView:
        """A pending host and its one-time registration token.
        :raise Forbidden: not allowed to add this kind of host."""
        team_id = None
        if req.type is HostType.BYOC:
            team_id = req.team_id or principal.team_id
            if not principal.is_admin and team_id != principal.team_id:
                raise NotFound("team", team_id)
            if not principal.is_admin:
                principal.require(Role.ADMIN)
        else:
            principal.require_admin()
            if req.team_id is not None:
                raise InvalidRequest("team_id is only for byoc hosts")
        token, expires = _secret("nbr_"), self._clock() + self._registration_ttl
        async with self._db.transaction() as tx:
            host = await tx.hosts.create(
                type_=req.type.value, team_id=team_id, provider=req.provider,
                availability_zone=req.availability_zone, created_by=principal.user_id,
                status=HostStatus.PENDING.value,
            )  # fmt: skip
            await tx.hosts.add_registration_token(
                host.id, key_hash(token), expires, principal.user_id
            )
            await tx.audit.record(principal.audit("host.create", "host", host.id,
                                                  type=req.type.value))  # fmt: skip
        return HostCreatedView(host=host_view(host), registration_token=token, expires_at=expires)

    async def new_registration_token(self, principal: Principal, host_id: str) -> HostTokenView:
        """A fresh one-time token for (re-)registering the host; earlier ones stop working."""
        host = await self._manageable(principal, host_id)
        token, expires = _secret("nbr_"), self._clock() + self._registration_ttl
        async with self._db.transaction() as tx:
            await tx.hosts.add_registration_token(
                host.id, key_hash(token), expires, principal.user_id
            )
            await tx.audit.record(principal.audit("host.token", "host", host.id))
        return HostTokenView(registration_token=token, expires_at=expires)

    async def list_for(self, principal: Principal) -> list[HostView]:
        async with self._db.transaction() as tx:
            hosts = await tx.hosts.listed(team_id=principal.team_id, everyone=principal.is_admin)
            counts = await tx.capsules.count_by_host(h.id for h in hosts)
        return [host_view(h, counts.get(h.id, 0)) for h in hosts]

    async def get(self, principal: Principal, host_id: str) -> HostView:
        host = await self._visible(principal, host_id)
        async with self._db.transaction() as tx:
            counts = await tx.capsules.count_by_host([host.id])
        return host_view(host, counts.get(host.id, 0))

    async def delete(self, principal: Principal, host_id: str, *, force: bool) -> None:
        """Remove a host; its agent is told to pause everything and stop.
        :raise HostHasCapsules: it still holds capsules and `force` is off."""
        host = await self._manageable(principal, host_id)
        async with self._db.transaction() as tx:
            held = await tx.capsules.on_host(host.id, statuses=LIVE_STATUSES)
        if held and not force:
            raise HostHasCapsules(host.id, [c.id for c in held])
        if host.address and host.agent_token_enc:
            try:
                token = self.agent_token(host)
                await self._agents.client(host.id, host.address, token).terminate()
            except (AgentCallError, HostUnavailable) as err:
                log.warning("host %s did not terminate: %s", host.id, err.message)
        self._agents.forget(host.id)
        async with self._db.transaction() as tx:
            await tx.capsules.set_status_on_host(
                host.id, CapsuleStatus.STOPPED.value, among=LIVE_STATUSES
            )
            await tx.hosts.delete(host.id)
            await tx.audit.record(principal.audit("host.delete", "host", host.id, force=force))

    async def _visible(self, principal: Principal, host_id: str) -> Host:
        async with self._db.transaction() as tx:
            host = await tx.hosts.get(host_id)
        if host is None or not (principal.is_admin or host.team_id == principal.team_id):
            raise NotFound("host", host_id)
        return host

    async def _manageable(self, principal: Principal, host_id: str) -> Host:
        host = await self._visible(principal, host_id)
        if not principal.is_admin:
            principal.require(Role.ADMIN)
        return host

    # ── the agents' side ──

    async def register(self, req: HostRegisterRequest) -> HostRegisterResponse:
        """Trade a registration token for credentials. :raise Unauthorized: bad token.
        :raise InvalidRequest: an address this host may not use (the token stays unspent)."""
        now = self._clock()
        token_hash = key_hash(req.token)
        async with self._db.transaction() as tx:
            host_id = await tx.hosts.registration_token_host(token_hash, now)
            pending = await tx.hosts.get(host_id) if host_id is not None else None
        if pending is None:
            raise Unauthorized("invalid, used or expired registration token")
        # Resolving may take a while: outside any transaction, before the token is spent.
        await self._addresses.check(req.address, byoc=pending.type == HostType.BYOC)
        reg = Registration(address=req.address, arch=req.arch, cpu_cores=req.cpu_cores,
                           memory_mb=req.memory_mb, disk_gb=req.disk_gb)  # fmt: skip
        agent_token, proxy_token = _secret("nba_"), _secret("nbp_")
        refresh = _secret("nbh_")
        async with self._db.transaction() as tx:
            host_id = await tx.hosts.use_registration_token(token_hash, now)
            if host_id is None:
                raise Unauthorized("invalid, used or expired registration token")
            host = await tx.hosts.register(
                host_id, reg, now=now,
                agent_token_enc=self._box.seal(agent_token, host_context(host_id, AGENT)),
                proxy_token_enc=self._box.seal(proxy_token, host_context(host_id, PROXY)),
            )  # fmt: skip
            await tx.hosts.add_refresh_token(host_id, key_hash(refresh), now + REFRESH_TOKEN_TTL)
            await tx.audit.record(AuditEvent(
                action="host.register", resource_type="host", resource_id=host_id,
                team_id=host.team_id, actor_type="host", actor_id=host_id, scope="admin",
                metadata={"address": req.address},
            ))  # fmt: skip
        self._agents.forget(host_id)
        log.info("host %s registered at %s", host_id, req.address, extra={"host_id": host_id})
        return HostRegisterResponse(host=host_view(host), token=self.host_token(host_id),
                                    refresh_token=refresh, agent_token=agent_token,
                                    proxy_token=proxy_token)  # fmt: skip

    # ── the agent's credentials, opened to be sent ──

    def agent_token(self, host: Host) -> str:
        return agent_token(self._box, host)

    def proxy_token(self, host: Host) -> str:
        return proxy_token(self._box, host)

    async def refresh(self, req: HostRefreshRequest) -> HostRefreshResponse:
        """A new host token and refresh token. :raise Unauthorized: bad refresh token."""
        now = self._clock()
        refresh = _secret("nbh_")
        async with self._db.transaction() as tx:
            host_id = await tx.hosts.spend_refresh_token(key_hash(req.refresh_token), now)
            if host_id is None or await tx.hosts.get(host_id) is None:
                raise Unauthorized("invalid, used or expired refresh token")
            await tx.hosts.add_refresh_token(host_id, key_hash(refresh), now + REFRESH_TOKEN_TTL)
        return HostRefreshResponse(token=self.host_token(host_id), refresh_token=refresh)

    async def heartbeat(
        self, host_id: str, token: str | None, load: HeartbeatRequest
    ) -> HeartbeatResponse:
        """Store a host's load. :raise Unauthorized: no or bad host token for `host_id`.
        :raise NotFound: the host was deleted."""
        self.check_host_token(host_id, token)
        now = self._clock()
        async with self._db.transaction() as tx:
            before = await tx.hosts.heartbeat(host_id, load.model_dump(mode="json"), now)
            if before is None:
                raise NotFound("host", host_id)
            host = await tx.hosts.get(host_id)
            if before == HostStatus.UNREACHABLE:
                await tx.audit.record(up := _host_event("host.up", host_id))
                await publish_audit(tx, up)
            counts = await tx.capsules.count_on_host(host_id)
        assert host is not None
        if before == HostStatus.UNREACHABLE:
            log.info("host %s is back", host_id, extra={"host_id": host_id})
        drift = (counts.get(CapsuleStatus.RUNNING, 0), counts.get(CapsuleStatus.PAUSED, 0)) != (
            load.capsules_running, load.capsules_paused)  # fmt: skip
        if before == HostStatus.UNREACHABLE or drift:
            # The host's counts disagree with ours (it paused capsules as it stopped, its
            # idle reaper paused one, a VM died…): reconcile now, not at the next interval.
            self._on_drift(host_id)
        return HeartbeatResponse(status=HostStatus(host.status))

    def host_token(self, host_id: str) -> str:
        now = int(self._clock().timestamp())
        claims = {"sub": host_id, "typ": HOST_TOKEN_TYP, "iat": now, "exp": now + HOST_TOKEN_TTL_S}
        return jwt.encode(claims, self._secret)

    def check_host_token(self, host_id: str, token: str | None) -> None:
        """:raise Unauthorized: `token` is not a live host token of `host_id`."""
        if not token:
            raise Unauthorized("missing host token (X-Host-Token)")
        try:
            claims = jwt.decode(token, self._secret, now=self._clock().timestamp())
        except jwt.TokenError:
            raise Unauthorized("invalid or expired host token") from None
        if claims.get("typ") != HOST_TOKEN_TYP or claims.get("sub") != host_id:
            raise Unauthorized("not a host token of this host")

    # ── the host monitor ──

    async def mark_silent(
        self, silent_for_s: float, *, listened_for_s: float | None = None
    ) -> list[str]:
        """Hosts without a heartbeat for `silent_for_s` become unreachable and their capsules
        `missing`; the ids of the hosts that changed. Silence counts only while this control
        plane listened (`listened_for_s`, since its start): heartbeats sent while no control
        plane ran were lost, not missed, so a restart longer than `silent_for_s` marks nothing
        before the hosts have had `silent_for_s` to reach the new process."""
        if listened_for_s is not None and listened_for_s < silent_for_s:
            return []
        since = self._clock() - timedelta(seconds=silent_for_s)
        changed = []
        async with self._db.transaction() as tx:
            stale = [h for h in await tx.hosts.with_status("online", "draining")
                     if h.last_heartbeat_at is None or h.last_heartbeat_at <= since]  # fmt: skip
        for host in stale:
            async with self._db.transaction() as tx:
                if not await tx.hosts.mark_unreachable(host.id, since):
                    continue  # a heartbeat came in meanwhile
                held = await tx.capsules.on_host(host.id, statuses=_MISSABLE)
                prior = {c.id: c.status for c in held}
                missing = await tx.capsules.set_status_on_host(
                    host.id, CapsuleStatus.MISSING.value, among=_MISSABLE
                )
                missing_before = [(cid, prior.get(cid, "")) for cid in missing]
                down = replace(_host_event("host.down", host.id),
                               metadata={"capsules": len(missing)})  # fmt: skip
                await tx.audit.record(down)
                await publish_audit(tx, down)
                for capsule_id, before in missing_before:
                    missing_now = CapsuleStatus.MISSING.value
                    await publish_state_change(tx, capsule_id, before, missing_now,
                                               reason="host_down")  # fmt: skip
            changed.append(host.id)
            log.warning(
                "host %s sent no heartbeat for %.0f s: unreachable, %d capsules missing",
                host.id, silent_for_s, len(missing), extra={"host_id": host.id},
            )  # fmt: skip
        return changed


AGENT, PROXY = "agent_token", "proxy_token"
"""The sealed columns' names in their `host_context`."""


def agent_token(box: SecretBox, host: Host) -> str:
    """The token for `host`'s RPCs. :raise HostUnavailable: it never registered, or the
    sealed token does not open (the secret key changed: register the host again)."""
    if host.agent_token_enc is None:
        raise HostUnavailable(f"host {host.id} has no registered agent")
    return _open(box, host, host.agent_token_enc, AGENT)


def proxy_token(box: SecretBox, host: Host) -> str:
    """The token for `host`'s port proxy. :raise HostUnavailable: as `agent_token`, or it
    registered before proxy tokens existed."""
    if host.proxy_token_enc is None:
        raise HostUnavailable(f"host {host.id} must register again to serve capsule ports")
    return _open(box, host, host.proxy_token_enc, PROXY)


def _open(box: SecretBox, host: Host, sealed: str, column: str) -> str:
    try:
        return box.open(sealed, host_context(host.id, column))
    except SecretError:
        log.error("the %s of host %s does not open with the secret key; register the host "
                  "again", column, host.id, extra={"host_id": host.id})  # fmt: skip
        raise HostUnavailable(f"host {host.id} must register again") from None


_MISSABLE = tuple(
    s.value
    for s in CapsuleStatus
    if s not in (CapsuleStatus.STOPPED, CapsuleStatus.MISSING, CapsuleStatus.ERROR)
)
"""What a silent host's capsules may have been: everything that needs the host alive."""


def _host_event(action: str, host_id: str) -> AuditEvent:
    return AuditEvent(action=action, resource_type="host", resource_id=host_id,
                      actor_type="system", scope="admin")  # fmt: skip


def _secret(prefix: str) -> str:
    return prefix + secrets.token_hex(32)
