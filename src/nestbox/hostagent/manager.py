"""`CapsuleManager`: the agent's registry of capsules and its lifecycle verbs.

A small registry over `VmRuntime` (which does the VM, network and disk work) that adds what
the RPC service needs: the running capsule's envd client (the run's one `CapsuleEnvd`, which
the runtime made for `/init`), per-capsule locks, last-activity timestamps, the proxy's
per-capsule connection tracker (`acquire`: it is the proxy's `CapsuleTargets`), metrics
sampling, templates, and the `error` state of a capsule whose VM died. Guest calls are in
`guestcalls`, the idle reaper in `reaper`, recovery in `recovery`.

Pause order (the seed's, `Manager.Pause`): stop the capsule's metrics sampler; drain proxied
requests (up to `drain_timeout_s`; new ones get 503 meanwhile); then the runtime closes both
envd pools' idle connections, so their FINs reach the guest *before* `/snapshot/prepare` (3 s,
best effort; the migration is set up meanwhile), and snapshots. On any failure after the drain
the tracker is reset and the VM runs on (the runtime lets the guest run again). After every
restore (create from a template, resume) the runtime has had envd answer `/init` (identity,
time, entropy, default user and env; sent as soon as envd takes connections, so it is the
readiness probe too) over the run's client, which the manager then uses for everything else.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from nestbox import __version__
from nestbox.hostagent.capsule import CapsuleNotFound, CapsuleState, InvalidState, new_capsule_id
from nestbox.hostagent.envdconn.errors import EnvdCallError
from nestbox.hostagent.errors import BadRequest, CapsuleExists, NoGuestImage
from nestbox.hostagent.guestcalls import GuestCalls
from nestbox.hostagent.image.cache import find_image
from nestbox.hostagent.managed import CapsuleMeta, CapsuleView, ManagedCapsule, write_meta
from nestbox.hostagent.metrics import sample_loop
from nestbox.hostagent.proxytrack import Draining, Lease, TargetNotFound, TargetUnavailable
from nestbox.hostagent.storage import templates as tpl

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskGroup

    from nestbox.hostagent.capsule import Capsule
    from nestbox.hostagent.runtime import VmRuntime
    from nestbox.hostagent.settings import AgentSettings

log = logging.getLogger(__name__)

S = CapsuleState
DEFAULT_TEMPLATE = "minimal"
CAPSULE_ID = re.compile(r"^cl-[0-9a-z]{25}$")
TEMPLATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ERROR = "error"
HEALTH_S = 5.0
"""How long the manager waits for envd's version after a restore (informational only)."""


