"""envd's `GET /logs` through the agent's envd client: a real envd process (outside-VM mode)
logs its processes into the ring, behind the access token, emptied for a new identity; and a
fake envd shows the client treats the guest's answer as hostile (size, bad JSON, bad bytes)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from nestbox.hostagent.envdconn import CapsuleEnvd, init_request
from nestbox.hostagent.envdconn.errors import Unauthorized, Unavailable
from nestbox.protocol.envd import LOG_ANSWER_BYTES, LOG_MESSAGE_CHARS
from tests.conftest import eventually, free_port
from tests.integration.asgi_server import LOOPBACK, serve
from tests.integration.envd_process import run_envd

if TYPE_CHECKING:
    from pathlib import Path

    from starlette.requests import Request


async def test_process_lines_behind_the_token_and_per_identity(tmp_path: Path) -> None:
    with run_envd(tmp_path) as own:
        async with CapsuleEnvd(own.url, access_token="tok") as envd:
            await envd.init(init_request(capsule_id="cl-a", template_id="t", access_token="tok"))
            done = await envd.exec("/bin/sh", ["-c", "exit 3"])
            assert done.exit_code == 3

            async def ended() -> list[Any]:
                lines = await envd.logs()
                return [e for e in lines if e.fields.get("pid") == str(done.pid)
                        and "ended" in e.message]  # fmt: skip

            [end] = await eventually(ended, within=10)
            assert end.level == "info"
            assert end.fields["exit_code"] == "3"
            assert end.fields["cmd"] == "/bin/sh"
            lines = await envd.logs()
            started = [e for e in lines if e.message == f"process {done.pid} (/bin/sh) started"]
            assert len(started) == 1
            assert lines.index(started[0]) < lines.index(end)  # oldest first
            assert await envd.logs(start_ms=end.ts_unix_ms + 60_000) == []
            assert len(await envd.logs(limit=1)) == 1

            # Another capsule now (a clone's /init): none of cl-a's lines.
            await envd.init(init_request(capsule_id="cl-b", template_id="t", access_token="tok"))
            assert not [e for e in await envd.logs() if "process" in e.message]
        async with CapsuleEnvd(own.url) as tokenless:
            with pytest.raises(Unauthorized):
                await tokenless.logs()


def _fake_envd(body: bytes) -> Starlette:
    async def logs(_request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/logs", logs)])


def _entry(message: str) -> dict[str, Any]:
    return {"timestampMs": 1, "level": "info", "message": message, "fields": {}}


async def test_a_hostile_answer_is_bounded_and_cleaned() -> None:
    hostile = json.dumps({"entries": [_entry("\x1b]0;pwned\x07" + "m" * 100_000)]}).encode()
    cases: list[tuple[bytes, type[Exception] | None]] = [
        (hostile, None),
        (b'{"entries": [' + b'{"timestampMs":1,"level":"info","message":"\xff\xfe"}' + b"]}",
         None),  # invalid UTF-8: replaced, not an error
        (b"[" * 100 + b"not json", Unavailable),
        (json.dumps({"entries": [_entry("x")] * 1001}).encode(), Unavailable),  # too many
        (b'{"entries":[{"timestampMs":1,"level":"fatal","message":""}]}', Unavailable),
        (b" " * (LOG_ANSWER_BYTES + 1), Unavailable),  # too large: not read further
    ]  # fmt: skip
    for body, error in cases:
        port = free_port()
        async with serve(_fake_envd(body), port), CapsuleEnvd(f"http://{LOOPBACK}:{port}") as c:
            if error is not None:
                with pytest.raises(error):
                    await c.logs()
                continue
            [entry] = await c.logs()
            assert len(entry.message) <= LOG_MESSAGE_CHARS
            assert "\x1b" not in entry.message
            assert "\x07" not in entry.message
            entry.message.encode()  # valid UTF-8
