"""`kill -9` of a registered host agent during a create and during a pause made through the
control plane's public API, then a restart of the agent: the agent's recovery cleans or adopts
the VM, and the control plane's rows settle (none left pending, starting, pausing, resuming or
snapshotting) within one reconcile interval (the stack's is 5 s) after the agent is back.

The operation is held inside the agent by stopping (SIGSTOP) the capsule's QEMU at a chosen
point, as in `test_agent_crash.py`; nothing in the agent or the control plane knows.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.integration.vm.agent_process import agent_leftovers
from tests.integration.vm.conftest import SLOT_FIRST, qemu_pids
from tests.integration.vm.stack import running_stack

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.storage.templates import Template
    from tests.integration.vm.agent_process import AgentProcess
    from tests.integration.vm.conftest import BootInfo
    from tests.integration.vm.stack import ControlPlaneProcess

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

SLOTS = SLOT_FIRST + 190
"""Slots 191-193 past the session's first: clear of the other agents' ranges."""
RECONCILE_S = 5.0
"""`NESTBOX_CP_RECONCILE_INTERVAL_S` of the stack."""
SETTLE_S = RECONCILE_S + 2.0
"""One reconcile interval, plus the pass's own time (an agent call, a few updates)."""
TRANSITIONAL = ("pending", "starting", "pausing", "resuming", "snapshotting", "stopping")
STALL_S = 60.0


@pytest.fixture(scope="module")
def stack(
    vm_settings: AgentSettings,
    minimal_template: tuple[Template, BootInfo],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ControlPlaneProcess, AgentProcess]]:
    with running_stack(tmp_path_factory.mktemp("stack-crash")) as cp:
        agent = cp.add_agent(vm_settings, slot_first=SLOTS, slot_count=3)
        yield cp, agent


@pytest.fixture
def api(stack: tuple[ControlPlaneProcess, AgentProcess]) -> Iterator[httpx.Client]:
    cp, _ = stack
    with httpx.Client(base_url=cp.url, headers=cp.admin, trust_env=False, timeout=300) as api:
        yield api


def wait_until(what: str, check: Callable[[], Any], within: float = STALL_S) -> Any:
    """Poll `check` every 0.5 ms until it is truthy."""
    deadline = time.monotonic() + within
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.0005)
    return value


