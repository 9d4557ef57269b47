"""The whole platform as processes, for the end-to-end tier: a control plane
(`python -m nestbox.controlplane`, on SQLite in its own directory or on a PostgreSQL database
given by URL, on a free loopback port) and host agents (`AgentProcess`) registered with it
through the real flow: an admin creates the host, the agent starts with the one-time token and
`--address`, then heartbeats.

Agents share the VM session's data directory (its `minimal` template) with their own agent ids,
ports and slot ranges. `Stack` bundles one control plane, its first agent and an API client,
with the helpers every e2e test uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg  # type: ignore[import-untyped]  # ships no type information
import httpx

from nestbox.controlplane.secretbox import SECRET_KEY_FILE, SecretBox, host_context
from tests.conftest import free_port, wait_until
from tests.integration.vm.agent_process import AgentProcess
from tests.integration.vm.conftest import leftovers, qemu_pids, remove_agent_leftovers

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from nestbox.hostagent.settings import AgentSettings

HEARTBEAT_S = 1.0
UNREACHABLE_AFTER_S = 6.0
"""The control plane under test calls a host unreachable after 6 s without a heartbeat."""
RECONCILE_S = 5.0
"""`NESTBOX_CP_RECONCILE_INTERVAL_S` of the control plane under test."""
TRANSITIONAL = ("pending", "starting", "pausing", "resuming", "snapshotting", "stopping")
API_TIMEOUT_S = 300.0
"""Per request: a bound for a hang, never a condition (TCG guests on a busy machine are slow)."""
IDLE_TIMEOUT_S = 60
"""The shortest idle timeout the API takes (shorter ones are raised to it)."""


def wait_for(what: str, check: Callable[[], Any], within: float = 60.0,
             every: float = 0.1) -> Any:  # fmt: skip
    """`tests.conftest.wait_until` with the description first: poll `check` until it returns
    something truthy and return that; fail after `within` seconds (a bound for a hang)."""
    return wait_until(check, within=within, every=every, what=what)


@dataclass
class ControlPlaneProcess:
    data_dir: Path
    port: int
    log_path: Path
    database_url: str | None = None
    """PostgreSQL (`postgresql://…`); None: SQLite in `data_dir/cp.db`."""
    proc: subprocess.Popen[bytes] | None = None
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-api-key").read_text().strip()

    @property
    def admin(self) -> dict[str, str]:
        return {"X-API-Key": self.admin_key}

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the control plane never started"
        assert self.proc.poll() is None, "the control plane is down"
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NESTBOX_")}
        env.update({
            "NESTBOX_DIR": str(self.data_dir),
            "NESTBOX_CP_LISTEN": f"127.0.0.1:{self.port}",
            "NESTBOX_PROXY_DOMAIN": f"localhost:{self.port}",
            "NESTBOX_CP_HOST_MONITOR_INTERVAL_S": "1",
            "NESTBOX_CP_HEARTBEAT_UNREACHABLE_AFTER_S": str(UNREACHABLE_AFTER_S),
            "NESTBOX_CP_RECONCILE_INTERVAL_S": str(RECONCILE_S),
            # a 3 s idle timeout for the events test; stats sampled often enough to be seen
            "NESTBOX_CP_MIN_IDLE_TIMEOUT_S": "1",
            "NESTBOX_CP_STATS_INTERVAL_S": "2",
            "NESTBOX_LOG_LEVEL": "INFO",
        })  # fmt: skip
        if self.database_url:
            env["NESTBOX_DATABASE_URL"] = self.database_url
        return env

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the control plane runs"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nestbox.controlplane"], env=self.env(),
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

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL past 30 s); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_size(self) -> int:
        """Where the log ends now: `log_since(offset)` reads what comes after."""
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    # ── the database, read as it is (what the API hides included) ──

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of `sql` (placeholders `?`) from the control plane's database."""
        if not self.database_url:
            uri = f"file:{self.data_dir / 'cp.db'}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
                return [tuple(r) for r in db.execute(sql, args).fetchall()]
        parts = sql.split("?")
        numbered = parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))

        async def fetch() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(self.database_url)
            try:
                return [tuple(r) for r in await conn.fetch(numbered, *args)]
            finally:
                await conn.close()

        return anyio.run(fetch)

    def stuck_rows(self) -> list[tuple[str, str]]:
        """Capsule rows in a transitional status (destroyed rows count too)."""
        marks = ",".join("?" * len(TRANSITIONAL))
        rows = self.query(f"SELECT id, status FROM capsules WHERE status IN ({marks})",
                          *TRANSITIONAL)  # fmt: skip
        return [(str(i), str(s)) for i, s in rows]

    def host_tokens(self) -> dict[str, tuple[str, str]]:
        """Each registered host's (agent token, proxy token), opened from the database with the
        secret key: what the control plane presents to the host's agent (the tests forge
        requests with them)."""
        key = bytes.fromhex((self.data_dir / SECRET_KEY_FILE).read_text().strip())
        box = SecretBox(key)
        rows = self.query("SELECT id, agent_token_enc, proxy_token_enc FROM hosts "
                          "WHERE agent_token_enc IS NOT NULL")  # fmt: skip
        return {
            host_id: (
                box.open(agent, host_context(host_id, "agent_token")),
                box.open(proxy, host_context(host_id, "proxy_token")),
            )
            for host_id, agent, proxy in rows
        }

    # ── agents ──

    def registration_token(self) -> str:
        r = httpx.post(f"{self.url}/v1/hosts", json={}, headers=self.admin, trust_env=False)
        assert r.status_code == 201, r.text
        return str(r.json()["registration_token"])

    def add_agent(
        self,
        base: AgentSettings,
        *,
        slot_first: int,
        slot_count: int,
        warm_slots: int = 0,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        """A new agent process, registered with this control plane and serving. Its one-time
        token stays in `extra_env["NESTBOX_AGENT_REGISTRATION_TOKEN"]` (spent by now).
        `warm_slots`: its warm slot pool (none by default; the benches use the agent's);
        `env`: more of its environment (settings)."""
        agent = AgentProcess.make(base, slot_first=slot_first, slot_count=slot_count)
        agent.settings = agent.settings.model_copy(update={"warm_slots": warm_slots})
        agent.extra_env.update(env or {})
        agent.extra_env.update({
            "NESTBOX_AGENT_CP_URL": self.url,
            "NESTBOX_AGENT_REGISTRATION_TOKEN": self.registration_token(),
            "NESTBOX_AGENT_ADDRESS": f"127.0.0.1:{agent.port}",
            "NESTBOX_AGENT_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        })  # fmt: skip
        self.agents.append(agent)
        agent.start(timeout=120)
        return agent

    def remove_agent(self, agent: AgentProcess) -> None:
        """Kill the agent and remove everything it made (its QEMUs, network, state)."""
        agent.kill()
        remove_agent_leftovers(agent.settings)
        with contextlib.suppress(ValueError):
            self.agents.remove(agent)


@contextlib.contextmanager
def running_stack(tmp: Path, database_url: str | None = None) -> Iterator[ControlPlaneProcess]:
    """A control plane for the block; afterwards it and every agent it got are stopped
    (agents killed, their capsules and network removed)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cp = ControlPlaneProcess(tmp / "cp", free_port(), tmp / "cp.log", database_url)
    cp.start()
    try:
        yield cp
    finally:
        for agent in list(cp.agents):
            cp.remove_agent(agent)
        cp.stop()


def run_sdk_script(python: Path, script: Path, cp: ControlPlaneProcess, *, key: str,
                   timeout: float = 900) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {**os.environ, "WRENN_API_KEY": key, "WRENN_BASE_URL": cp.url}
    return subprocess.run(
        [str(python), str(script)], env=env, capture_output=True, text=True, timeout=timeout
    )


# ── an agent's records and leftovers ──


def records(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """The agent's capsule records on disk, by capsule id."""
    found = {}
    for path in (agent.settings.state_dir / "capsules").glob("cl-*.json"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            found[path.stem] = json.loads(path.read_text())
    return found


def leftovers_beyond(agent: AgentProcess, keep: set[str],
                     within: float = 15.0) -> dict[str, list[str]]:  # fmt: skip
    """What the agent made and did not remove, leaving out what the capsules in `keep` hold
    (their slot's network, files and QEMU). The agent removes a slot's network in the
    background after a pause or destroy: this waits up to `within` seconds for everything else
    to be gone, then says what is left."""
    settings = agent.settings
    deadline = time.monotonic() + within
    while True:
        kept = {cid: r for cid, r in records(agent).items() if cid in keep}
        slots = {int(r["slot"]) for r in kept.values() if r.get("slot") is not None}
        left = leftovers(settings, skip_slots=slots)
        veth = f"nbh{settings.agent_id}x"
        left["routes"] = [r for r in left["routes"] if veth in r]
        capsules = settings.state_dir / "capsules"
        left["files"] = [f for f in left["files"]
                         if not any(f.startswith(str(capsules / cid)) for cid in keep)]  # fmt: skip
        mine = {pid for cid in keep for pid in qemu_pids(capsules / cid)}
        left["processes"] = [str(p) for p in qemu_pids(settings.state_dir) if p not in mine]
        left["cgroups"] = [c for c in left["cgroups"] if not any(c.endswith(cid) for cid in keep)]
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# ── the stack the e2e tests share ──


@dataclass
class Stack:
    """One control plane on one database, its first agent (`agent`) and an admin API client."""

    db: str
    cp: ControlPlaneProcess
    agent: AgentProcess
    base: AgentSettings
    slot_first: int
    """The first of this stack's 100 slots: the first agent takes 20, each extra agent 10."""
    api: httpx.Client = field(init=False)
    shared: list[str] = field(default_factory=list)
    """Capsules the tests share (the `capsule` fixture): `healthy` wants them running."""
    idle: tuple[str, float] | None = None
    """A capsule left idle since the stack started (its id, and the wall-clock time before its
    last activity) for the auto-pause test: see `start_idle`."""
    _extra: int = 0

    def __post_init__(self) -> None:
        self.api = httpx.Client(base_url=self.cp.url, headers=self.cp.admin, trust_env=False,
                                timeout=API_TIMEOUT_S)  # fmt: skip

    def close(self) -> None:
        self.api.close()

    def start_idle(self) -> None:
        """Create the capsule the auto-pause test watches, with the shortest idle timeout, and
        touch it once (a file the test reads back after the resume)."""
        capsule_id = str(self.create(timeout_sec=IDLE_TIMEOUT_S)["id"])
        active = time.time()
        self.write_file(capsule_id, "/root/kept.txt", b"written before the pause\n")
        self.idle = (capsule_id, active)

    # ── capsules ──

    def shared_capsule(self) -> str:
        """The running capsule the tests share (made on first use, on the first agent: a test
        that adds an agent asks for it first)."""
        if not self.shared:
            self.shared.append(str(self.create()["id"]))
        return self.shared[0]

    def create(self, **body: Any) -> dict[str, Any]:
        r = self.api.post("/v1/capsules", json=body)
        assert r.status_code == 201, r.text
        doc: dict[str, Any] = r.json()
        assert doc["status"] == "running", doc
        return doc

    def status(self, capsule_id: str) -> str:
        r = self.api.get(f"/v1/capsules/{capsule_id}")
        return str(r.json()["status"]) if r.status_code == 200 else str(r.status_code)

    def wait_status(self, capsule_id: str, want: str, within: float = 60.0) -> float:
        """Poll GET until the capsule's status is `want`; the monotonic time it was seen."""
        deadline = time.monotonic() + within
        while (status := self.status(capsule_id)) != want:
            assert time.monotonic() < deadline, f"{capsule_id}: {status}, not {want}, {within:g} s"
            time.sleep(0.2)
        return time.monotonic()

    def exec(self, capsule_id: str, script: str, **extra: Any) -> dict[str, Any]:
        body = {"cmd": "/bin/sh", "args": ["-c", script], **extra}
        r = self.api.post(f"/v1/capsules/{capsule_id}/exec", json=body)
        assert r.status_code in (200, 202), r.text
        doc: dict[str, Any] = r.json()
        return doc

    def out(self, capsule_id: str, script: str) -> str:
        """stdout of `sh -c script` (exit 0 asserted)."""
        doc = self.exec(capsule_id, script)
        assert doc["exit_code"] == 0, doc
        return str(doc["stdout"])

    def write_file(self, capsule_id: str, path: str, data: bytes) -> None:
        """`files/write` as the SDK sends it: a `path` field and a `file` part."""
        r = self.api.post(f"/v1/capsules/{capsule_id}/files/write", data={"path": path},
                          files={"file": ("upload", data, "application/octet-stream")})  # fmt: skip
        assert r.status_code == 204, r.text

    def read_file(self, capsule_id: str, path: str) -> bytes:
        r = self.api.post(f"/v1/capsules/{capsule_id}/files/read", json={"path": path})
        assert r.status_code == 200, r.text
        return r.content

    def destroy(self, capsule_id: str) -> None:
        r = self.api.delete(f"/v1/capsules/{capsule_id}")
        assert r.status_code in (204, 404), r.text

    # ── hosts ──

    def host_id(self, agent: AgentProcess) -> str:
        hosts = self.api.get("/v1/hosts").json()
        [host_id] = [h["id"] for h in hosts if h["address"] == f"127.0.0.1:{agent.port}"]
        return str(host_id)

    def host(self, agent: AgentProcess) -> dict[str, Any]:
        doc: dict[str, Any] = self.api.get(f"/v1/hosts/{self.host_id(agent)}").json()
        return doc

    def wait_online(self, agent: AgentProcess, *, since: datetime | None = None,
                    within: float = 60.0) -> dict[str, Any]:  # fmt: skip
        """The agent's host once it is online with a heartbeat after `since`."""

        def online() -> dict[str, Any] | None:
            host = self.host(agent)
            beat = host["last_heartbeat_at"]
            fresh = beat is not None and (since is None or datetime.fromisoformat(beat) > since)
            return host if host["status"] == "online" and fresh and host["load"] else None

        return dict(wait_for(f"host of agent {agent.settings.agent_id} online", online, within))

    def slot_block(self) -> int:
        """The first of 10 of this stack's slots that no agent took yet: an extra agent's, or
        those of a test's own small stack (`running_stack`)."""
        first = self.slot_first + 20 + 10 * self._extra
        self._extra += 1
        assert first + 10 <= self.slot_first + 100, "the stack's slots are used up"
        return first

    @contextlib.contextmanager
    def extra_agent(self) -> Iterator[AgentProcess]:
        """A second (third…) registered agent for the block; afterwards it is killed, what it
        made is removed and its host is deleted (if the test did not)."""
        agent = self.cp.add_agent(self.base, slot_first=self.slot_block(), slot_count=10)
        try:
            self.wait_online(agent)
            host_id = self.host_id(agent)
            yield agent
        finally:
            self.cp.remove_agent(agent)
            r = self.api.delete(f"/v1/hosts/{host_id}", params={"force": "true"})
            assert r.status_code in (204, 404), r.text

    def healthy(self) -> None:
        """The control plane and the first agent run, its host is online, the shared capsules
        run and no row is stuck (after a test that crashed or restarted something)."""
        if self.cp.proc is None or self.cp.proc.poll() is not None:
            self.cp.start()
        if self.agent.proc is None or self.agent.proc.poll() is not None:
            self.agent.start(timeout=120)
        self.wait_online(self.agent)
        for capsule_id in self.shared:
            self.wait_status(capsule_id, "running", within=60)
        wait_for("no capsule row stuck", lambda: self.cp.stuck_rows() == [], 3 * RECONCILE_S)


def utcnow() -> datetime:
    return datetime.now(UTC)
