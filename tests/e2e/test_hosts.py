"""Two real hosts under one control plane (the stack's agent and a second agent process on the
same machine, each registered through the real flow):

- capsules are placed on both (least-loaded: the emptier host takes capsules); killing one
  agent (SIGKILL: no pause, no goodbye) leaves the other's capsules working while the silent
  host becomes `unreachable` and its capsules `missing`, and new capsules go to the host that
  still answers;
- `DELETE /v1/hosts/{id}` refuses a host that holds capsules (409 `host_has_capsules`, with
  their ids), and with `?force=true` reaches the real agent: it pauses its capsules (no QEMU
  is left for them) and stops, the host is gone and its capsules' rows are `stopped` (the
  API: "Remove a host (its agent pauses and stops)"; force: "even with capsules (they stop)").

On both databases: host and capsule rows are what these change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.stack import UNREACHABLE_AFTER_S, records, wait_for
from tests.integration.vm.conftest import qemu_pids

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(400)]


def create_on(stack: Stack, host_id: str, tries: int = 8) -> tuple[dict[str, Any], list[str]]:
    """A capsule placed on `host_id`, and the ids of those made meanwhile elsewhere.

    Two agents on one machine report the same machine: their scores differ by when each last
    measured it (free disk, CPU use), so which one takes a capsule is noise until the committed
    vCPUs decide; each capsule placed elsewhere makes that host fuller (its CPU share falls by
    a quarter per capsule here), so `host_id` is chosen within a few."""
    elsewhere: list[str] = []
    for _ in range(tries):
        capsule = stack.create()
        if capsule["host_id"] == host_id:
            return capsule, elsewhere
        elsewhere.append(capsule["id"])
    raise AssertionError(f"{tries} capsules and none on {host_id}")


def test_two_agents_on_one_machine(stack: Stack, capsule: str) -> None:
    with stack.extra_agent() as two:
        one = stack.agent
        assert one.settings.state_dir != two.settings.state_dir
        first, second = stack.host_id(one), stack.host_id(two)
        hosts = {h["id"]: h["status"] for h in stack.api.get("/v1/hosts").json()}
        assert hosts == {first: "online", second: "online"}
        # the shared capsule was made before the second host existed; the second takes some
        assert stack.api.get(f"/v1/capsules/{capsule}").json()["host_id"] == first
        lost, elsewhere = create_on(stack, second)
        survivors = [capsule, *elsewhere]
        for cid in [*survivors, lost["id"]]:
            assert stack.out(cid, "cat /proc/loadavg").count(" ") == 4

        two.kill()  # SIGKILL: no pause, no goodbye
        for cid in survivors:
            assert stack.out(cid, "echo alive") == "alive\n"
        stack.wait_status(lost["id"], "missing", within=UNREACHABLE_AFTER_S + 30)
        assert stack.api.get(f"/v1/hosts/{second}").json()["status"] == "unreachable"
        # new capsules go to the agent that still answers
        fresh = stack.create()
        assert fresh["host_id"] == first
        for cid in [lost["id"], *elsewhere, fresh["id"]]:
            stack.destroy(cid)


def test_force_delete_host_reaches_its_agent(stack: Stack) -> None:
    with stack.extra_agent() as two:
        host_id = stack.host_id(two)
        capsule, elsewhere = create_on(stack, host_id)
        cid = capsule["id"]
        for other in elsewhere:
            stack.destroy(other)
        stack.out(cid, "echo on-the-second-host > /root/where")
        assert qemu_pids(two.settings.state_dir / "capsules" / cid)

        r = stack.api.delete(f"/v1/hosts/{host_id}")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "host_has_capsules"
        assert cid in r.json()["capsule_ids"]
        assert stack.status(cid) == "running"

        r = stack.api.delete(f"/v1/hosts/{host_id}", params={"force": "true"})
        assert r.status_code == 204, r.text
        # the agent paused its capsule (its QEMU is gone) and stopped
        wait_for("the agent to exit", lambda: two.proc is not None and two.proc.poll() is not None,
                 120)  # fmt: skip
        assert two.proc is not None
        assert two.proc.returncode == 0, two.log_tail()
        assert qemu_pids(two.settings.state_dir) == []
        assert records(two)[cid]["state"] == "paused"
        # the host is gone; its capsule's row is stopped, and can be destroyed
        assert stack.api.get(f"/v1/hosts/{host_id}").status_code == 404
        assert host_id not in {h["id"] for h in stack.api.get("/v1/hosts").json()}
        assert stack.status(cid) == "stopped"
        r = stack.api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "host_unavailable"), r.text
        stack.destroy(cid)
        assert stack.status(cid) == "404"
        # the first host is untouched
        assert stack.host(stack.agent)["status"] == "online"
