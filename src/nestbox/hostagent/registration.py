"""The agent's standing with the control plane: registering once, keeping the credentials, and
sending heartbeats (wire format in `protocol/hosts.py`).

`ensure_registered` trades a one-time registration token for long-lived credentials, kept in
`<state_dir>/host-credentials.json` (mode 0600); later starts reuse them and need no token.
`heartbeat_loop` runs for the agent's whole life in its task group: it reports the host's load
every interval, renews the host token with the refresh token when the control plane says 401,
and keeps trying quietly through outages (one warning per failure streak).

Not here: the HTTP check of the control plane's calls to the agent, which is `auth`'s
(`auth.from_credentials` checks them against `HostCredentials.agent_token_sha256` for RPCs and
`proxy_token_sha256` for the port proxy).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio
import httpx
import psutil
from pydantic import BaseModel, ConfigDict, ValidationError

from nestbox import __version__
from nestbox.hostagent.auth import sha256_hex
from nestbox.protocol.errors import ErrorBody
from nestbox.protocol.hosts import (
    HOST_TOKEN_HEADER,
    REFRESH_PATH,
    REGISTER_PATH,
    HeartbeatRequest,
    HeartbeatResponse,
    HostRefreshRequest,
    HostRefreshResponse,
    HostRegisterRequest,
    HostRegisterResponse,
    heartbeat_path,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from anyio.abc import TaskStatus

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

CREDENTIALS_FILE = "host-credentials.json"
REGISTER_TIMEOUT_S = 30.0
HEARTBEAT_TIMEOUT_S = 10.0
MIB = 1024 * 1024
GIB = 1024 * MIB


class RegistrationError(Exception):
    """Registration, or reading the saved credentials, failed; `message` says what to do."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


class HostCredentials(BaseModel):
    """What `host-credentials.json` holds."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    host_id: str
    cp_url: str
    address: str
    host_token: str
    """Sent in `X-Host-Token` with every heartbeat."""
    refresh_token: str
    agent_token_sha256: str
    """SHA-256 (hex) of the token the control plane presents with RPCs (`X-Agent-Token`)."""
    proxy_token_sha256: str | None = None
    """SHA-256 (hex) of the token the control plane presents with proxied requests
    (`X-Nestbox-Proxy-Token`); None in files written before it existed (no proxying then)."""
    registered_at: datetime


@dataclass(frozen=True, slots=True)
class MachineInfo:
    arch: str
    cpu_cores: int
    memory_mb: int
    disk_gb: int
    """Size of the file system holding the data directory."""


def machine_info(data_dir: Path) -> MachineInfo:
    """This machine's architecture, CPU cores, memory and data-directory disk size."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return MachineInfo(
        arch=platform.machine(),
        cpu_cores=max(1, cores or 1),
        memory_mb=memory // MIB,
        disk_gb=shutil.disk_usage(_existing(data_dir)).total // GIB,
    )


class CpuUse:
    """Whole-machine CPU use between successive `percent()` calls, whichever thread makes them.

    Not `psutil.cpu_percent(interval=None)`: psutil keeps its last sample per thread, and
    heartbeats sample from whichever worker thread is free, so a thread sampling for the first
    time answered 0.0 (an agent looked idle after every start, and often between).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = self._busy_total()

    @staticmethod
    def _busy_total() -> tuple[float, float]:
        t = psutil.cpu_times()
        # guest time is counted in user time already (Linux); idle and I/O wait are not busy
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total - t.idle - getattr(t, "iowait", 0.0), total

    def percent(self) -> float:
        """Percent of all cores busy since the previous call (or since this was made)."""
        with self._lock:
            (busy0, total0), self._last = self._last, self._busy_total()
            busy1, total1 = self._last
        if total1 <= total0:
            return 0.0
        return round(min(100.0, max(0.0, 100 * (busy1 - busy0) / (total1 - total0))), 1)


CPU_USE = CpuUse()
"""The heartbeats' CPU meter: its first reading covers the time since the agent started."""


