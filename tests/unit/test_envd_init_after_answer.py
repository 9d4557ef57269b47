"""`/init` answers once envd's own state is updated; the clock, identity files and RNG follow
right after the answer, or first thing in the next request if that comes sooner; a new host name
reaches `/etc/hosts` before the first request that may use it."""

from __future__ import annotations

import os
import pwd
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import httpx

from nestbox.envd.app import EnvdApp
from nestbox.envd.guest import GuestMachine
from nestbox.envd.lifecycle import finish_init
from nestbox.envd.settings import EnvdSettings
from nestbox.envd.state import MachineUpdate, Runtime
from tests.fakes.guest import FakeSyscalls

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


async def test_a_new_host_name_reaches_etc_hosts_before_the_first_use_only(
    tmp_path: Path,
) -> None:
    """An idle clone never writes its disk: `/init` sets the kernel's host name, `/etc/hosts`
    follows before the first request that may run a program or read files, and only then."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.1.1\tthe-template\n")

    class Machine(FakeSyscalls):
        def pin_in_hosts(self, name: str) -> None:
            super().pin_in_hosts(name)
            hosts.write_text(f"127.0.1.1\t{name}\n")

    rt = runtime(tmp_path / "run")
    fake = Machine()
    rt.machine = GuestMachine(in_vm=True, syscalls=fake)
    me = pwd.getpwuid(os.geteuid()).pw_name
    async with client(rt) as c:
        assert (await c.post("/init", json={"capsuleId": "cl-new"})).status_code == 204
        for path in ("/health", "/envs", "/logs", "/metrics"):
            assert (await c.get(path)).status_code == 200, path
        assert ("set_hostname", "cl-new") in fake.calls
        assert ("pin_in_hosts", "cl-new") not in fake.calls
        assert hosts.read_text() == "127.0.1.1\tthe-template\n"
        # The first use sees the new name: the file is written before the handler runs.
        r = await c.get("/files", params={"path": str(hosts), "username": me})
        assert r.text == "127.0.1.1\tcl-new\n"
        await c.get("/files", params={"path": str(hosts), "username": me})
    assert fake.calls.count(("pin_in_hosts", "cl-new")) == 1
    assert rt.hosts_pin is None


async def test_only_requests_that_may_start_a_program_keep_the_port_scanner_busy(
    tmp_path: Path,
) -> None:
    """A create's `/init`, health and metrics probes and refused requests leave the scanner
    idle (each new capsule scanned every second for a minute); a request that may start a
    program (here: reading a file) wakes it."""
    marks: list[str] = []
    rt = runtime(tmp_path)
    rt.ports = cast(Any, SimpleNamespace(activity=lambda: marks.append("active")))
    async with client(rt) as c:
        assert (await c.post("/init", json={"accessToken": "t0ken"})).status_code == 204
        for path in ("/health", "/metrics", "/envs"):
            await c.get(path, headers={"X-Access-Token": "t0ken"})
        assert (await c.get("/files", params={"path": "/etc/hostname"})).status_code == 401
        assert marks == []
        r = await c.get(
            "/files", params={"path": str(tmp_path)}, headers={"X-Access-Token": "t0ken"}
        )
        assert r.status_code == 400  # a directory: refused, but the request was the user's
    assert marks == ["active"]
