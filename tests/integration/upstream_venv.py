"""Upstream SDKs (E2B's `e2b`, Wrenn's `wrenn`) installed in venvs of their own.

They pin dependency versions that differ from ours (e2b wants connectrpc 0.12), so each lives in
`.cache/venv-<name>-<version>` under the repository (git-ignored), made once and reused.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

CACHE = ROOT / ".cache"


def upstream_venv(name: str, version: str, *, ignore_requires_python: bool = False) -> Path:
    """The python executable of a venv holding `name==version`, created on first use (under a
    lock: `make test` runs two pytest processes at once, and both may ask for it)."""
    venv = CACHE / f"venv-{name}-{version}"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if marker.exists():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".venv-{name}-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not marker.exists():
            _create(venv, python, name, version, ignore_requires_python)
    return python


def _create(venv: Path, python: Path, name: str, version: str,
            ignore_requires_python: bool) -> None:  # fmt: skip
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    cmd = [str(python), "-m", "pip", "install", "-q", f"{name}=={version}"]
    if ignore_requires_python:
        cmd.insert(4, "--ignore-requires-python")
    subprocess.run(cmd, check=True, timeout=600)
    (venv / ".complete").touch()


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())