async def host_load(
    data_dir: Path,
    *,
    capsules_running: int = 0,
    capsules_paused: int = 0,
    vcpus_allocated: int = 0,
    memory_allocated_mb: int = 0,
) -> HeartbeatRequest:
    """A heartbeat with this machine's figures now and the given capsule counts (the agent's
    `load` callback wraps this with the manager's numbers)."""

    def sample() -> HeartbeatRequest:
        memory = psutil.virtual_memory()
        disk = shutil.disk_usage(_existing(data_dir))
        return HeartbeatRequest(
            capsules_running=capsules_running,
            capsules_paused=capsules_paused,
            vcpus_allocated=vcpus_allocated,
            memory_allocated_mb=memory_allocated_mb,
            cpu_cores=max(1, psutil.cpu_count() or 1),
            cpu_used_pct=CPU_USE.percent(),
            load_1m=os.getloadavg()[0],
            memory_total_mb=memory.total // MIB,
            memory_available_mb=memory.available // MIB,
            disk_total_gb=round(disk.total / GIB, 2),
            disk_free_gb=round(disk.free / GIB, 2),
            agent_version=__version__,
        )

    return await anyio.to_thread.run_sync(sample)


def load_credentials(state_dir: Path) -> HostCredentials | None:
    """The saved credentials, or None if this agent never registered.

    :raise RegistrationError: the file exists but cannot be read or parsed.
    """
    path = state_dir / CREDENTIALS_FILE
    try:
        return HostCredentials.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as err:
        raise RegistrationError(f"cannot use {path}: {err}; delete it to register again") from err


def save_credentials(state_dir: Path, creds: HostCredentials) -> None:
    """Write the credentials file atomically with mode 0600 (the directory 0700 if new)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = creds.model_dump_json(indent=2).encode()
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{CREDENTIALS_FILE}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, state_dir / CREDENTIALS_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a successful replace


async def ensure_registered(
    cp_url: str,
    token: str | None,
    address: str,
    state_dir: Path,
    *,
    machine: MachineInfo | None = None,
    client: httpx.AsyncClient | None = None,
) -> HostCredentials:
    """Saved credentials for `cp_url` if there are any (a `token` is then not needed and is
    ignored), else `register(...)` with `token`.

    :raise RegistrationError: no credentials and no token, or registration failed.
    """
    creds = await anyio.to_thread.run_sync(load_credentials, state_dir)
    if creds is not None and _same_url(creds.cp_url, cp_url):
        if token:
            log.info(
                "already registered as %s; the registration token is not needed", creds.host_id
            )
        return creds
    if not token:
        where = "this agent is not registered" if creds is None else "registered elsewhere"
        raise RegistrationError(
            f"{where}: give a registration token from the control plane's admin "
            "(NESTBOX_AGENT_REGISTRATION_TOKEN or --register)"
        )
    return await register(cp_url, token, address, state_dir, machine=machine, client=client)


async def register(
    cp_url: str,
    token: str,
    address: str,
    state_dir: Path,
    *,
    machine: MachineInfo | None = None,
    client: httpx.AsyncClient | None = None,
) -> HostCredentials:
    """`POST /v1/hosts/register`: trade the one-time `token` for credentials and save them.

    :raise RegistrationError: the control plane refused (e.g. 401 for a bad or used token)
        or could not be reached.
    """
    if machine is None:
        machine = await anyio.to_thread.run_sync(machine_info, state_dir)
    try:
        request = HostRegisterRequest(
            token=token,
            address=address,
            arch=machine.arch,
            cpu_cores=machine.cpu_cores,
            memory_mb=machine.memory_mb,
            disk_gb=machine.disk_gb,
        )
    except ValidationError as err:
        problems = "; ".join(e["msg"] for e in err.errors(include_url=False))
        raise RegistrationError(f"register: cannot register {address!r}: {problems}") from err
    async with _cp_client(cp_url, client, REGISTER_TIMEOUT_S) as http:
        answer = await _post(http, REGISTER_PATH, request, HostRegisterResponse, "register")
    creds = HostCredentials(
        host_id=answer.host.id,
        cp_url=cp_url,
        address=address,
        host_token=answer.token,
        refresh_token=answer.refresh_token,
        agent_token_sha256=sha256_hex(answer.agent_token),
        proxy_token_sha256=sha256_hex(answer.proxy_token),
        registered_at=datetime.now(UTC),
    )
    await anyio.to_thread.run_sync(save_credentials, state_dir, creds)
    log.info("registered with %s as %s", cp_url, creds.host_id, extra={"host_id": creds.host_id})
    return creds


async def heartbeat_loop(
    creds: HostCredentials,
    interval_s: float,
    load: Callable[[], Awaitable[HeartbeatRequest]],
    *,
    state_dir: Path | None = None,
    client: httpx.AsyncClient | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Send `await load()` to the control plane every `interval_s` seconds, forever.

    Renews the host token on 401 (saving the new credentials to `state_dir` if given). Never
    raises for a failed beat: the first failure of a streak is a warning, the rest debug
    lines, the recovery an info line. Run it in the agent's task group (`tg.start`).
    """
    session = _Session(creds, state_dir)
    async with _cp_client(creds.cp_url, client, HEARTBEAT_TIMEOUT_S) as http:
        task_status.started()
        failures = 0
        while True:
            try:
                await session.beat(http, await load())
            except Exception as err:  # whatever failed, it is one missed beat
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "heartbeat to %s failed: %s", creds.cp_url, _describe(err))
            else:
                if failures:
                    log.info("heartbeats to %s back after %d failed", creds.cp_url, failures)
                failures = 0
            await anyio.sleep(interval_s)


