"""`make bench-api`: the public API of a real stack against what it wraps, side by side in one run
(root; a control plane on SQLite, one registered host agent with its default warm slot pool, QEMU
guests cloned from `minimal`).

  create            p50/p99 of single creates (POST /v1/capsules to `running`); baseline: the
                    agent's own time for the same clone ("capsule cloned" in its log)
  20 concurrent     wall time of 20 creates sent at once; baseline: 20 x the single create's
                    p50 (target: ratio <= 0.6 on 2 cores), and each create's p50/p99 in the batch
  exec RTT          POST /exec `echo` through the API; baseline: the same `echo` as a direct
                    Connect call (process.Start) to the same envd from the host, over the slot's
                    host address with the capsule's envd token: what the agent itself does
  PTY keystroke     one byte typed into a shell over the API's PTY WebSocket until its echo
                    comes back; baseline: the same over a direct envd PTY (Start + SendInput)
  PTY under a       the same keystrokes while a 20 MiB/s download from the same capsule runs
  download          through the port proxy, over the API and over a direct envd PTY; baseline:
                    the same side idle (target: API p99 <= 2x idle)
  pause / resume    POST /pause and /resume; baseline: the agent's own time for the verb (its log)

The create phase also prints where the host's CPU went (control plane, agent with its commands,
the new QEMUs up to the answer) per create, single and concurrent, beside the wall times, and two
floors for the batch: 20 single creates' CPU spread over the cores, and the CPU the batch really
used (its creates, its guests running on after their answers, the bench's clients) over them.

The sides alternate (and which goes first) so a change in the host's load hits both alike; the
machine is shared, so only ratios from the same run mean anything: the load average is printed
before and after. Everything runs in the test-only address ranges (slots from
NESTBOX_TEST_SLOT_FIRST + 100, default 4101), egress off; every capsule, netns, file and
process made here is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from tests.e2e.stack import API_TIMEOUT_S, Stack, records, running_stack
from tests.e2e.test_load import (
    DOWNLOAD_RATE,
    PROMPT,
    Download,
    HostCpu,
    cpu_s,
    keystrokes,
    serving_downloads,
    terminal,
)
from tests.integration.vm.conftest import SLOT_CIDR, VETH_CIDR, vm_skip_reason
from tests.integration.vm.session import guest_image, minimal_template

from nestbox.hostagent.envdconn import CapsuleEnvd, envd_url
from nestbox.hostagent.envdconn.events import Output
from nestbox.hostagent.settings import AgentSettings
from nestbox.hostagent.storage.templates import TemplateNotFound, load_template

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.e2e.stack import ControlPlaneProcess
    from tests.integration.vm.agent_process import AgentProcess

WITHIN_S = 60.0
"""A bound for a hang of one step (never a condition)."""
KEYS = b"abcdefghijklmnopqrstuvwxyz"


# ── figures ─────────────────────────────────────────────────────────────────────────────────


def pct(values: list[float], q: float) -> float:
    """The `q` quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, str]] = []

    def add(self, label: str, ours: float, base: float, note: str = "") -> None:
        self.rows.append((label, ours, base, note))

    def render(self) -> str:
        out = [f"{'':<34} {'ours':>10} {'baseline':>10} {'ratio':>7}   baseline is"]
        for label, ours, base, note in self.rows:
            ratio = ours / base if base else float("nan")
            out.append(f"{label:<34} {ours * 1000:>8.0f}ms {base * 1000:>8.0f}ms "
                       f"{ratio:>6.2f}x   {note}")  # fmt: skip
        return "\n".join(out)


# ── the agent's own times, from its log ─────────────────────────────────────────────────────


def agent_ms(agent: AgentProcess, what: str, capsule_id: str) -> float:
    """`duration_ms` of the agent's last `what` log line for `capsule_id`, in seconds."""
    pattern = re.compile(re.escape(what) + r".*capsule_id=" + capsule_id + r".*duration_ms=(\d+)")

    def found() -> float | None:
        hits = pattern.findall(agent.log_tail(400_000))
        return int(hits[-1]) / 1000 if hits else None

    deadline = time.monotonic() + 10
    while (value := found()) is None:
        assert time.monotonic() < deadline, f"no {what!r} line for {capsule_id} in the agent log"
        time.sleep(0.05)
    return value


# ── create ──────────────────────────────────────────────────────────────────────────────────


