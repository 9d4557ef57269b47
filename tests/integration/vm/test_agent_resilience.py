"""The host agent under stress and failure, over its real API with real QEMU capsules: the port
proxy (HTTP with a directory redirect, a WebSocket echo) in front of guest servers, zombie
connections across a pause, 20 pause/resume cycles, `kill -9` of the agent and of a VM, and
a guest trying to reach the host's ports.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import statistics
import threading
import time
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from connectrpc.errors import ConnectError
from websockets.asyncio.client import connect as ws_connect

from nestbox.hostagent.network import plan_slot
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.conftest import HANG_S
from tests.integration.vm.agent_process import HEADER_TIMEOUT_S, agent_leftovers, reset_agent
from tests.integration.vm.conftest import qemu_pids

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.integration.vm.agent_process import AgentProcess, Rpc

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _no_capsule_left(agent: AgentProcess) -> Iterator[None]:
    yield
    reset_agent(agent)


RUNNING, PAUSED, ERROR = (
    pb.CapsuleState.RUNNING,
    pb.CapsuleState.PAUSED,
    pb.CapsuleState.ERROR,
)

WS_ECHO = r"""
import base64, hashlib, socket, struct, sys, threading
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def exact(c, n):
    b = b""
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            raise EOFError
        b += d
    return b

def frame(op, payload):
    n = len(payload)
    head = bytes([0x80 | op])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload

def handle(c):
    data = b""
    while b"\r\n\r\n" not in data:
        d = c.recv(4096)
        if not d:
            return
        data += d
    lines = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
    key = [l.split(":", 1)[1].strip() for l in lines
           if l.lower().startswith("sec-websocket-key:")][0]
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + "\r\n\r\n").encode())
    try:
        while True:
            b1, b2 = exact(c, 2)
            op, n = b1 & 0x0F, b2 & 0x7F
            if n == 126:
                n = struct.unpack(">H", exact(c, 2))[0]
            elif n == 127:
                n = struct.unpack(">Q", exact(c, 8))[0]
            mask = exact(c, 4) if b2 & 0x80 else b"\0\0\0\0"
            payload = bytes(x ^ mask[i % 4] for i, x in enumerate(exact(c, n)))
            if op == 8:
                c.sendall(frame(8, payload[:2]))
                return
            if op == 9:
                c.sendall(frame(10, payload))
            elif op in (1, 2):
                c.sendall(frame(op, payload))
    except EOFError:
        pass
    finally:
        c.close()

srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""


async def destroy_all(rpc: Rpc) -> None:
    for capsule_id in await rpc.capsules():
        await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=capsule_id))


def assert_clean(agent: AgentProcess) -> None:
    left = agent_leftovers(agent.settings)
    assert left == {k: [] for k in left}, left


async def background(rpc: Rpc, cid: str, script: str, tag: str) -> int:
    request = pb.StartBackgroundRequest(capsule_id=cid, cmd="/bin/sh", args=["-c", script],
                                        tag=tag)  # fmt: skip
    started: pb.StartBackgroundResponse = await rpc.start_background(request)
    return started.pid


async def wait_http(http: httpx.AsyncClient, url: str, within: float = 60.0) -> httpx.Response:
    """GET `url` until it answers 200 (envd forwards a new guest port within about 1 s of its
    server listening; a Python server takes seconds to start in a TCG guest on a busy host)."""
    with anyio.fail_after(within):
        while True:
            r = await http.get(url)
            if r.status_code == 200:
                return r
            await anyio.sleep(0.2)


