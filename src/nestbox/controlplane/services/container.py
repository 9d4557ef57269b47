"""`Services`: every service of the control plane, built once in the app's lifespan and reached
by handlers through `api/deps.services(request)`. Add a service here when you add one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestbox.controlplane.agent_client import AgentPool
from nestbox.controlplane.scheduling import LeastLoaded
from nestbox.controlplane.services.accounts import AccountService
from nestbox.controlplane.services.api_keys import ApiKeyService
from nestbox.controlplane.services.auth import AuthService
from nestbox.controlplane.services.capsules import CapsuleService
from nestbox.controlplane.services.files import FileService
from nestbox.controlplane.services.hosts import HostService
from nestbox.controlplane.services.processes import ProcessService
from nestbox.controlplane.services.reconciler import Reconciler
from nestbox.controlplane.services.snapshots import SnapshotService
from nestbox.controlplane.services.targets import Targets
from nestbox.controlplane.services.teams import TeamService
from nestbox.controlplane.settings import jwt_secret

if TYPE_CHECKING:
    from nestbox.controlplane.db import Database
    from nestbox.controlplane.settings import CPSettings


@dataclass(frozen=True, slots=True)
class Services:
    settings: CPSettings
    db: Database
    auth: AuthService
    accounts: AccountService
    api_keys: ApiKeyService
    teams: TeamService
    # capsules, hosts and scheduling
    agents: AgentPool
    hosts: HostService
    capsules: CapsuleService
    processes: ProcessService
    files: FileService
    snapshots: SnapshotService
    reconciler: Reconciler


def build_services(settings: CPSettings, db: Database) -> Services:
    """:raise OSError: the JWT secret file cannot be read or made."""
    secret = jwt_secret(settings)
    agents = AgentPool()
    targets = Targets(db, agents)
    reconciler = Reconciler(db, targets)
    capsules = CapsuleService(db, targets, LeastLoaded())
    return Services(
        settings=settings,
        db=db,
        auth=AuthService(
            db,
            secret=secret,
            session_ttl_s=settings.jwt_ttl_s,
            signup_enabled=settings.signup_enabled,
        ),
        accounts=AccountService(db),
        api_keys=ApiKeyService(db),
        teams=TeamService(db),
        agents=agents,
        hosts=HostService(
            db,
            agents,
            secret=secret,
            registration_ttl_s=settings.host_registration_ttl_s,
            on_drift=reconciler.kick,
        ),
        capsules=capsules,
        processes=ProcessService(targets),
        files=FileService(targets),
        snapshots=SnapshotService(db, targets, capsules.locks),
        reconciler=reconciler,
    )
