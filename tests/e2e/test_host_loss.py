"""Host loss: a host agent that stops answering (SIGSTOP: the process is there, its sockets
accept, nothing is read) is marked `unreachable` and its capsules `missing` within the 90 s the
issue asks (the stack's heartbeat settings are shortened: `tests/e2e/stack.py`), the API
answers for them at once (409 for an exec: the capsule is not running) and the other host's
capsules go on working; after SIGCONT the host is online again, its capsules are `running` and
answer, with what was written before.

A second agent of the session stack, so the stack's own agent (and its shared capsule) is never
stopped; the stopped process is this test's, and is continued in a `finally` whatever fails.
`test_default_settings_meet_the_deadline` holds the production defaults to the same 90 s.

On SQLite only: the host monitor's and the reconciler's writes are the ones
`test_hosts.py` already takes through both databases (a killed agent: `unreachable`,
`missing`); what is new here is the process that hangs and continues.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import pytest

from nestbox.controlplane.settings import CPSettings
from nestbox.hostagent.settings import AgentSettings
from tests.e2e.test_hosts import create_on

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(400)]

DEADLINE_S = 90.0
"""The issue's bound from the stop to `missing`."""


def test_default_settings_meet_the_deadline() -> None:
    """From an agent's last heartbeat, its host is marked at the first monitor round past the
    silence limit: at most limit + one round, whatever the agent's own interval. (The stop comes
    after the last heartbeat, so this bounds the time from the stop too.)"""
    cp = {name: f.default for name, f in CPSettings.model_fields.items()}
    limit = cp["heartbeat_unreachable_after_s"] + cp["host_monitor_interval_s"]
    assert limit <= DEADLINE_S, limit
    # a host that heartbeats on time is never called silent: two beats fit in the limit
    beat = AgentSettings.model_fields["heartbeat_interval_s"].default
    assert 2 * beat < cp["heartbeat_unreachable_after_s"], beat


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_stopped_agent_goes_missing_and_comes_back(stack: Stack, capsule: str) -> None:
    with stack.extra_agent() as two:
        host_id = stack.host_id(two)
        lost, elsewhere = create_on(stack, host_id)
        for other in elsewhere:
            stack.destroy(other)
        cid = lost["id"]
        stack.out(cid, "echo before-the-stop > /root/f")
        assert two.proc is not None
        assert two.proc.poll() is None
        pid = two.proc.pid
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            missing = stack.wait_status(cid, "missing", within=DEADLINE_S) - stopped
            assert stack.host(two)["status"] == "unreachable"
            r = stack.api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
            assert (r.status_code, r.json()["error"]["code"]) == (409, "invalid_state"), r.text
            assert stack.out(capsule, "echo alive") == "alive\n"  # the other host's
        finally:
            os.kill(pid, signal.SIGCONT)
        continued = time.monotonic()
        back = stack.wait_status(cid, "running", within=120) - continued
        assert stack.host(two)["status"] == "online"
        assert stack.out(cid, "cat /root/f") == "before-the-stop\n"
        print(f"\nhost loss ({stack.db}): missing {missing:.1f} s after SIGSTOP (deadline "
              f"{DEADLINE_S:g} s, unreachable after 6 s here), running again {back:.1f} s "
              "after SIGCONT")  # fmt: skip
        stack.destroy(cid)
