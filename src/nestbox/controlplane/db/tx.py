"""`Tx`: one transaction and the repositories that work inside it (one per aggregate).

To add a repository: write `db/<aggregate>.py` with a class taking the `AsyncSession`, and add
a property here. Services see records, never rows or SQL.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from nestbox.controlplane.db.api_keys import ApiKeyRepo
from nestbox.controlplane.db.audit import AuditRepo
from nestbox.controlplane.db.builds import BuildRepo
from nestbox.controlplane.db.capsules import CapsuleRepo
from nestbox.controlplane.db.channels import ChannelRepo
from nestbox.controlplane.db.events import EventRepo
from nestbox.controlplane.db.hosts import HostRepo
from nestbox.controlplane.db.teams import TeamRepo
from nestbox.controlplane.db.templates import TemplateRepo
from nestbox.controlplane.db.usage import UsageRepo
from nestbox.controlplane.db.users import UserRepo

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession


class Tx:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @cached_property
    def users(self) -> UserRepo:
        return UserRepo(self.session)

    @cached_property
    def teams(self) -> TeamRepo:
        return TeamRepo(self.session)

    @cached_property
    def api_keys(self) -> ApiKeyRepo:
        return ApiKeyRepo(self.session)

    @cached_property
    def templates(self) -> TemplateRepo:
        return TemplateRepo(self.session)

    @cached_property
    def audit(self) -> AuditRepo:
        return AuditRepo(self.session)

    @cached_property
    def hosts(self) -> HostRepo:
        return HostRepo(self.session)

    @cached_property
    def capsules(self) -> CapsuleRepo:
        return CapsuleRepo(self.session)

    @cached_property
    def events(self) -> EventRepo:
        return EventRepo(self.session)

    @cached_property
    def channels(self) -> ChannelRepo:
        return ChannelRepo(self.session)

    @cached_property
    def usage(self) -> UsageRepo:
        return UsageRepo(self.session)

    @cached_property
    def builds(self) -> BuildRepo:
        return BuildRepo(self.session)
