"""Runs inside the wrenn venv (Wrenn's unmodified `wrenn` 0.3.0 SDK) against a real Nestbox
control plane, host agent and QEMU capsules (WRENN_BASE_URL, WRENN_API_KEY).

Prints one JSON document with what each call saw (last line of stdout); the test asserts on it.
Steps print progress to stderr, so a failure shows how far it got. Nothing waits on the clock:
what takes time is polled until it holds, with a generous deadline (`until`).
"""

import json
import os
import time

from sdk_steps import step, until  # beside this script
from wrenn import Capsule
from wrenn.exceptions import WrennConflictError, WrennNotFoundError

out: dict[str, object] = {}


def ticks(capsule) -> int:  # type: ignore[no-untyped-def]
    return int(capsule.commands.run("cat /root/ticks 2>/dev/null || echo 0").stdout.strip())


def pty_until(term, needle: bytes, limit: float = 30.0) -> bytes:  # type: ignore[no-untyped-def]
    seen = b""
    deadline = time.monotonic() + limit
    for event in term:
        if event.type == "output" and isinstance(event.data, bytes):
            seen += event.data
            if needle in seen:
                return seen
        if event.type in ("exit", "error") or time.monotonic() > deadline:
            break
    return seen


step("create")
capsule = Capsule(template="minimal", wait=True)
info = capsule.get_info()
out["created"] = {
    "status": str(info.status.value),
    "template": info.template,
    "aware": info.created_at is not None and info.created_at.tzinfo is not None,
}

step("commands.run")
res = capsule.commands.run("echo hello; echo oops >&2")
out["run"] = {"stdout": res.stdout, "stderr": res.stderr, "exit_code": res.exit_code}
out["exit7"] = capsule.commands.run("exit 7").exit_code
res = capsule.commands.run('echo "$GREETING from $(pwd)"', envs={"GREETING": "hi"}, cwd="/tmp")
out["envs_cwd"] = res.stdout

step("commands.stream")
events = list(capsule.commands.stream("for i in 1 2 3; do echo line$i; sleep 0.3; done"))
out["stream_types"] = [e.type for e in events]
out["stream_stdout"] = "".join(e.data for e in events if e.type == "stdout")  # type: ignore[attr-defined]
out["stream_exit"] = events[-1].exit_code if events and events[-1].type == "exit" else None  # type: ignore[attr-defined]

step("background + list + kill")
handle = capsule.commands.run("sleep 600", background=True, tag="sleeper")
listed = {p.pid: p.tag for p in capsule.commands.list()}  # started by the time run() answers
out["bg_listed"] = listed.get(handle.pid) == "sleeper"
capsule.commands.kill(handle.pid)
out["bg_after_kill"] = not until(lambda: handle.pid not in {p.pid for p in capsule.commands.list()})

step("files")
capsule.files.write("/root/hello.txt", "hi there")
out["read_text"] = capsule.files.read("/root/hello.txt")
blob = os.urandom(5 * 1024 * 1024)
capsule.files.write("/root/blob.bin", blob)
out["binary_roundtrip"] = capsule.files.read_bytes("/root/blob.bin") == blob
streamed = b"".join(capsule.files.download_stream("/root/blob.bin"))
out["download_stream"] = streamed == blob
capsule.files.upload_stream("/root/up.bin", iter([b"a" * 65536] * 16))
out["upload_stream_size"] = capsule.commands.run("stat -c %s /root/up.bin").stdout.strip()
entry = capsule.files.make_dir("/root/d/e")
out["make_dir"] = {"name": entry.name, "type": entry.type.value if entry.type else None}
out["make_dir_again"] = capsule.files.make_dir("/root/d/e").name
names = sorted(e.name for e in capsule.files.list("/root"))
out["list_root_has"] = [n for n in ("blob.bin", "d", "hello.txt") if n in names]
out["exists"] = [capsule.files.exists("/root/hello.txt"), capsule.files.exists("/root/nope")]
capsule.files.remove("/root/d")
out["exists_after_remove"] = capsule.files.exists("/root/d")
try:
    capsule.files.read("/root/nope")
    out["read_missing"] = "no error"
except WrennNotFoundError:
    out["read_missing"] = "not_found"

step("pty")
with capsule.pty(cmd="/bin/bash", cols=80, rows=24) as term:
    term.write(b"echo pty-$((6*7))\n")
    seen = pty_until(term, b"pty-42")
    out["pty_echo"] = b"pty-42" in seen
    out["pty_tag"] = bool(term.tag and term.tag.startswith("pty-"))
    term.resize(100, 40)
    term.write(b"stty size\n")
    out["pty_size"] = b"40 100" in pty_until(term, b"40 100")

step("pause + resume")
capsule.commands.run("echo persisted > /root/persist.txt")
survivor = capsule.commands.run("sleep 1000", background=True, tag="survivor")
paused = capsule.pause(wait=True)
out["paused_status"] = str(paused.status.value)
try:
    capsule.commands.run("true")
    out["exec_while_paused"] = "no error"
except WrennConflictError:
    out["exec_while_paused"] = "conflict"
resumed = capsule.resume(wait=True)
out["resumed_status"] = str(resumed.status.value)
out["file_survived"] = capsule.files.read("/root/persist.txt")
out["process_survived"] = survivor.pid in {p.pid for p in capsule.commands.list()}

step("get_info + list")
out["listed"] = capsule.capsule_id in {c.id for c in Capsule.list()}
out["info_status"] = str(Capsule.get_info(capsule.capsule_id).status.value)

step("snapshot")
capsule.commands.run(  # renamed into place: a read (or the snapshot) never sees it half-written
    "i=0; while true; do i=$((i+1)); echo $i > /root/ticks.new; mv /root/ticks.new /root/ticks;"
    " sleep 0.2; done",
    background=True,
    tag="ticker",
)
until(lambda: ticks(capsule) >= 2)  # the ticker runs when the snapshot is taken
template = capsule.create_snapshot(name="e2e-snap")
out["template"] = {"name": template.name, "type": template.type.value if template.type else None}
out["after_snapshot_status"] = str(capsule.get_info().status.value)
step("capsule from the snapshot")
clone = Capsule(template="e2e-snap", wait=True)
first = ticks(clone)
second = until(lambda: (n := ticks(clone)) > first and n)  # it goes on counting in the clone
out["clone_ticks"] = [first, second]
out["clone_ticker_listed"] = "ticker" in {p.tag for p in clone.commands.list()}
out["clone_has_file"] = clone.files.read("/root/persist.txt")

step("destroy")
clone.destroy()
capsule.destroy()
try:
    Capsule.get_info(capsule.capsule_id)
    out["after_destroy"] = "still there"
except WrennNotFoundError:
    out["after_destroy"] = "not_found"
out["listed_after_destroy"] = capsule.capsule_id in {c.id for c in Capsule.list()}
step("done")
print(json.dumps(out))
