"""The whole platform as processes, for the real-stack tests: a control plane
(`python -m nestbox.controlplane`, SQLite in its own directory, on a free loopback port) and host
agents (`AgentProcess`) registered with it through the real flow: an admin creates the host,
the agent starts with the one-time token and `--address`, then heartbeats.

Agents share the VM session's data directory (its `minimal` template) with their own agent ids,
ports and slot ranges.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from nestbox.controlplane.secretbox import SECRET_KEY_FILE, SecretBox, host_context
from tests.conftest import free_port
from tests.integration.vm.agent_process import AgentProcess

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nestbox.hostagent.settings import AgentSettings

HEARTBEAT_S = 1.0
UNREACHABLE_AFTER_S = 6.0
"""The control plane under test calls a host unreachable after 6 s without a heartbeat."""


@dataclass
class ControlPlaneProcess:
    data_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-api-key").read_text().strip()

    @property
    def admin(self) -> dict[str, str]:
        return {"X-API-Key": self.admin_key}

    def start(self, timeout: float = 60.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NESTBOX_")}
        env.update({
            "NESTBOX_DIR": str(self.data_dir),
            "NESTBOX_CP_LISTEN": f"127.0.0.1:{self.port}",
            "NESTBOX_PROXY_DOMAIN": f"localhost:{self.port}",
            "NESTBOX_CP_HOST_MONITOR_INTERVAL_S": "1",
            "NESTBOX_CP_HEARTBEAT_UNREACHABLE_AFTER_S": str(UNREACHABLE_AFTER_S),
            "NESTBOX_CP_RECONCILE_INTERVAL_S": "5",
            "NESTBOX_LOG_LEVEL": "INFO",
        })  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nestbox.controlplane"], env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the control plane exited:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError, OSError):
                r = httpx.get(f"{self.url}/openapi.json", timeout=1.0, trust_env=False)
                if r.status_code == 200 and (self.data_dir / "admin-api-key").exists():
                    return
            time.sleep(0.1)
        raise AssertionError(f"the control plane did not come up:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def host_tokens(self) -> dict[str, tuple[str, str]]:
        """Each registered host's (agent token, proxy token), opened from the database with the
        secret key: what the control plane presents to the host's agent (the tests forge
        requests with them)."""
        key = bytes.fromhex((self.data_dir / SECRET_KEY_FILE).read_text().strip())
        box = SecretBox(key)
        with contextlib.closing(sqlite3.connect(self.data_dir / "cp.db")) as db:
            rows = db.execute("SELECT id, agent_token_enc, proxy_token_enc FROM hosts "
                              "WHERE agent_token_enc IS NOT NULL").fetchall()  # fmt: skip
        return {
            host_id: (
                box.open(agent, host_context(host_id, "agent_token")),
                box.open(proxy, host_context(host_id, "proxy_token")),
            )
            for host_id, agent, proxy in rows
        }

    def registration_token(self) -> str:
        r = httpx.post(f"{self.url}/v1/hosts", json={}, headers=self.admin, trust_env=False)
        assert r.status_code == 201, r.text
        return str(r.json()["registration_token"])

    def add_agent(self, base: AgentSettings, *, slot_first: int, slot_count: int) -> AgentProcess:
        """A new agent process, registered with this control plane and serving."""
        agent = AgentProcess.make(base, slot_first=slot_first, slot_count=slot_count)
        agent.extra_env.update({
            "NESTBOX_AGENT_CP_URL": self.url,
            "NESTBOX_AGENT_REGISTRATION_TOKEN": self.registration_token(),
            "NESTBOX_AGENT_ADDRESS": f"127.0.0.1:{agent.port}",
            "NESTBOX_AGENT_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        })  # fmt: skip
        self.agents.append(agent)
        agent.start(timeout=120)
        return agent


@contextlib.contextmanager
def running_stack(tmp: Path) -> Iterator[ControlPlaneProcess]:
    """A control plane for the block; afterwards it and every agent it got are stopped
    (agents killed, their capsules and network removed)."""
    from tests.integration.vm.conftest import remove_agent_leftovers

    tmp.mkdir(parents=True, exist_ok=True)
    cp = ControlPlaneProcess(tmp / "cp", free_port(), tmp / "cp.log")
    cp.start()
    try:
        yield cp
    finally:
        for agent in cp.agents:
            agent.kill()
            remove_agent_leftovers(agent.settings)
        cp.stop()


def run_sdk_script(python: Path, script: Path, cp: ControlPlaneProcess, *, key: str,
                   timeout: float = 900) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {**os.environ, "WRENN_API_KEY": key, "WRENN_BASE_URL": cp.url}
    return subprocess.run(
        [str(python), str(script)], env=env, capture_output=True, text=True, timeout=timeout
    )
