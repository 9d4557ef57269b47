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

chunks: list[str] = []
sbx.commands.run("for i in 1 2 3; do echo line$i; sleep 0.2; done", on_stdout=chunks.append)
out["stream_chunks"] = chunks

base = os.environ["E2B_TEST_DIR"]
sbx.files.write(f"{base}/hello.txt", "written by e2b")
out["read"] = sbx.files.read(f"{base}/hello.txt")
out["list"] = sorted(e.name for e in sbx.files.list(base))

handle = sbx.commands.run("sleep 300", background=True)
# Let the login shell finish its profile before the kill: a root login shell on a developer
# machine may run tools (pyenv rehash) that leave a lock behind when killed half-way.
time.sleep(1)
listed = [p.pid for p in sbx.commands.list()]
out["bg_listed"] = handle.pid in listed
out["killed"] = sbx.commands.kill(handle.pid)
time.sleep(0.5)
out["bg_after_kill"] = handle.pid in [p.pid for p in sbx.commands.list()]
print(json.dumps(out))