def client(cp: ControlPlaneProcess) -> httpx.Client:
    return httpx.Client(base_url=cp.url, headers=cp.admin, trust_env=False,
                        timeout=API_TIMEOUT_S)  # fmt: skip


def timed_create(api: httpx.Client) -> tuple[str, float]:
    t0 = time.monotonic()
    r = api.post("/v1/capsules", json={})
    took = time.monotonic() - t0
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "running", r.text
    return str(r.json()["id"]), took


def try_create(api: httpx.Client) -> tuple[str | None, float]:
    """`timed_create` that counts a refusal instead of raising (None for the id)."""
    t0 = time.monotonic()
    r = api.post("/v1/capsules", json={})
    took = time.monotonic() - t0
    if r.status_code != 201:
        print(f"  a create of the batch failed after {took:.1f} s: {r.text}", file=sys.stderr)
        return None, took
    return str(r.json()["id"]), took


def destroy_all(stack: Stack, ids: list[str]) -> None:
    """Destroy through the API (the slot networks go in the agent's background, as always)."""
    for capsule_id in ids:
        stack.destroy(capsule_id)


@dataclass
class CreateCpu:
    """Host CPU seconds of creates, by program: the control plane, the agent (with its `ip`,
    `iptables`, `tc` commands) and the new capsules' QEMUs up to the answer."""

    cp: float = 0.0
    agent: float = 0.0
    qemu: float = 0.0

    @property
    def total(self) -> float:
        return self.cp + self.agent + self.qemu

    def per(self, n: int) -> CreateCpu:
        return CreateCpu(self.cp / n, self.agent / n, self.qemu / n)

    def row(self, label: str, wall: float) -> str:
        return (f"{label:<34} {self.cp:>7.2f} {self.agent:>7.2f} {self.qemu:>7.2f} "
                f"{self.total:>7.2f} {wall:>7.2f}")  # fmt: skip


def programs_cpu(stack: Stack) -> tuple[float, float]:
    """CPU seconds so far of the control plane and the agent (and their commands)."""
    assert stack.cp.proc is not None
    assert stack.agent.proc is not None
    return (cpu_s(stack.cp.proc.pid, children=True),
            cpu_s(stack.agent.proc.pid, children=True))  # fmt: skip


def qemu_cpu(stack: Stack, capsule_id: str) -> float:
    return cpu_s(int(records(stack.agent)[capsule_id]["pid"]))


def create_cpu(stack: Stack) -> tuple[str, float, CreateCpu]:
    """One create: its id, wall time and the host CPU it cost."""
    cp0, agent0 = programs_cpu(stack)
    capsule_id, took = timed_create(stack.api)
    cp1, agent1 = programs_cpu(stack)
    return capsule_id, took, CreateCpu(cp1 - cp0, agent1 - agent0, qemu_cpu(stack, capsule_id))


def after_create(stack: Stack, seconds: int = 6) -> str:
    """A new capsule's QEMU CPU in each second after the create's answer: what a guest still
    costs once created (under TCG a new QEMU translates every code path it runs anew)."""
    capsule_id, _, _ = create_cpu(stack)
    try:
        pid = int(records(stack.agent)[capsule_id]["pid"])
        last, used = cpu_s(pid), []
        for _ in range(seconds):
            time.sleep(1.0)
            now = cpu_s(pid)
            used.append(now - last)
            last = now
    finally:
        destroy_all(stack, [capsule_id])
    cells = " ".join(f"{ms * 1000:.0f}" for ms in used)
    return f"{'a new QEMU, CPU ms in seconds 1..' + str(seconds) + ' after:':<34} {cells}"


