"""A real auto-pause: a capsule created with an idle timeout (`timeout_sec`) is left alone; the
agent's idle reaper pauses it (its QEMU goes), its next heartbeat disagrees with the control
plane's counts, the reconciler asks the agent and the row becomes `paused`, visible through GET.
Then resume works and a file written before survives.

The shortest idle timeout the API takes is 60 s (shorter ones are raised to it, as the SDK
documents), so the capsule is made with the stacks (`Stack.idle`, see `tests/e2e/conftest.py`)
and this test runs after every other one but the agent-crash tests (an agent restart restarts
the idle timers): its minute passes while the others run.

On both databases: the reconciler's update of the row is the point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.e2e.stack import IDLE_TIMEOUT_S, records, wait_for
from tests.integration.vm.conftest import qemu_pids

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(400)]

PAUSED_WITHIN_S = 2 * IDLE_TIMEOUT_S + 60
"""A bound for a hang, counted from the capsule's last activity."""


def test_idle_capsule_is_auto_paused_and_resumes(stack: Stack) -> None:
    assert stack.idle is not None
    cid, active_wall = stack.idle
    assert stack.api.get(f"/v1/capsules/{cid}").json()["timeout_sec"] == IDLE_TIMEOUT_S
    stack.wait_status(cid, "paused", within=PAUSED_WITHIN_S)
    # paused by the reaper, never before the idle timeout (the record's last write is the
    # PAUSED one; the activity ended after `active_wall`)
    record = stack.agent.settings.state_dir / "capsules" / f"{cid}.json"
    assert records(stack.agent)[cid]["state"] == "paused"
    assert record.stat().st_mtime - active_wall >= IDLE_TIMEOUT_S
    wait_for("the agent's auto-pause log line", lambda: any(
        "auto-paused" in line and cid in line
        for line in stack.agent.log_path.read_text(errors="replace").splitlines()
    ))  # fmt: skip
    assert qemu_pids(stack.agent.settings.state_dir / "capsules" / cid) == []
    listed = {c["id"]: c["status"] for c in stack.api.get("/v1/capsules").json()}
    assert listed[cid] == "paused"
    assert stack.cp.stuck_rows() == []

    r = stack.api.post(f"/v1/capsules/{cid}/resume")
    assert (r.status_code, r.json()["status"]) == (200, "running"), r.text
    assert stack.read_file(cid, "/root/kept.txt") == b"written before the pause\n"
    assert stack.out(cid, "echo resumed") == "resumed\n"
    stack.destroy(cid)
    stack.idle = None
