"""Runs inside the e2b venv (E2B's unmodified SDK, debug mode: envd at http://localhost:49983).

Prints one JSON document with what each call saw; the test asserts on it.
"""

import json
import os
import time

from e2b import Sandbox

os.environ["E2B_DEBUG"] = "true"
out: dict[str, object] = {}
sbx = Sandbox.create(debug=True)

res = sbx.commands.run("echo hello-from-e2b; echo oops >&2; exit 0")
out["run"] = {"stdout": res.stdout, "stderr": res.stderr, "exit_code": res.exit_code}

base = os.environ["E2B_TEST_DIR"]


def wait_for(condition, what):  # a deadline for a hang, never a fixed sleep
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


# Each line is printed only once the previous one has reached `on_stdout` (which drops an ack
# file): output must arrive as it is produced, or the command waits out its 30 s and says so.
chunks: list[str] = []


def on_stdout(chunk: str) -> None:
    chunks.append(chunk)
    open(f"{base}/.ack{len(chunks)}", "w").close()


stream = (
    "for i in 1 2 3; do echo line$i; n=0; "
    f"while [ ! -e {base}/.ack$i ] && [ $n -lt 1500 ]; do sleep 0.02; n=$((n+1)); done; done"
)
sbx.commands.run(stream, on_stdout=on_stdout)
out["stream_chunks"] = chunks
for i in (1, 2, 3):
    if os.path.exists(f"{base}/.ack{i}"):
        os.remove(f"{base}/.ack{i}")
sbx.files.write(f"{base}/hello.txt", "written by e2b")
out["read"] = sbx.files.read(f"{base}/hello.txt")
out["list"] = sorted(e.name for e in sbx.files.list(base))

handle = sbx.commands.run(f"touch {base}/.running; sleep 300", background=True)
# Let the login shell finish its profile before the kill: a root login shell on a developer
# machine may run tools (pyenv rehash) that leave a lock behind when killed half-way.
wait_for(lambda: os.path.exists(f"{base}/.running"), "the background command to run")
os.remove(f"{base}/.running")
listed = [p.pid for p in sbx.commands.list()]
out["bg_listed"] = handle.pid in listed
out["killed"] = sbx.commands.kill(handle.pid)
# envd lists the process until it has reaped it, just after the kill.
deadline = time.monotonic() + 10  # `sleep 300` would still be listed
while handle.pid in [p.pid for p in sbx.commands.list()] and time.monotonic() < deadline:
    time.sleep(0.05)
out["bg_after_kill"] = handle.pid in [p.pid for p in sbx.commands.list()]
print(json.dumps(out))