def bench_creates(stack: Stack, table: Table, profile: list[str], n: int,
                  concurrent: int) -> None:  # fmt: skip
    """Single creates, then `concurrent` at once; `profile` gets where the host CPU went."""
    singles, agent_side, cpu = [], [], []
    for _ in range(n):
        capsule_id, took, used = create_cpu(stack)
        singles.append(took)
        cpu.append(used)
        agent_side.append(agent_ms(stack.agent, "capsule cloned", capsule_id))
        destroy_all(stack, [capsule_id])
    profile.append(after_create(stack))
    table.add("create p50", statistics.median(singles), statistics.median(agent_side),
              "the agent's clone (its log)")  # fmt: skip
    table.add("create p99", pct(singles, 0.99), pct(agent_side, 0.99),
              "the agent's clone (its log)")  # fmt: skip
    clients = [client(stack.cp) for _ in range(concurrent)]
    qemu: dict[str, float] = {}

    def one(api: httpx.Client) -> tuple[str | None, float]:
        capsule_id, took = try_create(api)
        if capsule_id is not None:  # its QEMU's CPU at the answer, as for a single create
            qemu[capsule_id] = qemu_cpu(stack, capsule_id)
        return capsule_id, took

    try:
        with concurrent_pool(concurrent) as pool:
            cp0, agent0 = programs_cpu(stack)
            own0 = time.process_time()
            t0 = time.monotonic()
            with HostTimeline() as timeline:
                tried = list(pool.map(one, clients))
            wall = time.monotonic() - t0
            own = time.process_time() - own0
            cp1, agent1 = programs_cpu(stack)
            after = sum(qemu_cpu(stack, cid) for cid in qemu) - sum(qemu.values())
    finally:
        for c in clients:
            c.close()
    made = [(cid, took) for cid, took in tried if cid is not None]
    failed = len(tried) - len(made)
    each = [took for _, took in made]
    batch_agent = [agent_ms(stack.agent, "capsule cloned", cid) for cid, _ in made]
    destroy_all(stack, [cid for cid, _ in made])
    single = statistics.median(singles)
    cores = os.cpu_count() or 1
    batch = CreateCpu(cp1 - cp0, agent1 - agent0, sum(qemu.values()))
    one_cpu = CreateCpu(*(statistics.median(getattr(c, k) for c in cpu)
                          for k in ("cp", "agent", "qemu")))  # fmt: skip
    profile.append(f"{'host CPU s per create':<34} {'CP':>7} {'agent':>7} {'QEMU':>7} "
                   f"{'total':>7} {'wall s':>7}")  # fmt: skip
    profile.append(one_cpu.row("  single (median)", single))
    profile.append(batch.per(max(1, len(made))).row(f"  {concurrent} concurrent (mean)",
                                                   statistics.median(each)))  # fmt: skip
    profile.append(batch.row(f"  {concurrent} concurrent (whole batch)", wall))
    profile.append(f"  {concurrent} concurrent: {batch.total:.1f} CPU s in {wall:.1f} s wall = "
                   f"{batch.total / wall:.2f} of {cores} cores busy with the creates "
                   f"(load {loadavg()})")  # fmt: skip
    profile.append(f"  also in the batch's {wall:.1f} s: its QEMUs after their answers "
                   f"{after:.2f} CPU s (the guests run on), this bench's {concurrent} HTTP "
                   f"clients {own:.2f} CPU s")  # fmt: skip
    profile.extend(timeline.lines(cores))
    table.add(f"{concurrent} concurrent creates (wall)", wall, concurrent * single,
              f"{concurrent} x the single create's p50 (target <= 0.6x); "
              f"{failed} of them failed")  # fmt: skip
    table.add(f"  each of the {concurrent}: p50", statistics.median(each),
              statistics.median(batch_agent), "the agent's clone (its log)")  # fmt: skip
    table.add(f"  each of the {concurrent}: p99", pct(each, 0.99), pct(batch_agent, 0.99),
              "the agent's clone (its log)")  # fmt: skip
    table.add("host CPU per single create", one_cpu.total, single,
              "its wall time (CP + agent + its commands + QEMU)")  # fmt: skip
    table.add(f"  bound: {concurrent} x CPU / {cores} cores", concurrent * one_cpu.total / cores,
              concurrent * single, f"{concurrent} x the single create's p50")  # fmt: skip
    # What the batch really cost: each create costs more among 19 others than alone, and the
    # guests made first run on (TCG translates each new guest's code anew) while later ones start.
    table.add(f"  bound: the batch's CPU / {cores} cores", (batch.total + after + own) / cores,
              concurrent * single, f"{concurrent} x the single create's p50; the batch's "
              "creates, its guests after their answers, the bench's clients")  # fmt: skip


