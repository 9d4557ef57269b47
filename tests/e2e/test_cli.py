"""The installed `nestbox` command, run as a subprocess against the real stack: login (the
config file it writes is then all the other commands use), capsule create/list/info/pause/
resume/rm with `--json` parsed, exec passing the exit code through, cp of a directory tree
both ways, ls, errors as one red line with exit 1, usage errors exit 2, and `nestbox shell`
through a real pseudo-terminal: it sees the terminal's size, follows a resize, gives Ctrl-C
to the capsule, and leaves the local terminal as it found it.

On SQLite only (the database plays no part); one capsule made by the CLI serves every check.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(600),
    pytest.mark.parametrize("stack", ["sqlite"], indirect=True),
]

NESTBOX = Path(sys.executable).parent / "nestbox"
WITHIN_S = 120.0


class Cli:
    """`nestbox` with a config home of its own and no NESTBOX_* variables."""

    def __init__(self, home: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NESTBOX_")}
        self.env.update({"XDG_CONFIG_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"})

    def __call__(self, *args: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(NESTBOX), *args], env=self.env, capture_output=True,
                              text=True, timeout=WITHIN_S)  # fmt: skip
        if code is not None:
            assert done.returncode == code, (args, done.returncode, done.stdout, done.stderr)
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def cli(stack, tmp_path: Path) -> Cli:
    run = Cli(tmp_path / "config")
    done = run("login", "--url", stack.cp.url, "--key", stack.cp.admin_key)
    assert "Logged in" in done.stdout
    config = tmp_path / "config" / "nestbox" / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stack.cp.admin_key in config.read_text()
    return run


def test_cli(cli: Cli, tmp_path: Path) -> None:
    made = cli.json("capsule", "create", "-m", "suite=cli")
    capsule = made["id"]
    try:
        assert (made["status"], made["metadata"]["suite"]) == ("running", "cli")
        assert capsule in [c["id"] for c in cli.json("capsule", "list")]
        assert capsule in cli("capsule", "list").stdout
        assert cli.json("capsule", "info", capsule)["id"] == capsule

        done = cli("exec", capsule, "--", "sh", "-c", "echo out; echo err >&2; exit 7", code=7)
        assert (done.stdout, done.stderr) == ("out\n", "err\n")
        assert cli("exec", capsule, "-e", "A=b", "--", "sh", "-c", "echo $A").stdout == "b\n"

        tree = tmp_path / "tree"
        (tree / "sub" / "deeper").mkdir(parents=True)
        (tree / "top.txt").write_text("top\n")
        (tree / "sub" / "deeper" / "bytes.bin").write_bytes(os.urandom(300_000))
        (tree / "empty").mkdir()
        cli("cp", str(tree), f"{capsule}:/root/")
        names = {e["name"]: e["type"] for e in cli.json("ls", capsule, "/root/tree")}
        assert names == {"top.txt": "file", "sub": "directory", "empty": "directory"}
        assert "top.txt" in cli("ls", f"{capsule}:/root/tree").stdout
        back = tmp_path / "back"
        cli("cp", f"{capsule}:/root/tree", str(back))
        assert _files(back) == _files(tree)
        assert (back / "empty").is_dir()
        one = tmp_path / "one.txt"
        cli("cp", f"{capsule}:/root/tree/top.txt", str(one))
        assert one.read_text() == "top\n"

        assert cli.json("capsule", "pause", capsule)[0]["status"] == "paused"
        assert cli.json("capsule", "resume", capsule)[0]["status"] == "running"
        assert [t["name"] for t in cli.json("template", "list") if t["name"] == "minimal"]

        _shell(capsule, cli.env)
    finally:
        cli("capsule", "rm", capsule)
    failed = cli("capsule", "info", capsule, code=1)
    assert failed.stdout == ""
    [line] = failed.stderr.splitlines()
    assert line.startswith("error: not_found: "), line
    assert cli("capsule", "info", code=2).returncode == 2


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ── the interactive terminal ──


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until(master: int, needle: bytes, seen: bytearray, within: float = WITHIN_S) -> None:
    deadline = time.monotonic() + within
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in {bytes(seen[-500:])!r}"
        ready, _, _ = select.select([master], [], [], min(left, 1.0))
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed
                data = b""
            assert data, f"the terminal closed before {needle!r}: {bytes(seen[-500:])!r}"
            seen += data


def _shell(capsule: str, env: dict[str, str]) -> None:
    master, slave = os.openpty()
    _set_size(slave, 30, 100)
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [str(NESTBOX), "shell", capsule], env={**env, "TERM": "xterm"},
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )  # fmt: skip
    seen = bytearray()
    try:
        _read_until(master, b"# ", seen)  # the capsule's root prompt
        os.write(master, b"stty size\n")
        _read_until(master, b"30 100", seen)
        assert termios.tcgetattr(slave)[3] & termios.ECHO == 0  # raw while it runs

        _set_size(master, 40, 120)  # the kernel sends SIGWINCH to the shell command
        deadline = time.monotonic() + WITHIN_S
        while b"40 120" not in seen:
            assert time.monotonic() < deadline, bytes(seen[-500:])
            os.write(master, b"stty size\n")
            try:
                _read_until(master, b"40 120", seen, within=2.0)
            except AssertionError:
                continue

        # Once "ready-42" is printed the job is in the foreground, so Ctrl-C goes to it.
        os.write(master, b"sh -c 'echo ready-$((40+2)); exec sleep 300'\n")
        _read_until(master, b"ready-42", seen)
        os.write(master, b"\x03")  # Ctrl-C: to the capsule's sleep, not to us
        os.write(master, b"echo after-$((40+2))\n")
        _read_until(master, b"after-42", seen)
        assert proc.poll() is None

        os.write(master, b"exit 3\n")
        assert proc.wait(WITHIN_S) == 3
        assert termios.tcgetattr(slave) == before  # the local terminal is as it was
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        os.close(master)
        os.close(slave)
