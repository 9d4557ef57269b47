"""Snapshot templates: made from a running or paused capsule (which is left paused), listed
with the platform's templates, deleted (the one deletion path of every template a team owns,
snapshot or built, refused while capsules use it). A team's template lives on the host that
took it, so capsules made from it are placed there; on its host it is named by its unique row
id (two teams may both call a template `base`), platform templates by their name.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import anyio

from nestbox.controlplane.agent_client import AgentCallError
from nestbox.controlplane.errors import (
    Conflict,
    ControlPlaneError,
    Forbidden,
    InvalidRequest,
    InvalidState,
    NotFound,
)
from nestbox.controlplane.services.events import publish_audit
from nestbox.controlplane.services.views import status_of, template_view
from nestbox.protocol.capsules import CapsuleStatus
from nestbox.protocol.events import EventType
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.ids import IdPrefix, is_id, new_id

if TYPE_CHECKING:
    from nestbox.controlplane.db import Database
    from nestbox.controlplane.db.templates import Template
    from nestbox.controlplane.services.locks import KeyedLocks
    from nestbox.controlplane.services.principal import Principal
    from nestbox.controlplane.services.targets import Target, Targets
    from nestbox.protocol.templates import SnapshotCreate, TemplateView

log = logging.getLogger(__name__)

SNAPSHOTTABLE = (CapsuleStatus.RUNNING.value, CapsuleStatus.PAUSED.value)
TYPES = ("base", "snapshot")
GONE = frozenset({"destroyed", CapsuleStatus.STOPPED.value, CapsuleStatus.ERROR.value})
"""Capsule statuses that hold no template any more."""


class TemplateInUse(Conflict):
    """A template capsules still use (409 `conflict`, their ids at the top level)."""

    def __init__(self, name: str, capsule_ids: list[str]) -> None:
        super().__init__(f"template {name} is used by {len(capsule_ids)} capsule(s); destroy "
                         "them first")  # fmt: skip
        self.capsule_ids = capsule_ids

    def extra(self) -> dict[str, object]:
        return {"capsule_ids": self.capsule_ids, "sandbox_ids": self.capsule_ids}


class SnapshotService:
    def __init__(self, db: Database, targets: Targets, locks: KeyedLocks) -> None:
        self._db = db
        self._targets = targets
        self._locks = locks
        """The capsule service's: a snapshot and a pause of one capsule never overlap."""

    async def create(
        self, principal: Principal, req: SnapshotCreate, *, overwrite: bool
    ) -> TemplateView:
        """Snapshot `req.sandbox_id` into the team's template `req.name`.

        :raise Conflict: the name is a platform template's, or the team's and not `overwrite`.
        :raise InvalidState: the capsule is neither running nor paused.
        """
        if not is_id(req.sandbox_id, IdPrefix.CAPSULE):
            raise NotFound("capsule", ascii(req.sandbox_id)[1:-1][:80])
        name = req.name or f"template-{secrets.token_hex(4)}"
        async with self._db.transaction() as tx:
            if await tx.templates.platform_named(name) is not None:
                raise Conflict(f"template name {name} is reserved")
            old = await tx.templates.own(principal.team_id, name)
        if old is not None and not overwrite:
            raise Conflict(f"template {name} exists (send overwrite=true to replace it)")
        async with self._locks.hold(req.sandbox_id):
            target = await self._targets.target(principal, req.sandbox_id)
            if target.capsule.status not in SNAPSHOTTABLE:
                raise InvalidState(f"capsule {target.capsule.id}", target.capsule.status,
                                   SNAPSHOTTABLE)  # fmt: skip
            with anyio.CancelScope(shield=True):
                template = await self._take(principal, target, name, old)
        if old is not None:
            await self.remove_from_host(old)
        return template_view(template)

    async def _take(
        self, principal: Principal, target: Target, name: str, old: Template | None
    ) -> Template:
        capsule, before = target.capsule, target.capsule.status
        template_id = new_id(IdPrefix.TEMPLATE)
        async with self._db.transaction() as tx:
            await tx.capsules.update(capsule.id, status=CapsuleStatus.SNAPSHOTTING.value)
        try:
            made = await target.agent.create_template(capsule.id, template_id)
        except AgentCallError:
            async with self._db.transaction() as tx:
                await tx.capsules.update(capsule.id, status=before)
            raise
        after = status_of(made.capsule.state) if made.capsule else CapsuleStatus.PAUSED
        shape = made.template
        async with self._db.transaction() as tx:
            await tx.capsules.update(capsule.id, status=after.value, host_ip="")
            if old is not None:
                await tx.templates.delete(old.id)
            template = await tx.templates.create(
                template_id=template_id, team_id=principal.team_id, name=name,
                host_id=target.host.id, vcpus=shape.vcpus if shape else capsule.vcpus,
                memory_mb=shape.memory_mb if shape else capsule.memory_mb,
                default_user=shape.default_user if shape else "root",
                default_env=dict(shape.default_env) if shape else {},
                metadata={"source_capsule": capsule.id},
                type_="base" if shape and shape.kind == pb.TemplateKind.BASE else "snapshot",
                size_bytes=shape.size_bytes if shape else 0,
                created_by=principal.api_key_id or principal.user_id,
            )  # fmt: skip
            event = principal.audit("template.snapshot.create", "template", template_id,
                                    name=name, capsule=capsule.id)  # fmt: skip
            await tx.audit.record(event)
            await publish_audit(tx, event)
        log.info("snapshot %s of %s on %s", name, capsule.id, target.host.id)
        return template

    async def list_for(self, principal: Principal, type_: str | None) -> list[TemplateView]:
        if type_ is not None and type_ not in TYPES:
            raise InvalidRequest("type must be base or snapshot")
        async with self._db.transaction() as tx:
            found = await tx.templates.list_visible(principal.team_id, type_=type_)
        return [template_view(t) for t in found]

    async def delete(self, principal: Principal, name: str, *, team_id: str | None = None) -> None:
        """Delete the team's template `name` (the caller's team, unless a platform admin's
        `team_id`): the one deletion path of `DELETE /v1/snapshots/{name}`, the admin
        `DELETE /v1/admin/templates/{name}` and the E2B facade. Refused while a capsule that
        is not gone was made from it (it may need the template's files on its host).

        :raise NotFound: the team has no template `name`. :raise Forbidden: a platform one.
        :raise TemplateInUse: capsules use it (409 with their ids).
        """
        team = team_id or principal.team_id
        async with self._db.transaction() as tx:
            template = await tx.templates.own(team, name)
            if template is None:
                if await tx.templates.platform_named(name) is not None:
                    raise Forbidden(f"template {name} is protected")
                raise NotFound("template", name)
            users = await tx.builds.capsules_using(template.id, exclude=GONE)
            if users:
                raise TemplateInUse(name, users)
            await tx.templates.delete(template.id)
            deleted = principal.audit(EventType.SNAPSHOT_DELETE.value, "template", template.id,
                                      name=name, team=team)  # fmt: skip
            await tx.audit.record(deleted)
            await publish_audit(tx, deleted)
        await self.remove_from_host(template)

    async def remove_from_host(self, template: Template) -> None:
        """Delete a template's files on its host (its row is gone or being replaced). Best
        effort: a template left on a host costs disk, not correctness."""
        if template.host_id is None:
            return
        async with self._db.transaction() as tx:
            host = await tx.hosts.get(template.host_id)
        if host is None:
            return
        try:
            await self._targets.agent(host).delete_template(template.id)
        except ControlPlaneError as err:
            log.warning("template %s stays on host %s: %s", template.id, host.id, err.message)
