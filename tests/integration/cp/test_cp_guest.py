"""Into a capsule through the public API (fake agents; SQLite): exec in the
foreground (envs, cwd, base64 output) and background, processes, files (buffered with the
100 MiB limit, streamed without), and the WebSocket routes (exec stream, re-attach, PTY)."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import anyio
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.cluster import Cluster, cluster

MIB = 1024 * 1024


async def _capsule(c: Cluster) -> tuple[str, dict[str, str]]:
    _, key = await c.user("ann@example.com")
    return (await c.create(key))["id"], key


async def test_exec(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        cid, key = await _capsule(c)
        agent = c.hosts[0].agent
        run = {"cmd": "/bin/sh", "args": ["-c", "echo hello"], "background": False,
               "timeout_sec": 10}  # fmt: skip
        r = await c.client.post(f"/v1/capsules/{cid}/exec", json=run, headers=key)
        assert r.status_code == 200, r.text
        assert r.json() == {"sandbox_id": cid, "cmd": "/bin/sh", "stdout": "hello\n",
                            "stderr": "", "exit_code": 0, "duration_ms": 3,
                            "encoding": "utf-8"}  # fmt: skip
        assert agent.exec_requests[-1].timeout_sec == 10

        env = {"cmd": "/bin/sh", "args": ["-c", "printenv GREETING"], "envs": {"GREETING": "hi"},
               "cwd": "/tmp"}  # fmt: skip
        r = await c.client.post(f"/v1/capsules/{cid}/exec", json=env, headers=key)
        assert r.json()["stdout"] == "hi\n"
        assert agent.exec_requests[-1].cwd == "/tmp"  # foreground envs and cwd are honoured

        r = await c.client.post(f"/v1/capsules/{cid}/exec", headers=key,
                                json={"cmd": "/bin/sh", "args": ["-c", "exit 3"]})  # fmt: skip
        assert (r.json()["exit_code"], r.json()["stderr"]) == (3, "bye\n")

        r = await c.client.post(f"/v1/capsules/{cid}/exec", json={"cmd": "binary"}, headers=key)
        doc = r.json()
        assert doc["encoding"] == "base64"
        assert base64.b64decode(doc["stdout"]) == b"\xff\xfe\x00bin"

        r = await c.client.post(f"/v1/capsules/{cid}/exec", json={"cmd": ""}, headers=key)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_request"
        r = await c.client.post(f"/v1/capsules/{cid}/exec", json={"cmd": "x", "bogus": 1},
                                headers=key)  # fmt: skip
        assert r.status_code == 400


async def test_background_processes(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        cid, key = await _capsule(c)
        bg = {"cmd": "/bin/sh", "args": ["-c", "sleep 300"], "background": True, "tag": "sleeper"}
        r = await c.client.post(f"/v1/capsules/{cid}/exec", json=bg, headers=key)
        assert r.status_code == 202
        doc = r.json()
        assert doc["tag"] == "sleeper"
        assert doc["sandbox_id"] == cid
        assert doc["pid"] > 0
        r = await c.client.post(f"/v1/capsules/{cid}/exec", headers=key,
                                json={**bg, "tag": None})  # fmt: skip
        other = r.json()["pid"]
        assert r.json()["tag"].startswith("proc-")

        listed = (await c.client.get(f"/v1/capsules/{cid}/processes", headers=key)).json()
        assert {p["pid"] for p in listed["processes"]} == {doc["pid"], other}
        assert listed["processes"][0] == {"pid": doc["pid"], "tag": "sleeper", "cmd": "/bin/sh",
                                          "args": ["-c", "sleep 300"]}  # fmt: skip

        r = await c.client.delete(f"/v1/capsules/{cid}/processes/sleeper?signal=SIGTERM",
                                  headers=key)  # fmt: skip
        assert r.status_code == 204
        r = await c.client.delete(f"/v1/capsules/{cid}/processes/{other}", headers=key)
        assert r.status_code == 204
        r = await c.client.delete(f"/v1/capsules/{cid}/processes/{other}", headers=key)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        r = await c.client.delete(f"/v1/capsules/{cid}/processes/1?signal=SIGHUP", headers=key)
        assert r.status_code == 400
        listed = (await c.client.get(f"/v1/capsules/{cid}/processes", headers=key)).json()
        assert listed == {"processes": []}


async def test_files(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        cid, key = await _capsule(c)
        base = f"/v1/capsules/{cid}/files"
        # the SDK's files.write: httpx multipart, `path` field then `file` part
        r = await c.client.post(base + "/write", data={"path": "/root/a.txt"},
                                files={"file": ("upload", b"hello", "application/octet-stream")},
                                headers=key)  # fmt: skip
        assert r.status_code == 204, r.text
        r = await c.client.post(base + "/read", json={"path": "/root/a.txt"}, headers=key)
        assert r.status_code == 200
        assert r.content == b"hello"
        assert r.headers["content-type"] == "application/octet-stream"
        r = await c.client.post(base + "/read", json={"path": "/root/none"}, headers=key)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"

        r = await c.client.post(base + "/list", json={"path": "/root", "depth": 1}, headers=key)
        [entry] = r.json()["entries"]
        assert entry == {"name": "a.txt", "path": "/root/a.txt", "type": "file", "size": 5,
                         "mode": 0o644, "permissions": "-rw-r--r--", "owner": "root",
                         "group": "root", "modified_at": 1700000000,
                         "symlink_target": None}  # fmt: skip
        r = await c.client.post(base + "/mkdir", json={"path": "/root/d"}, headers=key)
        assert r.status_code == 200
        assert r.json()["entry"]["type"] == "directory"
        r = await c.client.post(base + "/mkdir", json={"path": "/root/d"}, headers=key)
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "conflict"
        r = await c.client.post(base + "/stat", json={"path": "/root/d"}, headers=key)
        assert r.json()["entry"]["name"] == "d"
        move = {"source": "/root/a.txt", "destination": "/root/b.txt"}
        r = await c.client.post(base + "/move", json=move, headers=key)
        assert r.json()["entry"]["path"] == "/root/b.txt"
        r = await c.client.post(base + "/remove", json={"path": "/root/d"}, headers=key)
        assert r.status_code == 204
        r = await c.client.post(base + "/remove", json={"path": "/root/d"}, headers=key)
        assert r.status_code == 404
        r = await c.client.post(base + "/write", data={"nopath": "x"},
                                files={"file": ("u", b"x")}, headers=key)  # fmt: skip
        assert r.status_code == 400


async def test_buffered_write_over_100_mib_is_413(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        cid, key = await _capsule(c)
        big = b"\0" * (101 * MIB)
        r = await c.client.post(f"/v1/capsules/{cid}/files/write", data={"path": "/root/big"},
                                files={"file": ("upload", big)}, headers=key)  # fmt: skip
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "too_large"
        assert "/root/big" not in c.hosts[0].agent.capsules[cid].files
        # exactly 100 MiB is fine
        exact = {"file": ("upload", big[: 100 * MIB])}
        r = await c.client.post(f"/v1/capsules/{cid}/files/write", data={"path": "/root/ok"},
                                files=exact, headers=key)  # fmt: skip
        assert r.status_code == 204, r.text


async def test_streamed_files(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        cid, key = await _capsule(c)
        boundary = "0123456789abcdef0123456789abcdef"
        total = 150 * MIB

        async def body() -> Any:  # the SDK's hand-built multipart, path first
            yield (f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n'
                   f'/root/huge\r\n--{boundary}\r\nContent-Disposition: form-data; name="file";'
                   f' filename="upload.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
                   ).encode()  # fmt: skip
            chunk = b"y" * MIB
            for _ in range(total // MIB):
                yield chunk
            yield f"\r\n--{boundary}--\r\n".encode()

        headers = {**key, "Content-Type": f"multipart/form-data; boundary={boundary}"}
        me = psutil.Process()
        base, peak = me.memory_info().rss, [0]

        async def sample() -> None:
            while True:
                peak[0] = max(peak[0], me.memory_info().rss)
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            r = await c.client.post(f"/v1/capsules/{cid}/files/stream/write", content=body(),
                                    headers=headers)  # fmt: skip
            tg.cancel_scope.cancel()
        assert r.status_code == 204, r.text
        # client, control plane and fake agent share this process: 150 MiB went through it
        assert peak[0] - base < 40 * MIB, "the streamed write must not buffer the file"
        files = c.hosts[0].agent.capsules[cid].files
        assert files["/root/huge.size"] == str(total).encode()
        assert files["/root/huge"][:4] == b"yyyy"

        got = 0
        async with c.client.stream("POST", f"/v1/capsules/{cid}/files/stream/read",
                                   json={"path": "/dev/big"}, headers=key) as r:  # fmt: skip
            assert r.status_code == 200
            async for chunk in r.aiter_bytes():
                got += len(chunk)
        assert got == 64 * 65536
        r = await c.client.post(f"/v1/capsules/{cid}/files/stream/read",
                                json={"path": "/nope"}, headers=key)  # fmt: skip
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"


async def _frames(ws: Any) -> list[Any]:
    """Every frame until the server closes (whatever its close code)."""
    out = []
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            out.append(json.loads(message) if isinstance(message, str) else message)
    return out


async def test_exec_stream_and_attach(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        cid, key = await _capsule(c)
        url = f"{c.ws_url}/v1/capsules/{cid}/exec/stream"
        async with connect(url, additional_headers=key) as ws:
            await ws.send(json.dumps({"type": "start", "cmd": "/bin/sh", "args": ["-c", "x"]}))
            frames = await _frames(ws)
        assert frames[0]["type"] == "start"
        assert frames[0]["pid"] > 0
        out = "".join(f["data"] for f in frames if f["type"] == "stdout")
        assert out == "line1\né\nline3\n"  # a character split across chunks stays whole
        assert {"type": "stderr", "data": "warn\n"} in frames
        assert frames[-1] == {"type": "exit", "exit_code": 3}

        bg = {"cmd": "sleep", "background": True, "tag": "t1"}
        await c.client.post(f"/v1/capsules/{cid}/exec", json=bg, headers=key)
        async with connect(f"{c.ws_url}/v1/capsules/{cid}/processes/t1/stream",
                           additional_headers=key) as ws:  # fmt: skip
            frames = await _frames(ws)
        assert [f["type"] for f in frames] == ["start", "stdout", "exit"]

        async with connect(f"{c.ws_url}/v1/capsules/{cid}/processes/nope/stream",
                           additional_headers=key) as ws:  # fmt: skip
            frames = await _frames(ws)
        assert frames[0]["type"] == "error"
        assert "no such process" in frames[0]["data"]


async def test_websocket_auth(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        cid, key = await _capsule(c)
        _, other = await c.user("bob@example.com")
        url = f"{c.ws_url}/v1/capsules/{cid}/exec/stream"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers=other):
                pass
        assert refused.value.response.status_code == 404
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers={"X-API-Key": "wrn_" + "1" * 32}):
                pass
        assert refused.value.response.status_code == 401

        # no header: the first message authenticates (an API key or a session token)
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "token": key["X-API-Key"]}))
            await ws.send(json.dumps({"type": "start", "cmd": "x"}))
            frames = await _frames(ws)
        assert frames[-1]["type"] == "exit"
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "token": "wrong"}))
            frames = await _frames(ws)
            assert ws.close_code == 4401
        assert frames[0]["type"] == "error"


async def test_pty(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        cid, key = await _capsule(c)
        url = f"{c.ws_url}/v1/capsules/{cid}/pty"
        async with connect(url, additional_headers=key) as ws:
            await ws.send(json.dumps({"type": "start", "cmd": "/bin/bash", "cols": 100,
                                      "rows": 30}))  # fmt: skip
            started = json.loads(await ws.recv())
            assert started["type"] == "started"
            assert started["tag"].startswith("pty-")
            await ws.send(b"ls\n")  # binary input, the SDK's way
            assert await ws.recv() == b"echo:ls\n"  # binary output
            payload = base64.b64encode(b"pwd\n").decode()
            await ws.send(json.dumps({"type": "input", "data": payload}))  # JSON input too
            assert await ws.recv() == b"echo:pwd\n"
            await ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            assert await ws.recv() == b"size:120x40"
            await ws.send(json.dumps({"type": "resize", "cols": 0, "rows": 40}))
            error = json.loads(await ws.recv())
            assert error["type"] == "error"
            assert error["fatal"] is False
            await ws.send(json.dumps({"type": "pong"}))
            tag = started["tag"]
        # the terminal outlived its socket: re-attach by tag, then kill it
        async with connect(url, additional_headers=key) as ws:
            await ws.send(json.dumps({"type": "connect", "tag": tag}))
            assert json.loads(await ws.recv())["tag"] == tag
            await ws.send(b"again\n")
            assert await ws.recv() == b"echo:again\n"
            await ws.send(json.dumps({"type": "kill"}))
            assert json.loads(await ws.recv()) == {"type": "exit", "exit_code": 137}
        async with connect(url, additional_headers=key) as ws:
            await ws.send(json.dumps({"type": "connect", "tag": "pty-none"}))
            frames = await _frames(ws)
        assert frames[0]["type"] == "error"
        assert frames[0]["fatal"] is True


async def test_paused_capsule_refuses_streams(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        cid, key = await _capsule(c)
        await c.client.post(f"/v1/capsules/{cid}/pause", headers=key)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{c.ws_url}/v1/capsules/{cid}/pty", additional_headers=key):
                pass
        assert refused.value.response.status_code == 409
        body = json.loads(refused.value.response.body or b"{}")
        assert body["error"]["code"] == "invalid_state"