def host_jiffies() -> tuple[int, int, int]:
    """All cores' busy, idle and iowait time so far, in clock ticks (`/proc/stat`; guest time
    counts in user, so QEMU's vCPUs are busy)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal, idle, iowait


class HostTimeline:
    """The whole host's CPU (every process: the bench itself, earlier capsules' guests, kernel
    threads) sampled every `every` s in a thread while the batch runs: where it was idle, and
    whether it waited on the disk."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.samples: list[tuple[float, tuple[int, int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HostTimeline:
        self.samples.append((time.monotonic(), host_jiffies()))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), host_jiffies()))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append((time.monotonic(), host_jiffies()))

    def lines(self, cores: int) -> list[str]:
        """One line for the whole batch, then one per sample: cores busy / idle / in iowait."""
        tick = os.sysconf("SC_CLK_TCK")

        def cell(
            a: tuple[float, tuple[int, int, int]], b: tuple[float, tuple[int, int, int]]
        ) -> str:
            wall = max(b[0] - a[0], 1e-9)
            busy, idle, iowait = ((y - x) / tick / wall for x, y in zip(a[1], b[1], strict=True))
            return f"busy {busy:4.2f}  idle {idle:4.2f}  iowait {iowait:4.2f} of {cores} cores"

        t0 = self.samples[0][0]
        out = [f"  whole host over the batch: {cell(self.samples[0], self.samples[-1])}"]
        for a, b in itertools.pairwise(self.samples):
            out.append(f"    {a[0] - t0:5.1f}-{b[0] - t0:5.1f} s  {cell(a, b)}")
        return out


@contextlib.contextmanager
def concurrent_pool(n: int) -> Any:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        yield pool


# ── exec ────────────────────────────────────────────────────────────────────────────────────


def direct_envd(agent: AgentProcess, capsule_id: str) -> CapsuleEnvd:
    """A client to the capsule's envd as the agent reaches it: the slot's host address, the
    token envd holds (from the agent's record of it)."""
    record = records(agent)[capsule_id]
    return CapsuleEnvd(envd_url(record["host_address"]), access_token=record["access_token"])


async def envd_exec_once(envd: CapsuleEnvd, word: str) -> float:
    t0 = time.monotonic()
    result = await envd.exec("echo", [word])
    took = time.monotonic() - t0
    assert result.exit_code == 0, result
    assert result.stdout == f"{word}\n".encode(), result
    return took


def api_exec_once(api: httpx.Client, capsule_id: str, word: str) -> float:
    t0 = time.monotonic()
    r = api.post(f"/v1/capsules/{capsule_id}/exec", json={"cmd": "echo", "args": [word]})
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["stdout"] == f"{word}\n", r.text
    return took


def bench_exec(stack: Stack, capsule_id: str, table: Table, n: int) -> None:
    api_side: list[float] = []
    direct: list[float] = []

    async def run() -> None:
        async with direct_envd(stack.agent, capsule_id) as envd:
            for i in range(n + 1):  # 0: warm-up (connections opened on both sides)
                word = secrets.token_hex(4)
                for side in ("api", "direct") if i % 2 else ("direct", "api"):
                    if side == "api":
                        took = await anyio.to_thread.run_sync(
                            api_exec_once, stack.api, capsule_id, word
                        )
                        (api_side if i else []).append(took)
                    else:
                        took = await envd_exec_once(envd, word)
                        (direct if i else []).append(took)

    anyio.run(run)
    table.add("exec echo RTT p50", statistics.median(api_side), statistics.median(direct),
              "direct Connect call to envd (target <= 1.3x)")  # fmt: skip
    table.add("exec echo RTT p99", pct(api_side, 0.99), pct(direct, 0.99),
              "direct Connect call to envd")  # fmt: skip


# ── PTY ─────────────────────────────────────────────────────────────────────────────────────


def api_keystrokes(stack: Stack, capsule_id: str, n: int) -> list[float]:
    with terminal(stack, capsule_id) as ws:
        return keystrokes(ws, n + 1)[1:]  # the first: a warm-up


async def direct_keystrokes(envd: CapsuleEnvd, n: int) -> list[float]:
    took: list[float] = []
    tag = f"pty-{secrets.token_hex(4)}"
    async with envd.pty_attach("/bin/sh", tag=tag, cols=200, rows=50) as term:
        events = aiter(term)

        async def until(needle: bytes) -> None:
            seen = b""
            with anyio.fail_after(WITHIN_S):
                while needle not in seen:
                    event = await anext(events)
                    if isinstance(event, Output):
                        seen += event.data

        await envd.pty_input(tag, PROMPT)
        await until(b"42> ")  # the new prompt: nothing more is on its way
        for i in range(n + 1):
            key = KEYS[i % len(KEYS) : i % len(KEYS) + 1]
            t0 = time.monotonic()
            await envd.pty_input(tag, key)
            await until(key)
            if i:
                took.append(time.monotonic() - t0)
        await envd.pty_kill(tag)
    return took


