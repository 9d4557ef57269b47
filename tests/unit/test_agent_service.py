"""The agent service's pure parts: the RPC secret check, error codes on the wire, the idle
reaper's decisions (with a fake manager), and the request-head timeout of the server."""

from __future__ import annotations

import hashlib
import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from nestbox.hostagent import reaper, views
from nestbox.hostagent.auth import AgentAuth, local_auth, read_or_create_secret
from nestbox.hostagent.capsule import CapsuleNotFound, CapsuleState, InvalidState
from nestbox.hostagent.envdconn.errors import DeadlineExceeded, NotEnoughSpace, NotFound
from nestbox.hostagent.errors import BadRequest, CapsuleExists, StreamInterrupted, classify
from nestbox.hostagent.network import NoFreeSlot
from nestbox.hostagent.settings import AgentSettings
from nestbox.hostagent.storage.templates import TemplateNotFound
from nestbox.hostagent.views import connect_code, connect_error
from nestbox.protocol.errors import ErrorCode
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

SECRET = "s3cret"
PROXY_SECRET = "pr0xy"
AUTH = AgentAuth(
    hashlib.sha256(SECRET.encode()).hexdigest(),
    "test",
    hashlib.sha256(PROXY_SECRET.encode()).hexdigest(),
)


@pytest.mark.parametrize(
    ("headers", "rpc", "proxy"),
    [
        ([(b"authorization", b"Bearer s3cret")], True, False),
        ([(b"authorization", b"bearer  s3cret ")], True, False),
        ([(b"x-agent-token", b"s3cret")], True, False),
        ([(b"authorization", b"Bearer wrong")], False, False),
        ([(b"authorization", b"Basic s3cret")], False, False),
        ([(b"authorization", b"s3cret")], False, False),
        ([(b"x-agent-token", b"")], False, False),
        ([], False, False),
        # the proxy secret, only in its own header, and only for the proxy
        ([(b"x-nestbox-proxy-token", b"pr0xy")], False, True),
        ([(b"x-agent-token", b"pr0xy")], False, False),
        ([(b"authorization", b"Bearer pr0xy")], False, False),
        ([(b"x-nestbox-proxy-token", b"s3cret")], False, False),
        ([(b"x-nestbox-proxy-token", b"")], False, False),
    ],
)
def test_secret_check(headers: list[tuple[bytes, bytes]], rpc: bool, proxy: bool) -> None:
    assert AUTH.allows_rpc(headers) is rpc
    assert AUTH.allows_proxy(headers) is proxy


def test_no_proxy_secret_allows_no_proxying() -> None:
    old = AgentAuth(hashlib.sha256(SECRET.encode()).hexdigest(), "old credentials")
    assert not old.allows_proxy([(b"x-nestbox-proxy-token", b"")])
    assert not old.allows_proxy([(b"x-agent-token", b"s3cret")])
    assert old.allows_rpc([(b"x-agent-token", b"s3cret")])


def test_the_two_secrets_must_differ() -> None:
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    with pytest.raises(ValueError, match="must differ"):
        AgentAuth(digest, "test", digest)


def test_local_secret_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "agent-secret"
    first = read_or_create_secret(path)
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_or_create_secret(path) == first
    settings = AgentSettings(data_dir=tmp_path, agent_id="u1")
    settings.state_dir.mkdir(parents=True)
    auth = local_auth(settings)
    assert auth.source.endswith("proxy-secret")
    rpc = (settings.state_dir / "agent-secret").read_text().strip()
    proxy = (settings.state_dir / "proxy-secret").read_text().strip()
    assert stat.S_IMODE((settings.state_dir / "proxy-secret").stat().st_mode) == 0o600
    assert rpc != proxy
    assert auth.accepts(rpc)
    assert auth.accepts_proxy(proxy)
    assert not auth.accepts(proxy)
    assert not auth.accepts_proxy(rpc)
    given = local_auth(AgentSettings(data_dir=tmp_path, secret="x", proxy_secret="y"))  # type: ignore[arg-type]
    assert given.accepts("x")
    assert given.accepts_proxy("y")
    with pytest.raises(ValueError, match="must differ"):
        local_auth(AgentSettings(data_dir=tmp_path, secret="x", proxy_secret="x"))  # type: ignore[arg-type]


