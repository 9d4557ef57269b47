"""envd's plain-HTTP lifecycle endpoints: health, metrics, envs, `/init`, `/snapshot/prepare`,
and the post-restore recovery both `/health` and `/init` trigger.

Handlers parse, call the runtime's subsystems (the guest machine among them), and answer; they
hold no state of their own (the init lock and the CPU sampler are the runtime's too).

`/init` right after a restore is what the host waits on before a capsule counts as created,
and under TCG every code path the guest runs for the first time after a restore is slow
(nothing is translated yet; stepping the clock, writing the identity files and reseeding the RNG
took 35-95 ms there). So `/init` validates its body and updates envd's own state before it
answers, and applies the rest to the machine right after the answer is out (the seed's
"flush the response before the final work"): `finish_init`, run by the response's background
task, or first thing by any request that reaches envd before that, so that no process envd
starts and no file operation ever sees the machine without it. What it logs, it logs after.
A clone's new host name goes into `/etc/hosts` later still, before the first request that may
run a program or read files (`pin_hostname`): an idle clone never writes its disk.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio.to_thread
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from nestbox.envd import guest
from nestbox.envd.errors import EnvdError, InvalidArgument, UnknownUser
from nestbox.envd.metrics import read_metrics
from nestbox.envd.state import MachineUpdate
from nestbox.envd.users import user_named
from nestbox.protocol.envd import ENVD_VERSION, LOG_LINES, InitRequest, LogPage

if TYPE_CHECKING:
    from starlette.requests import Request

    from nestbox.envd.state import Runtime

log = logging.getLogger(__name__)

NO_STORE = {"Cache-Control": "no-store"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def error_response(err: EnvdError) -> JSONResponse:
    body = {"error": {"code": err.http_code, "message": err.message}}
    return JSONResponse(body, status_code=err.http_status, headers=NO_STORE)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What one post-restore recovery did."""

    closed: int
    """Pre-snapshot connections closed."""
    duration_ms: float
    prepared: str
    """What `/snapshot/prepare` did before the snapshot."""


async def recover_if_needed(rt: Runtime) -> Recovery | None:
    """Post-restore recovery, exactly once after each `/snapshot/prepare`: close the connections
    frozen into the snapshot, re-enable keep-alive, restart port forwarding. Returns what it did
    (None if there was nothing to do), for the handler to log after it has answered."""
    if not rt.needs_restore.claim():
        return None
    started = time.monotonic()
    closed = rt.tracker.restore_after_snapshot()
    await rt.ports.restart()
    return Recovery(closed, round((time.monotonic() - started) * 1000, 1), rt.last_prepare)


def finish_init(rt: Runtime) -> float | None:
    """Apply what answered `/init`s left for the machine (`rt.pending`), if anything: step the
    clock to the host's time now, rewrite the identity files, mix in the entropy. Synchronous:
    nothing else runs on envd's loop meanwhile. Returns the clock step in seconds, if any."""
    update, rt.pending = rt.pending, None
    if update is None:
        return None
    step = None
    if update.host_ns is not None:
        elapsed_ns = round((time.monotonic() - update.received) * 1e9)
        step = rt.machine.set_clock(update.host_ns + elapsed_ns)
    if update.identity:
        write_identity(rt)
        if rt.machine.set_hostname(rt.identity.capsule_id):
            rt.hosts_pin = rt.identity.capsule_id
    if update.entropy:
        rt.machine.reseed_rng(update.entropy)
    return step


NO_GUEST_USE = frozenset({"/health", "/metrics", "/envs", "/logs", "/init", "/snapshot/prepare"})
"""Paths whose handlers run no program and read no file a program wrote: the requests that
leave a pending host name (`Runtime.hosts_pin`) for later."""


def pin_hostname(rt: Runtime, path: str) -> None:
    """Before a request to `path` that may run a program or read files, write a pending new
    host name into `/etc/hosts` (`127.0.1.1`, for tools that resolve their own host name, such
    as sudo). Synchronous, as `finish_init`; once: a failure is logged, not retried."""
    name = rt.hosts_pin
    if name is None or path in NO_GUEST_USE:
        return
    rt.hosts_pin = None
    rt.machine.pin_hostname(name)