def bench_pty(stack: Stack, capsule_id: str, table: Table, n: int) -> None:
    async def direct() -> list[float]:
        async with direct_envd(stack.agent, capsule_id) as envd:
            return await direct_keystrokes(envd, n)

    first_direct = anyio.run(direct)
    api_side = api_keystrokes(stack, capsule_id, n)
    direct_side = first_direct + anyio.run(direct)
    api_side += api_keystrokes(stack, capsule_id, n)
    table.add("PTY keystroke echo p50", statistics.median(api_side),
              statistics.median(direct_side), "direct envd PTY (Start + SendInput)")  # fmt: skip
    table.add("PTY keystroke echo p99", pct(api_side, 0.99), pct(direct_side, 0.99),
              "direct envd PTY (Start + SendInput)")  # fmt: skip


def bench_pty_download(stack: Stack, capsule_id: str, table: Table, profile: list[str],
                       n: int) -> None:  # fmt: skip
    """Keystroke echo while a download (`DOWNLOAD_RATE`, 20 MiB/s) from the same capsule runs
    through the port proxy, over the API and over a direct envd PTY, each against itself idle:
    if the direct one slows as much, the guest and the host's cores are the bound, not our
    relays. The host CPU of each program during both is in the profile."""

    async def direct() -> list[float]:
        async with direct_envd(stack.agent, capsule_id) as envd:
            return await direct_keystrokes(envd, n)

    cpu = HostCpu(stack, capsule_id)
    idle_api, idle_direct = api_keystrokes(stack, capsule_id, n), anyio.run(direct)
    idle_cpu = cpu.since()
    with serving_downloads(stack, capsule_id):
        download = Download(stack, capsule_id)
        try:
            download.progressing()
            cpu.mark()
            busy_direct, busy_api = anyio.run(direct), api_keystrokes(stack, capsule_id, n)
            busy_cpu = cpu.since()
            download.progressing()
        finally:
            download.stop()
    assert download.error is None, download.error
    for label, busy, idle in (("API", busy_api, idle_api), ("direct envd", busy_direct,
                                                              idle_direct)):  # fmt: skip
        table.add(f"PTY echo p50 under download, {label}", statistics.median(busy),
                  statistics.median(idle), f"the same idle ({label})")  # fmt: skip
        table.add(f"PTY echo p99 under download, {label}", pct(busy, 0.99), pct(idle, 0.99),
                  f"the same idle ({label}; target <= 2x for the API)")  # fmt: skip
    profile.append(f"download through the port proxy: {download.rate():.1f} MiB/s (asked "
                   f"{DOWNLOAD_RATE / 2**20:.0f}); host CPU (cores) idle: {idle_cpu}; "
                   f"under the download: {busy_cpu}")  # fmt: skip


# ── pause / resume ──────────────────────────────────────────────────────────────────────────


def bench_pause_resume(stack: Stack, capsule_id: str, table: Table, n: int) -> None:
    pauses: list[float] = []
    resumes: list[float] = []
    agent_pauses: list[float] = []
    agent_resumes: list[float] = []
    for _ in range(n):
        for verb, ours, theirs, log_line in (
            ("pause", pauses, agent_pauses, "capsule paused"),
            ("resume", resumes, agent_resumes, "capsule resumed"),
        ):
            t0 = time.monotonic()
            r = stack.api.post(f"/v1/capsules/{capsule_id}/{verb}")
            ours.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            theirs.append(agent_ms(stack.agent, log_line, capsule_id))
            time.sleep(0.5)  # the slot teardown of the pause (background) is not measured
    table.add("pause p50", statistics.median(pauses), statistics.median(agent_pauses),
              "the agent's pause (its log)")  # fmt: skip
    table.add("resume p50", statistics.median(resumes), statistics.median(agent_resumes),
              "the agent's resume (its log)")  # fmt: skip


# ── the run ─────────────────────────────────────────────────────────────────────────────────