async def test_proxy_http_redirect_websocket_and_pause(agent: AgentProcess) -> None:
    async with agent.connect() as rpc, httpx.AsyncClient(
        trust_env=False, headers=agent.proxy_headers(), timeout=30
    ) as http:  # fmt: skip
        cid = (await rpc.create()).capsule_id
        await rpc.out(cid, "mkdir -p /srv/www/dir && echo hello-proxy > /srv/www/dir/file.txt")
        await background(rpc, cid, "exec python3 -m http.server 8000 --bind 127.0.0.1 "
                                   "--directory /srv/www", "web")  # fmt: skip
        base = f"{agent.url}/proxy/{cid}/8000"
        listing = await wait_http(http, f"{base}/")
        assert "dir/" in listing.text
        redirect = await http.get(f"{base}/dir")
        assert redirect.status_code == 301
        assert redirect.headers["location"] == f"/proxy/{cid}/8000/dir/"
        file = await http.get(f"{base}/dir/file.txt")
        assert file.text == "hello-proxy\n"

        await rpc.write_file(pb.WriteFileRequest(capsule_id=cid, path="/root/wsecho.py",
                                                 content=WS_ECHO.encode()))  # fmt: skip
        await background(rpc, cid, "exec python3 /root/wsecho.py 8765", "ws")
        ws_url = f"ws://127.0.0.1:{agent.port}/proxy/{cid}/8765/"
        with anyio.fail_after(60):
            while True:
                try:
                    ws = await ws_connect(ws_url, additional_headers=agent.proxy_headers())
                    break
                except (OSError, Exception) as err:  # 502 until socat forwards the port
                    if "401" in str(err):
                        raise
                    await anyio.sleep(0.3)
        async with ws:
            await ws.send("hello websocket")
            assert await ws.recv() == "hello websocket"
            await ws.send(b"\x00\x01binary" * 1000)
            assert await ws.recv() == b"\x00\x01binary" * 1000

        await rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid))
        paused = await http.get(f"{base}/dir/file.txt")
        assert paused.status_code == 503
        assert paused.json()["error"]["code"] == "unavailable"
        await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=cid))
        again = await wait_http(http, f"{base}/dir/file.txt")
        assert again.text == "hello-proxy\n"
        unknown = await http.get(f"{agent.url}/proxy/cl-{'0' * 25}/8000/")
        assert unknown.status_code == 404
        await destroy_all(rpc)
    assert_clean(agent)


async def test_zombie_connections_do_not_delay_exec_after_resume(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        capsule = await rpc.create()
        cid = capsule.capsule_id
        await background(rpc, cid, "exec sleep 100000", "sleeper")
        # A keep-alive connection straight to envd, left idle across the pause...
        raw = socket.create_connection((capsule.host_ip, 49983), timeout=5)
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: envd\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        # ...and a streaming exec through the agent, in flight during the pause.
        loop = "while :; do echo x; sleep 0.2; done"
        stream = rpc.exec_stream(
            pb.ExecStreamRequest(capsule_id=cid, cmd="/bin/sh", args=["-c", loop])
        )
        assert (await anext(stream)).event.event.field == "started"
        assert (await anext(stream)).event.event.field == "stdout"
        await rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid))
        with anyio.fail_after(HANG_S), pytest.raises(ConnectError) as cut:
            async for _ in stream:
                pass
        assert "paused" in cut.value.message
        await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=cid))
        started = time.monotonic()
        with anyio.fail_after(15):
            out = await rpc.out(cid, "echo after-resume")
        exec_ms = (time.monotonic() - started) * 1000
        assert out == "after-resume\n"
        with anyio.fail_after(15):
            request = pb.ExecStreamRequest(capsule_id=cid, cmd="echo", args=["streamed"])
            fields = [r.event.event.field async for r in rpc.exec_stream(request)]
        assert fields == ["started", "stdout", "exited"]
        raw.close()
        print(f"first exec after a resume with zombie connections: {exec_ms:.0f} ms")
        await destroy_all(rpc)
    assert_clean(agent)


async def test_twenty_pause_resume_cycles(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        cid = (await rpc.create()).capsule_id
        # The count is renamed into place: a reader never sees the file between its
        # truncation and its write (a slow guest can be stopped there for seconds).
        pid = await background(rpc, cid, "i=0; while :; do i=$((i+1)); echo $i > /root/count.new; "
                                          "mv /root/count.new /root/count; sleep 0.1; done",
                               "counter")  # fmt: skip
        pauses, resumes, execs, failures = [], [], [], []
        last = 0
        for cycle in range(20):
            try:
                t0 = time.monotonic()
                await rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=cid))
                t1 = time.monotonic()
                await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=cid))
                t2 = time.monotonic()
                out = await rpc.out(cid, f"kill -0 {pid} && cat /root/count")
                t3 = time.monotonic()
                count = int(out)
                assert count >= last, (count, last)
                last = count
                pauses.append(t1 - t0)
                resumes.append(t2 - t1)
                execs.append(t3 - t2)
            except Exception as err:
                failures.append(f"cycle {cycle}: {err!r}")
        assert failures == []

        def ms(xs: list[float]) -> str:
            return f"mean {statistics.mean(xs) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms"

        print(f"20 cycles, 0 failures; pause {ms(pauses)}; resume {ms(resumes)}; "
              f"exec after resume {ms(execs)}")  # fmt: skip
        await destroy_all(rpc)
    assert_clean(agent)