def log_clock_step(step: float | None) -> None:
    if step is not None:
        log.info("guest clock stepped by %.3f s", step)


def _after_answer(rt: Runtime, recovery: Recovery | None) -> BackgroundTask:
    """The work of a request left for after its answer (Starlette runs a response's background
    task once the last body chunk has been sent): what an `/init` left pending, then the
    logging."""

    def write() -> None:
        step = finish_init(rt)
        if recovery is not None:
            log.info(
                "post-restore recovery done: %d pre-snapshot connections closed, port "
                "forwarding restarted (the snapshot's prepare: %s, port forwarding stopped)",
                recovery.closed,
                recovery.prepared,
                extra={"duration_ms": recovery.duration_ms},
            )
        log_clock_step(step)

    return BackgroundTask(write)


async def health(request: Request) -> Response:
    rt = _runtime(request)
    recovery = await recover_if_needed(rt)
    return JSONResponse(
        {"version": ENVD_VERSION},
        headers=NO_STORE,
        background=_after_answer(rt, recovery),
    )


async def metrics(request: Request) -> Response:
    sample = await anyio.to_thread.run_sync(read_metrics, _runtime(request).cpu_sampler)
    return JSONResponse(sample.to_json(), headers=NO_STORE)


async def envs(request: Request) -> Response:
    return JSONResponse(_runtime(request).base_env(), headers=NO_STORE)


async def scan_ports(request: Request) -> Response:
    """`POST /ports/scan` → `{"forwarded": [ports]}`: look for loopback listeners now (an idle
    envd does not poll; `ports.py`), once their socats listen. The host's port proxy sends it
    when a dial into the capsule is refused; never reachable through the envd gateways."""
    forwarded = await _runtime(request).ports.scan_now()
    return JSONResponse({"forwarded": list(forwarded)}, headers=NO_STORE)


async def logs(request: Request) -> Response:
    """`GET /logs?start=<ms>&limit=<n>` → `{"entries": [...]}`: envd's last log lines
    (`logring`), oldest first. Never reachable through the envd gateways (their allow-list)."""
    try:
        start = int(request.query_params.get("start", "0"))
        limit = int(request.query_params.get("limit", str(LOG_LINES)))
    except ValueError:
        return error_response(InvalidArgument("start and limit must be integers"))
    entries = _runtime(request).logs.read(start, min(limit, LOG_LINES))
    page = LogPage(entries=entries)
    return JSONResponse(page.model_dump(mode="json", by_alias=True), headers=NO_STORE)


async def init(request: Request) -> Response:
    """`POST /init` → 204. Applies the host's defaults, token, clock, entropy and identity; an
    older `timestamp` than the last applied one skips the data updates (E2B) but not the token.
    Post-restore recovery runs first, so it happens even when the body is rejected. Only a
    request carrying the current token gets here once one is set (`app.EnvdApp`)."""
    received = time.monotonic()
    rt = _runtime(request)
    recovery = await recover_if_needed(rt)
    try:
        body = await request.body()
    except ClientDisconnect:
        return Response(status_code=400)  # nobody to read it
    try:
        req = _parse_init(body)
        host_ns = _timestamp_ns(req.timestamp)
        entropy = _entropy(req.entropy)
        if req.default_user:  # cached: a clone's repeated default user is cheap
            try:
                await user_named(req.default_user)
            except UnknownUser as err:
                raise InvalidArgument(err.message) from err
    except EnvdError as err:
        return error_response(err)

    update = MachineUpdate(received)
    async with rt.init_lock:  # E2B's initLock: two /init calls never interleave their updates
        if req.access_token:
            # Whatever the timestamp: the request carried the current token (the gate in
            # `app.py`), and a clone whose host clock stepped back must still drop the
            # template's token, or clones would share it.
            rt.access_token = req.access_token
        if _is_newer(host_ns, rt.last_init_ns):
            _apply_data(rt, req, host_ns)
            update.host_ns, update.identity = host_ns, True
        else:
            log.info(
                "stale /init timestamp %s (the last applied one is %s): data updates skipped",
                req.timestamp,
                _format_ns(rt.last_init_ns),
            )
    # Even for a stale request: more entropy never hurts, and a restored snapshot needs it.
    update.entropy = entropy
    if rt.pending is None:
        rt.pending = update
    else:
        rt.pending.merge(update)
    return Response(status_code=204, headers=NO_STORE, background=_after_answer(rt, recovery))


