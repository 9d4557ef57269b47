"""From a caller and a capsule id to the capsule's row, its host and that host's agent client.

Every capsule route goes through here, so the team rule holds everywhere: a capsule of
another team, or one its user destroyed, is `NotFound` (never `Forbidden`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestbox.controlplane.errors import HostUnavailable, InvalidState, NotFound
from nestbox.controlplane.services.hosts import agent_token
from nestbox.protocol.capsules import CapsuleStatus

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nestbox.controlplane.agent_client import AgentClient, AgentPool
    from nestbox.controlplane.db import Database
    from nestbox.controlplane.db.capsules import Capsule
    from nestbox.controlplane.db.hosts import Host
    from nestbox.controlplane.secretbox import SecretBox
    from nestbox.controlplane.services.principal import Principal


@dataclass(frozen=True, slots=True)
class Target:
    capsule: Capsule
    host: Host
    agent: AgentClient


class Targets:
    def __init__(self, db: Database, agents: AgentPool, box: SecretBox) -> None:
        self._db = db
        self.agents = agents
        self._box = box
        self.auto_resume: Callable[[Principal, Capsule], Awaitable[bool]] | None = None
        """`LifetimeService.ensure_running`, set once the services exist: a guest call to a
        paused capsule created with `auto_resume` resumes it first."""

    async def find(self, principal: Principal, capsule_id: str) -> tuple[Capsule, Host | None]:
        """The caller's capsule and its host. :raise NotFound:"""
        async with self._db.transaction() as tx:
            capsule = await tx.capsules.visible(principal.team_id, capsule_id)
            if capsule is None:
                raise NotFound("capsule", capsule_id)
            host = await tx.hosts.get(capsule.host_id) if capsule.host_id else None
        return capsule, host

    def agent(self, host: Host) -> AgentClient:
        """The agent client of `host`. :raise HostUnavailable: it never registered (or its
        sealed token does not open)."""
        if not host.address:
            raise HostUnavailable(f"host {host.id} has no registered agent")
        return self.agents.client(host.id, host.address, agent_token(self._box, host))

    async def target(self, principal: Principal, capsule_id: str) -> Target:
        """The caller's capsule, its host and agent, whatever its status.
        :raise NotFound: :raise HostUnavailable: its host is gone."""
        capsule, host = await self.find(principal, capsule_id)
        if host is None:
            raise HostUnavailable(f"the host of capsule {capsule_id} is gone")
        return Target(capsule, host, self.agent(host))

    async def running(self, principal: Principal, capsule_id: str) -> Target:
        """Like `target`, for calls into the guest (a paused capsule with `auto_resume` is
        resumed first). :raise InvalidState: not running."""
        target = await self.target(principal, capsule_id)
        resume = self.auto_resume
        if target.capsule.status != CapsuleStatus.RUNNING and resume is not None:  # noqa: SIM102 (the resume is awaited only then)
            if await resume(principal, target.capsule):
                target = await self.target(principal, capsule_id)
        if target.capsule.status != CapsuleStatus.RUNNING:
            raise InvalidState(f"capsule {capsule_id}", target.capsule.status, ["running"])
        return target
