"""Registration and heartbeats against a fake control plane: a small Starlette app on a
loopback port that issues credentials for one-time tokens and records heartbeats."""

from __future__ import annotations

import logging
import secrets
import stat
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nestbox.hostagent.auth import from_credentials
from nestbox.hostagent.registration import (
    CREDENTIALS_FILE,
    MachineInfo,
    RegistrationError,
    ensure_registered,
    heartbeat_loop,
    host_load,
    load_credentials,
    machine_info,
)
from nestbox.protocol.errors import ErrorBody, ErrorCode
from nestbox.protocol.hosts import (
    HOST_TOKEN_HEADER,
    HeartbeatRequest,
    HeartbeatResponse,
    HostRefreshRequest,
    HostRefreshResponse,
    HostRegisterRequest,
    HostRegisterResponse,
    HostStatus,
    HostView,
)
from tests.conftest import HANG_S, free_port
from tests.integration.asgi_server import LOOPBACK, serve

MACHINE = MachineInfo(arch="x86_64", cpu_cores=4, memory_mb=8192, disk_gb=100)


def refuse(status: int, code: ErrorCode, message: str) -> Response:
    return JSONResponse(ErrorBody.of(code, message).model_dump(mode="json"), status_code=status)


class FakeControlPlane:
    def __init__(self) -> None:
        self.registration_tokens = {"good-token"}
        self.registrations: list[HostRegisterRequest] = []
        self.heartbeats: list[tuple[str, HeartbeatRequest]] = []
        self.host_tokens: dict[str, str] = {}  # host id -> current host token
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> host id
        self.agent_tokens: dict[str, str] = {}
        self.proxy_tokens: dict[str, str] = {}
        self.app = Starlette(
            routes=[
                Route("/v1/hosts/register", self.register, methods=["POST"]),
                Route("/v1/hosts/auth/refresh", self.refresh, methods=["POST"]),
                Route("/v1/hosts/{id}/heartbeat", self.heartbeat, methods=["POST"]),
            ]
        )

    async def register(self, request: Request) -> Response:
        body = HostRegisterRequest.model_validate_json(await request.body())
        if body.token not in self.registration_tokens:
            return refuse(401, ErrorCode.UNAUTHORIZED, "registration token invalid or expired")
        self.registration_tokens.discard(body.token)  # one-time
        self.registrations.append(body)
        host_id = f"host-{len(self.registrations)}"
        token, refresh = secrets.token_hex(8), secrets.token_hex(8)
        self.host_tokens[host_id] = token
        self.refresh_tokens[refresh] = host_id
        self.agent_tokens[host_id] = secrets.token_hex(16)
        self.proxy_tokens[host_id] = secrets.token_hex(16)
        view = HostView(
            id=host_id,
            status=HostStatus.ONLINE,
            address=body.address,
            arch=body.arch,
            cpu_cores=body.cpu_cores,
            memory_mb=body.memory_mb,
            disk_gb=body.disk_gb,
        )
        answer = HostRegisterResponse(
            host=view,
            token=token,
            refresh_token=refresh,
            agent_token=self.agent_tokens[host_id],
            proxy_token=self.proxy_tokens[host_id],
        )
        return JSONResponse(answer.model_dump(mode="json"))

    async def refresh(self, request: Request) -> Response:
        body = HostRefreshRequest.model_validate_json(await request.body())
        host_id = self.refresh_tokens.pop(body.refresh_token, None)  # rotates: old one is spent
        if host_id is None:
            return refuse(401, ErrorCode.UNAUTHORIZED, "refresh token invalid")
        token, refresh = secrets.token_hex(8), secrets.token_hex(8)
        self.host_tokens[host_id] = token
        self.refresh_tokens[refresh] = host_id
        return JSONResponse(HostRefreshResponse(token=token, refresh_token=refresh).model_dump())

    async def heartbeat(self, request: Request) -> Response:
        host_id = request.path_params["id"]
        if self.host_tokens.get(host_id) != request.headers.get(HOST_TOKEN_HEADER):
            return refuse(401, ErrorCode.UNAUTHORIZED, "host token invalid or expired")
        body = HeartbeatRequest.model_validate_json(await request.body())
        self.heartbeats.append((host_id, body))
        return JSONResponse(HeartbeatResponse(status=HostStatus.ONLINE).model_dump(mode="json"))

    def expire_host_token(self, host_id: str) -> None:
        self.host_tokens[host_id] = "expired-" + secrets.token_hex(4)


@pytest.fixture
async def cp() -> AsyncIterator[tuple[FakeControlPlane, str]]:
    fake = FakeControlPlane()
    port = free_port()
    async with serve(fake.app, port):
        yield fake, f"http://{LOOPBACK}:{port}"


async def fixed_load() -> HeartbeatRequest:
    return HeartbeatRequest(
        capsules_running=2,
        cpu_cores=4,
        cpu_used_pct=12.5,
        load_1m=0.5,
        memory_total_mb=8192,
        memory_available_mb=4096,
        disk_total_gb=100,
        disk_free_gb=60,
    )


async def wait_for_beats(fake: FakeControlPlane, count: int) -> None:
    with anyio.fail_after(HANG_S):
        while len(fake.heartbeats) < count:  # noqa: ASYNC110 (the state has no event to wait on)
            await anyio.sleep(0.01)