async def test_agent_sigkill_loses_no_capsule(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        kept = {}
        for n in range(2):
            cid = (await rpc.create()).capsule_id
            pid = await background(rpc, cid, "exec sleep 100000", f"bg{n}")
            await rpc.out(cid, f"echo file-{n} > /root/mine")
            kept[cid] = pid
        paused = (await rpc.create()).capsule_id
        await rpc.out(paused, "echo paused-file > /root/mine")
        await rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=paused))
        lost = (await rpc.create()).capsule_id
    agent.kill()
    [lost_pid] = qemu_pids(agent.settings.state_dir / "capsules" / lost)
    os.kill(lost_pid, signal.SIGKILL)  # dies while the agent is down
    agent.start()
    async with agent.connect() as rpc:
        listed = await rpc.capsules()
        assert {cid: c.state for cid, c in listed.items()} == {
            **dict.fromkeys(kept, RUNNING),
            paused: PAUSED,
            lost: ERROR,
        }
        assert "gone" in listed[lost].error
        for n, (cid, pid) in enumerate(kept.items()):
            out = await rpc.out(cid, f"kill -0 {pid} && echo alive; cat /root/mine")
            assert out.split() == ["alive", f"file-{n}"]
            procs = await rpc.list_processes(pb.ListProcessesRequest(capsule_id=cid))
            assert any(p.pid == pid and p.tag == f"bg{n}" for p in procs.processes)
        await rpc.pause_capsule(pb.PauseCapsuleRequest(capsule_id=next(iter(kept))))
        await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=next(iter(kept))))
        await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=paused))
        assert (await rpc.out(paused, "cat /root/mine")) == "paused-file\n"
        await destroy_all(rpc)
    assert_clean(agent)


