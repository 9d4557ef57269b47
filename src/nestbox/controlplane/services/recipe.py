"""Recipes and healthchecks of the template builder, parsed before any capsule starts (Wrenn's
`internal/recipe`, wrenn-surface §1.7), and the pieces of their semantics that need no guest:
`$VAR` expansion, Go durations, the variables never persisted into a template's environment,
and the fixed pre- and post-build phases.

A recipe is a list of lines, one instruction each; keywords in any case; blank lines and lines
starting with `#` are skipped. A line that does not parse is a `RecipeError` naming its line
number and text, so the build fails before a capsule is made for it.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

Phase = Literal["pre-build", "recipe", "post-build"]

RUN_TIMEOUT_S = 30.0
"""A recipe RUN's default timeout (Wrenn's)."""
STEP_TIMEOUT_S = 120.0
"""The bound of the builder's own commands (USER, WORKDIR, ENV, COPY, START): they take
milliseconds, but a TCG guest on a loaded host can take seconds for a `useradd`."""
PHASE_TIMEOUT_S = 600.0
"""A pre- or post-build RUN's (apt can take minutes)."""
MAX_TIMEOUT_S = 6 * 3600.0
USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,31}")
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RUNTIME_VARS = frozenset({
    "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "HOSTNAME", "TERM", "SHLVL", "_",
    "NESTBOX_CAPSULE_ID", "NESTBOX_TEMPLATE_ID", "WRENN_SANDBOX_ID", "WRENN_TEMPLATE_ID",
})  # fmt: skip
"""Set per process or per capsule: never part of a template's default environment."""
PRE_BUILD_USER = "user"
"""The guest image's non-root user (passwordless sudo): the pre-build phase switches to it."""


class Op(StrEnum):
    RUN = "RUN"
    START = "START"
    USER = "USER"
    COPY = "COPY"
    ENV = "ENV"
    WORKDIR = "WORKDIR"


class RecipeError(ValueError):
    """A line that does not parse (`line` is 1-based, within the recipe)."""

    def __init__(self, line: int, text: str, problem: str) -> None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        super().__init__(f"recipe line {line} ({shown!r}): {problem}")
        self.line, self.text, self.problem = line, text, problem


@dataclass(frozen=True, slots=True)
class Step:
    """One instruction. `arg` is the command (RUN, START), user (USER), path (WORKDIR) or
    value (ENV); `key` ENV's name; `sources`/`arg` COPY's sources and destination."""

    op: Op
    text: str
    phase: Phase
    arg: str
    key: str = ""
    sources: tuple[str, ...] = ()
    timeout_s: float = RUN_TIMEOUT_S
    as_root: bool = False
    """Run as root whatever the current user (the post-build clean-up)."""


@dataclass(frozen=True, slots=True)
class Healthcheck:
    cmd: str
    interval_s: float = 3.0
    timeout_s: float = 10.0
    start_period_s: float = 0.0
    retries: int = 0
    """0: until the build's healthcheck bound."""


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
          "h": 3600.0}  # fmt: skip
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """A Go duration (`300ms`, `1m30s`, `2h`; `0`), or plain seconds (`45`), in seconds.
    :raise ValueError:"""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            raise ValueError(f"{text!r} is not a duration (say 30s, 1m30s, 500ms)")
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise ValueError("empty duration")
    return total


def _flags(words: list[str], allowed: Sequence[str]) -> tuple[dict[str, str], int]:
    """Leading `--name=value` flags (names in `allowed`); the flags and where the rest starts.
    :raise ValueError:"""
    found: dict[str, str] = {}
    i = 0
    while i < len(words) and words[i].startswith("--"):
        name, eq, value = words[i][2:].partition("=")
        if name not in allowed:
            raise ValueError(f"unknown flag --{name} (known: "
                             f"{', '.join('--' + a for a in allowed)})")  # fmt: skip
        if not eq:
            if i + 1 >= len(words):
                raise ValueError(f"--{name} needs a value")
            i += 1
            value = words[i]
        found[name] = value
        i += 1
    return found, i


def _split_head(text: str) -> tuple[str, str]:
    """`KEYWORD rest` -> (KEYWORD upper-cased, rest stripped)."""
    head, _, rest = text.strip().partition(" ")
    if "\t" in head:
        head, _, more = head.partition("\t")
        rest = more + " " + rest
    return head.upper(), rest.strip()


def _timeout(value: str) -> float:
    seconds = parse_duration(value)
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"a timeout must be above 0 and at most {MAX_TIMEOUT_S / 3600:g}h")
    return seconds


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def clean_source(source: str) -> str:
    """A COPY source as a path inside the archive. :raise ValueError: absolute or escaping."""
    if not source or "\x00" in source:
        raise ValueError("an empty COPY source")
    if source.startswith("/"):
        raise ValueError(f"COPY source {source!r} is absolute (sources are paths in the archive)")
    cleaned = posixpath.normpath(source)
    if cleaned == ".." or cleaned.startswith("../"):
        raise ValueError(f"COPY source {source!r} leaves the archive")
    return cleaned


