"""The official `wrenn` 0.3.0 SDK's `events.stream()`, `capsules.metrics`, `capsules.stats` and
`capsules.usage` against the whole stack with real QEMU capsules (`wrenn_observe_script.py`):
the stream sees a capsule's create, pause, resume and destroy, and the auto-pause of another
made with a 3 s idle timeout (the stack lowers the 60 s floor, `NESTBOX_CP_MIN_IDLE_TIMEOUT_S`);
the metrics are the host's samples of the VM, kept while it is paused; stats and usage count it.

On PostgreSQL only: the control plane is a process of its own, so the stream's events arrive
through LISTEN/NOTIFY (the in-process SQLite path is `tests/integration/cp/test_cp_events.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.stack import run_sdk_script
from tests.integration.upstream_venv import upstream_venv

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [
    pytest.mark.vm,
    pytest.mark.sdk,
    pytest.mark.timeout(900),
    pytest.mark.parametrize("stack", ["postgres"], indirect=True),
]

SCRIPT = Path(__file__).with_name("wrenn_observe_script.py")


def test_events_metrics_stats_usage(stack: Stack) -> None:
    python = upstream_venv("wrenn", "0.3.0", ignore_requires_python=True)
    cp = stack.cp
    proc = run_sdk_script(python, SCRIPT, cp, key=cp.admin_key)
    print(proc.stderr)  # the steps' timings
    assert proc.returncode == 0, f"{proc.stderr[-6000:]}\n--- cp ---\n{cp.log_tail()}"
    seen = json.loads(proc.stdout.strip().splitlines()[-1])

    assert seen["connected"] == "connected"
    kinds = seen["kinds"]
    for kind in ("capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"):
        assert kind in kinds, kinds
    order = [k for k in kinds if k != "capsule.state.changed"]
    assert order == ["capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"]
    first = seen["first"]
    assert first["outcome"] == "success"
    assert first["actor"]["type"] == "api_key"
    assert first["resource"]["type"] == "sandbox"
    assert first["sandbox"]["status"] == "running"

    auto = seen["auto"]
    assert auto["status"] == "paused"
    assert {"from": "running", "to": "paused", "reason": "ttl_expired"} in auto["changed"]
    assert auto["pause_actor"] == ["system"]

    running = seen["metrics_running"]
    assert running == {"count": running["count"], "mem": True, "disk": True, "cpu_seen": True,
                       "recent": True}  # fmt: skip
    assert running["count"] >= 3
    assert seen["metrics_2h"] is True
    assert seen["metrics_24h"] is True
    assert seen["metrics_paused"] is True  # a paused capsule answers its history

    stats = seen["stats"]
    assert stats["range"] == "5m"
    assert stats["running_now"] >= 1
    assert stats["vcpus_now"] >= 1
    assert stats["peak_running"] >= 1
    assert stats["labels_aware"] is True
    assert stats["series_max"] >= 1

    usage = seen["usage"]
    assert len(usage["days"]) == 2
    assert usage["today_cpu"] > 0
    assert usage["today_ram"] > 0
