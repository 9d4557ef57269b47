"""Chaos: rounds that crash a piece of a real stack at a random point and check that everything
settles and nothing leaks.

Each round, chosen by a seeded random generator (the seed and every round's draw are printed;
`CHAOS_SEED` and `CHAOS_ROUNDS` set them, `make chaos` runs many rounds, `make test` a few):

- `create`, `pause`, `resume`, `destroy`, `snapshot` (template snapshot): the API call is sent
  and, a random time into it (up to 1.2 x the last time that operation took), the host agent is
  `kill -9`ed and started again on the same state;
- `qemu`: a running capsule's QEMU is `kill -9`ed;
- `cp`: one of the five calls is sent and the control plane is `kill -9`ed a random time into
  it, then started again on the same database.

Afterwards, within a bound for a hang (the time taken is printed): no capsule row is stuck in
a transitional status, the control plane's rows on the host are exactly the capsules the agent
lists, in the same states; every running capsule answers an exec (others are paused or
`error`); and the host holds nothing that no live capsule or known template owns
(`tests/e2e/leaks.py`: netns, TAP/veth, routes, iptables/nft rules, cgroups, disks, overlays,
RAM and snapshot files, template versions and staging directories, QEMU processes, mounts).
At the end every capsule and template is removed through the API and the host is as before.

The stack is the test's own (a control plane on SQLite and one agent, on ten of the SQLite
session stack's slots), so crashing it disturbs no other test. Every process killed is one this
test started, by its pid.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.e2e.leaks import HostState, leaked
from tests.e2e.stack import API_TIMEOUT_S, TRANSITIONAL, running_stack, wait_for
from tests.e2e.test_stack_crash import in_background
from tests.integration.vm.conftest import qemu_pids

if TYPE_CHECKING:
    from pathlib import Path

    from tests.e2e.stack import ControlPlaneProcess, Stack
    from tests.integration.vm.agent_process import AgentProcess

SEED = int(os.environ.get("CHAOS_SEED") or 20261202)
ROUNDS = int(os.environ.get("CHAOS_ROUNDS") or 3)
"""`make test`'s short run: three rounds (about 40 s here)."""

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300 + 120 * ROUNDS)]
OPS = ("create", "pause", "resume", "destroy", "snapshot")
PHASES = (*OPS, "qemu", "cp")
SETTLE_S = 90.0
"""A bound for a hang: a reconcile interval (5 s) after the stuck-row age (5 s), an agent's
recovery, a heartbeat; under load TCG guests are slow."""
FLEET = 2
"""Capsules kept between rounds (fewer would cost a create per round, more a slower host)."""
FIRST_GUESS_S = {"create": 1.5, "pause": 2.0, "resume": 1.5, "destroy": 0.5, "snapshot": 3.0}


