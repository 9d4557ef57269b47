"""The template builder (Wrenn's admin builds, wrenn-surface §1.7): a queue of builds in the
database, workers that run each build in a capsule through the same agent API as any capsule,
and a live feed of each build's progress.

Submit: the configuration is checked (the base template must be visible to the team, the name
must not be a platform template's), the recipe and healthcheck parsed: a line that does not
parse makes the build `failed` at once, naming the line, before any capsule exists. An archive
(tar, tar.gz, zip; `stage_archive`) is streamed to `<data_dir>/builds/` as it arrives, at most
100 MiB, then read through once by `archive.check_archive` (nothing that could land outside
its directory); it is deleted when the build ends.

Queue: rows in `builds`. Each control plane runs one worker loop (`serve`) that claims up to
`concurrency` builds at once (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, so several
control planes share one queue; on SQLite `BEGIN IMMEDIATE` serialises the claim), and
heartbeats the builds it runs every second. A build whose worker stopped heartbeating for
`stale_after_s` (its control plane was stopped or killed) is claimed again and run again from
the start: its old capsule is destroyed first. So the queue survives restarts: pending builds
wait in the table, running ones are taken over. Three attempts at most.

A build: a capsule of the team from `base_template` (egress on, so apt and pip work; it counts
towards the team's quota like any capsule), the archive uploaded and unpacked at
`/tmp/build-files`, then the steps, in order: pre-build (unless `skip_pre_post`), the recipe,
post-build, each one exec (RUN streamed through ExecStream, its output lines published as they
come). Then the healthcheck, if any, until it passes; then the agent's CreateTemplate, which
consumes the capsule: a snapshot template with a healthcheck (memory included, START processes
running), a base template without (the disk flattened). The template row is the team's; a
template of that name it had before is replaced. Its default user is the last USER, its default
environment what ENV set minus runtime variables, its default working directory the last
WORKDIR (`metadata.default_workdir`).

Cancel: a pending build is cancelled at once; a running one is flagged and its worker (this
process at once, another within a heartbeat) cancels the step in progress and destroys the
capsule. Progress: `current_step` and `logs` are written after every step; `events` publishes
step starts, output lines, step ends and status changes to this process's subscribers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shlex
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel
from protobuf import Oneof

from nestbox.controlplane.agent_client import AgentCallError
from nestbox.controlplane.errors import (
    Conflict,
    ControlPlaneError,
    InvalidRequest,
    NotFound,
    TooLarge,
)
from nestbox.controlplane.services import recipe as rc
from nestbox.controlplane.services.archive import ArchiveRefused, check_archive, extract_command
from nestbox.controlplane.services.principal import Principal
from nestbox.controlplane.services.snapshots import SnapshotService
from nestbox.controlplane.services.views import template_view
from nestbox.protocol.accounts import Role
from nestbox.protocol.builds import (
    MAX_ARCHIVE_BYTES,
    AdminTemplateView,
    BuildEvent,
    BuildEventType,
    BuildLogEntry,
    BuildStatus,
    BuildView,
)
from nestbox.protocol.capsules import CapsuleCreate
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.ids import IdPrefix, new_id

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from anyio.abc import TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from nestbox.controlplane.agent_client import AgentClient
    from nestbox.controlplane.db import Database
    from nestbox.controlplane.db.builds import Build
    from nestbox.controlplane.db.templates import Template
    from nestbox.controlplane.services.capsules import CapsuleService
    from nestbox.controlplane.services.targets import Targets
    from nestbox.protocol.builds import BuildCreate

log = logging.getLogger(__name__)

ARCHIVE_DIR = "/tmp/build-files"
"""Where a build's archive is unpacked in the guest (Wrenn's)."""
MAX_KEPT_OUTPUT = 64 * 1024
"""Of each step's stdout and stderr, the logs keep the last this many bytes."""
MAX_LINE = 4096
"""A longer line of output is published in pieces."""
MAX_ATTEMPTS = 3
CHUNK = 256 * 1024
SUBSCRIBER_BUFFER = 1024
LIST_LIMIT = 200
BUILD_METADATA = "nestbox.build"
"""The build capsule's metadata key naming its build."""


class BuildFailed(Exception):
    """The build cannot go on; the message is the build's `error`."""


# ── the live feed ──


class BuildEvents:
    """In-process publish/subscribe of build events. Publishing never waits: a subscriber that
    falls `SUBSCRIBER_BUFFER` events behind is dropped (its stream ends)."""

    def __init__(self) -> None:
        self._subs: dict[str, set[MemoryObjectSendStream[BuildEvent]]] = {}

    def publish(self, event: BuildEvent) -> None:
        for send in list(self._subs.get(event.build_id, ())):
            try:
                send.send_nowait(event)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                send.close()
                self._subs[event.build_id].discard(send)

    @contextlib.contextmanager
    def subscribe(self, build_id: str) -> Iterator[MemoryObjectReceiveStream[BuildEvent]]:
        send, receive = anyio.create_memory_object_stream[BuildEvent](SUBSCRIBER_BUFFER)
        self._subs.setdefault(build_id, set()).add(send)
        try:
            yield receive
        finally:
            subs = self._subs.get(build_id)
            if subs is not None:
                subs.discard(send)
                if not subs:
                    del self._subs[build_id]
            send.close()
            receive.close()