def test_every_error_code_has_a_connect_code() -> None:
    assert all(isinstance(connect_code(code), Code) for code in ErrorCode)
    assert connect_code(ErrorCode.INVALID_STATE) == Code.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("error", "code", "connect"),
    [
        (CapsuleNotFound("cl-x"), "not_found", Code.NOT_FOUND),
        (TemplateNotFound("t"), "not_found", Code.NOT_FOUND),
        (InvalidState("cl-x", CapsuleState.PAUSED, frozenset({CapsuleState.RUNNING})),
         "invalid_state", Code.FAILED_PRECONDITION),
        (CapsuleExists("cl-x exists"), "conflict", Code.ALREADY_EXISTS),
        (BadRequest("bad"), "invalid_request", Code.INVALID_ARGUMENT),
        (NoFreeSlot("full"), "unavailable", Code.UNAVAILABLE),
        (StreamInterrupted("paused"), "unavailable", Code.UNAVAILABLE),
        (NotFound("no file"), "not_found", Code.NOT_FOUND),
        (NotEnoughSpace("full"), "not_enough_space", Code.RESOURCE_EXHAUSTED),
        (DeadlineExceeded("slow"), "unavailable", Code.DEADLINE_EXCEEDED),
        (RuntimeError("/secret/path exploded"), "internal_error", Code.INTERNAL),
    ],
)  # fmt: skip
def test_errors_leave_with_stable_codes(error: Exception, code: str, connect: Code) -> None:
    wire = connect_error(error, "Test")
    assert wire.code == connect
    [detail] = wire.details
    info = detail.value(pb.ErrorInfo)
    assert isinstance(info, pb.ErrorInfo)
    assert info.code == code
    assert "/secret" not in wire.message  # an unexpected error never leaks its text
    assert classify(error)[0].value == code


@dataclass
class FakeManager:
    """What the reaper uses of `CapsuleManager`."""

    expired_ids: list[str]
    fail_pause: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    paused: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    auto: list[str] = field(default_factory=list)
    settings: AgentSettings = field(default_factory=lambda: AgentSettings(pause_concurrency=2))

    def expired(self) -> list[str]:
        return list(self.expired_ids)

    async def pause(self, capsule_id: str, *, only_if_idle: bool = False) -> bool:
        assert only_if_idle
        if capsule_id in self.gone:
            raise CapsuleNotFound(capsule_id)
        if capsule_id in self.fail_pause:
            raise RuntimeError("snapshot failed")
        if capsule_id in self.busy:
            return False
        self.paused.append(capsule_id)
        return True

    async def destroy(self, capsule_id: str) -> None:
        self.destroyed.append(capsule_id)

    def record_auto_paused(self, capsule_id: str) -> None:
        self.auto.append(capsule_id)


async def test_reaper_pauses_expired_and_destroys_what_cannot_pause() -> None:
    fake = FakeManager(["a", "b", "c", "d"], fail_pause={"b"}, busy={"c"}, gone={"d"})
    done = await reaper.reap_once(fake)  # type: ignore[arg-type]
    assert done == ["a"]
    assert fake.auto == ["a"]
    assert fake.destroyed == ["b"]  # pause failed: destroyed, as in the seed
    assert await reaper.reap_once(FakeManager([])) == []  # type: ignore[arg-type]


@dataclass
class _Method:
    name: str


@dataclass
class _Ctx:
    method: _Method


async def test_slow_unary_calls_are_logged_with_how_they_ended(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(views, "SLOW_CALL_S", 0.05)
    mapper = views.ErrorMapper()

    async def quick(request: str, ctx: object) -> str:
        return request

    async def slow(request: str, ctx: object) -> str:
        await anyio.sleep(0.1)
        if request == "bad":
            raise NotFound("no such file")
        return request

    with caplog.at_level(logging.INFO, logger="nestbox.hostagent.views"):
        assert await mapper.intercept_unary(quick, "a", _Ctx(_Method("Quick"))) == "a"
        assert await mapper.intercept_unary(slow, "b", _Ctx(_Method("PtyResize"))) == "b"
        with pytest.raises(ConnectError) as raised:
            await mapper.intercept_unary(slow, "bad", _Ctx(_Method("ReadFile")))
    assert raised.value.code is Code.NOT_FOUND
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("PtyResize answered after 0.")
    assert lines[1].startswith("ReadFile failed after 0.")
