"""The SDK without a server: the generated blocking client is current and has the async one's
surface, errors map from the API's codes, retries happen only where safe, configuration comes
from arguments, then the environment, then the config file; SSE, recipes and paging parse."""

from __future__ import annotations

import inspect
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import nestbox.sdk as sdk
from nestbox.sdk import _codegen, _core, errors
from nestbox.sdk._async import client as async_client
from nestbox.sdk._sync import client as sync_client
from nestbox.sdk.config import read_config, resolve, write_config

ROOT = Path(__file__).resolve().parents[2]


def test_generated_client_is_current() -> None:
    assert sync_client.__file__ is not None
    assert Path(sync_client.__file__).read_text() == _codegen.unasync(
        _codegen.SOURCE.read_text()
    ), "run: python src/nestbox/sdk/_codegen.py"


def _public(cls: type) -> dict[str, inspect.Signature]:
    found = {}
    for name, member in inspect.getmembers(cls):
        dunders = ("__enter__", "__exit__", "__iter__", "__aenter__", "__aexit__", "__aiter__")
        if name.startswith("_") and name not in dunders:
            continue
        if callable(member) or isinstance(member, property):
            key = {"__aenter__": "__enter__", "__aexit__": "__exit__", "__aiter__": "__iter__",
                   "aclose": "close"}.get(name, name)  # fmt: skip
            found[key] = inspect.signature(member) if callable(member) else None
    return found


@pytest.mark.parametrize(
    "name",
    ["Nestbox", "Capsules", "Capsule", "Commands", "CommandHandle", "Pty", "PtySession", "Files",
     "Templates", "Builds", "Keys"],
)  # fmt: skip
def test_sync_and_async_have_the_same_surface(name: str) -> None:
    sync_cls, async_cls = getattr(sdk, name), getattr(sdk, "Async" + name)
    sync_members, async_members = _public(sync_cls), _public(async_cls)
    assert sync_members.keys() == async_members.keys()
    for member, signature in async_members.items():
        if signature is not None:
            assert list(signature.parameters) == list(sync_members[member].parameters), member
        assert not inspect.iscoroutinefunction(getattr(sync_cls, member, None)), member


def test_the_sdk_imports_without_the_server_programs() -> None:
    code = (
        "import sys, nestbox.sdk, nestbox.cli.app\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', "
        "'sqlalchemy', 'asyncpg', 'pyqwest') or m.startswith(('nestbox.controlplane', "
        "'nestbox.hostagent', 'nestbox.envd', 'nestbox.common'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_py_typed_ships() -> None:
    assert (Path(sdk.__file__).parent.parent / "py.typed").exists()


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (404, "not_found", errors.NotFound),
        (409, "invalid_state", errors.InvalidState),
        (409, "conflict", errors.Conflict),
        (429, "quota_exceeded", errors.QuotaExceeded),
        (401, "unauthorized", errors.Unauthorized),
        (400, "invalid_request", errors.InvalidRequest),
        (503, "host_unavailable", errors.Unavailable),
        (413, "too_large", errors.TooLarge),
        (418, "something_new", errors.NestboxError),
    ],
)
def test_errors_map_from_the_api_code(status: int, code: str, cls: type) -> None:
    body = json.dumps({"error": {"code": code, "message": "why"}}).encode()
    err = errors.from_answer(status, body, "3")
    assert type(err) is cls
    assert (err.code, err.message, err.status) == (code, "why", status)
    assert isinstance(errors.InvalidState("invalid_state", ""), errors.Conflict)
    if cls is errors.QuotaExceeded:
        assert isinstance(err, errors.QuotaExceeded)
        assert err.retry_after == 3.0


def test_an_answer_without_our_body_maps_by_status() -> None:
    err = errors.from_answer(404, b"<html>nope</html>")
    assert isinstance(err, errors.NotFound)
    assert "nope" in err.message


class Script:
    """A mock transport answering from a list; records each request's method."""

    def __init__(self, answers: list[Exception | int]) -> None:
        self.answers = list(answers)
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.method)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer >= 400:
            return httpx.Response(answer, json={"error": {"code": "unavailable", "message": "x"}},
                                  headers={"Retry-After": "0"})  # fmt: skip
        return httpx.Response(answer, json={"ok": True})


def client(script: Script) -> sdk.Nestbox:
    return sdk.Nestbox("http://api.test", "wrn_" + "0" * 32,
                       transport=httpx.MockTransport(script))  # fmt: skip


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_core, "backoff", lambda attempt, retry_after=None: 0.0)


def test_connect_errors_are_retried_for_any_method() -> None:
    script = Script([httpx.ConnectError("down"), httpx.ConnectError("down"), 204])
    client(script)._api.request("POST", "/v1/capsules/x/ping")
    assert script.seen == ["POST"] * 3


def test_broken_connections_and_503s_are_retried_only_when_idempotent() -> None:
    script = Script([httpx.ReadError("reset"), 503, 200])
    client(script)._api.request("GET", "/v1/capsules")
    assert script.seen == ["GET"] * 3

    script = Script([httpx.ReadError("reset")])
    with pytest.raises(errors.NestboxConnectionError):
        client(script)._api.request("POST", "/v1/capsules")
    assert script.seen == ["POST"]

    script = Script([503])
    with pytest.raises(errors.Unavailable):
        client(script)._api.request("POST", "/v1/capsules")
    assert script.seen == ["POST"]