class _Session:
    """The current credentials of the heartbeat loop (they change when the token is renewed)."""

    def __init__(self, creds: HostCredentials, state_dir: Path | None) -> None:
        self.creds = creds
        self._state_dir = state_dir

    async def beat(self, http: httpx.AsyncClient, load: HeartbeatRequest) -> HeartbeatResponse:
        try:
            return await self._send(http, load)
        except RegistrationError as err:
            if err.status != 401:
                raise
        await self._refresh(http)
        return await self._send(http, load)

    async def _send(self, http: httpx.AsyncClient, load: HeartbeatRequest) -> HeartbeatResponse:
        headers = {HOST_TOKEN_HEADER: self.creds.host_token}
        path = heartbeat_path(self.creds.host_id)
        return await _post(http, path, load, HeartbeatResponse, "heartbeat", headers=headers)

    async def _refresh(self, http: httpx.AsyncClient) -> None:
        request = HostRefreshRequest(refresh_token=self.creds.refresh_token)
        answer = await _post(http, REFRESH_PATH, request, HostRefreshResponse, "token refresh")
        self.creds = self.creds.model_copy(
            update={"host_token": answer.token, "refresh_token": answer.refresh_token}
        )
        if self._state_dir is not None:
            await anyio.to_thread.run_sync(save_credentials, self._state_dir, self.creds)
        log.info("renewed the host token", extra={"host_id": self.creds.host_id})


async def _post(
    http: httpx.AsyncClient,
    path: str,
    body: BaseModel,
    answer: type[M],
    what: str,
    *,
    headers: dict[str, str] | None = None,
) -> M:
    """:raise RegistrationError: no answer, a non-2xx answer, or a malformed one."""
    payload = body.model_dump_json().encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        response = await http.post(path, content=payload, headers=all_headers)
    except httpx.HTTPError as err:
        raise RegistrationError(f"{what}: cannot reach the control plane: {err}") from err
    if response.status_code >= 300:
        raise _refusal(response, what)
    try:
        return answer.model_validate_json(response.content)
    except ValidationError as err:
        raise RegistrationError(f"{what}: malformed answer from the control plane") from err


def _refusal(response: httpx.Response, what: str) -> RegistrationError:
    try:
        error = ErrorBody.model_validate_json(response.content).error
        code, detail = error.code.value, error.message
    except ValidationError:
        code, detail = None, response.text[:200]
    hint = " (is the registration token right and unused?)" if what == "register" else ""
    message = f"{what}: the control plane answered {response.status_code}: {detail}{hint}"
    return RegistrationError(message, status=response.status_code, code=code)


@asynccontextmanager
async def _cp_client(
    cp_url: str, client: httpx.AsyncClient | None, timeout_s: float
) -> AsyncIterator[httpx.AsyncClient]:
    """The caller's client, or one of our own for `cp_url` (closed on exit)."""
    if client is not None:
        yield client
        return
    async with httpx.AsyncClient(base_url=cp_url, timeout=timeout_s) as own:
        yield own


def _describe(err: Exception) -> str:
    return err.message if isinstance(err, RegistrationError) else f"{type(err).__name__}: {err}"


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