def run(args: argparse.Namespace, work: Path) -> int:
    (work / "d").mkdir(mode=0o700, parents=True, exist_ok=True)
    base = AgentSettings(
        data_dir=work / "d", image_cache=AgentSettings().images_dir,
        agent_id="b" + secrets.token_hex(3),
        slot_cidr=SLOT_CIDR, veth_cidr=VETH_CIDR, slot_first=args.slot_first,
        slot_count=args.concurrent + 10, accel="auto",
    )  # fmt: skip
    print(f"load average at start: {loadavg()} ({os.cpu_count()} cores)", file=sys.stderr)
    t0 = time.monotonic()
    image = guest_image.__wrapped__(base)  # type: ignore[attr-defined]  # the fixture's body
    try:
        kept = load_template(base.templates_dir, "minimal").meta.image_version == image.version
    except TemplateNotFound:
        kept = False
    if not kept:
        # The e2e session's `minimal` (one cold boot, a command run, the snapshot), in the
        # agent's data directory: the fixtures' own code, outside pytest.
        minimal_template.__wrapped__(base, image)  # type: ignore[attr-defined]
        print(f"minimal template built in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    with running_stack(work / "stack") as cp:
        restores = {"NESTBOX_AGENT_RESTORE_CONCURRENCY": str(args.restore_concurrency)}
        agent = cp.add_agent(base, slot_first=args.slot_first, slot_count=args.concurrent + 10,
                             warm_slots=args.warm_slots, env=restores)  # fmt: skip
        stack = Stack("sqlite", cp, agent, base, args.slot_first)
        try:
            stack.wait_online(agent)
            table = Table()
            profile: list[str] = []
            load = [loadavg()]
            failed = False
            # The shared capsule is made after the creates (the team's quota is 20).
            phases: list[tuple[str, Callable[[], None]]] = [
                (
                    "create",
                    lambda: bench_creates(stack, table, profile, args.n_create, args.concurrent),
                ),
                ("exec", lambda: bench_exec(stack, stack.shared_capsule(), table, args.n_exec)),
                ("pty", lambda: bench_pty(stack, stack.shared_capsule(), table, args.n_pty)),
                (
                    "pty-download",
                    lambda: bench_pty_download(
                        stack, stack.shared_capsule(), table, profile, args.n_pty
                    ),
                ),
                (
                    "pause",
                    lambda: bench_pause_resume(stack, stack.shared_capsule(), table, args.n_pause),
                ),
            ]
            for name, phase in phases:
                if name in args.only:
                    print(f"{name}...", file=sys.stderr)
                    try:
                        phase()
                    except Exception:  # the other phases' figures still count
                        traceback.print_exc()
                        failed = True
                if name == "create":
                    load.append(loadavg())
            load.append(loadavg())
            print(table.render())
            print("\n".join(profile))
            print(f"load average (1/5/15 min) before / after the creates / at the end: "
                  f"{' | '.join(load)}; {os.cpu_count()} cores")  # fmt: skip
            if failed:
                return 1
        finally:
            for capsule in stack.api.get("/v1/capsules").json():
                stack.destroy(capsule["id"])
            stack.close()
            if sys.exc_info()[0] is not None:
                print(f"the agent's log ends:\n{agent.log_tail(6000)}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-create", type=int, default=8, help="single creates")
    parser.add_argument("--concurrent", type=int, default=20, help="creates sent at once")
    parser.add_argument("--n-exec", type=int, default=40, help="exec round trips per side")
    parser.add_argument("--n-pty", type=int, default=40, help="keystrokes per side and round")
    parser.add_argument("--n-pause", type=int, default=5, help="pause/resume cycles")
    phases = ["create", "exec", "pty", "pty-download", "pause"]
    parser.add_argument("--only", nargs="+", default=phases, choices=phases)
    parser.add_argument("--restore-concurrency", type=int,
                        default=AgentSettings().restore_concurrency,
                        help="the agent's clones started at once (0: two per core)")  # fmt: skip
    parser.add_argument("--warm-slots", type=int, default=AgentSettings().warm_slots,
                        help="the agent's warm slot pool (its default)")  # fmt: skip
    # +100: clear of the VM tier's slots (+0..+69) and the e2e tier's (+200..+399)
    first = int(os.environ.get("NESTBOX_TEST_SLOT_FIRST", "4001")) + 100
    parser.add_argument("--slot-first", type=int, default=first)
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR and keep it (its `minimal` is reused)")  # fmt: skip
    args = parser.parse_args()
    reason = vm_skip_reason()
    if reason:
        sys.exit(f"bench-api: {reason}")
    blackholes = subprocess.run(["ip", "route", "show", "type", "blackhole"], check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
    work = Path(args.keep or tempfile.mkdtemp(prefix="nbapi-", dir="/tmp"))
    try:
        return run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        for cidr in (SLOT_CIDR, VETH_CIDR):
            if cidr not in blackholes:
                subprocess.run(["ip", "route", "del", "blackhole", cidr], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
