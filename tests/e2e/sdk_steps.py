"""What the SDK scripts (`e2b_script.py`, `wrenn_script.py`, `wrenn_observe_script.py`)
share. They run in the SDKs' own venvs as `python <script>`, so the script's folder is on
`sys.path` and they import this by its bare name (`from sdk_steps import step, until`); stdlib
only, nothing of the project."""

import sys
import time

started = time.monotonic()


def step(name: str) -> None:
    """Progress on stderr (stdout's last line is the script's JSON), timed from the start."""
    print(f"[{time.monotonic() - started:6.1f}s] {name}", file=sys.stderr, flush=True)


def until(check, limit: float = 60.0):  # type: ignore[no-untyped-def]
    """Poll `check()` until it is truthy or `limit` seconds passed; its last value."""
    deadline = time.monotonic() + limit
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value
