"""`/init` answers once envd's own state is updated; the clock, identity files and RNG follow
right after the answer, or first thing in the next request if that comes sooner."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import httpx

from nestbox.envd.app import EnvdApp
from nestbox.envd.lifecycle import finish_init
from nestbox.envd.settings import EnvdSettings
from nestbox.envd.state import MachineUpdate, Runtime

if TYPE_CHECKING:
    from pathlib import Path


def runtime(run_dir: Path) -> Runtime:
    nothing = cast(Any, None)
    ports = cast(Any, SimpleNamespace(activity=lambda: None))  # each request marks activity
    return Runtime(settings=EnvdSettings(run_dir=run_dir), in_vm=False, processes=nothing,
                   watchers=nothing, tracker=nothing, ports=ports)  # fmt: skip


def client(rt: Runtime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(EnvdApp(rt)), base_url="http://envd")


async def test_init_leaves_nothing_pending_once_its_answer_is_out(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    async with client(rt) as c:
        r = await c.post("/init", json={"capsuleId": "cl-one", "templateId": "base"})
    assert r.status_code == 204
    assert rt.pending is None
    assert (tmp_path / "NESTBOX_CAPSULE_ID").read_text() == "cl-one"
    assert (tmp_path / "NESTBOX_TEMPLATE_ID").read_text() == "base"


async def test_a_request_before_the_background_work_applies_it_first(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    rt.identity.capsule_id = "cl-two"
    rt.pending = MachineUpdate(time.monotonic(), identity=True)
    async with client(rt) as c:
        r = await c.get("/envs")
    assert r.json()["NESTBOX_CAPSULE_ID"] == "cl-two"
    assert rt.pending is None
    assert (tmp_path / "NESTBOX_CAPSULE_ID").read_text() == "cl-two"


async def test_a_rejected_init_queues_nothing(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    async with client(rt) as c:
        r = await c.post("/init", json={"entropy": "not base64!"})
    assert r.status_code == 400
    assert rt.pending is None
    assert not (tmp_path / "NESTBOX_CAPSULE_ID").exists()


def test_two_updates_merge_into_one() -> None:
    first = MachineUpdate(1.0, host_ns=10, entropy=b"a", identity=True)
    first.merge(MachineUpdate(2.0, entropy=b"b"))  # a stale /init: entropy only
    assert (first.received, first.host_ns, first.entropy, first.identity) == (1.0, 10, b"ab", True)
    first.merge(MachineUpdate(3.0, host_ns=30))
    assert (first.received, first.host_ns, first.entropy) == (3.0, 30, b"ab")


def test_finish_with_nothing_pending_does_nothing(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    assert finish_init(rt) is None
    assert list(tmp_path.iterdir()) == []
