"""`CapsuleManager`: the RPC service's view of the agent's capsules.

It keeps no capsule state of its own: the one registry is `VmRuntime` (one `Capsule` entry, one
record on disk and one lock per capsule; see `runtime`). The manager checks ids, fills in
defaults (the `minimal` template, built from the guest image when missing or stale), turns
entries into views, answers the proxy (`acquire`: it is the proxy's `CapsuleTargets`), picks
the reaper's candidates, remembers auto-paused ids for the next `ListCapsules`, and pauses
everything at shutdown. Guest calls are in `guestcalls`, the idle reaper in `reaper`, recovery
in `recovery`.

Pause order (the seed's, `Manager.Pause`, done by `VmRuntime.pause` for every caller): stop the
capsule's metrics sampler; drain proxied requests (up to `drain_timeout_s`; new ones get 503
meanwhile); `/snapshot/prepare` (3 s, best effort; the migration is set up meanwhile) on the
unary pool's keep-alive connection, envd closing its other idle connections itself; snapshot.
On any failure after the drain the tracker is reset and the VM runs on. After every restore
(create from a template, resume) envd has answered `/init` (identity, time, entropy, default
user and env; sent as soon as envd takes connections, so it is the readiness probe too) over the
run's one envd client, which every guest call then uses.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import anyio

from nestbox import __version__
from nestbox.hostagent.capsule import CapsuleNotFound, CapsuleState, new_capsule_id
from nestbox.hostagent.envdconn.errors import EnvdCallError
from nestbox.hostagent.errors import BadRequest, NoGuestImage
from nestbox.hostagent.guestcalls import GuestCalls
from nestbox.hostagent.image.cache import ensure_base_image, find_base_image, find_image
from nestbox.hostagent.managed import CapsuleView
from nestbox.hostagent.network import egress as egress_
from nestbox.hostagent.proxytrack import Draining, Lease, TargetNotFound, TargetUnavailable
from nestbox.hostagent.storage import templates as tpl

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from anyio.abc import TaskGroup

    from nestbox.hostagent.capsule import Capsule
    from nestbox.hostagent.runtime import VmRuntime
    from nestbox.hostagent.settings import AgentSettings

log = logging.getLogger(__name__)

S = CapsuleState
DEFAULT_TEMPLATE = "minimal"
MINIMAL_BASE = "minimal-base"
BASE_TEMPLATE = "base"
PLATFORM_TEMPLATES = (DEFAULT_TEMPLATE, MINIMAL_BASE, BASE_TEMPLATE)
"""Made by the agent on first use (see `_build_platform_template`)."""
BASE_VCPUS = 1
BASE_MEMORY_MIB = 512
MIN_MEMORY_MIB = 128
CAPSULE_ID = re.compile(r"^cl-[0-9a-z]{25}$")
TEMPLATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEALTH_S = 5.0
"""How long the manager waits for envd's version after a create (informational only)."""


@dataclass(frozen=True, slots=True)
class CreateSpec:
    template_id: str = DEFAULT_TEMPLATE
    capsule_id: str = ""
    team_id: str = ""
    idle_timeout_s: int = 0
    default_user: str = ""
    default_env: dict[str, str] = field(default_factory=dict)
    egress: bool = False
    egress_allow: list[str] = field(default_factory=list)
    vcpus: int = 0
    """Base templates only (0 = the template's); a snapshot template's machine wins."""
    memory_mib: int = 0
    default_workdir: str = ""
    """The /init's working directory (a built template's WORKDIR); empty: none sent."""


@dataclass(frozen=True, slots=True)
class AgentStatistics:
    running: int
    paused: int
    slots_free: int


def check_template_id(template_id: str) -> str:
    if not TEMPLATE_ID.match(template_id):
        raise BadRequest(f"bad template id {template_id!r}")
    return template_id


