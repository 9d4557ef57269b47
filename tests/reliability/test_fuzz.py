"""The short form of `make fuzz` (tests/reliability/fuzz.py): a fixed seed, one example per
operation, the fuzzing and stateful phases, every caller; the same pass rule as the long run."""

from __future__ import annotations

import socket

import anyio.to_thread
import pytest

from nestbox.controlplane.agent_client import PoolSettings
from nestbox.hostagent.settings import AgentSettings
from tests.conftest import free_port
from tests.fakes.agent import FakeAgent, FakeAgentApp
from tests.integration.asgi_server import serve
from tests.reliability.fuzz import LIMIT_MET, PROBED, REFUSED, allowed, fuzz, names_stay_local

SEED = 20261202


@pytest.mark.timeout(600)  # ~70 s alone; a loaded 2-core machine can triple it
async def test_short_fuzz_run_finds_nothing() -> None:
    passed, summary = await anyio.to_thread.run_sync(
        lambda: fuzz(seed=SEED, examples=1, phases="examples,fuzzing,stateful", max_time=None)
    )
    print(summary)
    assert passed, summary


async def test_agents_keep_idle_connections_longer_than_the_control_planes_pool() -> None:
    """The agent (real, and the fuzz run's fakes) keeps an idle connection open longer than the
    control plane's agent pool does, so the pool always drops it first. With uvicorn's 5 s
    default the fake agent closed one just as a request went out on it (the shared loop busy
    at the deadline): a 503 host_unavailable from a live agent (seed 1672275882)."""
    pool = PoolSettings().idle_timeout_s
    assert AgentSettings.model_fields["keepalive_idle_s"].default > pool
    async with serve(FakeAgentApp(FakeAgent("keepalive")), free_port()) as server:
        assert server.config.timeout_keep_alive > pool


def test_only_explained_failures_pass() -> None:
    limit_met = "Unexpected response to invalid authentication" + LIMIT_MET
    assert allowed(PROBED, f"POST /v1/api-keys: {limit_met}")
    assert not allowed(PROBED, f"POST /v1/capsules: {limit_met}")  # no rate limit there
    assert not allowed(PROBED, "POST /v1/api-keys: API accepts requests without authentication")
    assert allowed(REFUSED, "POST /v1/channels: Schema-valid request rejected")
    assert not allowed(REFUSED, "POST /v1/capsules: Schema-valid request rejected")
    assert not allowed("not_a_server_error", "POST /v1/channels: Server error")


def test_names_are_not_resolved_while_fuzzing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A made-up name never reaches the system's resolver (DNS off this machine); literals and
    localhost still do."""
    asked: list[object] = []

    def recorder(host: object, *args: object, **kwargs: object) -> list[object]:
        asked.append(host)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", recorder)
    with names_stay_local():
        for name in ("fuzz-made-up.example", b"x.test", "hosT"):
            with pytest.raises(socket.gaierror):
                socket.getaddrinfo(name, 80)
        for literal in ("127.0.0.1", "::1", "fe80::1%eth0", "localhost", None):
            socket.getaddrinfo(literal, 80)
    assert asked == ["127.0.0.1", "::1", "fe80::1%eth0", "localhost", None]
    socket.getaddrinfo("after", 80)  # the guard is gone
    assert asked[-1] == "after"
