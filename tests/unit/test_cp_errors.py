"""Every error code has a status, and the one handler answers `{"error": {"code", "message"}}`
(the `wrenn` SDK maps exceptions by code)."""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nestbox.controlplane import agent_client
from nestbox.controlplane.agent_client import map_error
from nestbox.controlplane.api.errors import EXCEPTION_HANDLERS
from nestbox.controlplane.errors import HostHasCapsules, InvalidState, NotFound
from nestbox.protocol.errors import HTTP_STATUS, ErrorCode
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

SDK_CODES = {"invalid_request", "unauthorized", "forbidden", "not_found", "invalid_state",
             "conflict", "host_has_capsules", "host_unavailable", "agent_error",
             "internal_error"}  # fmt: skip


def test_every_code_has_a_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert {c.value for c in ErrorCode} >= SDK_CODES


async def test_the_handler() -> None:
    async def missing(request: Request) -> Response:
        raise NotFound("capsule", "cl-1")

    async def busy(request: Request) -> Response:
        raise HostHasCapsules("host-1", ["cl-1", "cl-2"])

    async def state(request: Request) -> Response:
        raise InvalidState("capsule cl-1", "paused", ["running"])

    async def boom(request: Request) -> Response:
        raise RuntimeError("/secret/path leaked")

    app = Starlette(
        routes=[Route("/missing", missing), Route("/busy", busy), Route("/state", state),
                Route("/boom", boom)],
        exception_handlers=EXCEPTION_HANDLERS,
    )  # fmt: skip
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/missing")
        assert (r.status_code, r.json()) == (
            404, {"error": {"code": "not_found", "message": "capsule cl-1 does not exist"}}
        )  # fmt: skip
        r = await client.get("/busy")
        assert r.status_code == 409
        assert r.json()["capsule_ids"] == r.json()["sandbox_ids"] == ["cl-1", "cl-2"]
        r = await client.get("/state")
        assert (r.status_code, r.json()["error"]["code"]) == (409, "invalid_state")
        r = await client.get("/boom")
        assert r.status_code == 500
        assert r.json() == {"error": {"code": "internal_error", "message": "internal error"}}
        r = await client.get("/nowhere")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
        r = await client.post("/missing")
        assert r.status_code == 405
        assert r.json()["error"]["code"] == "invalid_request"


def test_agent_call_errors_keep_the_agents_code_and_log_only_real_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    detail = pb.ErrorInfo(code=ErrorCode.NOT_FOUND.value)
    found = ConnectError(Code.NOT_FOUND, "no such file", details=[detail])
    assert map_error(found, "host-1").code is ErrorCode.NOT_FOUND
    with caplog.at_level(logging.WARNING):
        # the control plane's own call cancelled (its client left): not the host's failure
        cancelled = map_error(ConnectError(Code.CANCELED, "Request was cancelled"), "host-1")
        assert caplog.records == []
        broken = map_error(ConnectError(Code.INTERNAL, "boom"), "host-1")
    assert (cancelled.code, broken.code) == (ErrorCode.AGENT_ERROR, ErrorCode.AGENT_ERROR)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    gone = map_error(ConnectError(Code.UNAVAILABLE, "refused"), "host-1")
    assert gone.code is ErrorCode.HOST_UNAVAILABLE


async def test_slow_agent_calls_are_logged_with_their_method(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(agent_client, "SLOW_CALL_S", 0.05)
    client = agent_client.AgentClient("host-1", "127.0.0.1:9", "token")

    async def pty_resize() -> str:
        await anyio.sleep(0.1)
        return "resized"

    async def ping() -> str:
        return "pong"

    with caplog.at_level(logging.INFO, logger="nestbox.controlplane.agent_client"):
        assert await client._unary(ping()) == "pong"
        assert await client._unary(pty_resize()) == "resized"
    await client.aclose()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "pty_resize took 0." in lines[0]