def parse_line(text: str, phase: Phase = "recipe", *, default_timeout_s: float = RUN_TIMEOUT_S
               ) -> Step:  # fmt: skip
    """One instruction. :raise ValueError: it does not parse (the message says why)."""
    if "\x00" in text:
        raise ValueError("a NUL byte")
    keyword, rest = _split_head(text)
    try:
        op = Op(keyword)
    except ValueError:
        raise ValueError(f"unknown instruction {keyword[:32]!r} (known: "
                         f"{', '.join(o.value for o in Op)})") from None  # fmt: skip
    if not rest:
        raise ValueError(f"{op} needs an argument")
    if op is Op.RUN:
        cmd, timeout = rest, default_timeout_s
        while cmd.startswith("--"):
            flag, _, cmd = cmd.partition(" ")
            name, eq, value = flag[2:].partition("=")
            if name != "timeout":
                raise ValueError(f"unknown flag --{name[:32]} (RUN takes --timeout=<duration>)")
            if not eq:
                value, _, cmd = cmd.lstrip().partition(" ")
            timeout, cmd = _timeout(value), cmd.lstrip()
        if not cmd.strip():
            raise ValueError("RUN needs a command")
        return Step(op, text, phase, cmd.strip(), timeout_s=timeout)
    if op is Op.START:
        return Step(op, text, phase, rest, timeout_s=STEP_TIMEOUT_S)
    if op is Op.USER:
        if USER_NAME.fullmatch(rest) is None:
            raise ValueError(f"{rest[:40]!r} is not a user name ([A-Za-z_][A-Za-z0-9_-]*, at "
                             "most 32)")  # fmt: skip
        return Step(op, text, phase, rest, timeout_s=STEP_TIMEOUT_S)
    if op is Op.ENV:
        key, eq, value = rest.partition("=")
        key = key.strip()
        if not eq or ENV_KEY.fullmatch(key) is None:
            raise ValueError("ENV takes KEY=VALUE (KEY: letters, digits, _)")
        return Step(op, text, phase, _unquote(value.strip()), key=key, timeout_s=STEP_TIMEOUT_S)
    if op is Op.WORKDIR:
        return Step(op, text, phase, _unquote(rest), timeout_s=STEP_TIMEOUT_S)
    try:
        words = shlex.split(rest)
    except ValueError as err:
        raise ValueError(f"COPY: {err}") from None
    if len(words) < 2:
        raise ValueError("COPY takes one or more sources and a destination")
    sources = tuple(clean_source(s) for s in words[:-1])
    return Step(op, text, phase, words[-1], sources=sources, timeout_s=STEP_TIMEOUT_S)


def parse_recipe(lines: Sequence[str], phase: Phase = "recipe") -> list[Step]:
    """Every instruction of `lines`. :raise RecipeError: the first line that does not parse."""
    steps = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            steps.append(parse_line(line, phase))
        except ValueError as err:
            raise RecipeError(number, line.strip(), str(err)) from None
    return steps


def parse_healthcheck(text: str) -> Healthcheck:
    """`[--interval=3s] [--timeout=10s] [--start-period=0] [--retries=0] cmd`.
    :raise ValueError:"""
    words = text.split()
    flags, start = _flags(words, ("interval", "timeout", "start-period", "retries"))
    cmd = " ".join(words[start:]) if start else text.strip()
    if not cmd:
        raise ValueError("the healthcheck needs a command")
    retries = flags.get("retries", "0")
    if not retries.isdigit() or int(retries) > 1000:
        raise ValueError("--retries must be a whole number (0: no limit)")
    interval = parse_duration(flags.get("interval", "3s"))
    if interval <= 0:
        raise ValueError("--interval must be above 0")
    return Healthcheck(
        cmd=cmd, interval_s=interval, timeout_s=_timeout(flags.get("timeout", "10s")),
        start_period_s=parse_duration(flags.get("start-period", "0")), retries=int(retries),
    )  # fmt: skip


def pre_build() -> list[Step]:
    """Wrenn's pre-build phase: package lists, then the non-root user and its home."""
    return [
        parse_line("RUN DEBIAN_FRONTEND=noninteractive apt-get update", "pre-build",
                   default_timeout_s=PHASE_TIMEOUT_S),
        parse_line(f"USER {PRE_BUILD_USER}", "pre-build"),
        parse_line(f"WORKDIR /home/{PRE_BUILD_USER}", "pre-build"),
    ]  # fmt: skip


def post_build() -> list[Step]:
    """Wrenn's post-build phase, as root: the package caches and the build's own files go."""
    lines = ["RUN DEBIAN_FRONTEND=noninteractive apt-get clean",
             "RUN DEBIAN_FRONTEND=noninteractive apt-get autoremove -y",
             "RUN rm -rf /var/lib/apt/lists/* /tmp/build-files /tmp/build-files.*"]  # fmt: skip
    return [
        replace(parse_line(line, "post-build", default_timeout_s=PHASE_TIMEOUT_S), as_root=True)
        for line in lines
    ]


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand(value: str, env: Mapping[str, str]) -> str:
    """`$VAR` and `${VAR}` from `env` (unknown: empty), `$$` -> `$`; anything else verbatim."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1) or match.group(2), "")

    return _VAR.sub(one, value)


def references(value: str) -> set[str]:
    """The variables `value` expands (`$$` is not one)."""
    return {m.group(1) or m.group(2) for m in _VAR.finditer(value) if m.group(0) != "$$"}


def persisted_env(env: Mapping[str, str]) -> dict[str, str]:
    """What a template keeps of the build's ENV: all but the runtime variables."""
    return {k: v for k, v in env.items() if k not in RUNTIME_VARS}
