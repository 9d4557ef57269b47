"""`Services`: every service of the control plane, built once in the app's lifespan and reached
by handlers through `api/deps.services(request)`. Add a service here when you add one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestbox.controlplane.agent_client import AgentPool
from nestbox.controlplane.scheduling import LeastLoaded
from nestbox.controlplane.secretbox import SecretBox, load_secret_key
from nestbox.controlplane.services.accounts import AccountService
from nestbox.controlplane.services.addresses import AddressPolicy
from nestbox.controlplane.services.api_keys import ApiKeyService
from nestbox.controlplane.services.auth import AuthService
from nestbox.controlplane.services.capsules import CapsuleService
from nestbox.controlplane.services.files import FileService
from nestbox.controlplane.services.hosts import HostService
from nestbox.controlplane.services.locks import KeyedLocks
from nestbox.controlplane.services.processes import ProcessService
from nestbox.controlplane.services.ratelimit import RateLimiter
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
    limiter: RateLimiter
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
    box = SecretBox(load_secret_key(settings.data_dir))
    agents = AgentPool()
    targets = Targets(db, agents, box)
    locks = KeyedLocks()
    reconciler = Reconciler(db, targets, busy=locks.held, stuck_after_s=settings.stuck_after_s)
    capsules = CapsuleService(db, targets, LeastLoaded(), quota=settings.team_capsule_quota,
                              locks=locks)  # fmt: skip
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
        teams=TeamService(db, targets),
        limiter=RateLimiter(burst=settings.auth_rate_burst, per_s=settings.auth_rate_per_min / 60),
        agents=agents,
        hosts=HostService(
            db,
            agents,
            secret=secret,
            box=box,
            addresses=AddressPolicy(settings.listen),
            registration_ttl_s=settings.host_registration_ttl_s,
            on_drift=reconciler.kick,
        ),
        capsules=capsules,
        processes=ProcessService(targets),
        files=FileService(targets, buffer_budget_bytes=settings.file_buffer_budget_bytes),
        snapshots=SnapshotService(db, targets, capsules.locks),
        reconciler=reconciler,
    )