# ── views ──


def build_view(b: Build) -> BuildView:
    return BuildView(
        id=b.id, team_id=b.team_id, name=b.name, base_template=b.base_template,
        recipe=b.recipe, healthcheck=b.healthcheck, vcpus=b.vcpus, memory_mb=b.memory_mb,
        skip_pre_post=b.skip_pre_post, status=BuildStatus(b.status),
        current_step=b.current_step, total_steps=b.total_steps,
        logs=[BuildLogEntry.model_validate(e) for e in b.logs], error=b.error,
        sandbox_id=b.capsule_id, host_id=b.host_id, template_id=b.template_id,
        template_type="base" if b.template_type == "base" else
        "snapshot" if b.template_type else None,
        default_user=b.default_user, default_env=b.default_env,
        default_workdir=b.default_workdir, has_archive=b.archive is not None,
        created_by=b.created_by, created_at=b.created_at, started_at=b.started_at,
        completed_at=b.completed_at,
    )  # fmt: skip


def admin_template_view(t: Template) -> AdminTemplateView:
    workdir = t.metadata.get("default_workdir")
    return AdminTemplateView(
        **template_view(t).model_dump(),
        id=t.id,
        team_id=t.team_id,
        default_workdir=str(workdir) if workdir else None,
    )


def plan(build: Build | BuildCreate) -> list[rc.Step]:
    """Every step the build runs, in order. :raise ValueError: (RecipeError) a bad line."""
    steps = rc.parse_recipe(build.recipe)
    if build.healthcheck:
        try:
            rc.parse_healthcheck(build.healthcheck)
        except ValueError as err:
            raise ValueError(f"healthcheck: {err}") from None
    if build.skip_pre_post:
        return steps
    return [*rc.pre_build(), *steps, *rc.post_build()]


@dataclass
class StagedArchive:
    """An uploaded archive on disk, checked; `discard` removes it (idempotent)."""

    path: Path
    kind: str

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


# ── the service ──


