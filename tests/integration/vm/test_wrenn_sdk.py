"""The official `wrenn` 0.3.0 SDK, unmodified, in a venv of its own, against the whole Nestbox
stack: a control plane process, a host agent registered with it, real QEMU capsules cloned from
the session's `minimal` template. Then two agents on one machine: both register, capsules are
placed least-loaded across them, and killing one agent leaves the other's capsules working
while the silent host's capsules become `missing`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.integration.upstream_venv import upstream_venv
from tests.integration.vm.conftest import SLOT_FIRST
from tests.integration.vm.stack import UNREACHABLE_AFTER_S, run_sdk_script, running_stack

if TYPE_CHECKING:
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.storage.templates import Template
    from tests.integration.vm.conftest import BootInfo

pytestmark = [pytest.mark.vm, pytest.mark.sdk, pytest.mark.timeout(1200)]

SCRIPT = Path(__file__).parents[1] / "sdk" / "wrenn_script.py"
SLOTS = SLOT_FIRST + 100
"""Slots 101-160 past the session's first: the runtime tests and the `agent` fixture use 1-70."""


def test_wrenn_sdk_end_to_end(
    vm_settings: AgentSettings, minimal_template: tuple[Template, BootInfo], tmp_path: Path
) -> None:
    python = upstream_venv("wrenn", "0.3.0", ignore_requires_python=True)
    with running_stack(tmp_path / "stack") as cp:
        cp.add_agent(vm_settings, slot_first=SLOTS, slot_count=20)
        proc = run_sdk_script(python, SCRIPT, cp, key=cp.admin_key)
        assert proc.returncode == 0, f"{proc.stderr[-6000:]}\n--- cp ---\n{cp.log_tail()}"
        seen = json.loads(proc.stdout.strip().splitlines()[-1])

    assert seen["created"] == {"status": "running", "template": "minimal", "aware": True}
    assert seen["run"] == {"stdout": "hello\n", "stderr": "oops\n", "exit_code": 0}
    assert seen["exit7"] == 7
    assert seen["envs_cwd"] == "hi from /tmp\n"
    assert seen["stream_types"][0] == "start"
    assert seen["stream_types"][-1] == "exit"
    assert seen["stream_types"].count("stdout") >= 2, "output must arrive as it is produced"
    assert seen["stream_stdout"] == "line1\nline2\nline3\n"
    assert seen["stream_exit"] == 0
    assert seen["bg_listed"] is True
    assert seen["bg_after_kill"] is False
    assert seen["read_text"] == "hi there"
    assert seen["binary_roundtrip"] is True
    assert seen["download_stream"] is True
    assert seen["upload_stream_size"] == str(16 * 65536)
    assert seen["make_dir"] == {"name": "e", "type": "directory"}
    assert seen["make_dir_again"] == "e"
    assert seen["list_root_has"] == ["blob.bin", "d", "hello.txt"]
    assert seen["exists"] == [True, False]
    assert seen["exists_after_remove"] is False
    assert seen["read_missing"] == "not_found"
    assert seen["pty_echo"] is True
    assert seen["pty_tag"] is True
    assert seen["pty_size"] is True
    assert seen["paused_status"] == "paused"
    assert seen["exec_while_paused"] == "conflict"
    assert seen["resumed_status"] == "running"
    assert seen["file_survived"] == "persisted\n"
    assert seen["process_survived"] is True
    assert seen["listed"] is True
    assert seen["info_status"] == "running"
    assert seen["template"] == {"name": "e2e-snap", "type": "snapshot"}
    assert seen["after_snapshot_status"] == "paused"
    first, second = (int(x) for x in seen["clone_ticks"])
    assert second > first, "the process started before the snapshot runs on in the clone"
    assert seen["clone_ticker_listed"] is True
    assert seen["clone_has_file"] == "persisted\n"
    assert seen["after_destroy"] == "not_found"
    assert seen["listed_after_destroy"] is False


def _wait_status(client: httpx.Client, cid: str, headers: dict[str, str], want: str,
                 limit: float) -> str:  # fmt: skip
    deadline, status = time.monotonic() + limit, ""
    while time.monotonic() < deadline:
        status = str(client.get(f"/v1/capsules/{cid}", headers=headers).json()["status"])
        if status == want:
            return status
        time.sleep(0.5)
    return status


def test_two_agents_on_one_machine(
    vm_settings: AgentSettings, minimal_template: tuple[Template, BootInfo], tmp_path: Path
) -> None:
    with running_stack(tmp_path / "stack") as cp:
        one = cp.add_agent(vm_settings, slot_first=SLOTS + 20, slot_count=10)
        two = cp.add_agent(vm_settings, slot_first=SLOTS + 30, slot_count=10)
        assert one.settings.state_dir != two.settings.state_dir
        with httpx.Client(base_url=cp.url, trust_env=False, timeout=120) as client:
            hosts = client.get("/v1/hosts", headers=cp.admin).json()
            assert [h["status"] for h in hosts] == ["online", "online"]
            by_address = {h["address"]: h["id"] for h in hosts}
            host_of = {by_address[f"127.0.0.1:{a.port}"]: a for a in (one, two)}

            created = []
            for _ in range(4):
                r = client.post("/v1/capsules", json={}, headers=cp.admin)
                assert r.status_code == 201, r.text
                created.append(r.json())
            placed = [c["host_id"] for c in created]
            # least-loaded: the capsules spread over both agents
            assert set(placed) == set(host_of), placed

            loadavg = {"cmd": "/bin/sh", "args": ["-c", "cat /proc/loadavg"]}
            for c in created:
                r = client.post(f"/v1/capsules/{c['id']}/exec", headers=cp.admin, json=loadavg)
                assert r.status_code == 200, r.text
                assert r.json()["exit_code"] == 0

            victim_host = placed[0]
            host_of[victim_host].kill()  # SIGKILL: no pause, no goodbye
            survivors = [c for c in created if c["host_id"] != victim_host]
            lost = [c for c in created if c["host_id"] == victim_host]
            for c in survivors:
                r = client.post(f"/v1/capsules/{c['id']}/exec", headers=cp.admin,
                                json={"cmd": "/bin/sh", "args": ["-c", "echo alive"]})  # fmt: skip
                assert r.json()["stdout"] == "alive\n"
            status = _wait_status(client, lost[0]["id"], cp.admin, "missing",
                                  UNREACHABLE_AFTER_S + 10)  # fmt: skip
            assert status == "missing"
            host = client.get(f"/v1/hosts/{victim_host}", headers=cp.admin).json()
            assert host["status"] == "unreachable"
            # new capsules go to the agent that still answers
            r = client.post("/v1/capsules", json={}, headers=cp.admin)
            assert r.status_code == 201, r.text
            assert r.json()["host_id"] != victim_host
            for c in client.get("/v1/capsules", headers=cp.admin).json():
                if c["host_id"] != victim_host:
                    assert (
                        client.delete(f"/v1/capsules/{c['id']}", headers=cp.admin).status_code
                        == 204
                    )