async def test_sigterm_pauses_running_capsules_and_terminate(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        cid = (await rpc.create()).capsule_id
        await rpc.out(cid, "echo before-sigterm > /root/mine")
    assert agent.stop() == 0
    record = json.loads((agent.settings.state_dir / "capsules" / f"{cid}.json").read_text())
    assert record["state"] == "paused"
    assert qemu_pids(agent.settings.state_dir) == []
    agent.start()
    async with agent.connect() as rpc:
        assert (await rpc.capsules())[cid].state == PAUSED
        await rpc.resume_capsule(pb.ResumeCapsuleRequest(capsule_id=cid))
        assert await rpc.out(cid, "cat /root/mine") == "before-sigterm\n"
        terminated = await rpc.terminate(pb.TerminateRequest())
        assert (list(terminated.paused_ids), list(terminated.failed_ids)) == ([cid], [])
    assert agent.proc is not None
    assert agent.proc.wait(60) == 0
    agent.start()
    async with agent.connect() as rpc:
        assert (await rpc.capsules())[cid].state == PAUSED
        await destroy_all(rpc)
    assert_clean(agent)


async def test_request_head_timeout_and_keepalive(agent: AgentProcess) -> None:
    def response(sock: socket.socket) -> bytes:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: agent\r\n\r\n")
        data = b""
        while not data.endswith(b'"ok"}'):
            data += sock.recv(4096)
        return data

    def closed_at(sock: socket.socket) -> float:
        """`time.monotonic()` once the agent has closed `sock` (a hang fails the test)."""
        sock.settimeout(HEADER_TIMEOUT_S + 30)
        assert sock.recv(4096) == b""
        return time.monotonic()

    def still_open(sock: socket.socket) -> bool:
        sock.setblocking(False)
        try:
            return sock.recv(1) != b""
        except BlockingIOError:
            return True
        finally:
            sock.setblocking(True)

    def exchange() -> tuple[bytes, float, bool, bytes]:
        with socket.create_connection(("127.0.0.1", agent.port)) as kept:
            first = response(kept)  # answered: idle on a kept-alive connection from now on
            before = time.monotonic()  # the slow connection's head timer starts after this
            with socket.create_connection(("127.0.0.1", agent.port)) as slow:
                slow.sendall(b"GET /health HTTP/1.1\r\nHost: agent\r\n")  # never finished
                slow_s = closed_at(slow) - before
            # A head timer armed on `kept` (idle since before `slow` connected) would have
            # fired first: it must still be open, and still serve.
            return first, slow_s, still_open(kept), response(kept)

    first, slow_s, kept_open, second = await anyio.to_thread.run_sync(exchange)
    assert first.startswith(b"HTTP/1.1 200")
    # Closed by the head timeout: not before it; the upper bound only catches a much longer one.
    assert HEADER_TIMEOUT_S <= slow_s < HEADER_TIMEOUT_S + 10
    assert kept_open  # idle keep-alive: the keep-alive timeout (620 s) applies, not this one
    assert second.startswith(b"HTTP/1.1 200")


async def test_killed_vm_becomes_error_and_is_cleaned(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        cid = (await rpc.create()).capsule_id
        [pid] = qemu_pids(agent.settings.state_dir / "capsules" / cid)
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(30):
            while (await rpc.capsules())[cid].state != ERROR:  # noqa: ASYNC110 (polling the API)
                await anyio.sleep(0.2)
        capsule = (await rpc.capsules())[cid]
        assert "exited unexpectedly" in capsule.error
        with pytest.raises(ConnectError):
            await rpc.exec(pb.ExecRequest(capsule_id=cid, cmd="true"))
        left = agent_leftovers(agent.settings)
        assert left == {k: [] for k in left}, left  # resources gone while it is listed
        await rpc.destroy_capsule(pb.DestroyCapsuleRequest(capsule_id=cid))
        assert cid not in await rpc.capsules()
    assert_clean(agent)


@contextlib.contextmanager
def probe_listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP listener on every host address (so a guest could reach it through any of them
    if the firewall let it); yields its port and the peers that connected."""
    srv = socket.create_server(("0.0.0.0", 0))
    srv.settimeout(0.2)
    peers: list[str] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = srv.accept()
            except TimeoutError:
                continue
            peers.append(peer[0])
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1], peers
    finally:
        stop.set()
        thread.join()
        srv.close()


GUEST_PROBE = """
import socket, sys, threading
results = {}
def probe(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        results[(host, port)] = "connected"
    except OSError as err:
        results[(host, port)] = type(err).__name__
targets = [(h, int(p)) for h, p in (t.split(":") for t in sys.argv[1:])]
threads = [threading.Thread(target=probe, args=t) for t in targets]
[t.start() for t in threads]
[t.join() for t in threads]
for (h, p), r in sorted(results.items()):
    print(f"{h}:{p} {r}")
"""


async def test_guest_cannot_reach_the_host(agent: AgentProcess) -> None:
    with probe_listener() as (probe_port, peers):
        async with agent.connect() as rpc, httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(f"{agent.url}/health")).status_code == 200  # host: yes
            with socket.create_connection(("127.0.0.1", probe_port), timeout=3):
                pass  # the probe answers from the host
            capsule = await rpc.create()
            cid = capsule.capsule_id
            address = ipaddress.ip_address(capsule.host_ip)
            slot = int(address) - int(ipaddress.ip_network(agent.settings.slot_cidr)[0])
            plan = plan_slot(agent.settings, slot)
            await rpc.write_file(pb.WriteFileRequest(capsule_id=cid, path="/root/probe.py",
                                                     content=GUEST_PROBE.encode()))  # fmt: skip
            targets = [f"{host}:{port}" for host in (plan.veth_host_ip, "169.254.0.22")
                       for port in (agent.port, probe_port)] + ["127.0.0.1:49983"]  # fmt: skip
            out = await rpc.out(cid, "python3 /root/probe.py " + " ".join(targets))
        results = dict(line.split() for line in out.splitlines())
        assert results.pop("127.0.0.1:49983") == "connected"  # the probe itself works
        assert all(r != "connected" for r in results.values()), results
        assert len(results) == 4
        assert peers == ["127.0.0.1"], peers  # only the host's own check reached the probe
        print("guest -> host: " + ", ".join(f"{t} {r}" for t, r in sorted(results.items())))
        async with agent.connect() as rpc:
            await destroy_all(rpc)
    assert_clean(agent)