@dataclass
class Chaos:
    cp: ControlPlaneProcess
    agent: AgentProcess
    rng: random.Random
    api: httpx.Client = field(init=False)
    took: dict[str, float] = field(default_factory=lambda: dict(FIRST_GUESS_S))
    """The last time each operation took when nothing crashed: where the random point falls."""
    templates: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.api = httpx.Client(base_url=self.cp.url, headers=self.cp.admin, trust_env=False,
                                timeout=API_TIMEOUT_S)  # fmt: skip

    # ── the API ──

    def call(self, op: str, cid: str, name: str = "") -> httpx.Response:
        if op == "create":
            return self.api.post("/v1/capsules", json={})
        if op == "destroy":
            return self.api.delete(f"/v1/capsules/{cid}")
        if op == "snapshot":
            return self.api.post("/v1/snapshots", json={"sandbox_id": cid, "name": name})
        return self.api.post(f"/v1/capsules/{cid}/{op}")

    def timed(self, op: str, cid: str = "", name: str = "") -> httpx.Response:
        """The call, undisturbed (its time kept for the random points); 2xx asserted."""
        start = time.monotonic()
        r = self.call(op, cid, name)
        assert r.is_success, f"{op} {cid}: {r.status_code} {r.text}"
        self.took[op] = time.monotonic() - start
        return r

    def capsules(self) -> dict[str, str]:
        """Every capsule the API lists, by id: its status."""
        r = self.api.get("/v1/capsules")
        assert r.status_code == 200, r.text
        return {c["id"]: c["status"] for c in r.json()}

    def host_id(self) -> str:
        [host] = self.api.get("/v1/hosts").json()
        return str(host["id"])

    def agent_capsules(self) -> dict[str, str] | None:
        """What the agent lists (id: state, in the API's words); None while it is down."""
        held = self.agent_list()
        if held is None:
            return None
        return {c["capsuleId"]: c.get("state", "").removeprefix("CAPSULE_STATE_").lower()
                for c in held}  # fmt: skip

    def agent_list(self) -> list[dict[str, Any]] | None:
        """The agent's ListCapsules answer (JSON); None while it is down."""
        token, _ = self.cp.host_tokens()[self.host_id()]
        try:
            r = httpx.post(f"{self.agent.url}/hostagent.v1.HostAgentService/ListCapsules",
                           json={}, headers={"X-Agent-Token": token}, trust_env=False,
                           timeout=10)  # fmt: skip
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        return list(r.json().get("capsules", []))

    # ── the rounds ──

    def ready(self, want: str) -> str:
        """A capsule in status `want` (running or paused), made from what there is."""
        fleet = self.capsules()
        if found := [c for c, s in fleet.items() if s == want]:
            return self.rng.choice(sorted(found))
        other = "paused" if want == "running" else "running"
        if spare := [c for c, s in fleet.items() if s == other]:
            cid = self.rng.choice(sorted(spare))
            self.timed("resume" if want == "running" else "pause", cid)
            return cid
        cid = str(self.timed("create").json()["id"])
        if want == "paused":
            self.timed("pause", cid)
        return cid

    def crash_agent(self) -> None:
        self.agent.kill()
        self.agent.start(timeout=120)

    def crash_cp(self) -> None:
        assert self.cp.proc is not None
        self.cp.proc.kill()
        self.cp.proc.wait(30)
        self.cp.start()

    def round(self, n: int, phase: str) -> str:
        """One disruption; what it hit, for the log."""
        if phase == "qemu":
            cid = self.ready("running")
            [pid] = qemu_pids(self.agent.settings.state_dir / "capsules" / cid)
            os.kill(pid, signal.SIGKILL)  # the agent's QEMU for our own capsule

            # The agent sees the exit when its watcher wakes: until then both sides still say
            # running, which is not yet the settled state.
            def seen() -> bool:
                return (self.agent_capsules() or {}).get(cid) != "running"

            wait_for(f"the agent to see {cid}'s QEMU gone", seen, SETTLE_S)
            return f"qemu {pid} of {cid}: {(self.agent_capsules() or {}).get(cid)}"
        op = self.rng.choice(OPS) if phase == "cp" else phase
        cid = "" if op == "create" else self.ready("paused" if op == "resume" else "running")
        name = f"chaos-{n}"
        if op == "snapshot":
            self.templates.append(name)
        delay = self.rng.uniform(0, 1.2 * self.took[op])
        join = in_background(lambda: self.call(op, cid, name))
        time.sleep(delay)
        (self.crash_cp if phase == "cp" else self.crash_agent)()
        answer = join()
        said = answer if isinstance(answer, str) else f"{answer.status_code}"
        return f"{op} {cid or '(new)'} killed after {delay:.2f} s: {said[:80]}"

    def mismatches(self) -> list[str]:
        """Where the control plane's rows and the agent disagree ([] when they match), and any
        row stuck in a transitional status."""
        gone = ("destroyed", "stopped")
        rows = dict(self.cp.query("SELECT id, status FROM capsules WHERE status NOT IN (?, ?)",
                                  *gone))  # fmt: skip
        held = self.agent_capsules()
        if held is None:
            return ["the agent does not answer"]
        ids = sorted(rows.keys() | held.keys())
        wrong = [f"{cid}: row {rows.get(cid)}, agent {held.get(cid)}"
                 for cid in ids if rows.get(cid) != held.get(cid)]  # fmt: skip
        wrong += [f"{cid}: stuck {status}" for cid, status in rows.items()
                  if status in TRANSITIONAL]  # fmt: skip
        return wrong

    def settle(self) -> float:
        """Seconds until the rows match the agent; fails past `SETTLE_S`."""
        start = time.monotonic()
        while wrong := self.mismatches():
            if time.monotonic() - start > SETTLE_S:
                raise AssertionError(self.logs(f"not settled after {SETTLE_S:g} s", wrong))
            time.sleep(0.2)
        return time.monotonic() - start

    def check(self, baseline: HostState) -> dict[str, int]:
        """Every capsule answers or is `error`/paused/stopped; nothing held beyond the live
        capsules and known templates. The count of capsules by status."""
        fleet = self.capsules()
        for cid, status in fleet.items():
            assert status in ("running", "paused", "error", "stopped"), (cid, status)
            if status == "running":
                r = self.api.post(f"/v1/capsules/{cid}/exec",
                                  json={"cmd": "/bin/sh", "args": ["-c", "echo ok"]})  # fmt: skip
                assert (r.status_code, r.json().get("stdout")) == (200, "ok\n"), self.logs(
                    cid, r.text
                )
        left = leaked(self.agent, baseline, keep=set(self.agent_capsules() or {}),
                      templates=self.template_ids())  # fmt: skip
        assert left == {}, self.logs("leaked", left)
        return collections.Counter(fleet.values())

    def logs(self, *what: object) -> str:
        """`what` and the tails of both logs, for a failure's message."""
        return (f"{what}\ncontrol plane log:\n{self.cp.log_tail(8000)}\n"
                f"agent log:\n{self.agent.log_tail(8000)}")  # fmt: skip

    def template_ids(self) -> set[str]:
        """The templates the control plane knows, and those the agent's capsules are made
        from: a capsule keeps its template's version (also one the agent removed as never
        answered for, until the capsule goes)."""
        made_from = {str(c.get("templateId", "")) for c in self.agent_list() or []}
        return {str(i) for (i,) in self.cp.query("SELECT id FROM templates")} | made_from

    def tidy(self) -> None:
        """Capsules that can do nothing more (error, stopped) and the fleet beyond `FLEET`
        destroyed; the templates made removed."""
        fleet = self.capsules()
        spare = sorted(c for c, s in fleet.items() if s in ("running", "paused"))
        for cid in [c for c, s in fleet.items() if s in ("error", "stopped")] + spare[FLEET:]:
            self.timed("destroy", cid)
        for name in self.templates:
            r = self.api.delete(f"/v1/snapshots/{name}")
            assert r.status_code in (204, 404), r.text
        self.templates.clear()