def records(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """The agent's capsule records on disk, by capsule id."""
    found = {}
    for path in (agent.settings.state_dir / "capsules").glob("cl-*.json"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            found[path.stem] = json.loads(path.read_text())
    return found


def stuck_rows(cp: ControlPlaneProcess) -> list[tuple[str, str]]:
    """Capsule rows in a transitional status, read straight from the control plane's
    database (destroyed rows included: they count too)."""
    with contextlib.closing(sqlite3.connect(f"file:{cp.data_dir / 'cp.db'}?mode=ro",
                                            uri=True, timeout=10)) as db:  # fmt: skip
        marks = ",".join("?" * len(TRANSITIONAL))
        rows = db.execute(f"SELECT id, status FROM capsules WHERE status IN ({marks})",
                          TRANSITIONAL).fetchall()  # fmt: skip
    return [(str(i), str(s)) for i, s in rows]


def in_background(call: Callable[[], httpx.Response]) -> Callable[[], httpx.Response | str]:
    """Run `call` in a thread; the returned function joins it and gives its answer (or the
    error it raised, as text)."""
    result: list[httpx.Response | str] = []

    def run() -> None:
        try:
            result.append(call())
        except httpx.HTTPError as err:
            result.append(repr(err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> httpx.Response | str:
        thread.join(120)
        assert result, "the API call did not return"
        return result[0]

    return join


def crash_and_restart(agent: AgentProcess, pid: int) -> float:
    """`kill -9` the agent, continue the stopped QEMU, restart the agent; the time it was back."""
    agent.kill()
    os.kill(pid, signal.SIGCONT)
    agent.start(timeout=120)
    return time.monotonic()


def settle(cp: ControlPlaneProcess, back: float, check: Callable[[], bool], what: str) -> float:
    """Seconds after the agent was back until no row is stuck and `check` holds; fails past
    one reconcile interval (with the rows and the control plane's log)."""
    while True:
        stuck = stuck_rows(cp)
        if not stuck and check():
            return time.monotonic() - back
        if time.monotonic() - back > SETTLE_S:
            raise AssertionError(
                f"not settled {SETTLE_S:g} s after the agent came back ({what}): stuck rows "
                f"{stuck}\ncontrol plane log:\n{cp.log_tail(6000)}"
            )
        time.sleep(0.1)


def exec_out(api: httpx.Client, cid: str, script: str) -> str:
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/sh", "args": ["-c", script]})
    assert r.status_code == 200, r.text
    assert r.json()["exit_code"] == 0, r.json()
    return str(r.json()["stdout"])


def assert_agent_clean(agent: AgentProcess) -> None:
    left = agent_leftovers(agent.settings)
    assert left == {k: [] for k in left}, left


def test_kill_during_create(stack: tuple[ControlPlaneProcess, AgentProcess],
                            api: httpx.Client) -> None:  # fmt: skip
    cp, agent = stack
    before = set(qemu_pids(agent.settings.state_dir))
    join = in_background(lambda: api.post("/v1/capsules", json={}))
    pid = wait_until("a new QEMU", lambda: next(iter(set(qemu_pids(agent.settings.state_dir))
                                                   - before), None))  # fmt: skip
    os.kill(pid, signal.SIGSTOP)
    try:
        cid = wait_until("its record with the pid", lambda: next(
            (cid for cid, r in records(agent).items() if r.get("pid") == pid), None))  # fmt: skip
        assert records(agent)[cid]["state"] == "starting"
    finally:
        back = crash_and_restart(agent, pid)
    answer = join()
    assert isinstance(answer, str) or answer.status_code >= 500, answer
    assert qemu_pids(agent.settings.state_dir) == []

    ((agent_token, _),) = cp.host_tokens().values()

    def gone_everywhere() -> bool:
        visible = api.get(f"/v1/capsules/{cid}").status_code != 404
        listed = httpx.post(
            f"{agent.url}/hostagent.v1.HostAgentService/ListCapsules", json={},
            headers={"X-Agent-Token": agent_token}, trust_env=False,
        )  # fmt: skip
        assert listed.status_code == 200, listed.text
        return not visible and cid not in listed.text

    took = settle(cp, back, gone_everywhere, "the failed create's row and the agent's capsule")
    print(f"create: settled {took:.1f} s after the agent came back")
    assert_agent_clean(agent)


def test_kill_during_pause(stack: tuple[ControlPlaneProcess, AgentProcess],
                           api: httpx.Client) -> None:  # fmt: skip
    cp, agent = stack
    r = api.post("/v1/capsules", json={})
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    exec_out(api, cid, "echo before-pause > /root/mine && sync")
    [pid] = qemu_pids(agent.settings.state_dir / "capsules" / cid)
    # Stopped first: the agent records PAUSING, then waits on QMP; the snapshot cannot begin.
    os.kill(pid, signal.SIGSTOP)
    join = in_background(lambda: api.post(f"/v1/capsules/{cid}/pause"))
    try:
        wait_until("the pausing record", lambda: records(agent)[cid]["state"] == "pausing")
    finally:
        back = crash_and_restart(agent, pid)
    answer = join()
    assert isinstance(answer, str) or answer.status_code >= 500, answer

    def running() -> bool:
        return bool(api.get(f"/v1/capsules/{cid}").json()["status"] == "running")

    took = settle(cp, back, running, "the capsule re-adopted running")
    print(f"pause: settled {took:.1f} s after the agent came back")
    assert qemu_pids(agent.settings.state_dir) == [pid]  # the same VM, adopted
    assert exec_out(api, cid, "cat /root/mine") == "before-pause\n"
    r = api.post(f"/v1/capsules/{cid}/pause")
    assert (r.status_code, r.json()["status"]) == (200, "paused"), r.text
    r = api.post(f"/v1/capsules/{cid}/resume")
    assert (r.status_code, r.json()["status"]) == (200, "running"), r.text
    assert exec_out(api, cid, "cat /root/mine") == "before-pause\n"
    assert api.delete(f"/v1/capsules/{cid}").status_code == 204
    assert_agent_clean(agent)