@dataclass(frozen=True, slots=True)
class CreateSpec:
    template_id: str = DEFAULT_TEMPLATE
    capsule_id: str = ""
    team_id: str = ""
    idle_timeout_s: int = 0
    default_user: str = ""
    default_env: dict[str, str] = field(default_factory=dict)
    egress: bool = False


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
    """See the module docstring. Construct it inside the app's task group (it owns the
    metrics samplers and stream pumps); `on_evict(capsule_id)` drops the proxy's pools."""

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
        self._on_evict = on_evict
        # Every capsule this agent knows, including ones being created and ones in `error`.
        # Keys are added and removed only by create, destroy and recovery.
        self._entries: dict[str, ManagedCapsule] = {}
        self._auto_paused: list[str] = []
        runtime.on_vm_exit = self._vm_exited

    # ── queries ─────────────────────────────────────────────────────────────────────────

    def entry(self, capsule_id: str) -> ManagedCapsule:
        """:raise CapsuleNotFound:"""
        try:
            return self._entries[capsule_id]
        except KeyError:
            raise CapsuleNotFound(capsule_id) from None

    def _capsule(self, capsule_id: str) -> Capsule | None:
        try:
            return self.runtime.get(capsule_id)
        except CapsuleNotFound:
            return None

    def state(self, capsule_id: str) -> CapsuleState | str:
        entry = self.entry(capsule_id)
        if entry.error is not None:
            return ERROR
        try:
            return self.runtime.get(capsule_id).state
        except CapsuleNotFound:
            return S.STARTING if entry.creating else S.STOPPED

    def view(self, capsule_id: str) -> CapsuleView:
        entry = self.entry(capsule_id)
        capsule = self._capsule(capsule_id)
        metadata = {"agent_version": __version__, "accel": self.runtime.accel.accel}
        if entry.envd_version:
            metadata["envd_version"] = entry.envd_version
        view = CapsuleView(
            capsule_id=capsule_id,
            state=self.state(capsule_id),
            template_id="",
            meta=entry.meta,
            last_active_unix_ms=entry.last_active_unix_ms(),
            error=entry.error,
            metadata=metadata,
        )
        if capsule is None:
            return view
        record = capsule.record
        metadata["image_version"] = record.machine.image_version
        return CapsuleView(
            capsule_id=capsule_id, state=view.state, template_id=record.template_id,
            meta=entry.meta, vcpus=record.machine.vcpus, memory_mib=record.machine.memory_mib,
            host_address=capsule.host_address, last_active_unix_ms=view.last_active_unix_ms,
            error=entry.error, metadata=metadata,
        )  # fmt: skip

    def list_capsules(self) -> tuple[list[CapsuleView], list[str]]:
        """Every capsule, and the ids auto-paused since the previous call (drained)."""
        views = [self.view(cid) for cid in list(self._entries)]
        auto, self._auto_paused = self._auto_paused, []
        return views, auto

    def statistics(self) -> AgentStatistics:
        stats = self.runtime.statistics()
        return AgentStatistics(stats.running, stats.paused, stats.slots_free)

    # ── create ──────────────────────────────────────────────────────────────────────────

    async def create(self, spec: CreateSpec) -> CapsuleView:
        """Clone `spec.template_id` (building `minimal` from the guest image if missing).

        :raise CapsuleExists: :raise TemplateNotFound: :raise NoGuestImage: :raise NoFreeSlot:
        :raise GuestUnreachable: :raise BadRequest:
        """
        cid = spec.capsule_id or new_capsule_id()
        if not CAPSULE_ID.match(cid):
            raise BadRequest(f"bad capsule id {cid!r}: want cl- and 25 of [0-9a-z]")
        template_id = check_template_id(spec.template_id or DEFAULT_TEMPLATE)
        if cid in self._entries:
            raise CapsuleExists(f"capsule {cid} exists")
        meta = CapsuleMeta(
            team_id=spec.team_id, idle_timeout_s=spec.idle_timeout_s, egress=spec.egress,
            created_at_unix_ms=int(time.time() * 1000),
        )  # fmt: skip
        entry = self._entries[cid] = ManagedCapsule(cid, meta)
        try:
            async with entry.lock:
                capsule = await self._clone(entry, template_id, spec.default_user,
                                            spec.default_env)  # fmt: skip
                entry.creating = False
        except BaseException:
            self._entries.pop(cid, None)
            raise
        log.info("capsule created", extra={"capsule_id": cid, "template_id": template_id})
        return self.view(capsule.id)

    async def _clone(
        self, entry: ManagedCapsule, template_id: str, user: str, env: dict[str, str]
    ) -> Capsule:
        """A running clone named `entry.id`, with its meta saved and its run started."""
        meta = entry.meta

        async def clone() -> Capsule:
            [capsule] = await self.runtime.clone(
                template_id, capsule_id=entry.id, egress=meta.egress,
                default_user=user or None, env_vars=env or None,
            )  # fmt: skip
            return capsule

        try:
            capsule = await clone()
        except tpl.TemplateNotFound:
            if template_id != DEFAULT_TEMPLATE:
                raise
            await self._build_default_template()
            capsule = await clone()
        try:
            await anyio.to_thread.run_sync(write_meta, capsule.record.dir, meta)
            await self._start_run(entry, capsule)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._destroy_quietly(entry.id)
            raise
        return capsule

    async def _build_default_template(self) -> None:
        image = await anyio.to_thread.run_sync(find_image, self.settings)
        if image is None:
            raise NoGuestImage(
                "template minimal does not exist and no guest image is cached "
                "(run 'nestbox-agent image build')"
            )
        await self.runtime.ensure_template(image, DEFAULT_TEMPLATE)

    # ── the run: what exists only while the VM runs ────────────────────────────────────

    async def _start_run(self, entry: ManagedCapsule, capsule: Capsule) -> None:
        """After create or resume: the run's envd client (the one that sent `/init`), proxied
        traffic let in, sampling.

        envd's version is asked for only while unknown (create, re-adoption): the create
        answer carries it, and a resumed capsule runs the same envd as before its pause."""
        entry.envd = capsule.envd
        entry.error = None
        entry.tracker.reset()
        entry.touch()
        if not entry.envd_version:
            try:
                with anyio.fail_after(HEALTH_S):
                    entry.envd_version = await entry.envd.health()
            except (EnvdCallError, TimeoutError) as err:
                log.debug("envd version unknown: %s", err, extra={"capsule_id": entry.id})
        self._start_sampler(entry, capsule)

    def _start_sampler(self, entry: ManagedCapsule, capsule: Capsule) -> None:
        entry.stop_sampler()
        vm, record = capsule.run.vm if capsule.run else None, capsule.record
        if vm is None:
            return
        scope = entry.sampler = anyio.CancelScope()
        interval = self.settings.metrics_interval_s
        stats = functools.partial(self.runtime.hypervisor.stats, vm)

        async def run() -> None:
            with scope:
                try:
                    await sample_loop(
                        entry.metrics, stats, record.disk, record.machine.vcpus, interval
                    )
                except Exception as err:  # a sampler must never take the agent down
                    log.warning("metrics sampler failed: %r", err, extra={"capsule_id": entry.id})

        self._tg.start_soon(run)

    async def _end_run(self, entry: ManagedCapsule) -> None:
        await entry.end_run()
        if self._on_evict is not None:
            with anyio.CancelScope(shield=True):
                await self._on_evict(entry.id)

    def _vm_exited(self, capsule_id: str, code: int | None) -> None:
        """The runtime's callback: a VM exited on its own and its resources are gone."""
        entry = self._entries.get(capsule_id)
        if entry is None:
            return
        entry.error = f"the VM exited unexpectedly (exit code {code})"
        log.error("capsule failed: %s", entry.error, extra={"capsule_id": capsule_id})
        self._tg.start_soon(self._end_run, entry)

    # ── pause / resume ──────────────────────────────────────────────────────────────────

    def _require(self, entry: ManagedCapsule, *states: CapsuleState) -> Capsule:
        """The runtime's capsule if it is in one of `states`. :raise InvalidState:"""
        state = self.state(entry.id)
        if state == ERROR or state not in states:
            current = S(state) if state != ERROR else S.STOPPED
            raise InvalidState(entry.id, current, frozenset(states))
        return self.runtime.get(entry.id)

    async def pause(self, capsule_id: str, *, only_if_idle: bool = False) -> bool:
        """Pause a running capsule (see the module docstring for the order).

        With `only_if_idle` (the reaper) nothing happens unless its idle time is still over its
        timeout once the lock is held; returns whether it paused.
        :raise CapsuleNotFound: :raise InvalidState: :raise VmError: (the VM runs on)
        """
        entry = self.entry(capsule_id)
        async with entry.lock:
            self._require(entry, S.RUNNING)
            if only_if_idle and not entry.is_idle_expired():
                return False
            await self._quiesced(entry, self.runtime.pause)
            await self._end_run(entry)
        return True

    async def _quiesced(
        self, entry: ManagedCapsule, action: Callable[[str], Awaitable[object]]
    ) -> object:
        """Run `action(capsule_id)` (which snapshots the VM) after the first steps of the pause
        order; on failure let proxied traffic in again and resume sampling."""
        entry.stop_sampler()
        if not await entry.tracker.drain(self.settings.drain_timeout_s):
            active = entry.tracker.statistics().active
            log.info("pausing with %d proxied requests in flight", active,
                     extra={"capsule_id": entry.id})  # fmt: skip
        try:
            return await action(entry.id)
        except BaseException:
            entry.tracker.reset()
            capsule = self._capsule(entry.id)
            if capsule is not None and capsule.state == S.RUNNING:
                self._start_sampler(entry, capsule)
            raise

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
        entry = self.entry(capsule_id)
        async with entry.lock:
            capsule = self._require(entry, S.PAUSED)
            if idle_timeout_s is not None and idle_timeout_s != entry.meta.idle_timeout_s:
                entry.meta = entry.meta.model_copy(update={"idle_timeout_s": idle_timeout_s})
                await anyio.to_thread.run_sync(write_meta, capsule.record.dir, entry.meta)
            await self.runtime.resume(
                capsule_id, egress=entry.meta.egress, default_user=default_user or None,
                env_vars=default_env or None,
            )  # fmt: skip
            await self._start_run(entry, capsule)
        return self.view(capsule_id)

    # ── destroy ─────────────────────────────────────────────────────────────────────────

    async def destroy(self, capsule_id: str) -> None:
        """Remove the capsule whatever its state (one in `error` is only forgotten).

        :raise CapsuleNotFound: :raise TeardownError: (it is forgotten all the same)
        """
        entry = self.entry(capsule_id)
        async with entry.lock:
            try:
                await self._end_run(entry)
                await self.runtime.destroy(capsule_id)
            except CapsuleNotFound:
                pass
            finally:
                self._entries.pop(capsule_id, None)
        log.info("capsule destroyed", extra={"capsule_id": capsule_id})

    async def _destroy_quietly(self, capsule_id: str) -> None:
        try:
            await self.runtime.destroy(capsule_id)
        except Exception as err:
            log.error("destroy after a failure: %s", err, extra={"capsule_id": capsule_id})

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

        running = [cid for cid in list(self._entries) if self.state(cid) == S.RUNNING]
        async with anyio.create_task_group() as tg:
            for cid in running:
                tg.start_soon(one, cid)
        return paused, failed

    async def close(self) -> None:
        """Drop every run's envd client and cut the streams (agent shutdown)."""
        for entry in list(self._entries.values()):
            await entry.end_run()

    # ── templates ───────────────────────────────────────────────────────────────────────

    async def create_template(
        self, capsule_id: str, template_id: str = "", *, consume: bool = False
    ) -> tuple[tpl.Template, CapsuleView | None]:
        """Snapshot a running or paused capsule into `template_id` (generated when empty).

        The capsule is consumed by the snapshot; unless `consume`, it comes back paused, as a
        clone of the new template under the same id (Wrenn leaves it paused).
        :raise InvalidState: :raise BadRequest:
        """
        template_id = check_template_id(template_id or f"template-{secrets.token_hex(4)}")
        entry = self.entry(capsule_id)
        async with entry.lock:
            capsule = self._require(entry, S.RUNNING, S.PAUSED)
            user, env = capsule.record.default_user, dict(capsule.record.env_vars)
            if capsule.state == S.PAUSED:
                await self.runtime.resume(capsule_id, egress=entry.meta.egress)
                await self._start_run(entry, capsule)

            async def snapshot(cid: str) -> tpl.Template:
                return await self.runtime.snapshot_template(cid, template_id)

            template = await self._quiesced(entry, snapshot)
            assert isinstance(template, tpl.Template)
            await self._end_run(entry)
            if consume:
                self._entries.pop(capsule_id, None)
                return template, None
            try:
                await self._clone(entry, template_id, user, env)
                await self._quiesced(entry, self.runtime.pause)
                await self._end_run(entry)
            except Exception as err:
                log.error("capsule lost after its template was made: %s", err,
                          extra={"capsule_id": capsule_id})  # fmt: skip
                self._entries.pop(capsule_id, None)
                return template, None
        return template, self.view(capsule_id)

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
        entry = self._entries.get(capsule_id)
        if entry is None:
            raise TargetNotFound(capsule_id)
        if entry.tracker.statistics().draining:
            raise Draining(f"capsule {capsule_id} is being paused")
        capsule = self._capsule(capsule_id)
        if entry.error or capsule is None or capsule.host_address is None:
            raise TargetUnavailable(f"capsule {capsule_id} is {self.state(capsule_id)}")
        if capsule.state != S.RUNNING:
            raise TargetUnavailable(f"capsule {capsule_id} is {capsule.state}")
        entry.tracker.acquire()
        entry.touch()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                entry.tracker.release()
                entry.touch()

        return Lease(capsule.host_address, release)

    # ── recovery hooks ──────────────────────────────────────────────────────────────────

    async def adopt(self, capsule: Capsule, meta: CapsuleMeta) -> None:
        """Register a capsule that `recovery` re-adopted into the runtime."""
        entry = self._entries[capsule.id] = ManagedCapsule(capsule.id, meta)
        entry.creating = False
        if capsule.state == S.RUNNING:
            await self._start_run(entry, capsule)
        else:
            entry.tracker.reset()

    def add_failed(self, capsule_id: str, meta: CapsuleMeta, reason: str) -> None:
        """Register a capsule that recovery found dead (listed as `error` until destroyed)."""
        entry = self._entries[capsule_id] = ManagedCapsule(capsule_id, meta)
        entry.creating = False
        entry.error = reason

    def record_auto_paused(self, capsule_id: str) -> None:
        self._auto_paused.append(capsule_id)

    def expired(self) -> list[str]:
        """Running capsules idle longer than their timeout (the reaper's candidates)."""
        return [
            cid
            for cid, entry in list(self._entries.items())
            if entry.is_idle_expired() and self.state(cid) == S.RUNNING
        ]
