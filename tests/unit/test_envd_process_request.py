"""Start request -> ProcessSpec: user, environment, working directory, headers, exit statuses."""

from __future__ import annotations

import base64
import signal
from typing import TYPE_CHECKING, Any, cast

import pytest

from nestbox.envd.errors import InvalidArgument, UnknownUser
from nestbox.envd.process.request import (
    DEFAULT_KEEPALIVE_S,
    MIN_KEEPALIVE_S,
    build_spec,
    keepalive_interval,
    request_user,
)
from nestbox.envd.process.signals import describe_exit
from nestbox.envd.settings import EnvdSettings
from nestbox.envd.state import Runtime
from nestbox.envd.users import lookup_user
from nestbox.protocol.gen.process.process_pb import PTY, ProcessConfig, StartRequest

if TYPE_CHECKING:
    from pathlib import Path


def runtime() -> Runtime:
    settings = EnvdSettings()
    nothing = cast(Any, None)
    return Runtime(settings=settings, in_vm=False, processes=nothing, watchers=nothing,
                   tracker=nothing, ports=nothing)  # fmt: skip


def basic(user: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, DEFAULT_KEEPALIVE_S), ("50", 50.0), ("0.01", MIN_KEEPALIVE_S),
     ("-3", DEFAULT_KEEPALIVE_S), ("nan", DEFAULT_KEEPALIVE_S), ("x", DEFAULT_KEEPALIVE_S)],
)  # fmt: skip
def test_keepalive_interval(header: str | None, expected: float) -> None:
    headers = {} if header is None else {"keepalive-ping-interval": header}
    assert keepalive_interval(headers) == expected


async def test_request_user_from_basic_authorization_else_default() -> None:
    rt = runtime()
    assert (await request_user(basic("nobody"), rt)).name == "nobody"
    empty = {"authorization": "Basic " + base64.b64encode(b":").decode()}
    assert (await request_user(empty, rt)).name == "root"
    assert (await request_user({"authorization": "Bearer abc"}, rt)).name == "root"
    assert (await request_user({}, rt)).name == "root"
    with pytest.raises(InvalidArgument):
        await request_user({"authorization": "Basic !!!"}, rt)
    with pytest.raises(UnknownUser):
        await request_user(basic("no-such-user-x"), rt)


ROOT = lookup_user("root")


def test_env_layers_request_over_login_over_base() -> None:
    rt = runtime()
    rt.defaults.env = {"A": "base", "HOME": "/base-home", "KEEP": "1"}
    config = ProcessConfig(cmd="/bin/true", envs={"A": "request"})
    spec = build_spec(StartRequest(process=config), rt, ROOT)
    assert spec.env["A"] == "request"
    assert spec.env["KEEP"] == "1"
    assert spec.env["HOME"] == "/root"  # login env beats the base env
    assert spec.env["NESTBOX_CAPSULE_ID"] == ""
    assert spec.envs == {"A": "request"}
    assert spec.user.name == "root"


def test_spec_for_another_user() -> None:
    spec = build_spec(
        StartRequest(process=ProcessConfig(cmd="id")), runtime(), lookup_user("nobody")
    )
    assert spec.user.name == "nobody"
    assert spec.cwd == "/"  # nobody's home does not exist


def test_cwd_resolution(tmp_path: Path) -> None:
    rt = runtime()
    spec = build_spec(StartRequest(process=ProcessConfig(cmd="pwd", cwd="~")), rt, ROOT)
    assert spec.cwd == "/root"
    spec = build_spec(StartRequest(process=ProcessConfig(cmd="pwd", cwd=str(tmp_path))), rt, ROOT)
    assert spec.cwd == str(tmp_path)
    rt.defaults.workdir = str(tmp_path)
    assert build_spec(StartRequest(process=ProcessConfig(cmd="pwd")), rt, ROOT).cwd == str(tmp_path)
    missing = ProcessConfig(cmd="pwd", cwd=str(tmp_path / "missing"))
    with pytest.raises(InvalidArgument, match="not an existing directory"):
        build_spec(StartRequest(process=missing), rt, ROOT)


def test_pty_sets_term_and_size() -> None:
    request = StartRequest(
        process=ProcessConfig(cmd="sh"), pty=PTY(size=PTY.Size(cols=90, rows=30))
    )
    spec = build_spec(request, runtime(), ROOT)
    assert spec.pty is not None
    assert (spec.pty.cols, spec.pty.rows) == (90, 30)
    assert spec.env["TERM"] == "xterm-256color"
    zero = StartRequest(process=ProcessConfig(cmd="sh"), pty=PTY(size=PTY.Size(cols=0, rows=3)))
    with pytest.raises(InvalidArgument):
        build_spec(zero, runtime(), ROOT)


@pytest.mark.parametrize(
    "config",
    [ProcessConfig(cmd=""), ProcessConfig(cmd="a\x00b"), ProcessConfig(cmd="x", args=["\x00"]),
     ProcessConfig(cmd="x", envs={"A=B": "1"}), ProcessConfig(cmd="x", envs={"A": "\x00"})],
)  # fmt: skip
def test_invalid_requests(config: ProcessConfig) -> None:
    with pytest.raises(InvalidArgument):
        build_spec(StartRequest(process=config), runtime(), ROOT)


def test_tag_and_stdin_flags() -> None:
    rt = runtime()
    plain = build_spec(StartRequest(process=ProcessConfig(cmd="x")), rt, ROOT)
    assert (plain.tag, plain.stdin) == (None, False)
    tagged = build_spec(StartRequest(process=ProcessConfig(cmd="x"), tag="t", stdin=True), rt, ROOT)
    assert (tagged.tag, tagged.stdin) == ("t", True)


def test_describe_exit_words_like_go() -> None:
    assert describe_exit(0).status == "exit status 0"
    end = describe_exit(3)
    assert (end.exit_code, end.exited, end.status) == (3, True, "exit status 3")
    killed = describe_exit(-signal.SIGKILL)
    assert (killed.exit_code, killed.exited, killed.status) == (-1, False, "signal: killed")
    assert describe_exit(-signal.SIGTERM).status == "signal: terminated"
