"""Start the real envd as a local process (outside a VM) for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import PYTHON, ROOT, free_port


@dataclass
class EnvdProcess:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def run_envd(
    tmp: Path, *extra: str, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[EnvdProcess]:
    """Run `python -m nestbox.envd --outside-vm` on a free port (or `port`) until the block ends."""
    port = port or free_port()
    log = tmp / f"envd-{port}.log"
    run_dir = tmp / f"run-{port}"
    full_env = {**os.environ, "NESTBOX_ENVD_RUN_DIR": str(run_dir), **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PYTHON, "-m", "nestbox.envd", "--port", str(port), "--outside-vm", *extra],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield EnvdProcess(url=url, port=port, proc=proc, log=log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envd exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"envd did not become healthy:\n{log.read_text()}")