def test_retries_stop_after_the_limit() -> None:
    script = Script([httpx.ConnectError("down")] * 4)
    with pytest.raises(errors.NestboxConnectionError):
        client(script)._api.request("GET", "/v1/capsules")
    assert len(script.seen) == 1 + _core.RETRIES


def test_a_timeout_is_not_retried() -> None:
    script = Script([httpx.ReadTimeout("slow"), 200])
    with pytest.raises(errors.NestboxTimeout):
        client(script)._api.request("GET", "/v1/capsules", request_timeout=1.0)
    assert script.seen == ["GET"]


def test_configuration_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("NESTBOX_API_URL", raising=False)
    monkeypatch.delenv("NESTBOX_API_KEY", raising=False)
    path = write_config({"api_url": "http://file:1", "api_key": 'k"ey\\1'})
    assert path == tmp_path / "nestbox" / "config.toml"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_config() == {"api_url": "http://file:1", "api_key": 'k"ey\\1'}
    assert resolve() == resolve(None, None)
    assert (resolve().api_url, resolve().api_key) == ("http://file:1", 'k"ey\\1')
    monkeypatch.setenv("NESTBOX_API_URL", "http://env:2/")
    monkeypatch.setenv("NESTBOX_API_KEY", "envkey")
    assert (resolve().api_url, resolve().api_key) == ("http://env:2", "envkey")
    assert resolve("http://arg:3", "argkey").api_key == "argkey"
    monkeypatch.delenv("NESTBOX_API_KEY")
    path.unlink()
    with pytest.raises(errors.Unauthorized):
        sdk.Nestbox()


def test_sse_parser() -> None:
    parser = _core.SseParser()
    lines = [": keepalive", "event: step_start", 'data: {"a":', "data: 1}", "", "", "data: x", ""]
    got = [m for line in lines if (m := parser.feed(line)) is not None]
    assert [(m.event, m.data) for m in got] == [("step_start", '{"a":\n1}'), ("message", "x")]


def test_recipe_file() -> None:
    recipe = _core.parse_recipe(
        "# comment\nFROM minimal\n\nRUN echo hi\nCOPY app /app\n"
        "HEALTHCHECK --interval=1s curl -sf localhost:8000\n"
    )
    assert recipe.steps == ["RUN echo hi", "COPY app /app"]
    assert (recipe.base_template, recipe.healthcheck) == (
        "minimal",
        "--interval=1s curl -sf localhost:8000",
    )
    config = _core.build_config("t1", recipe, None, {"vcpus": 2})
    assert config == {"name": "t1", "recipe": recipe.steps, "base_template": "minimal",
                      "healthcheck": recipe.healthcheck, "vcpus": 2}  # fmt: skip


def test_pages() -> None:
    def page(body: object, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.Response(200, json=body, headers=headers)

    assert _core.page_of(page([1, 2])) == ([1, 2], None)
    assert _core.page_of(page([1], {"X-Next-Cursor": "c2"})) == ([1], "c2")
    assert _core.page_of(page({"items": [3], "next_cursor": "c3"})) == ([3], "c3")


def test_list_walks_pages_and_filters() -> None:
    seen: list[dict[str, str]] = []
    view = {"status": "running", "template": "minimal", "vcpus": 1, "memory_mb": 512,
            "timeout_sec": 0, "disk_size_mb": 1, "created_at": "2026-01-01T00:00:00Z",
            "last_updated": "2026-01-01T00:00:00Z"}  # fmt: skip

    def answer(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append(params)
        if "cursor" not in params:
            return httpx.Response(200, json=[{**view, "id": "a"}, {**view, "id": "b"}],
                                  headers={"X-Next-Cursor": "next"})  # fmt: skip
        return httpx.Response(200, json=[{**view, "id": "b"}, {**view, "id": "c"}])

    nb = sdk.Nestbox("http://api.test", "k", transport=httpx.MockTransport(answer))
    ids = [c.id for c in nb.capsules.list(status="running", metadata={"k": "v"}, page_size=2)]
    assert ids == ["a", "b", "c"]
    assert seen[0] == {"status": "running", "metadata.k": "v", "limit": "2"}
    assert seen[1]["cursor"] == "next"


def test_command_argv() -> None:
    assert _core.command_argv("echo $HOME") == ("/bin/sh", ["-c", "echo $HOME"])
    assert _core.command_argv(["ls", "-l"]) == ("ls", ["-l"])
    body = _core.exec_body("x", envs={"A": "1"}, cwd="/tmp", user="user", timeout=5)
    assert body == {"cmd": "/bin/sh", "args": ["-c", "x"], "background": False, "timeout_sec": 5,
                    "envs": {"A": "1"}, "cwd": "/tmp", "user": "user"}  # fmt: skip


def test_async_client_is_the_source() -> None:
    assert "async def run" in Path(async_client.__file__).read_text()
