"""`kill -9` of a registered host agent during a create and during a pause made through the
control plane's public API, then a restart of the agent: the agent's recovery cleans or adopts
the VM, and the control plane's rows settle (none left pending, starting, pausing, resuming or
snapshotting) within one reconcile interval (the stack's is 5 s) after the agent is back; the
bound is generous (a bound for a hang), the time it took is printed.

The operation is held inside the agent by stopping (SIGSTOP) the capsule's QEMU at a chosen
point, as in `test_agent_crash.py`; nothing in the agent or the control plane knows. The agent
is the stack's own: its other capsules (the shared one among them) are re-adopted by the
restart and left alone by these checks; the stack's health check after each test waits for
them to be running again.

On both databases: the rows the reconciler settles are the point.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.conftest import wait_until as poll
from tests.e2e.stack import RECONCILE_S, leftovers_beyond, records
from tests.integration.vm.conftest import qemu_pids

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.e2e.stack import ControlPlaneProcess, Stack
    from tests.integration.vm.agent_process import AgentProcess

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

SETTLE_S = 3 * RECONCILE_S + 15.0
"""A bound for a hang: settling takes one reconcile interval, plus the pass's own time."""
STALL_S = 60.0


def wait_until(what: str, check: Callable[[], Any], within: float = STALL_S) -> Any:
    """`tests.conftest.wait_until`, polling every 0.5 ms: the point to catch may be
    milliseconds wide."""
    return poll(check, within=within, every=0.0005, what=what)


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
    `SETTLE_S` (with the rows and the control plane's log)."""
    while True:
        stuck = cp.stuck_rows()
        if not stuck and check():
            return time.monotonic() - back
        if time.monotonic() - back > SETTLE_S:
            raise AssertionError(
                f"not settled {SETTLE_S:g} s after the agent came back ({what}): stuck rows "
                f"{stuck}\ncontrol plane log:\n{cp.log_tail(6000)}"
            )
        time.sleep(0.1)


def others(stack: Stack, but: str = "") -> set[str]:
    """The agent's capsules other than `but` (the other tests' and the shared ones)."""
    return set(records(stack.agent)) - {but}


def assert_agent_clean(stack: Stack, keep: set[str]) -> None:
    left = leftovers_beyond(stack.agent, keep)
    assert left == {k: [] for k in left}, left


def test_kill_during_create(stack: Stack) -> None:
    cp, agent, api = stack.cp, stack.agent, stack.api
    before = set(qemu_pids(agent.settings.state_dir))
    keep = others(stack)
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
    assert pid not in qemu_pids(agent.settings.state_dir)
    assert qemu_pids(agent.settings.state_dir / "capsules" / cid) == []

    agent_token, _ = cp.host_tokens()[stack.host_id(agent)]

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
    assert_agent_clean(stack, keep)


def test_kill_during_pause(stack: Stack) -> None:
    cp, agent, api = stack.cp, stack.agent, stack.api
    cid = stack.create()["id"]
    keep = others(stack, but=cid)
    stack.out(cid, "echo before-pause > /root/mine && sync")
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
        return stack.status(cid) == "running"

    took = settle(cp, back, running, "the capsule re-adopted running")
    print(f"pause: settled {took:.1f} s after the agent came back")
    assert qemu_pids(agent.settings.state_dir / "capsules" / cid) == [pid]  # the same VM, adopted
    assert stack.out(cid, "cat /root/mine") == "before-pause\n"
    r = api.post(f"/v1/capsules/{cid}/pause")
    assert (r.status_code, r.json()["status"]) == (200, "paused"), r.text
    r = api.post(f"/v1/capsules/{cid}/resume")
    assert (r.status_code, r.json()["status"]) == (200, "running"), r.text
    assert stack.out(cid, "cat /root/mine") == "before-pause\n"
    assert api.delete(f"/v1/capsules/{cid}").status_code == 204
    assert_agent_clean(stack, keep)