async def test_registration_saves_private_credentials_and_is_reused(
    cp: tuple[FakeControlPlane, str], tmp_path: Path
) -> None:
    fake, url = cp
    state = tmp_path / "agents" / "a0"
    creds = await ensure_registered(url, "good-token", "10.0.0.5:9726", state, machine=MACHINE)
    assert creds.host_id == "host-1"
    assert fake.registrations[0].model_dump() == {
        "token": "good-token",
        "address": "10.0.0.5:9726",
        "arch": "x86_64",
        "cpu_cores": 4,
        "memory_mb": 8192,
        "disk_gb": 100,
    }
    path = state / CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_credentials(state) == creds
    agent_auth = from_credentials(creds)
    agent_token, proxy_token = fake.agent_tokens["host-1"], fake.proxy_tokens["host-1"]
    assert agent_auth.accepts(agent_token)
    assert not agent_auth.accepts("wrong")
    assert not agent_auth.accepts(None)
    # each token for its own purpose only: the proxy token never authorises an RPC
    assert agent_auth.accepts_proxy(proxy_token)
    assert not agent_auth.accepts(proxy_token)
    assert not agent_auth.accepts_proxy(agent_token)
    saved = path.read_text()
    assert agent_token not in saved  # only their hashes are kept
    assert proxy_token not in saved

    again = await ensure_registered(url, None, "10.0.0.5:9726", state)  # a second start
    assert again == creds
    assert len(fake.registrations) == 1


async def test_bad_token_is_a_clear_error(cp: tuple[FakeControlPlane, str], tmp_path: Path) -> None:
    _, url = cp
    with pytest.raises(RegistrationError) as caught:
        await ensure_registered(url, "bad-token", "10.0.0.5:9726", tmp_path, machine=MACHINE)
    assert caught.value.status == 401
    assert caught.value.code == "unauthorized"
    assert "registration token invalid or expired" in caught.value.message
    assert "registration token right and unused" in caught.value.message
    assert not (tmp_path / CREDENTIALS_FILE).exists()


async def test_no_token_and_no_credentials(
    cp: tuple[FakeControlPlane, str], tmp_path: Path
) -> None:
    with pytest.raises(RegistrationError, match="not registered"):
        await ensure_registered(cp[1], None, "10.0.0.5:9726", tmp_path)


async def test_unreachable_control_plane(tmp_path: Path) -> None:
    url = f"http://{LOOPBACK}:{free_port()}"
    with pytest.raises(RegistrationError, match="cannot reach the control plane"):
        await ensure_registered(url, "t", "10.0.0.5:9726", tmp_path, machine=MACHINE)


async def test_corrupt_credentials_file(tmp_path: Path) -> None:
    (tmp_path / CREDENTIALS_FILE).write_text("{not json")
    with pytest.raises(RegistrationError, match="delete it to register again"):
        load_credentials(tmp_path)


async def test_heartbeats_arrive_and_survive_token_expiry(
    cp: tuple[FakeControlPlane, str], tmp_path: Path
) -> None:
    fake, url = cp
    creds = await ensure_registered(url, "good-token", "10.0.0.5:9726", tmp_path, machine=MACHINE)
    async with anyio.create_task_group() as tg:
        beats = partial(heartbeat_loop, state_dir=tmp_path)
        await tg.start(beats, creds, 0.02, fixed_load)
        await wait_for_beats(fake, 3)
        assert fake.heartbeats[0] == ("host-1", await fixed_load())
        fake.expire_host_token("host-1")
        seen = len(fake.heartbeats)
        await wait_for_beats(fake, seen + 3)  # renewed with the refresh token
        tg.cancel_scope.cancel()
    saved = load_credentials(tmp_path)
    assert saved is not None
    assert saved.host_token == fake.host_tokens["host-1"]
    assert saved.refresh_token != creds.refresh_token


async def test_heartbeats_retry_quietly_through_an_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeControlPlane()
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    async with serve(fake.app, port):
        creds = await ensure_registered(url, "good-token", "a:1", tmp_path, machine=MACHINE)
    caplog.set_level(logging.DEBUG, logger="nestbox.hostagent.registration")
    async with anyio.create_task_group() as tg:
        await tg.start(heartbeat_loop, creds, 0.02, fixed_load)
        with anyio.fail_after(HANG_S):
            while sum("heartbeat to" in r.message for r in caplog.records) < 4:  # noqa: ASYNC110 (the state has no event to wait on)
                await anyio.sleep(0.01)
        async with serve(fake.app, port):
            await wait_for_beats(fake, 2)
        tg.cancel_scope.cancel()
    failures = [r for r in caplog.records if "heartbeat to" in r.message]
    assert [r.levelno for r in failures][:4] == [logging.WARNING] + [logging.DEBUG] * 3
    assert any("back after" in r.message and r.levelno == logging.INFO for r in caplog.records)


async def test_machine_info_and_host_load(tmp_path: Path) -> None:
    info = machine_info(tmp_path / "not" / "made" / "yet")
    assert info.cpu_cores >= 1
    assert info.memory_mb > 0
    assert info.disk_gb >= 0
    assert info.arch
    load = await host_load(tmp_path, capsules_running=3, vcpus_allocated=6)
    assert load.capsules_running == 3
    assert load.vcpus_allocated == 6
    assert load.memory_total_mb > 0
    assert 0 <= load.cpu_used_pct <= 100
    assert load.agent_version


def test_cpu_use_is_measured_whatever_thread_samples(tmp_path: Path) -> None:
    """Heartbeats sample from whichever worker thread is free: every sample measures the
    machine's CPU use since the one before, also from a thread that never sampled (psutil's
    own `cpu_percent(interval=None)` answers 0.0 there)."""
    seen: list[float] = []

    def beat() -> None:
        seen.append(anyio.run(host_load, tmp_path).cpu_used_pct)

    for _ in range(2):
        busy_until = time.process_time() + 0.3  # CPU time: at least 0.3 s of one core
        while time.process_time() < busy_until:
            pass
        thread = threading.Thread(target=beat)  # a new thread each time, as heartbeats may get
        thread.start()
        thread.join()
    assert all(pct > 0 for pct in seen), seen
