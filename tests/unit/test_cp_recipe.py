"""Recipe and healthcheck parsing of the template builder (`services/recipe.py`): every
instruction, Wrenn's flags and durations, `$VAR` expansion, and lines that do not parse
(named by number and text)."""

from __future__ import annotations

import pytest

from nestbox.controlplane.services.recipe import (
    Op,
    RecipeError,
    expand,
    parse_duration,
    parse_healthcheck,
    parse_recipe,
    persisted_env,
    post_build,
    pre_build,
    references,
)


def test_every_instruction_parses() -> None:
    steps = parse_recipe([
        "RUN --timeout=2m pip install  x", "# a comment", "", "run echo hi",
        "START python3 -m http.server 8080", "USER app", 'COPY src "a b" /srv/',
        "ENV PATH=$PATH:/opt/bin", "ENV GREETING='hello world'", "WORKDIR /srv/app",
    ])  # fmt: skip
    assert [s.op for s in steps] == [Op.RUN, Op.RUN, Op.START, Op.USER, Op.COPY, Op.ENV,
                                     Op.ENV, Op.WORKDIR]  # fmt: skip
    run, plain, start, user, copy, env, quoted, workdir = steps
    assert (run.arg, run.timeout_s) == ("pip install  x", 120.0)
    assert (plain.arg, plain.timeout_s) == ("echo hi", 30.0)
    assert start.arg == "python3 -m http.server 8080"
    assert user.arg == "app"
    assert (copy.sources, copy.arg) == (("src", "a b"), "/srv/")
    assert (env.key, env.arg) == ("PATH", "$PATH:/opt/bin")
    assert (quoted.key, quoted.arg) == ("GREETING", "hello world")
    assert workdir.arg == "/srv/app"
    assert all(s.phase == "recipe" for s in steps)


@pytest.mark.parametrize(("line", "says"), [
    ("FROM debian", "unknown instruction 'FROM'"),
    ("RUN", "needs an argument"),
    ("RUN --timeout=forever x", "not a duration"),
    ("RUN --timeout=0s x", "above 0"),
    ("RUN --user=root x", "unknown flag --user"),
    ("USER ro ot", "not a user name"),
    ("USER 0day", "not a user name"),
    ("ENV NOVALUE", "KEY=VALUE"),
    ("ENV 1X=y", "KEY=VALUE"),
    ("COPY onlyone", "one or more sources"),
    ("COPY ../secret /x", "leaves the archive"),
    ("COPY a/../../x /x", "leaves the archive"),
    ("COPY /etc/passwd /x", "absolute"),
    ("COPY 'unterminated /x", "COPY"),
])  # fmt: skip
def test_bad_lines_name_their_line(line: str, says: str) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(["RUN true", "", line])
    assert caught.value.line == 3
    assert str(caught.value).startswith(f"recipe line 3 ({line.strip()!r})")
    assert says in str(caught.value)


def test_durations() -> None:
    assert parse_duration("1m30s") == 90
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2h") == 7200
    assert parse_duration("0") == 0
    assert parse_duration("45") == 45
    for bad in ("", "5x", "s", "1 m"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_healthcheck() -> None:
    hc = parse_healthcheck("--interval=1s --timeout=2s --start-period=5s --retries=3 curl -f x")
    assert (hc.cmd, hc.interval_s, hc.timeout_s, hc.start_period_s, hc.retries) == (
        "curl -f x",
        1.0,
        2.0,
        5.0,
        3,
    )
    plain = parse_healthcheck("test -f /ready")
    assert (plain.cmd, plain.interval_s, plain.timeout_s, plain.retries) == (
        "test -f /ready",
        3.0,
        10.0,
        0,
    )
    for bad in ("--interval=1s", "--retries=x true", "--bogus=1 true", "--interval=0s true"):
        with pytest.raises(ValueError, match=r"command|retries|flag|interval"):
            parse_healthcheck(bad)


def test_expansion() -> None:
    env = {"HOME": "/home/app", "V": "1"}
    assert expand("$HOME/bin:${V}x:$UNSET:$$:$", env) == "/home/app/bin:1x::$:$"
    assert expand("$(rm -rf /) `x`", env) == "$(rm -rf /) `x`"
    assert references("$A ${B}c $$ $") == {"A", "B"}


def test_runtime_variables_are_not_persisted() -> None:
    env = {"HOME": "/x", "PWD": "/", "NESTBOX_CAPSULE_ID": "cl-1", "APP": "1", "PATH": "/b"}
    assert persisted_env(env) == {"APP": "1", "PATH": "/b"}


def test_fixed_phases() -> None:
    pre, post = pre_build(), post_build()
    assert [s.op for s in pre] == [Op.RUN, Op.USER, Op.WORKDIR]
    assert pre[0].timeout_s == 600
    assert "apt-get update" in pre[0].arg
    assert (pre[1].arg, pre[2].arg) == ("user", "/home/user")
    assert all(s.op is Op.RUN and s.as_root and s.phase == "post-build" for s in post)
    assert any("/tmp/build-files" in s.arg for s in post)