def own_stack(stack: Stack, tmp: Path) -> contextlib.AbstractContextManager[ControlPlaneProcess]:
    """A control plane of the test's own, on SQLite, with one agent on a block of the session
    stack's slots (see `running_stack`: afterwards both stop and the agent's leftovers go)."""

    @contextlib.contextmanager
    def run() -> Any:
        with running_stack(tmp) as cp:
            cp.add_agent(stack.base, slot_first=stack.slot_block(), slot_count=10)
            yield cp

    return run()


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)  # an own stack: any database
def test_chaos(stack: Stack, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"\nchaos: seed {SEED}, {ROUNDS} rounds (CHAOS_SEED, CHAOS_ROUNDS)")
    kills: collections.Counter[str] = collections.Counter()
    with own_stack(stack, tmp_path) as cp:
        [agent] = cp.agents
        chaos = Chaos(cp, agent, rng)
        baseline = HostState.take(agent)
        # a fresh order of the phases per cycle: every phase once in each len(PHASES) rounds
        order: list[str] = []
        for n in range(ROUNDS):
            if not order:
                order = rng.sample(PHASES, len(PHASES))
            phase = order.pop()
            print(f"round {n}: {phase} ...", flush=True)
            start = time.monotonic()
            what = chaos.round(n, phase)
            kills[phase] += 1
            settled = chaos.settle()
            fleet = chaos.check(baseline)
            print(f"round {n}: {phase}: {what}; settled in {settled:.1f} s; capsules "
                  f"{dict(fleet)}; {time.monotonic() - start:.1f} s")  # fmt: skip
            chaos.tidy()
        for cid in chaos.capsules():
            chaos.timed("destroy", cid)
        chaos.tidy()
        assert chaos.settle() >= 0
        left = leaked(agent, baseline)
        assert left == {}, f"leaked at the end: {left}"
        assert chaos.capsules() == {}
        chaos.api.close()
    print(f"chaos: seed {SEED}, {ROUNDS} rounds, kills per phase {dict(sorted(kills.items()))}")
