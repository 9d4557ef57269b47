"""A real host agent process (`python -m nestbox.hostagent serve`) for the agent tests, and a
small client over its Connect API and port proxy.

The agent shares the VM session's data directory (so the session's `minimal` template is
there) but has its own agent id and slot range, listens on a free loopback port and runs
unregistered with secrets the test chooses (one for RPCs, one for the proxy), without warm
slot networks. `leftovers()` of its settings lists everything it could leave on the host.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from pyqwest import Client, HTTPTransport, HTTPVersion

from nestbox.hostagent.settings import AgentSettings
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.gen.hostagent.v1.hostagent_connect import HostAgentServiceClient
from nestbox.protocol.hosts import PROXY_TOKEN_HEADER
from tests.conftest import free_port

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

READ_MAX = 200 * 1024 * 1024
HEADER_TIMEOUT_S = 3.0
"""The agents under test wait 3 s (not 10) for a request head, so the test of it is quick."""


@dataclass
class AgentProcess:
    """One agent process at a time on `port`; `start()` again after `kill()`/`stop()`."""

    settings: AgentSettings
    port: int
    secret: str
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    proxy_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    """What an unregistered agent takes for `/proxy/` (never for an RPC)."""

    @classmethod
    def make(cls, base: AgentSettings, *, slot_first: int, slot_count: int) -> AgentProcess:
        agent_id = "t" + secrets.token_hex(3)
        port = free_port()
        settings = base.model_copy(
            update={"agent_id": agent_id, "slot_first": slot_first, "slot_count": slot_count,
                    "listen": f"127.0.0.1:{port}", "warm_slots": 0}
        )  # fmt: skip
        log_path = base.data_dir / f"agent-{agent_id}.log"
        return cls(settings, port, secrets.token_urlsafe(24), log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("NESTBOX_")}
        env.update({
            "NESTBOX_DIR": str(s.data_dir),
            "NESTBOX_IMAGE_CACHE": str(s.images_dir),
            "NESTBOX_AGENT_AGENT_ID": s.agent_id,
            "NESTBOX_AGENT_SLOT_CIDR": s.slot_cidr,
            "NESTBOX_AGENT_VETH_CIDR": s.veth_cidr,
            "NESTBOX_AGENT_SLOT_FIRST": str(s.slot_first),
            "NESTBOX_AGENT_SLOT_COUNT": str(s.slot_count),
            "NESTBOX_AGENT_LISTEN": s.listen,
            "NESTBOX_AGENT_SECRET": self.secret,
            "NESTBOX_AGENT_PROXY_SECRET": self.proxy_secret,
            "NESTBOX_AGENT_ACCEL": s.accel,
            "NESTBOX_AGENT_REAP_INTERVAL_S": "0.5",
            # No warm slot networks: what `agent_leftovers` sees while the agent runs is then
            # exactly what its capsules hold. The runtime tests cover the warm pool.
            "NESTBOX_AGENT_WARM_SLOTS": str(s.warm_slots),
            "NESTBOX_AGENT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "NESTBOX_AGENT_LOG_LEVEL": "INFO",
        })  # fmt: skip
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> None:
        """Start the agent; return once `/health` says it serves. :raise AssertionError:"""
        assert self.proc is None or self.proc.poll() is not None, "the agent is running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nestbox.hostagent", "serve"],
                env=self.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{self.url}/health", timeout=1.0, trust_env=False)
                if r.status_code == 200 and r.json()["status"] == "ok":
                    return
            time.sleep(0.1)
        raise AssertionError(f"the agent did not come up:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the agent (its VMs run on: QEMU is in its own session)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 180.0) -> int | None:
        """SIGTERM and wait (the agent pauses its running capsules first)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Rpc]:
        transport = HTTPTransport(http_version=HTTPVersion.HTTP1, follow_redirects=False)
        async with HostAgentServiceClient(
            self.url, http_client=Client(transport), read_max_bytes=READ_MAX,
            send_compression=None, accept_compression=[],
        ) as client:  # fmt: skip
            yield Rpc(client, {"Authorization": f"Bearer {self.secret}"})
        await transport.aclose()

    def proxy_headers(self) -> dict[str, str]:
        return {PROXY_TOKEN_HEADER: self.proxy_secret}


class Rpc:
    """`await rpc.exec(pb.ExecRequest(...))`: every method of the generated client, with the
    agent secret added."""

    def __init__(self, client: HostAgentServiceClient, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(request: Any, **kwargs: Any) -> Any:
            return method(request, headers=self.headers, **kwargs)

        return call

    async def create(self, **fields: Any) -> pb.Capsule:
        response: pb.CreateCapsuleResponse = await self.create_capsule(
            pb.CreateCapsuleRequest(**fields)
        )
        assert response.capsule is not None
        return response.capsule

    async def sh(self, capsule_id: str, script: str, timeout_sec: int = 60) -> pb.ExecResponse:
        request = pb.ExecRequest(
            capsule_id=capsule_id, cmd="/bin/sh", args=["-c", script], timeout_sec=timeout_sec
        )
        response: pb.ExecResponse = await self.exec(request)
        return response

    async def out(self, capsule_id: str, script: str) -> str:
        """stdout of `sh -c script` (exit 0 asserted)."""
        r = await self.sh(capsule_id, script)
        assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
        return r.stdout.decode()

    async def capsules(self) -> dict[str, pb.Capsule]:
        response = await self.list_capsules(pb.ListCapsulesRequest())
        return {c.capsule_id: c for c in response.capsules}


def agent_leftovers(settings: AgentSettings, within: float = 30.0) -> dict[str, list[str]]:
    """What this agent made and did not remove: `conftest.leftovers` narrowed to the agent's
    own names, so that another test session running at the same time does not count. The
    agent removes a slot's network in the background after a pause or destroy: this waits up
    to `within` seconds for everything to be gone, then says what is left."""
    from tests.integration.vm.conftest import leftovers, qemu_pids

    deadline = time.monotonic() + within
    while True:
        left = leftovers(settings)
        veth = f"nbh{settings.agent_id}x"
        left["routes"] = [r for r in left["routes"] if veth in r]
        left["processes"] = [str(pid) for pid in qemu_pids(settings.state_dir)]
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def reset_agent(agent: AgentProcess) -> None:
    """After a test, pass or fail: the agent runs and holds no capsule (so one failing test
    leaves nothing to the next)."""
    if agent.proc is None or agent.proc.poll() is not None:
        agent.start()

    async def destroy_all() -> None:
        async with agent.connect() as rpc:
            for capsule_id in await rpc.capsules():
                await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=capsule_id))

    anyio.run(destroy_all)
