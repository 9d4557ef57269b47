"""The `nestbox` command without a server: it is installed, prints its help and a completion
script, refuses bad usage with exit 2, and reports an unreachable API as one red line, exit 1;
`cp` tells the capsule side from the local one as docker does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nestbox.cli.copy import Spec, parse

NESTBOX = Path(sys.executable).parent / "nestbox"


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NESTBOX_")}
    env.update({"XDG_CONFIG_HOME": str(home), "NO_COLOR": "1"})
    return subprocess.run([str(NESTBOX), *args], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_help_and_completion(tmp_path: Path) -> None:
    done = run("--help", home=tmp_path)
    assert done.returncode == 0
    for command in ("capsule", "exec", "shell", "cp", "ls", "template", "events", "keys", "login"):
        assert command in done.stdout
    script = run("completion", "bash", home=tmp_path)
    assert script.returncode == 0
    assert "_NESTBOX_COMPLETE" in script.stdout


def test_usage_error_is_2_and_api_errors_are_1(tmp_path: Path) -> None:
    assert run("capsule", "info", home=tmp_path).returncode == 2
    assert run("no-such-command", home=tmp_path).returncode == 2
    no_key = run("capsule", "list", home=tmp_path)
    assert no_key.returncode == 1
    assert no_key.stderr.startswith("error: unauthorized: no API key")
    down = run("--api-url", "http://127.0.0.1:9", "--api-key", "k", "capsule", "list",
               home=tmp_path)  # fmt: skip
    assert down.returncode == 1
    [line] = down.stderr.splitlines()
    assert line.startswith("error: connection_error: cannot reach http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("cl-abc:/root/x", Spec("cl-abc", "/root/x")),
        ("cl-abc:", Spec("cl-abc", ".")),
        ("./a:b", Spec(None, "./a:b")),
        ("/tmp/x", Spec(None, "/tmp/x")),
        ("dir/file:1", Spec(None, "dir/file:1")),
    ],
)
def test_cp_sides(spec: str, parsed: Spec) -> None:
    assert parse(spec) == parsed
