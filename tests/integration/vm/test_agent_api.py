"""The host agent as the control plane sees it: a real agent process, driven over its Connect
API with the generated client, against real QEMU capsules cloned from the session's `minimal`
template (see conftest.py: `agent`).

Capsule lifecycle, exec (one-shot and streamed), background processes, PTY, files (a 50 MiB
streamed round trip), pause/resume, templates, the idle reaper, errors with stable codes, and
authentication. Each test destroys what it made and checks that nothing is left.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING, Literal

import anyio
import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from nestbox.hostagent.envdconn import CHUNK
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.conftest import eventually
from tests.integration.vm.agent_process import agent_leftovers, reset_agent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from tests.integration.vm.agent_process import AgentProcess, Rpc

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _no_capsule_left(agent: AgentProcess) -> Iterator[None]:
    yield
    reset_agent(agent)


RUNNING, PAUSED = pb.CapsuleState.RUNNING, pb.CapsuleState.PAUSED


def by_tag(tag: str) -> Oneof[Literal["tag"], str]:
    return Oneof("tag", tag)


def by_pid(pid: int) -> Oneof[Literal["pid"], int]:
    return Oneof("pid", pid)


def error_code(err: ConnectError) -> str:
    """The stable machine code of an agent error (its `ErrorInfo` detail)."""
    [detail] = err.details
    info = detail.value(pb.ErrorInfo)
    assert isinstance(info, pb.ErrorInfo)
    return info.code


async def destroy_all(rpc: Rpc) -> None:
    for capsule_id in await rpc.capsules():
        await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=capsule_id))


def assert_clean(agent: AgentProcess) -> None:
    left = agent_leftovers(agent.settings)
    assert left == {k: [] for k in left}, left


async def test_create_exec_destroy(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        started = time.monotonic()
        capsule = await rpc.create(template="minimal", team_id="team-1", idle_timeout_sec=0)
        create_ms = (time.monotonic() - started) * 1000
        assert capsule.state == RUNNING
        assert capsule.capsule_id.startswith("cl-")
        assert len(capsule.capsule_id) == 28
        assert capsule.template_id == "minimal"
        assert capsule.team_id == "team-1"
        assert capsule.host_ip
        assert capsule.vcpus >= 1
        assert capsule.memory_mb >= 64
        assert capsule.metadata["envd_version"]
        cid = capsule.capsule_id
        started = time.monotonic()
        r = await rpc.exec(pb.ExecRequest(capsule_id=cid, cmd="uname", args=["-a"]))
        exec_ms = (time.monotonic() - started) * 1000
        assert r.exit_code == 0
        assert r.stdout.startswith(b"Linux ")
        ids = await rpc.out(cid, "echo $NESTBOX_CAPSULE_ID $NESTBOX_TEMPLATE_ID")
        assert ids.split() == [cid, "minimal"]
        print(f"create {create_ms:.0f} ms, exec {exec_ms:.0f} ms")
        await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=cid))
        assert cid not in await rpc.capsules()
        with pytest.raises(ConnectError) as err:
            await rpc.exec(pb.ExecRequest(capsule_id=cid, cmd="true"))
        assert err.value.code == Code.NOT_FOUND
        assert error_code(err.value) == "not_found"
    assert_clean(agent)


async def collect(stream: AsyncIterator[object]) -> list[pb.ProcessEvent]:
    events = []
    async for response in stream:
        event = getattr(response, "event", None)
        assert isinstance(event, pb.ProcessEvent)
        events.append(event)
    return events


def kinds(events: list[pb.ProcessEvent]) -> list[str]:
    return [e.event.field for e in events if e.event is not None]


def output(events: list[pb.ProcessEvent], kind: str) -> bytes:
    return b"".join(e.event.value for e in events if e.event is not None and e.event.field == kind)  # type: ignore[misc]


async def test_exec_stream_background_and_processes(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        cid = (await rpc.create()).capsule_id
        request = pb.ExecStreamRequest(
            capsule_id=cid, cmd="/bin/sh",
            args=["-c", "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.1; done; exit 7"],
            envs={"X": "1"}, cwd="/tmp",
        )  # fmt: skip
        events = await collect(rpc.exec_stream(request))
        assert kinds(events)[0] == "started"
        assert kinds(events)[-1] == "exited"
        assert output(events, "stdout") == b"out1\nout2\nout3\n"
        assert output(events, "stderr") == b"err1\nerr2\nerr3\n"
        assert events[-1].event is not None
        exited = events[-1].event.value
        assert isinstance(exited, pb.ProcessEvent.Exited)
        assert exited.exit_code == 7

        bg = await rpc.start_background(pb.StartBackgroundRequest(
            capsule_id=cid, cmd="/bin/sh", args=["-c", "while :; do echo tick; sleep 0.2; done"],
            tag="ticker",
        ))  # fmt: skip
        assert bg.pid > 0
        assert bg.tag == "ticker"
        listed = await rpc.list_processes(pb.ListProcessesRequest(capsule_id=cid))
        assert any(p.pid == bg.pid and p.tag == "ticker" for p in listed.processes)
        got = b""
        async for response in rpc.connect_process(
            pb.ConnectProcessRequest(capsule_id=cid, selector=by_tag("ticker"))
        ):
            if response.event.event.field == "stdout":
                got += response.event.event.value
                if got.count(b"tick") >= 2:
                    break
        await rpc.kill_process(pb.KillProcessRequest(
            capsule_id=cid, selector=by_pid(bg.pid), signal="SIGTERM"))  # fmt: skip
        missing = pb.KillProcessRequest(capsule_id=cid, selector=by_tag("nothing"))
        with pytest.raises(ConnectError) as err:
            await rpc.kill_process(missing)
        assert error_code(err.value) == "not_found"
        with pytest.raises(ConnectError) as err:
            await rpc.exec(pb.ExecRequest(capsule_id=cid, cmd="sleep", args=["30"], timeout_sec=1))
        assert err.value.code == Code.DEADLINE_EXCEEDED
        assert error_code(err.value) == "unavailable"
        await destroy_all(rpc)
    assert_clean(agent)


async def test_pty_attach_input_resize_reconnect(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        cid = (await rpc.create()).capsule_id
        stream = rpc.pty_attach(pb.PtyAttachRequest(capsule_id=cid, cmd="/bin/sh", cols=100,
                                                    rows=30, envs={"PS1": "$ "}))  # fmt: skip
        first = await anext(stream)
        started = first.event.event.value
        assert isinstance(started, pb.ProcessEvent.Started)
        assert started.tag.startswith("pty-")
        tag = started.tag
        await rpc.pty_send_input(pb.PtySendInputRequest(
            capsule_id=cid, tag=tag, data=b"stty size; echo hello-$((6*7))\n"))  # fmt: skip
        seen = b""
        with anyio.fail_after(20):
            async for response in stream:
                seen += response.event.event.value if response.event.event.field == "pty" else b""
                if b"hello-42" in seen and b"30 100" in seen:
                    break
        await stream.aclose()
        await rpc.pty_resize(pb.PtyResizeRequest(capsule_id=cid, tag=tag, cols=120, rows=40))
        again = rpc.pty_attach(pb.PtyAttachRequest(capsule_id=cid, tag=tag))  # reconnect
        assert (await anext(again)).event.event.field == "started"
        await rpc.pty_send_input(pb.PtySendInputRequest(capsule_id=cid, tag=tag,
                                                        data=b"stty size\n"))  # fmt: skip
        seen = b""
        with anyio.fail_after(20):
            async for response in again:
                seen += response.event.event.value if response.event.event.field == "pty" else b""
                if b"40 120" in seen:
                    break
        await rpc.pty_kill(pb.PtyKillRequest(capsule_id=cid, tag=tag))
        with anyio.fail_after(20):
            rest = await collect(again)
        assert kinds(rest)[-1] == "exited"
        await destroy_all(rpc)
    assert_clean(agent)


async def test_files_buffered_streamed_and_fs(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        cid = (await rpc.create()).capsule_id
        w = await rpc.write_file(pb.WriteFileRequest(capsule_id=cid, path="/root/small.txt",
                                                     content=b"hello"))  # fmt: skip
        assert w.path == "/root/small.txt"
        r = await rpc.read_file(pb.ReadFileRequest(capsule_id=cid, path="/root/small.txt"))
        assert r.content == b"hello"

        data = os.urandom(50 * 1024 * 1024)
        digest = hashlib.sha256(data).hexdigest()

        async def upload() -> AsyncIterator[pb.WriteFileStreamRequest]:
            meta = pb.WriteFileMeta(capsule_id=cid, path="/root/big.bin")
            yield pb.WriteFileStreamRequest(
                message=Oneof[Literal["meta"], pb.WriteFileMeta]("meta", meta)
            )
            for i in range(0, len(data), 1 << 20):
                yield pb.WriteFileStreamRequest(
                    message=Oneof[Literal["chunk"], bytes]("chunk", data[i : i + (1 << 20)])
                )

        started = time.monotonic()
        up = await rpc.write_file_stream(upload())
        up_s = time.monotonic() - started
        assert up.bytes_written == len(data)
        assert up.path == "/root/big.bin"
        assert (await rpc.out(cid, "sha256sum /root/big.bin")).split()[0] == digest
        started = time.monotonic()
        h, n = hashlib.sha256(), 0
        async for chunk in rpc.read_file_stream(
            pb.ReadFileStreamRequest(capsule_id=cid, path="/root/big.bin")
        ):
            assert len(chunk.chunk) <= CHUNK
            h.update(chunk.chunk)
            n += len(chunk.chunk)
        down_s = time.monotonic() - started
        assert (n, h.hexdigest()) == (len(data), digest)
        print(f"50 MiB streamed: up {up_s:.1f} s, down {down_s:.1f} s")

        made = await rpc.make_dir(pb.MakeDirRequest(capsule_id=cid, path="/root/d/e"))
        assert made.entry.type == "directory"
        with pytest.raises(ConnectError) as err:
            await rpc.make_dir(pb.MakeDirRequest(capsule_id=cid, path="/root/d/e"))
        assert error_code(err.value) == "conflict"
        moved = await rpc.move(pb.MoveRequest(capsule_id=cid, source="/root/small.txt",
                                              destination="/root/d/moved.txt"))  # fmt: skip
        assert moved.entry.path == "/root/d/moved.txt"
        st = await rpc.stat(pb.StatRequest(capsule_id=cid, path="/root/d/moved.txt"))
        assert (st.entry.size, st.entry.type, st.entry.owner) == (5, "file", "root")
        listing = await rpc.list_dir(pb.ListDirRequest(capsule_id=cid, path="/root/d", depth=1))
        assert sorted(e.name for e in listing.entries) == ["e", "moved.txt"]
        await rpc.remove_path(pb.RemovePathRequest(capsule_id=cid, path="/root/d"))
        with pytest.raises(ConnectError) as err:
            await rpc.stat(pb.StatRequest(capsule_id=cid, path="/root/d"))
        assert err.value.code == Code.NOT_FOUND
        assert error_code(err.value) == "not_found"
        await destroy_all(rpc)
    assert_clean(agent)


async def test_pause_resume_template_and_states(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        capsule = await rpc.create(default_env={"FROM_CREATE": "yes"})
        cid = capsule.capsule_id
        pid = (await rpc.start_background(pb.StartBackgroundRequest(
            capsule_id=cid, cmd="sleep", args=["1000"], tag="sleeper"))).pid  # fmt: skip
        await rpc.out(cid, "echo kept > /root/kept")
        started = time.monotonic()
        paused = await rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid))
        pause_ms = (time.monotonic() - started) * 1000
        assert paused.capsule.state == PAUSED
        assert paused.capsule.host_ip == ""
        for call in (rpc.exec(pb.ExecRequest(capsule_id=cid, cmd="true")),
                     rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid)),
                     rpc.ping_capsule(pb.PingCapsuleRequest(capsule_id=cid))):  # fmt: skip
            with pytest.raises(ConnectError) as err:
                await call
            assert err.value.code == Code.FAILED_PRECONDITION
            assert error_code(err.value) == "invalid_state"
        started = time.monotonic()
        resumed = await rpc.resume_capsule(pb.ResumeCapsuleRequest(
            capsule_id=cid, default_env={"FROM_RESUME": "1"}, idle_timeout_sec=600))  # fmt: skip
        resume_ms = (time.monotonic() - started) * 1000
        assert resumed.capsule.state == RUNNING
        assert resumed.capsule.idle_timeout_sec == 600
        started = time.monotonic()
        out = await rpc.out(cid, f"cat /root/kept; kill -0 {pid} && echo alive; "
                                 "echo $FROM_CREATE $FROM_RESUME")  # fmt: skip
        exec_after_ms = (time.monotonic() - started) * 1000
        assert out.split("\n")[:3] == ["kept", "alive", "yes 1"]
        print(f"pause {pause_ms:.0f} ms, resume {resume_ms:.0f} ms, "
              f"first exec after resume {exec_after_ms:.0f} ms")  # fmt: skip

        request = pb.CreateTemplateRequest(capsule_id=cid, template_id="agent-t1")
        made = await rpc.create_template(request)
        assert made.template.template_id == "agent-t1"
        assert made.capsule is not None
        assert made.capsule.state == PAUSED
        child = (await rpc.create(template="agent-t1")).capsule_id
        assert (await rpc.out(child, "cat /root/kept")).strip() == "kept"
        assert (await rpc.out(child, "echo $NESTBOX_TEMPLATE_ID")).strip() == "agent-t1"
        await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=cid))
        assert (await rpc.out(cid, "cat /root/kept")).strip() == "kept"
        await rpc.delete_template(pb.DeleteTemplateRequest(template_id="agent-t1"))
        with pytest.raises(ConnectError) as err:
            await rpc.create(template="agent-t1")
        assert error_code(err.value) == "not_found"
        with pytest.raises(ConnectError) as err:
            await rpc.create(capsule_id=cid)
        assert err.value.code == Code.ALREADY_EXISTS
        assert error_code(err.value) == "conflict"
        with pytest.raises(ConnectError) as err:
            await rpc.create(capsule_id="not-an-id")
        assert error_code(err.value) == "invalid_request"
        await destroy_all(rpc)
    assert_clean(agent)


IDLE_S = 5
"""The idle timeout of `kept` and `idle` below (the test agent's reaper runs every 0.5 s)."""


async def test_idle_capsule_is_auto_paused(agent: AgentProcess) -> None:
    """`idle` is auto-paused once its timeout has passed; `kept`, made before it with the same
    timeout, is pinged meanwhile: had pings not counted, the reaper would have paused it in
    the same sweep as `idle` or an earlier one, so the end of the wait closes the window."""
    async with agent.connect() as rpc:
        await rpc.list_capsules(pb.ListCapsulesRequest())  # drain earlier auto-pauses
        never = (await rpc.create(idle_timeout_sec=0)).capsule_id
        kept = (await rpc.create(idle_timeout_sec=IDLE_S)).capsule_id
        gaps = [time.monotonic()]  # the longest a ping could have left `kept` untouched

        stop = anyio.Event()  # ends the pings between calls: a cancel mid-call surfaces as
        # connectrpc's ConnectError(CANCELED), not as a cancellation the task group absorbs

        async def keep_alive() -> None:
            last = gaps.pop()
            while not stop.is_set():
                sent = time.monotonic()
                await rpc.ping_capsule(pb.PingCapsuleRequest(capsule_id=kept))
                gaps.append(time.monotonic() - last)
                last = sent
                with anyio.move_on_after(0.2):
                    await stop.wait()

        auto: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_alive)
            before = time.monotonic()  # `idle`'s last activity (its create) is after this
            idle = (await rpc.create(idle_timeout_sec=IDLE_S)).capsule_id
            with anyio.fail_after(60):
                while idle not in auto:
                    auto += (await rpc.list_capsules(pb.ListCapsulesRequest())).auto_paused_ids
                    await anyio.sleep(0.2)
            waited = time.monotonic() - before
            stop.set()
        assert waited >= IDLE_S, waited  # not before its timeout
        # The premise: `kept` was never left alone for its timeout (only a stalled machine
        # breaks it, and then the states below would say nothing about the reaper).
        assert max(gaps) < IDLE_S - 1, f"`kept` went {max(gaps):.1f} s without a ping"
        states = {c.capsule_id: c.state for c in (await rpc.list_capsules(
            pb.ListCapsulesRequest())).capsules}  # fmt: skip
        assert states == {idle: PAUSED, kept: RUNNING, never: RUNNING}
        assert auto == [idle]
        assert (await rpc.list_capsules(pb.ListCapsulesRequest())).auto_paused_ids == []
        print(f"auto-paused {waited:.1f} s after its create began (timeout {IDLE_S} s); "
              f"longest ping gap {max(gaps):.2f} s")  # fmt: skip
        await destroy_all(rpc)
    assert_clean(agent)


