"""The registration contract with both sides real: the stack's agent registered with its
one-time token (`nestbox-agent` with `NESTBOX_AGENT_REGISTRATION_TOKEN`), and the control plane
shows its host online with what the agent reported at registration and in its heartbeats,
which keep coming. The spent token registers nothing a second time (401)."""

from __future__ import annotations

import http.client
import json
import os
import platform
from datetime import datetime
from typing import TYPE_CHECKING

import pytest

from nestbox import __version__

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def test_registered_host_is_online_with_its_heartbeat(stack: Stack) -> None:
    agent = stack.agent
    first = stack.wait_online(agent)
    assert first["address"] == f"127.0.0.1:{agent.port}"
    assert first["type"] == "regular"
    # what the agent measured and sent at registration
    assert first["arch"] == platform.machine()
    assert first["cpu_cores"] == len(os.sched_getaffinity(0))  # the cores it may use
    assert first["memory_mb"] > 0
    assert first["disk_gb"] > 0
    # ... and in its heartbeats
    load = first["load"]
    assert load["cpu_cores"] == os.cpu_count()
    assert load["agent_version"] == __version__
    assert load["memory_total_mb"] >= load["memory_available_mb"] > 0
    assert load["disk_total_gb"] >= load["disk_free_gb"] > 0
    assert 0 <= load["cpu_used_pct"] <= 100
    beat = datetime.fromisoformat(first["last_heartbeat_at"])
    assert beat.tzinfo is not None
    # the heartbeats go on: a newer one arrives
    later = stack.wait_online(agent, since=beat, within=30)
    assert datetime.fromisoformat(later["last_heartbeat_at"]) > beat
    assert later["id"] == first["id"]
    [listed] = [h for h in stack.api.get("/v1/hosts").json() if h["id"] == first["id"]]
    assert listed["status"] == "online"


def test_a_spent_registration_token_is_refused(stack: Stack) -> None:
    agent = stack.agent
    host_id = stack.host_id(agent)
    spent = agent.extra_env["NESTBOX_AGENT_REGISTRATION_TOKEN"]
    tokens = stack.cp.host_tokens()[host_id]
    body = json.dumps({"token": spent, "address": f"127.0.0.1:{agent.port}", "arch": "x86_64",
                       "cpu_cores": 2, "memory_mb": 1024, "disk_gb": 10}).encode()  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", stack.cp.port, timeout=60)
    try:
        conn.request("POST", "/v1/hosts/register", body,
                     {"Content-Type": "application/json"})  # fmt: skip
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 401, answer
    assert answer["error"]["code"] == "unauthorized"
    # nothing changed: still the one host for this agent, online, with the same credentials
    hosts = [
        h for h in stack.api.get("/v1/hosts").json() if h["address"].endswith(f":{agent.port}")
    ]
    assert [h["id"] for h in hosts] == [host_id]
    assert stack.cp.host_tokens()[host_id] == tokens
    assert stack.wait_online(agent)["status"] == "online"