async def prepare(request: Request) -> Response:
    """`POST /snapshot/prepare` → 204: quiesce envd before the host freezes the VM.

    The tracker ends keep-alive on this request's own connection too, so the 204 goes out with
    `Connection: close` and the socket is closed right after it, before the freeze.
    """
    rt = _runtime(request)
    started = time.monotonic()
    await rt.ports.stop()
    stopped = time.monotonic()
    closed, remembered = rt.tracker.prepare_for_snapshot()
    rt.needs_restore.set()
    # Before answering: the host freezes the VM as soon as it has the 204 (a no-op outside a
    # VM). Inline, not in a worker thread: the loop has nothing better to do now, and under TCG
    # starting or waking a thread costs about as much as the sync itself. The page cache is
    # kept: dropping it would not shrink a full-RAM snapshot (freed pages are not zeroed).
    rt.machine.sync()
    done = time.monotonic()
    # Said at INFO by the post-restore recovery line: a line written here would delay the
    # answer, and a task after it would only run after the restore.
    rt.last_prepare = (
        f"{closed} idle connections closed and {remembered} remembered in "
        f"{(done - started) * 1000:.1f} ms (ports {(stopped - started) * 1000:.1f} ms, "
        f"sync {(done - stopped) * 1000:.1f} ms)"
    )
    log.debug("snapshot prepared: %s", rt.last_prepare)
    return Response(status_code=204, headers=NO_STORE)


def _parse_init(body: bytes) -> InitRequest:
    if not body.strip():
        return InitRequest()
    try:
        return InitRequest.model_validate_json(body)
    except ValidationError as err:
        # Name the fields only: the input may hold the access token.
        fields = ", ".join(".".join(map(str, e["loc"])) or "body" for e in err.errors())
        raise InvalidArgument(f"invalid /init body: {fields}") from None


def _timestamp_ns(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidArgument("timestamp must be an RFC 3339 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - EPOCH) // timedelta(microseconds=1) * 1000


def _entropy(raw: str | None) -> bytes:
    if not raw:
        return b""
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("entropy must be base64") from None


def _format_ns(ns: int | None) -> str:
    if ns is None:
        return "none"
    return (EPOCH + timedelta(microseconds=ns // 1000)).isoformat()


def _is_newer(host_ns: int | None, last_ns: int | None) -> bool:
    """E2B's rule: a request without a timestamp always applies; one with a timestamp applies
    only if it is later than the last applied one."""
    return host_ns is None or last_ns is None or host_ns > last_ns


def _apply_data(rt: Runtime, req: InitRequest, host_ns: int | None) -> None:
    if host_ns is not None:
        rt.last_init_ns = host_ns
    if req.env_vars:
        rt.defaults.env.update(req.env_vars)
    if req.default_user:
        rt.defaults.user = req.default_user
    if req.default_workdir:
        rt.defaults.workdir = req.default_workdir
    if req.capsule_id is not None:
        if req.capsule_id != rt.identity.capsule_id:
            rt.logs.clear()  # another capsule now (a clone, a fork copy): none of its lines
        rt.identity.capsule_id = req.capsule_id
    if req.template_id is not None:
        rt.identity.template_id = req.template_id


def write_identity(rt: Runtime) -> None:
    """Write the capsule identity files (`guest.write_identity`); a failure is logged, not
    raised."""
    try:
        rt.identity_files = guest.write_identity(
            rt.settings.run_dir, rt.identity, rt.identity_files
        )
    except OSError as err:
        log.warning("cannot write identity files to %s: %s", rt.settings.run_dir, err)