async def test_metrics_ping_and_agent_ping(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        cid = (await rpc.create()).capsule_id

        async def sampled() -> list[pb.MetricPoint]:  # the sampler's first point, ~1 s in
            request = pb.GetCapsuleMetricsRequest(capsule_id=cid)
            return list((await rpc.get_capsule_metrics(request)).points)

        points = await eventually(sampled, what="a metrics point")
        assert points[-1].mem_bytes > 10 << 20
        assert points[-1].disk_bytes > 0
        pong = await rpc.ping(pb.PingRequest())
        assert pong.agent_id == agent.settings.agent_id
        assert pong.capsules_running == 1
        assert pong.accel in ("kvm", "tcg")
        await destroy_all(rpc)
    assert_clean(agent)


async def test_every_rpc_needs_the_secret(agent: AgentProcess) -> None:
    url = f"{agent.url}/hostagent.v1.HostAgentService/Ping"
    async with httpx.AsyncClient(trust_env=False) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Agent-Token": "wrong"},
                        {"Authorization": agent.secret}, agent.proxy_headers(),
                        {"X-Agent-Token": agent.proxy_secret},
                        {"Authorization": f"Bearer {agent.proxy_secret}"}):  # fmt: skip
            r = await http.post(url, content=b"{}", headers={
                "Content-Type": "application/json", **headers})  # fmt: skip
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "unauthorized"
        for headers in ({"Authorization": f"Bearer {agent.secret}"},
                        {"X-Agent-Token": agent.secret}):  # fmt: skip
            r = await http.post(url, content=b"{}", headers={
                "Content-Type": "application/json", **headers})  # fmt: skip
            assert r.status_code == 200, r.text
        for headers in ({"Authorization": f"Bearer {agent.secret}"},
                        {"X-Agent-Token": agent.secret}):  # fmt: skip
            r = await http.get(f"{agent.url}/proxy/cl-x/80/", headers=headers)
            assert r.status_code == 401  # the proxy takes its own secret only
        r = await http.get(f"{agent.url}/proxy/cl-x/80/", headers=agent.proxy_headers())
        assert r.status_code == 404  # past the check: no such capsule
