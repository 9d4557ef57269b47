"""Process attach through the control plane (`WS /v1/capsules/{id}/processes/{pid or tag}/
stream`) to a real guest process: a background process started through the exec API waits
for a signal file; two sockets attach to it (one by pid, one by tag), the file is written
through the files API, and both see the output the process prints afterwards. Killing it
through the API ends both streams with its exit.

On both databases: the sockets re-check the caller's credentials against the database while
they are open.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.e2e.stack import wait_for

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

WITHIN_S = 60.0


def attach(stack: Stack, capsule: str, selector: str | int) -> ClientConnection:
    return connect(f"{stack.cp.ws_url}/v1/capsules/{capsule}/processes/{selector}/stream",
                   additional_headers=stack.cp.admin, open_timeout=WITHIN_S)  # fmt: skip


def frames_until(ws: ClientConnection, done: str) -> list[dict[str, Any]]:
    """Frames up to and including the first of type `done`."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + WITHIN_S
    while not frames or frames[-1]["type"] != done:
        message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        assert isinstance(message, str), message
        frames.append(json.loads(message))
        assert frames[-1]["type"] != "error", frames
    return frames


def stdout(frames: list[dict[str, Any]]) -> str:
    return "".join(f["data"] for f in frames if f["type"] == "stdout")


def test_attach_by_pid_and_tag_sees_later_output_then_kill(stack: Stack, capsule: str) -> None:
    word = secrets.token_hex(4)
    tag = f"e2e-attach-{word}"
    go = f"/tmp/go-{word}"
    script = (f"echo early-{word}; while [ ! -e {go} ]; do sleep 0.05; done; "
              f"echo later-$(cat {go}); exec sleep 600")  # fmt: skip
    started = stack.exec(capsule, script, background=True, tag=tag)
    pid = started["pid"]
    assert started["tag"] == tag

    with attach(stack, capsule, pid) as by_pid, attach(stack, capsule, tag) as by_tag:
        for ws in (by_pid, by_tag):
            first = frames_until(ws, "start")
            assert first[-1] == {"type": "start", "pid": pid}, first
        stack.write_file(capsule, go, f"{word}-after-attach\n".encode())
        for ws in (by_pid, by_tag):
            seen = frames_until(ws, "stdout")
            while f"later-{word}-after-attach\n" not in stdout(seen):
                seen += frames_until(ws, "stdout")
        r = stack.api.delete(f"/v1/capsules/{capsule}/processes/{pid}")
        assert r.status_code == 204, r.text
        for ws in (by_pid, by_tag):
            end = frames_until(ws, "exit")[-1]
            assert end["exit_code"] != 0, end  # SIGKILLed

    def listed() -> set[int]:
        return {p["pid"] for p in stack.api.get(f"/v1/capsules/{capsule}/processes").json()
                ["processes"]}  # fmt: skip

    wait_for(f"pid {pid} gone from the process list", lambda: pid not in listed())
    r = stack.api.delete(f"/v1/capsules/{capsule}/processes/{pid}")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found"), r.text
