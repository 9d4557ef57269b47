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
from nestbox.controlplane.services.builds import BuildService
from nestbox.controlplane.services.capsule_policy import CreatePolicy
from nestbox.controlplane.services.capsules import CapsuleService
from nestbox.controlplane.services.channels import ChannelService, UrlPolicy
from nestbox.controlplane.services.events import EventHub
from nestbox.controlplane.services.files import FileService
from nestbox.controlplane.services.fork import ForkService
from nestbox.controlplane.services.hosts import HostService
from nestbox.controlplane.services.lifetime import LifetimeService
from nestbox.controlplane.services.locks import KeyedLocks
from nestbox.controlplane.services.outbox import Outbox
from nestbox.controlplane.services.processes import ProcessService
from nestbox.controlplane.services.ratelimit import RateLimiter
from nestbox.controlplane.services.reconciler import Reconciler
from nestbox.controlplane.services.snapshots import SnapshotService
from nestbox.controlplane.services.stats import CapsuleMetrics, StatsService
from nestbox.controlplane.services.stdio import StdioService
from nestbox.controlplane.services.targets import Targets
from nestbox.controlplane.services.teams import TeamService
from nestbox.controlplane.services.usage import UsageService
from nestbox.controlplane.settings import ADMIN_KEY_FILE, jwt_secret

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
    builds: BuildService
    reconciler: Reconciler
    # events, channels, metrics, stats and usage
    events: EventHub
    channels: ChannelService
    outbox: Outbox
    metrics: CapsuleMetrics
    stats: StatsService
    usage: UsageService
    # capsule lifetime, fork, stdin and watch (issue 13)
    lifetime: LifetimeService
    forks: ForkService
    stdio: StdioService
    targets: Targets
    """From a caller and a capsule id to its host's agent (E2B's logs call its agent)."""


def build_services(settings: CPSettings, db: Database) -> Services:
    """:raise OSError: the JWT secret file cannot be read or made."""
    secret = jwt_secret(settings)
    box = SecretBox(load_secret_key(settings.data_dir))
    agents = AgentPool()
    targets = Targets(db, agents, box)
    locks = KeyedLocks()
    reconciler = Reconciler(db, targets, busy=locks.held, stuck_after_s=settings.stuck_after_s)
    policy = CreatePolicy(
        default_internet_access=settings.default_internet_access,
        max_vcpus=settings.capsule_max_vcpus, max_memory_mb=settings.capsule_max_memory_mb,
    )  # fmt: skip
    events, channels, outbox = _events_and_channels(settings, db, box)
    capsules = CapsuleService(db, targets, LeastLoaded(), quota=settings.team_capsule_quota,
                              locks=locks, policy=policy,
                              auto_resume_default=settings.auto_resume_default,
                              min_idle_timeout_s=settings.min_idle_timeout_s)  # fmt: skip
    lifetime = LifetimeService(db, targets, capsules)
    targets.auto_resume = lifetime.ensure_running
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
        api_keys=ApiKeyService(db, settings.data_dir / ADMIN_KEY_FILE),
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
        builds=_builds(settings, db, capsules, targets),
        reconciler=reconciler,
        events=events,
        channels=channels,
        outbox=outbox,
        metrics=CapsuleMetrics(targets),
        stats=StatsService(db, interval_s=settings.stats_interval_s),
        usage=UsageService(db),
        lifetime=lifetime,
        forks=ForkService(db, targets, capsules),
        stdio=StdioService(targets),
        targets=targets,
    )


def _events_and_channels(
    settings: CPSettings, db: Database, box: SecretBox
) -> tuple[EventHub, ChannelService, Outbox]:
    """The event hub, the channels and their outbox (the hub kicks the outbox)."""
    events = EventHub(db)
    holder: list[Outbox] = []
    channels = ChannelService(db, box, UrlPolicy(allow_private=settings.channels_allow_private),
                              client=lambda: holder[0].http())  # fmt: skip
    outbox = Outbox(db, channels, settings)
    holder.append(outbox)
    events.on_event(outbox.kick)
    return events, channels, outbox


def _builds(
    settings: CPSettings, db: Database, capsules: CapsuleService, targets: Targets
) -> BuildService:
    """The template builder, its files in `<data_dir>/builds`."""
    return BuildService(
        db, capsules, targets, builds_dir=settings.data_dir / "builds",
        concurrency=settings.build_concurrency, poll_s=settings.build_poll_s,
        stale_after_s=settings.build_stale_after_s,
        healthcheck_max_s=settings.build_healthcheck_max_s, egress=settings.build_egress,
    )  # fmt: skip
