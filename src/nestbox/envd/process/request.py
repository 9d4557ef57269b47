"""From a Start request and its headers to a validated `ProcessSpec`.

The user comes from `Authorization: Basic base64("user:")` (what E2B's SDK sends) or else the
runtime's default user. The environment is the runtime's base env, then the user's login
variables, then the request's `envs`. The working directory is the request's `cwd` (`~` allowed),
else the runtime's default workdir, else the user's home, else `/`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from nestbox.envd.errors import InvalidArgument, UnknownUser
from nestbox.envd.process.proc import ProcessSpec, PtySize
from nestbox.envd.users import User, basic_auth_user, resolve_path, user_named

if TYPE_CHECKING:
    from collections.abc import Mapping

    from nestbox.envd.state import Runtime
    from nestbox.protocol.gen.process.process_pb import ProcessConfig, StartRequest

KEEPALIVE_HEADER = "keepalive-ping-interval"
DEFAULT_KEEPALIVE_S = 30.0
MIN_KEEPALIVE_S = 1.0
PTY_TERM = "xterm-256color"


def keepalive_interval(headers: Mapping[str, str]) -> float:
    """Seconds between keepalive events: the `Keepalive-Ping-Interval` header, else 30."""
    raw = headers.get(KEEPALIVE_HEADER)
    try:
        value = float(raw) if raw else DEFAULT_KEEPALIVE_S
    except ValueError:
        value = DEFAULT_KEEPALIVE_S
    if not math.isfinite(value) or value <= 0:
        value = DEFAULT_KEEPALIVE_S
    return max(value, MIN_KEEPALIVE_S)


async def request_user(headers: Mapping[str, str], runtime: Runtime) -> User:
    """The user a Start acts as (see the module docstring); NSS only off the loop.

    :raise InvalidArgument: a malformed Basic credential.
    :raise UnknownUser, PermissionDenied: see `users.lookup_user`.
    """
    try:
        name = basic_auth_user(headers.get("authorization"))
    except UnknownUser as err:
        raise InvalidArgument(err.message) from None
    return await user_named(name or runtime.defaults.user)


def build_spec(request: StartRequest, runtime: Runtime, user: User) -> ProcessSpec:
    """Validate a Start request for `user`: a `stat` or two (the working directory), no NSS.

    :raise InvalidArgument: no command, NUL bytes, a bad env name or `cwd`, a zero PTY size.
    """
    config = request.process
    if config is None or not config.cmd:
        raise InvalidArgument("process.cmd is required")
    _check_strings(config)
    env = {**runtime.base_env(), **user.login_env(), **config.envs}
    size = None
    if request.pty is not None:
        dims = request.pty.size
        size = PtySize(cols=dims.cols, rows=dims.rows) if dims else PtySize(80, 24)
        if size.cols <= 0 or size.rows <= 0:
            raise InvalidArgument("PTY size must be at least 1x1")
        env.setdefault("TERM", PTY_TERM)
    return ProcessSpec(
        cmd=config.cmd,
        args=tuple(config.args),
        envs=dict(config.envs),
        env=env,
        cwd=resolve_cwd(config, user, runtime),
        user=user,
        tag=(request.tag or None) if request.has_field("tag") else None,
        stdin=bool(request.has_field("stdin") and request.stdin),
        pty=size,
    )


def _check_strings(config: ProcessConfig) -> None:
    texts = [config.cmd, *config.args, *config.envs.keys(), *config.envs.values()]
    if any("\x00" in text for text in texts):
        raise InvalidArgument("cmd, args and envs must not contain NUL bytes")
    if any(not key or "=" in key for key in config.envs):
        raise InvalidArgument("environment variable names must be non-empty and without '='")


def resolve_cwd(config: ProcessConfig, user: User, runtime: Runtime) -> str:
    """The working directory for a new process (see the module docstring).

    :raise InvalidArgument: the requested `cwd` is not an existing directory.
    """
    if config.has_field("cwd") and config.cwd:
        path = resolve_path(config.cwd, user)
        if not path.is_dir():
            raise InvalidArgument(f"cwd {config.cwd!r} is not an existing directory")
        return str(path)
    for candidate in (runtime.defaults.workdir, str(user.home)):
        if candidate:
            path = resolve_path(candidate, user)
            if path.is_dir():
                return str(path)
    return "/"