class CapsuleManager(GuestCalls):
    """See the module docstring. Construct it inside the app's task group (it owns the stream
    pumps); `on_evict(capsule_id)` drops the proxy's pools when a run ends."""

    def __init__(
        self,
        settings: AgentSettings,
        runtime: VmRuntime,
        task_group: TaskGroup,
        *,
        on_evict: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self._tg = task_group
        self._auto_paused: list[str] = []
        self._image_versions: dict[str, str] = {}
        """The guest image version of each image flavour (`minimal`, `base`), once looked up
        (`_is_stale`)."""
        self._envd_versions: dict[Path, str] = {}
        """envd's version by template version directory (`_learn_envd_version`)."""
        self._platform_sizes: dict[str, tuple[Path, int]] = {}
        """Each platform template's version directory last used here and the bytes it takes
        (`platform_size`): sized once per version, a published version never changes."""
        runtime.on_run_end = on_evict

    # ── queries ─────────────────────────────────────────────────────────────────────────

    def entry(self, capsule_id: str) -> Capsule:
        """The capsule's registry entry. :raise CapsuleNotFound:"""
        return self.runtime.get(capsule_id)

    def state(self, capsule_id: str) -> CapsuleState:
        """:raise CapsuleNotFound:"""
        return self.runtime.get(capsule_id).state

    def view(self, capsule_id: str) -> CapsuleView:
        """:raise CapsuleNotFound:"""
        capsule = self.runtime.get(capsule_id)
        record = capsule.record
        metadata = {"agent_version": __version__, "accel": self.runtime.accel.accel}
        if capsule.envd_version:
            metadata["envd_version"] = capsule.envd_version
        metadata["image_version"] = record.machine.image_version
        return CapsuleView(
            capsule_id=capsule_id, state=record.state, template_id=record.template_id,
            team_id=record.team_id, idle_timeout_s=record.idle_timeout_s, egress=record.egress,
            egress_allow=list(record.egress_allow), template_kind=record.template_kind,
            created_at_unix_ms=int(record.created_at.timestamp() * 1000),
            vcpus=record.machine.vcpus, memory_mib=record.machine.memory_mib,
            host_address=capsule.host_address,
            last_active_unix_ms=capsule.last_active_unix_ms(), error=record.error,
            metadata=metadata,
        )  # fmt: skip

    def list_capsules(self) -> tuple[list[CapsuleView], list[str]]:
        """Every capsule, and the ids auto-paused since the previous call (drained)."""
        views = [self.view(c.id) for c in self.runtime.capsules()]
        auto, self._auto_paused = self._auto_paused, []
        return views, auto

    def statistics(self) -> AgentStatistics:
        stats = self.runtime.statistics()
        return AgentStatistics(stats.running, stats.paused, stats.slots_free)

    # ── create ──────────────────────────────────────────────────────────────────────────

    async def create(self, spec: CreateSpec) -> CapsuleView:
        """Clone `spec.template_id` if it is a snapshot template, or cold-boot it with the
        spec's size if it is a base one. The platform's templates (`minimal`, `minimal-base`,
        `base`) are made on first use (`base` builds its image stage first: minutes, once).

        :raise CapsuleExists: :raise TemplateNotFound: :raise NoGuestImage: :raise NoFreeSlot:
        :raise GuestUnreachable: :raise BadRequest: :raise ImageBuildError:
        """
        cid = spec.capsule_id or new_capsule_id()
        if not CAPSULE_ID.match(cid):
            raise BadRequest(f"bad capsule id {cid!r}: want cl- and 25 of [0-9a-z]")
        template_id = check_template_id(spec.template_id or DEFAULT_TEMPLATE)
        try:
            egress_.parse_allow(spec.egress_allow)
        except egress_.BadEgress as err:
            raise BadRequest(str(err)) from None
        try:
            template = tpl.load_template(self.settings.templates_dir, template_id)
        except tpl.TemplateNotFound:
            if template_id not in PLATFORM_TEMPLATES:
                raise
            template = await self._build_platform_template(template_id)
        else:
            if await self._is_stale(template):
                template = await self._build_platform_template(template_id)
        if template.meta.kind == "base":
            self._check_size(spec)
            capsule = await self.runtime.boot_template(
                template_id, capsule_id=cid, vcpus=spec.vcpus or None,
                memory_mib=spec.memory_mib or None, egress=spec.egress,
                egress_allow=spec.egress_allow, default_user=spec.default_user or None,
                env_vars=spec.default_env or None, team_id=spec.team_id,
                idle_timeout_s=spec.idle_timeout_s, default_workdir=spec.default_workdir or None,
            )  # fmt: skip
        else:
            [capsule] = await self.runtime.clone(
                template_id, capsule_id=cid, egress=spec.egress,
                default_user=spec.default_user or None, env_vars=spec.default_env or None,
                team_id=spec.team_id, idle_timeout_s=spec.idle_timeout_s,
                egress_allow=spec.egress_allow, default_workdir=spec.default_workdir or None,
            )  # fmt: skip
        await self._learn_envd_version(capsule)
        await self._learn_platform_size(template)
        log.info("capsule created", extra={"capsule_id": cid, "template_id": template_id})
        return self.view(capsule.id)

    def platform_size(self, template_id: str) -> int:
        """Bytes the platform template's version last used here takes; 0 for any other
        template (the control plane has a team's template's size from when it was made)."""
        known = self._platform_sizes.get(template_id)
        return known[1] if known else 0

    async def _learn_platform_size(self, template: tpl.Template) -> None:
        """Size a platform template's version the first time a capsule comes from it (a few
        `stat`s in a worker thread); a version that cannot be read stays unknown."""
        template_id, root = template.template_id, template.dir.root
        if template_id not in PLATFORM_TEMPLATES:
            return
        known = self._platform_sizes.get(template_id)
        if known is not None and known[0] == root:
            return
        try:
            size = await anyio.to_thread.run_sync(template.size_bytes)
        except OSError:
            return
        self._platform_sizes[template_id] = (root, size)

    def _check_size(self, spec: CreateSpec) -> None:
        """A base template's capsule gets the size asked for, within this host's limits.
        :raise BadRequest:"""
        cores = os.cpu_count() or 1
        if spec.vcpus and not 1 <= spec.vcpus <= cores:
            raise BadRequest(f"vcpus must be between 1 and {cores} (this host's cores)")
        limit = self.settings.max_memory_mib
        if spec.memory_mib and not MIN_MEMORY_MIB <= spec.memory_mib <= limit:
            raise BadRequest(f"memory_mb must be between {MIN_MEMORY_MIB} and {limit}")

    async def _is_stale(self, template: tpl.Template) -> bool:
        """A platform template made from another guest image than this agent's (an upgrade
        changed the image key): it is remade (`_build_platform_template`), so no capsule gets an
        older envd. The image is looked up once per agent run (a few ms of file reads), and
        again only once a template was found stale; without a cached image nothing is stale."""
        template_id = template.template_id
        if template_id not in PLATFORM_TEMPLATES:
            return False
        flavour = "base" if template_id == BASE_TEMPLATE else "minimal"
        version = self._image_versions.get(flavour)
        if version is None:
            find = find_base_image if flavour == "base" else find_image
            image = await anyio.to_thread.run_sync(find, self.settings)
            if image is None:
                return False
            version = self._image_versions[flavour] = image.version
        if template.meta.image_version == version:
            return False
        log.info("template %s was made from guest image %s, this agent runs %s: remaking it",
                 template_id, template.meta.image_version, version,
                 extra={"template_id": template_id})  # fmt: skip
        self._image_versions.pop(flavour, None)  # found again by the rebuild
        return True

    async def _build_platform_template(self, template_id: str) -> tpl.Template:
        """`minimal` (a snapshot of the guest image), `minimal-base` (the guest image as a
        base template) or `base` (a snapshot of 1 vCPU and 512 MiB of the `base` image flavour,
        whose stage is built first if it is not cached)."""
        image = await anyio.to_thread.run_sync(find_image, self.settings)
        if image is None:
            raise NoGuestImage(
                f"template {template_id} does not exist and no guest image is cached "
                "(run 'nestbox-agent image build')"
            )
        if template_id == DEFAULT_TEMPLATE:
            return await self.runtime.ensure_template(image, DEFAULT_TEMPLATE)
        if template_id == MINIMAL_BASE:
            return await self.runtime.ensure_image_template(image, MINIMAL_BASE)
        log.info("building the base image flavour for template %s (first use)", template_id)
        base_image = await ensure_base_image(self.settings)
        return await self.runtime.ensure_template(
            base_image, BASE_TEMPLATE, vcpus=BASE_VCPUS, memory_mib=BASE_MEMORY_MIB
        )

    async def _learn_envd_version(self, capsule: Capsule) -> None:
        """envd's version, asked for while unknown (create, re-adoption): the create answer
        carries it, and a resumed capsule runs the same envd as before its pause. Every capsule
        of one template version runs the same envd, so only the first is asked: a `/health`
        right after `/init` waits for envd's after-answer work (clock, identity, RNG), which
        cost every create a second (the attempt's bound) on a busy TCG host."""
        if capsule.envd_version or capsule.run is None:
            return
        source = capsule.record.template_dir
        if source is not None and (known := self._envd_versions.get(source)):
            capsule.envd_version = known
            return
        try:
            with anyio.fail_after(HEALTH_S):
                capsule.envd_version = await capsule.run.envd.health()
        except (EnvdCallError, TimeoutError) as err:
            log.debug("envd version unknown: %s", err, extra={"capsule_id": capsule.id})
            return
        if source is not None and capsule.envd_version:
            self._envd_versions[source] = capsule.envd_version

    # ── pause / resume / destroy ────────────────────────────────────────────────────────

    async def pause(self, capsule_id: str, *, only_if_idle: bool = False) -> bool:
        """Pause a running capsule (see the module docstring for the order).

        With `only_if_idle` (the reaper) nothing happens unless its idle time is still over its
        timeout once the lock is held; returns whether it paused.
        :raise CapsuleNotFound: :raise InvalidState: :raise VmError: (the VM runs on)
        """
        return await self.runtime.pause(capsule_id, only_if_idle=only_if_idle)

    async def resume(
        self,
        capsule_id: str,
        *,
        default_user: str = "",
        default_env: dict[str, str] | None = None,
        idle_timeout_s: int | None = None,
    ) -> CapsuleView:
        """Restore a paused capsule into a fresh slot. :raise InvalidState: :raise NoFreeSlot:
        :raise GuestUnreachable: (it stays paused)"""
        await self.runtime.resume(
            capsule_id, default_user=default_user or None, env_vars=default_env or None,
            idle_timeout_s=idle_timeout_s,
        )  # fmt: skip
        return self.view(capsule_id)

    async def destroy(self, capsule_id: str) -> None:
        """Remove the capsule whatever its state (one in `error` is only forgotten).

        :raise CapsuleNotFound: :raise TeardownError: (it is forgotten all the same)
        """
        await self.runtime.destroy(capsule_id)

    async def pause_all(self, *, destroy_failed: bool) -> tuple[list[str], list[str]]:
        """Pause every running capsule (4 at a time). Returns (paused, failed); failed ones are
        destroyed when `destroy_failed` (Terminate), else left running (agent shutdown: the
        next start re-adopts them)."""
        paused: list[str] = []
        failed: list[str] = []
        limiter = anyio.CapacityLimiter(self.settings.pause_concurrency)

        async def one(cid: str) -> None:
            async with limiter:
                try:
                    await self.pause(cid)
                    paused.append(cid)
                except Exception as err:
                    log.error("pause failed: %s", err, extra={"capsule_id": cid})
                    failed.append(cid)
                    if destroy_failed:
                        try:
                            await self.destroy(cid)
                        except Exception as destroy_err:
                            log.error("destroy after a failed pause: %s", destroy_err,
                                      extra={"capsule_id": cid})  # fmt: skip

        running = [c.id for c in self.runtime.capsules() if c.state == S.RUNNING]
        async with anyio.create_task_group() as tg:
            for cid in running:
                tg.start_soon(one, cid)
        return paused, failed

    async def close(self) -> None:
        """Drop every run's envd client and cut the streams (agent shutdown)."""
        await self.runtime.close_runs()

    # ── templates ───────────────────────────────────────────────────────────────────────

    async def create_template(
        self,
        capsule_id: str,
        template_id: str = "",
        *,
        consume: bool = False,
        kind: Literal["snapshot", "base"] = "snapshot",
    ) -> tuple[tpl.Template, CapsuleView | None]:
        """Snapshot a running or paused capsule into `template_id` (generated when empty).

        The capsule is consumed by the snapshot; unless `consume`, it comes back paused, as a
        clone of the new template under the same id (Wrenn leaves it paused).
        :raise InvalidState: :raise BadRequest:
        """
        template_id = check_template_id(template_id or f"template-{secrets.token_hex(4)}")
        template, capsule = await self.runtime.make_template(
            capsule_id, template_id, consume=consume, kind=kind
        )
        return template, self.view(capsule.id) if capsule is not None else None

    async def delete_template(self, template_id: str) -> None:
        """Unpublish a template; versions capsules still use stay until they are unused.

        :raise TemplateNotFound:
        """
        check_template_id(template_id)
        templates_dir = self.settings.templates_dir
        link = tpl.template_path(templates_dir, template_id).root
        if not link.is_symlink():
            raise tpl.TemplateNotFound(template_id)
        in_use = {
            c.record.template_dir
            for c in self.runtime.capsules()
            if c.record.template_dir is not None
        }
        await anyio.to_thread.run_sync(link.unlink)
        await tpl.prune(templates_dir, template_id, in_use)
        log.info("template deleted", extra={"template_id": template_id})

    # ── the proxy's CapsuleTargets ──────────────────────────────────────────────────────

    def acquire(self, capsule_id: str) -> Lease:
        """The capsule's address for one proxied request, counted until released.

        :raise TargetNotFound: :raise TargetUnavailable: (`Draining` while pausing)
        """
        try:
            capsule = self.runtime.get(capsule_id)
        except CapsuleNotFound:
            raise TargetNotFound(capsule_id) from None
        if capsule.tracker.statistics().draining:
            raise Draining(f"capsule {capsule_id} is being paused")
        address = capsule.host_address
        if capsule.state != S.RUNNING or address is None:
            raise TargetUnavailable(f"capsule {capsule_id} is {capsule.state}")
        capsule.tracker.acquire()
        capsule.touch()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                capsule.tracker.release()
                capsule.touch()

        return Lease(address, release)

    # ── recovery and the reaper ─────────────────────────────────────────────────────────

    async def adopt(self, capsule: Capsule) -> None:
        """Register a capsule that `recovery` took back (running or paused)."""
        await self.runtime.adopt(capsule)
        await self._learn_envd_version(capsule)

    def record_auto_paused(self, capsule_id: str) -> None:
        self._auto_paused.append(capsule_id)

    def expired(self) -> list[str]:
        """Running capsules idle longer than their timeout (the reaper's candidates)."""
        return [
            c.id for c in self.runtime.capsules() if c.state == S.RUNNING and c.is_idle_expired()
        ]
