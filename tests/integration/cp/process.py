"""`nestbox-cp` as a real process, for the tests that need one (first start, `admin reset-key`,
`make run`'s recovery)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import PYTHON

START_TIMEOUT_S = 60.0


def cp_env(data_dir: Path, db: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NESTBOX_")}
    env.update(
        NESTBOX_DIR=str(data_dir),
        # A plain postgresql:// URL, as an operator writes it; the CP picks the async driver.
        NESTBOX_DATABASE_URL=db.replace("postgresql+asyncpg://", "postgresql://"),
        NESTBOX_CP_LISTEN=f"127.0.0.1:{port}",
        NESTBOX_CP_JWT_SECRET="",
    )
    env.pop("NESTBOX_CP_JWT_SECRET")
    return env


@contextlib.contextmanager
def control_plane(env: dict[str, str]) -> Iterator[list[str]]:
    """Run `nestbox-cp` until the block ends; the list gets its output once it has stopped."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "nestbox.controlplane"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    try:
        url = "http://" + env["NESTBOX_CP_LISTEN"]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "nestbox-cp did not answer in time"
            time.sleep(0.1)
        yield output
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc.stdout:
            with proc.stdout:
                output.append(proc.stdout.read())
