"""A control-plane restart with the agent and capsules running: the control plane process is
stopped (SIGTERM) while a capsule runs and another is paused, and started again on the same
database; the agent's heartbeats find it again, the capsules are still there and usable
(exec in the running one, resume of the paused one), and no row is stuck.

On both databases: what the control plane finds again is what its database kept.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import pytest

from tests.e2e.stack import utcnow

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def test_capsules_survive_a_control_plane_restart(stack: Stack, capsule: str) -> None:
    stack.out(capsule, "echo before > /root/restart.txt")
    paused = stack.create()["id"]
    try:
        stack.out(paused, "echo paused-before > /root/p.txt")
        r = stack.api.post(f"/v1/capsules/{paused}/pause")
        assert (r.status_code, r.json()["status"]) == (200, "paused"), r.text
        host_id = stack.host_id(stack.agent)

        log = stack.cp.log_size()
        # uvicorn re-raises the signal once it has shut down cleanly
        assert stack.cp.stop() in (0, -signal.SIGTERM), stack.cp.log_tail()
        assert "Application shutdown complete" in stack.cp.log_since(log)
        down = utcnow()
        stack.cp.start()

        # the agent's heartbeats reach the new process
        host = stack.wait_online(stack.agent, since=down)
        assert host["id"] == host_id
        assert stack.status(capsule) == "running"
        assert stack.status(paused) == "paused"
        assert stack.out(capsule, "cat /root/restart.txt; echo after") == "before\nafter\n"
        r = stack.api.post(f"/v1/capsules/{paused}/resume")
        assert (r.status_code, r.json()["status"]) == (200, "running"), r.text
        assert stack.out(paused, "cat /root/p.txt") == "paused-before\n"
        assert stack.cp.stuck_rows() == []
    finally:
        stack.healthy()  # the control plane up again, whatever failed
        stack.destroy(paused)