class BuildService:
    def __init__(
        self,
        db: Database,
        capsules: CapsuleService,
        targets: Targets,
        *,
        builds_dir: Path,
        concurrency: int = 2,
        poll_s: float = 2.0,
        stale_after_s: float = 30.0,
        healthcheck_max_s: float = 600.0,
        egress: bool = True,
    ) -> None:
        self._db = db
        self._capsules = capsules
        self._targets = targets
        self._snapshots = SnapshotService(db, targets, capsules.locks)
        """Template deletion (one path, with the in-use check) and removal from hosts."""
        self.builds_dir = builds_dir
        self._concurrency = concurrency
        self._poll_s = poll_s
        self._stale_after = timedelta(seconds=stale_after_s)
        self._beat_s = min(1.0, stale_after_s / 3)
        self.healthcheck_max_s = healthcheck_max_s
        self.egress = egress
        self.worker_id = "cp-" + secrets.token_hex(6)
        self.events = BuildEvents()
        self._wake = anyio.Event()
        self._runs: dict[str, BuildRun] = {}

    # ── who may ──

    @staticmethod
    def authorise(principal: Principal) -> str | None:
        """The team whose builds and templates the caller manages (None: every team's, a
        platform admin). :raise Forbidden: a team member below admin."""
        if principal.is_admin:
            return None
        principal.require(Role.ADMIN)
        return principal.team_id

    async def _visible(self, principal: Principal, build_id: str) -> Build:
        scope = self.authorise(principal)
        async with self._db.transaction() as tx:
            build = await tx.builds.get(build_id)
        if build is None or (scope is not None and build.team_id != scope):
            raise NotFound("build", build_id)
        return build

    # ── the API ──

    async def stage_archive(self, chunks: AsyncIterator[bytes]) -> StagedArchive:
        """Stream an uploaded archive to disk (at most 100 MiB) and check it.
        :raise TooLarge: :raise InvalidRequest: not an archive, or an entry could escape."""
        await anyio.to_thread.run_sync(self._make_dir)
        path = self.builds_dir / f".upload-{secrets.token_hex(8)}"
        staged = StagedArchive(path, "")
        try:
            async with await anyio.open_file(
                await anyio.to_thread.run_sync(_create_private, path), "wb"
            ) as f:
                size = 0
                async for chunk in chunks:
                    size += len(chunk)
                    if size > MAX_ARCHIVE_BYTES:
                        raise TooLarge(f"the archive is larger than {MAX_ARCHIVE_BYTES} bytes")
                    await f.write(chunk)
            if size == 0:
                raise InvalidRequest("the archive part is empty")
            try:
                staged.kind = await anyio.to_thread.run_sync(check_archive, path)
            except ArchiveRefused as err:
                raise InvalidRequest(f"archive refused: {err}") from None
        except BaseException:
            staged.discard()
            raise
        return staged

    def _make_dir(self) -> None:
        self.builds_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def archive_path(self, build_id: str) -> Path:
        return self.builds_dir / f"{build_id}.archive"

    async def submit(
        self, principal: Principal, config: BuildCreate, archive: StagedArchive | None = None
    ) -> BuildView:
        """Queue a build (or record it failed: its recipe does not parse).
        :raise NotFound: no such base template. :raise Conflict: a platform template's name."""
        self.authorise(principal)
        try:
            async with self._db.transaction() as tx:
                if await tx.templates.find(principal.team_id, config.base_template) is None:
                    raise NotFound("template", config.base_template)
                if await tx.templates.platform_named(config.name) is not None:
                    raise Conflict(f"template name {config.name} is reserved")
            build_id = new_id(IdPrefix.BUILD)
            try:
                steps, error = plan(config), None
            except ValueError as err:
                steps, error = [], str(err)
            if archive is not None and error is None:
                await anyio.to_thread.run_sync(
                    os.replace, archive.path, self.archive_path(build_id)
                )
            now = datetime.now(UTC)
            async with self._db.transaction() as tx:
                build = await tx.builds.create(
                    id=build_id, team_id=principal.team_id, created_by=principal.user_id,
                    name=config.name, base_template=config.base_template,
                    recipe=list(config.recipe), healthcheck=config.healthcheck or None,
                    vcpus=config.vcpus, memory_mb=config.memory_mb,
                    skip_pre_post=config.skip_pre_post,
                    status=BuildStatus.FAILED if error else BuildStatus.PENDING,
                    total_steps=len(steps), error=error, completed_at=now if error else None,
                    archive=archive.kind if archive is not None and error is None else None,
                    logs=[], default_env={}, attempts=0, current_step=0,
                )  # fmt: skip
                await tx.audit.record(principal.audit("build.create", "build", build_id,
                                                      name=config.name))  # fmt: skip
        finally:
            if archive is not None:
                archive.discard()  # moved into place, or not wanted
        if error is None:
            self._wake.set()
        log.info("build %s of %s queued", build.id, build.name, extra={"build_id": build.id})
        return build_view(build)

    async def list_for(self, principal: Principal, limit: int = LIST_LIMIT) -> list[BuildView]:
        scope = self.authorise(principal)
        async with self._db.transaction() as tx:
            return [build_view(b) for b in await tx.builds.newest(scope, limit=limit)]

    async def get(self, principal: Principal, build_id: str) -> BuildView:
        return build_view(await self._visible(principal, build_id))

    async def cancel(self, principal: Principal, build_id: str) -> BuildView:
        """Cancel a pending or running build (a finished one is left as it is)."""
        await self._visible(principal, build_id)
        async with self._db.transaction() as tx:
            status = await tx.builds.request_cancel(build_id)
            if status in (BuildStatus.CANCELLED, BuildStatus.RUNNING):
                await tx.audit.record(principal.audit("build.cancel", "build", build_id))
            build = await tx.builds.get(build_id)
        assert build is not None
        run = self._runs.get(build_id)
        if run is not None:
            run.stop(cancel=True)
        if build.status == BuildStatus.CANCELLED:
            await anyio.to_thread.run_sync(self._drop_archive, build_id)
            self._publish_done(build)
        return build_view(build)

    async def current(self, principal: Principal, build_id: str) -> BuildView:
        """`get` for a stream that is already open (re-checks the caller every time)."""
        return await self.get(principal, build_id)

    def runs_here(self, build_id: str) -> bool:
        """Whether this process's worker runs the build (its events are published here)."""
        return build_id in self._runs

    # ── templates (the admin view) ──

    async def list_templates(self, principal: Principal) -> list[AdminTemplateView]:
        scope = self.authorise(principal)
        async with self._db.transaction() as tx:
            if scope is None:
                found = await tx.templates.list_all()
            else:
                found = await tx.templates.list_visible(scope)
        return [admin_template_view(t) for t in found]

    async def delete_template(self, principal: Principal, name: str) -> None:
        """Delete the caller's team's template `name` (`SnapshotService.delete`).
        :raise NotFound: :raise Forbidden: a platform template. :raise TemplateInUse:"""
        team = self.authorise(principal) or principal.team_id
        await self._snapshots.delete(principal, name, team_id=team)

    # ── the worker ──

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Claim and run builds until cancelled (the app's background loop). Builds running
        when it is cancelled are left as they are: the next worker takes them over."""
        await anyio.to_thread.run_sync(self._make_dir)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeats)
            task_status.started()
            while True:
                try:
                    while len(self._runs) < self._concurrency:
                        build = await self._claim()
                        if build is None:
                            break
                        run = self._runs[build.id] = BuildRun(self, build)
                        tg.start_soon(self._run, run)
                except Exception as err:  # the database hiccuped: the next round tries again
                    log.error("claiming builds failed: %r", err)
                with anyio.move_on_after(self._poll_s):
                    await self._wake.wait()
                self._wake = anyio.Event()

    def kick(self) -> None:
        self._wake.set()

    async def _claim(self) -> Build | None:
        """The next build to run, claimed; builds interrupted too often are failed instead."""
        while True:
            stale = datetime.now(UTC) - self._stale_after
            with anyio.CancelScope(shield=True):
                async with self._db.transaction() as tx:
                    build = await tx.builds.claim(self.worker_id, stale_before=stale)
                    if build is None or build.attempts <= MAX_ATTEMPTS:
                        break
                    await tx.builds.update(
                        build.id, worker=self.worker_id, status=BuildStatus.FAILED,
                        error=f"interrupted {MAX_ATTEMPTS} times (control plane restarts)",
                        completed_at=datetime.now(UTC),
                    )  # fmt: skip
                run = BuildRun(self, build)
                run.capsule_id = build.capsule_id
                await run._destroy_capsule()
                await self._finish(run, BuildStatus.FAILED, None, write=False)
        if build is not None:
            log.info("build %s claimed (attempt %d)", build.id, build.attempts,
                     extra={"build_id": build.id})  # fmt: skip
        return build

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(self._beat_s)
            if not self._runs:
                continue
            try:
                with anyio.CancelScope(shield=True):
                    async with self._db.transaction() as tx:
                        lost = await tx.builds.heartbeat(self.worker_id, list(self._runs))
            except Exception as err:  # the next beat tries again
                log.warning("build heartbeat failed: %r", err)
                continue
            for build_id in lost:
                run = self._runs.get(build_id)
                if run is not None:
                    run.stop(cancel=True)

    async def _run(self, run: BuildRun) -> None:
        try:
            await run.execute()
        except Exception as err:
            log.error("build %s failed unexpectedly: %r", run.build.id, err,
                      extra={"build_id": run.build.id})  # fmt: skip
            log.debug("build traceback", exc_info=err)
            with anyio.CancelScope(shield=True):
                await run._destroy_capsule()
                await self._finish(run, BuildStatus.FAILED,
                                   f"internal error: {type(err).__name__}")  # fmt: skip
        finally:
            self._runs.pop(run.build.id, None)
            self._wake.set()

    # ── helpers the runs use ──

    def publish(self, build_id: str, kind: BuildEventType, **values: Any) -> None:
        self.events.publish(BuildEvent(type=kind, build_id=build_id, **values))

    def _publish_done(self, build: Build) -> None:
        view = build_view(build)
        self.publish(build.id, BuildEventType.BUILD, build=view.model_dump(mode="json"))
        self.publish(build.id, BuildEventType.DONE, status=view.status, error=view.error)

    async def save(self, run: BuildRun, **values: Any) -> bool:
        """Update the run's row while this worker still owns it."""
        with anyio.CancelScope(shield=True):
            async with self._db.transaction() as tx:
                done = await tx.builds.update(run.build.id, worker=self.worker_id, **values)
        return done

    async def _finish(self, run: BuildRun, status: BuildStatus, error: str | None, *,
                      write: bool = True, **values: Any) -> None:  # fmt: skip
        """Record the build's end (unless `write`: already recorded), drop its archive and
        tell the subscribers."""
        done = not write or await self.save(run, status=status.value, error=error,
                                            completed_at=datetime.now(UTC), **values)  # fmt: skip
        async with self._db.transaction() as tx:
            build = await tx.builds.get(run.build.id)
        if build is not None and (done or BuildStatus(build.status).final):
            await anyio.to_thread.run_sync(self._drop_archive, build.id)
            self._publish_done(build)
        log.info("build %s: %s%s", run.build.id, status.value, f" ({error})" if error else "",
                 extra={"build_id": run.build.id})  # fmt: skip

    def _drop_archive(self, build_id: str) -> None:
        with contextlib.suppress(OSError):
            self.archive_path(build_id).unlink()

    def principal_of(self, build: Build) -> Principal:
        """Who a build's capsule is made for: its team, as the user who asked for it."""
        return Principal(team_id=build.team_id, role=Role.ADMIN, user_id=build.created_by,
                         name=f"build {build.id}")  # fmt: skip


def _first(err: BaseException, kinds: tuple[type[Exception], ...]) -> Exception | None:
    """The first exception of `kinds` in `err` or the groups it holds."""
    if isinstance(err, kinds):
        return err
    if isinstance(err, BaseExceptionGroup):
        for inner in err.exceptions:
            if (found := _first(inner, kinds)) is not None:
                return found
    return None


def _create_private(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    return path


# ── one build ──


@dataclass
class GuestState:
    """What the steps so far set: the user later steps run as, their working directory
    (None: the user's home), and what ENV set."""

    user: str = "root"
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    user_set: bool = False


class _Output:
    """One stream of a step's output: the tail kept for the log, complete lines published."""

    def __init__(self, publish: Any) -> None:
        self._publish = publish
        self.kept = bytearray()
        self._line = bytearray()

    def add(self, data: bytes) -> None:
        self.kept += data
        if len(self.kept) > MAX_KEPT_OUTPUT:
            del self.kept[: len(self.kept) - MAX_KEPT_OUTPUT]
        self._line += data
        while True:
            cut = self._line.find(b"\n")
            if cut < 0 and len(self._line) < MAX_LINE:
                return
            cut = cut if 0 <= cut < MAX_LINE else MAX_LINE - 1
            self._publish(bytes(self._line[:cut]).decode("utf-8", "replace"))
            del self._line[: cut + 1]

    def flush(self) -> None:
        if self._line:
            self._publish(bytes(self._line).decode("utf-8", "replace"))
            self._line.clear()

    def text(self) -> str:
        return bytes(self.kept).decode("utf-8", "replace")


class BuildRun:
    """One claimed build, run to its end (or until `stop`)."""

    def __init__(self, service: BuildService, build: Build) -> None:
        self.service = service
        self.build = build
        self.state = GuestState()
        self.capsule_id: str | None = None
        self.agent: AgentClient | None = None
        self.logs: list[dict[str, Any]] = []
        self.cancelled = False
        self._scope = anyio.CancelScope()

    def stop(self, *, cancel: bool) -> None:
        """Stop the build now: the step in progress is abandoned and the capsule destroyed."""
        self.cancelled = self.cancelled or cancel
        self._scope.cancel()

    def _publish(self, kind: BuildEventType, **values: Any) -> None:
        self.service.publish(self.build.id, kind, **values)

    async def execute(self) -> None:
        svc = self.service
        status, error, extra = BuildStatus.FAILED, None, dict[str, Any]()
        with self._scope:
            try:
                await self._prepare()
                extra = await self._build()
                status = BuildStatus.SUCCESS
            except BuildFailed as err:
                error = str(err)
            except ControlPlaneError as err:
                error = err.message
            except Exception as err:
                # A call cut short by a cancel fails as CANCELED (not as a cancellation),
                # maybe from inside a task group.
                known = _first(err, (BuildFailed, ControlPlaneError))
                if known is None and not self.cancelled:
                    raise
                error = getattr(known, "message", str(known))
        # The app is stopping (a call it cut short may have failed above as CANCELED): leave
        # the build as it is, running; the next worker takes it over and starts again.
        await anyio.lowlevel.checkpoint()
        if self.cancelled:
            status, error = BuildStatus.CANCELLED, "cancelled"
        with anyio.CancelScope(shield=True):
            if status is not BuildStatus.SUCCESS:
                await self._destroy_capsule()
            await svc._finish(self, status, error, **extra)

    async def _prepare(self) -> None:
        """A rerun (its control plane stopped mid-build) starts clean: the old capsule goes."""
        build = self.build
        if build.attempts > 1 and build.capsule_id:
            self.capsule_id = build.capsule_id
            await self._destroy_capsule()
        await self.service.save(self, current_step=0, logs=[], error=None, capsule_id=None,
                                host_id=None)  # fmt: skip
        async with self.service._db.transaction() as tx:
            fresh = await tx.builds.get(build.id)
        if fresh is not None:
            self._publish(BuildEventType.BUILD, build=build_view(fresh).model_dump(mode="json"))

    async def _destroy_capsule(self) -> None:
        if self.capsule_id is None:
            return
        capsule_id, self.capsule_id = self.capsule_id, None
        try:
            with anyio.fail_after(120):
                await self.service._capsules.destroy(self.service.principal_of(self.build),
                                                     capsule_id)  # fmt: skip
        except (ControlPlaneError, TimeoutError) as err:
            log.warning("build %s: its capsule %s was not destroyed: %s", self.build.id,
                        capsule_id, getattr(err, "message", err))  # fmt: skip

    async def _build(self) -> dict[str, Any]:
        svc, build = self.service, self.build
        try:
            steps = plan(build)
            check = rc.parse_healthcheck(build.healthcheck) if build.healthcheck else None
        except ValueError as err:
            raise BuildFailed(str(err)) from None
        principal = svc.principal_of(build)
        async with svc._db.transaction() as tx:
            base = await tx.templates.find(build.team_id, build.base_template)
        if base is None:
            raise BuildFailed(f"the base template {build.base_template} no longer exists")
        self.state = GuestState(
            user="root", workdir=base.metadata.get("default_workdir") or None,
            env=dict(base.default_env),
        )  # fmt: skip
        await self._start_capsule(principal)
        if build.archive:
            await self._unpack()
        for number, step in enumerate(steps, 1):
            await self._step(number, step)
        await self._exec(f"rm -rf {ARCHIVE_DIR} {ARCHIVE_DIR}.*", user="root", timeout_s=60)
        if check is not None:
            await self._healthcheck(check)
        user = self.state.user if self.state.user_set else base.default_user
        return await self._template(check is not None, user)

    async def _start_capsule(self, principal: Principal) -> None:
        build, svc = self.build, self.service
        body: dict[str, Any] = {"template": build.base_template, "vcpus": build.vcpus,
                                "memory_mb": build.memory_mb,
                                "metadata": {BUILD_METADATA: build.id}}  # fmt: skip
        body["allow_internet_access"] = svc.egress
        request = CapsuleCreate.model_validate(body)
        with anyio.CancelScope(shield=True):
            view = await svc._capsules.create(principal, request)
            self.capsule_id = view.id
        await svc.save(self, capsule_id=view.id, host_id=view.host_id)
        target = await svc._targets.running(principal, view.id)
        self.agent = target.agent

    # ── guest calls ──

    @property
    def cid(self) -> str:
        """The build capsule's id (it exists: the steps run in it)."""
        assert self.capsule_id is not None, "the build capsule is not up"
        return self.capsule_id

    def _agent(self) -> AgentClient:
        assert self.agent is not None, "the build capsule is not up"
        return self.agent

    async def _exec(
        self, script: str, *, user: str, timeout_s: float, cwd: str | None = None,
        envs: dict[str, str] | None = None,
    ) -> pb.ExecResponse:  # fmt: skip
        """Run `sh -c script` to its end (at its deadline the agent kills it and the call
        fails). :raise AgentCallError:"""
        return await self._agent().exec(pb.ExecRequest(
            capsule_id=self.cid, cmd="/bin/sh", args=["-c", script], envs=envs or {},
            cwd=cwd or "", timeout_sec=max(1, math.ceil(timeout_s)), user=user,
        ))  # fmt: skip

    async def _unpack(self) -> None:
        build, svc = self.build, self.service
        kind = build.archive or "tar"
        suffix = {"tar": "tar", "tar.gz": "tar.gz", "zip": "zip"}.get(kind, "tar")
        guest_path = f"{ARCHIVE_DIR}.{suffix}"
        local = svc.archive_path(build.id)
        if not await anyio.Path(local).exists():
            raise BuildFailed("the build's archive is not on this control plane (share "
                              f"{svc.builds_dir} between control planes)")  # fmt: skip

        async def messages() -> AsyncIterator[pb.WriteFileStreamRequest]:
            meta = pb.WriteFileMeta(capsule_id=self.cid, path=guest_path, user="root")
            yield pb.WriteFileStreamRequest(message=Oneof[Literal["meta"], pb.WriteFileMeta](
                "meta", meta))  # fmt: skip
            async with await anyio.open_file(local, "rb") as f:
                while chunk := await f.read(CHUNK):
                    yield pb.WriteFileStreamRequest(
                        message=Oneof[Literal["chunk"], bytes]("chunk", chunk)
                    )

        await self._agent().write_file_stream(messages())
        done = await self._exec(extract_command(kind, guest_path, ARCHIVE_DIR),  # type: ignore[arg-type]  # checked at upload
                                user="root", timeout_s=300)  # fmt: skip
        if done.exit_code != 0:
            tail = done.stderr.decode("utf-8", "replace")[-500:]
            raise BuildFailed(f"the archive could not be unpacked: {tail}")

    # ── steps ──

    async def _step(self, number: int, step: rc.Step) -> None:
        self._publish(BuildEventType.STEP_START, step=number, phase=step.phase, cmd=step.text)
        started = time.monotonic()
        entry: dict[str, Any] = {"step": number, "phase": step.phase, "cmd": step.text,
                                 "stdout": "", "stderr": "", "exit": None, "ok": False}  # fmt: skip
        failure: str | None = None
        try:
            await self._do(step, number, entry)
        except BuildFailed as err:
            failure = str(err)
        except AgentCallError as err:
            failure = err.message
        except BaseException:  # cancelled mid-step: the log says what it did until then
            with anyio.CancelScope(shield=True):
                await self._ended(number, step, entry, started, "cancelled")
            raise
        await self._ended(number, step, entry, started, failure)
        if not entry["ok"]:
            why = failure or f"exited with code {entry['exit']}"
            raise BuildFailed(f"step {number} ({step.text}) failed: {why}")

    async def _ended(self, number: int, step: rc.Step, entry: dict[str, Any], started: float,
                     failure: str | None) -> None:  # fmt: skip
        """Log the step (row, event, log line)."""
        entry["elapsed_ms"] = int((time.monotonic() - started) * 1000)
        entry["ok"] = failure is None and entry["exit"] == 0
        self.logs.append(entry)
        log.info("build %s step %d (%s): exit %s in %d ms%s", self.build.id, number,
                 step.text[:60], entry["exit"], entry["elapsed_ms"],
                 f" ({failure})" if failure else "", extra={"build_id": self.build.id})  # fmt: skip
        await self.service.save(self, current_step=number, logs=list(self.logs))
        self._publish(BuildEventType.STEP_END, step=number, phase=step.phase,
                      cmd=step.text, exit=entry["exit"], ok=entry["ok"],
                      elapsed_ms=entry["elapsed_ms"])  # fmt: skip

    async def _do(self, step: rc.Step, number: int, entry: dict[str, Any]) -> None:
        s = self.state
        user = "root" if step.as_root else s.user
        if step.op is rc.Op.RUN:
            await self._run(step, number, entry, user)
            return
        if step.op is rc.Op.START:
            script = (f"setsid -f nohup /bin/sh -c {shlex.quote(step.arg)} "
                      ">/dev/null 2>&1 </dev/null")  # fmt: skip
            done = await self._exec(script, user=user, cwd=s.workdir, envs=s.env,
                                    timeout_s=step.timeout_s)  # fmt: skip
        elif step.op is rc.Op.USER:
            name = shlex.quote(step.arg)
            sudoers = shlex.quote(f"/etc/sudoers.d/nestbox-{step.arg}")
            script = (f"id -u {name} >/dev/null 2>&1 || {{ useradd --create-home --shell "
                      f"/bin/bash {name} && printf '%s ALL=(ALL) NOPASSWD:ALL\\n' {name} > "
                      f"{sudoers} && chmod 0440 {sudoers} && echo created {name}; }}")  # fmt: skip
            done = await self._exec(script, user="root", timeout_s=step.timeout_s)
            if done.exit_code == 0:
                s.user, s.user_set = step.arg, True
        elif step.op is rc.Op.WORKDIR:
            done = await self._exec(self._workdir_script(step.arg), user="root",
                                    timeout_s=step.timeout_s)  # fmt: skip
            if done.exit_code == 0:
                s.workdir = done.stdout.decode("utf-8", "replace").strip().splitlines()[-1]
        elif step.op is rc.Op.COPY:
            done = await self._exec(self._copy_script(step), user="root", cwd=ARCHIVE_DIR
                                    if self.build.archive else None,
                                    timeout_s=step.timeout_s)  # fmt: skip
        else:  # ENV
            known: dict[str, str] = {}
            if rc.references(step.arg) - s.env.keys():  # the guest's own variables too
                found = await self._exec("env -0", user=user, cwd=s.workdir, envs=s.env,
                                         timeout_s=step.timeout_s)  # fmt: skip
                text = found.stdout.decode("utf-8", "replace")
                known = dict(item.partition("=")[::2] for item in text.split("\0") if item)
            value = s.env[step.key] = rc.expand(step.arg, {**known, **s.env})
            entry.update(stdout=f"{step.key}={value}\n", exit=0)
            return
        entry.update(stdout=done.stdout.decode("utf-8", "replace")[-MAX_KEPT_OUTPUT:],
                     stderr=done.stderr.decode("utf-8", "replace")[-MAX_KEPT_OUTPUT:],
                     exit=done.exit_code)  # fmt: skip

    def _base_dir(self) -> str:
        """Shell for the directory relative paths start from: the working directory, else
        the current user's home."""
        if self.state.workdir:
            return shlex.quote(self.state.workdir)
        return f'"$(getent passwd {shlex.quote(self.state.user)} | cut -d: -f6)"'

    def _workdir_script(self, path: str) -> str:
        p, u = shlex.quote(path), shlex.quote(self.state.user)
        return (f"set -e; cd {self._base_dir()}; if [ ! -d {p} ]; then mkdir -p -- {p}; "
                f"chown {u}: {p}; fi; cd -- {p}; pwd")  # fmt: skip

    def _copy_script(self, step: rc.Step) -> str:
        if not self.build.archive:
            return "echo 'COPY needs an archive: upload one with the build' >&2; exit 1"
        u, dst = shlex.quote(self.state.user), step.arg
        into_dir = len(step.sources) > 1 or dst.endswith("/")
        lines = ["set -e", f"base={self._base_dir()}",
                 f'case {shlex.quote(dst)} in /*) d={shlex.quote(dst)} ;; *) d="$base"/'
                 f"{shlex.quote(dst)} ;; esac"]  # fmt: skip
        for src in step.sources:
            q = shlex.quote(src)
            lines += [
                f"[ -e {q} ] || {{ echo 'COPY: '{q}' is not in the archive' >&2; exit 1; }}",
                f'case "$(realpath -m -- {q})" in {ARCHIVE_DIR}|{ARCHIVE_DIR}/*) ;; *) '
                f"echo 'COPY: '{q}' leaves the archive' >&2; exit 1 ;; esac",
            ]  # fmt: skip
        cp = "cp -R --preserve=mode,timestamps,links --"
        for src in step.sources:
            q = shlex.quote(src)
            if into_dir:
                lines.append(f'mkdir -p -- "$d"; if [ -d {q} ]; then {cp} {q}/. "$d"/; '
                             f'else {cp} {q} "$d"/; fi')  # fmt: skip
            else:
                lines.append(
                    f'if [ -d {q} ]; then mkdir -p -- "$d"; {cp} {q}/. "$d"/; '
                    f'else mkdir -p -- "$(dirname -- "$d")"; if [ -d "$d" ]; then '
                    f'{cp} {q} "$d"/; else {cp} {q} "$d"; fi; fi'
                )  # fmt: skip
        lines.append(f'chown -R {u}: -- "$d"')
        return "; ".join(lines)

    async def _run(self, step: rc.Step, number: int, entry: dict[str, Any], user: str) -> None:
        """RUN through ExecStream: output lines published as they come; at the deadline the
        process (its group) is killed."""
        s, agent = self.state, self._agent()
        tag = f"build-{self.build.id[-8:]}-{number}"
        out = _Output(lambda line: self._publish(BuildEventType.OUTPUT, step=number,
                                                 stream="stdout", line=line))  # fmt: skip
        err = _Output(lambda line: self._publish(BuildEventType.OUTPUT, step=number,
                                                 stream="stderr", line=line))  # fmt: skip
        request = pb.ExecStreamRequest(
            capsule_id=self.cid, cmd="/bin/sh", args=["-c", step.arg], envs=s.env,
            cwd=s.workdir or "", user=user, tag=tag,
        )  # fmt: skip
        timed_out = False

        async def deadline() -> None:
            nonlocal timed_out
            await anyio.sleep(step.timeout_s)
            timed_out = True
            with contextlib.suppress(ControlPlaneError):
                await agent.kill_process(pb.KillProcessRequest(
                    capsule_id=self.cid, selector=Oneof[Literal["tag"], str]("tag", tag),
                    signal="SIGKILL"))  # fmt: skip

        exit_code: int | None = None
        try:
            with anyio.move_on_after(step.timeout_s + 15):  # the kill did not end the stream
                async with anyio.create_task_group() as tg:
                    tg.start_soon(deadline)
                    async for message in agent.exec_stream(request):
                        ev = message.event.event if message.event else None
                        if ev is None:
                            continue
                        if ev.field == "stdout":
                            out.add(ev.value)
                        elif ev.field == "stderr":
                            err.add(ev.value)
                        elif ev.field == "exited":
                            exited: pb.ProcessEvent.Exited = ev.value
                            exit_code = exited.exit_code if exited.exited else None
                    tg.cancel_scope.cancel()
        finally:  # also when cancelled: the log keeps the output so far
            out.flush()
            err.flush()
            entry.update(stdout=out.text(), stderr=err.text(), exit=exit_code)
        if timed_out:
            raise BuildFailed(f"timed out after {step.timeout_s:g} s")
        if exit_code is None:
            raise BuildFailed("the process was killed")

    # ── the end ──

    async def _healthcheck(self, check: rc.Healthcheck) -> None:
        """Poll `check` as the template's user until it passes. :raise BuildFailed:"""
        s, svc = self.state, self.service
        started = time.monotonic()
        failures, last = 0, ""
        while True:
            elapsed = time.monotonic() - started
            try:
                done = await self._exec(check.cmd, user=s.user, cwd=s.workdir, envs=s.env,
                                        timeout_s=check.timeout_s)  # fmt: skip
                ok, code = done.exit_code == 0, done.exit_code
                last = (done.stderr or done.stdout).decode("utf-8", "replace")[-300:]
            except (BuildFailed, AgentCallError) as err:
                ok, code, last = False, None, str(err)
            self._publish(BuildEventType.HEALTHCHECK, ok=ok, exit=code, cmd=check.cmd)
            log.info("build %s healthcheck: %s", self.build.id, "passed" if ok else
                     f"failed ({code}): {last.strip()[-120:]}",
                     extra={"build_id": self.build.id})  # fmt: skip
            if ok:
                return
            if elapsed >= check.start_period_s:
                failures += 1
            if check.retries and failures > check.retries:
                raise BuildFailed(f"the healthcheck failed {failures} times: {last.strip()}")
            if time.monotonic() - started > svc.healthcheck_max_s:
                raise BuildFailed(f"the healthcheck did not pass within "
                                  f"{svc.healthcheck_max_s:g} s: {last.strip()}")  # fmt: skip
            await anyio.sleep(check.interval_s)

    async def _template(self, snapshot: bool, user: str) -> dict[str, Any]:
        """Make the template (consuming the capsule) and its row; the build row's values."""
        svc, build = self.service, self.build
        template_id = new_id(IdPrefix.TEMPLATE)
        kind = pb.TemplateKind.SNAPSHOT if snapshot else pb.TemplateKind.BASE
        with anyio.CancelScope(shield=True):
            made = await self._agent().build_template(self.capsule_id or "", template_id,
                                                      kind=kind, consume=True)  # fmt: skip
            capsule_id, self.capsule_id = self.capsule_id, None
            shape = made.template
            env = rc.persisted_env(self.state.env)
            metadata = {"build_id": build.id}
            if self.state.workdir:
                metadata["default_workdir"] = self.state.workdir
            async with svc._db.transaction() as tx:
                capsule = await tx.capsules.get(capsule_id or "")
                await tx.capsules.update(capsule_id or "", status="destroyed", host_ip="")
                old = await tx.templates.own(build.team_id, build.name)
                if old is not None:
                    await tx.templates.delete(old.id)
                await tx.templates.create(
                    template_id=template_id, team_id=build.team_id, name=build.name,
                    host_id=capsule.host_id if capsule else None,
                    vcpus=(shape.vcpus or None) if shape and snapshot else None,
                    memory_mb=(shape.memory_mb or None) if shape and snapshot else None,
                    default_user=user, default_env=env, metadata=metadata,
                    type_="snapshot" if snapshot else "base",
                    size_bytes=shape.size_bytes if shape else 0, created_by=build.created_by,
                )  # fmt: skip
                await tx.audit.record(svc.principal_of(build).audit(
                    "template.build", "template", template_id, name=build.name,
                    build=build.id))  # fmt: skip
        if old is not None:
            await svc._snapshots.remove_from_host(old)
        return {"template_id": template_id, "template_type": "snapshot" if snapshot else "base",
                "default_user": user, "default_env": env,
                "default_workdir": self.state.workdir}  # fmt: skip
