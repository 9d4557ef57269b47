"""Runs inside the e2b venv (E2B's unmodified `e2b` 2.63.0 SDK) against a real Nestbox control
plane, host agent and QEMU capsule, configured only by E2B_API_URL, E2B_SANDBOX_URL and
E2B_API_KEY (plus E2B_TEST_OTHER_KEY: another team's key, passed explicitly where used).

Prints one JSON document with what each call saw (last line of stdout); the test asserts on it.
Steps print progress to stderr. Nothing waits on the clock: what takes time is polled.
"""

import json
import os
import uuid
from datetime import UTC, datetime

from e2b import CommandExitException, FilesystemEventType, PtySize, Sandbox, SandboxQuery
from e2b.api.client.api.sandboxes import get_sandboxes_sandbox_id_logs
from e2b.api.client_sync import get_api_client
from e2b.connection_config import ConnectionConfig
from e2b.exceptions import NotFoundException, SandboxException
from sdk_steps import step, until  # beside this script

OTHER = os.environ["E2B_TEST_OTHER_KEY"]
RUN = uuid.uuid4().hex
out: dict[str, object] = {}


def logs(**kw):  # type: ignore[no-untyped-def]
    """`GET /sandboxes/{id}/logs` through the SDK's own API client (it has no `Sandbox`
    method for it): the status and the structured entries."""
    api_key = kw.pop("api_key", None)
    config = ConnectionConfig(**({"api_key": api_key} if api_key else {}))
    res = get_sandboxes_sandbox_id_logs.sync_detailed(sid, client=get_api_client(config), **kw)
    entries = getattr(res.parsed, "log_entries", None) or []
    return res.status_code, entries


def exit3_line(entries) -> list:  # type: ignore[no-untyped-def]
    """envd's line for the process that exited with 3 (the `commands` step's)."""
    return [
        (e.level.value, e.fields.additional_properties.get("cmd"))
        for e in entries
        if "ended" in e.message and e.fields.additional_properties.get("exit_code") == "3"
    ]


def refused(call) -> str:  # type: ignore[no-untyped-def]
    """The exception class a call with the other team's key raised ("-" if none)."""
    try:
        result = call()
    except Exception as err:  # what the SDK raises is the point
        return type(err).__name__
    return f"returned {result!r}"


step("create")
# `minimal`: E2B's default `base` is our `base` template, built on its host's first use.
sbx = Sandbox.create("minimal", metadata={"suite": "e2b", "run": RUN},
                     envs={"GREETING": "hello"}, timeout=600)  # fmt: skip
sid = sbx.sandbox_id
print(json.dumps({"sandbox": sid}), flush=True)
info = sbx.get_info()
out["info"] = {"state": str(info.state.value), "metadata": info.metadata,
               "ends_later": info.end_at > datetime.now(UTC)}  # fmt: skip
out["running"] = sbx.is_running()

step("commands")
# One command for the create's envs, the call's envs and cwd, stderr and the exit code.
try:
    sbx.commands.run("echo $GREETING-$A-$(pwd); echo bad >&2; exit 3", envs={"A": "x"},
                     cwd="/tmp")  # fmt: skip
    out["exit3"] = None
except CommandExitException as err:
    out["exit3"] = {"code": err.exit_code, "stdout": err.stdout, "stderr": err.stderr}

# Each line is printed only once the previous one reached `on_stdout`, which writes an ack
# file through the gateway while the stream is open: output must flow as it is produced.
chunks: list[str] = []


def on_stdout(chunk: str) -> None:
    chunks.append(chunk)
    sbx.files.write(f"/tmp/.ack{len(chunks)}", "x")


sbx.commands.run(
    "for i in 1 2 3; do echo line$i; n=0; "
    "while [ ! -e /tmp/.ack$i ] && [ $n -lt 1500 ]; do sleep 0.02; n=$((n+1)); done; done",
    on_stdout=on_stdout,
)
out["stream_chunks"] = chunks

bg = sbx.commands.run("sleep 300", background=True)
out["bg_listed"] = bg.pid in [p.pid for p in sbx.commands.list()]
out["bg_killed"] = bg.kill()
out["bg_gone"] = bool(until(lambda: bg.pid not in [p.pid for p in sbx.commands.list()], 10))

step("files")
sbx.files.write("/tmp/e2b/hello.txt", "hi there")
out["read_text"] = sbx.files.read("/tmp/e2b/hello.txt")
blob = bytes(range(256)) * 64
sbx.files.write("/tmp/e2b/blob.bin", blob)
out["bytes_roundtrip"] = bytes(sbx.files.read("/tmp/e2b/blob.bin", format="bytes")) == blob
out["make_dir"] = sbx.files.make_dir("/tmp/e2b/d")
out["make_dir_again"] = sbx.files.make_dir("/tmp/e2b/d")
out["list"] = sorted(e.name for e in sbx.files.list("/tmp/e2b"))
out["exists"] = [sbx.files.exists("/tmp/e2b/hello.txt"), sbx.files.exists("/tmp/e2b/nope")]
sbx.files.rename("/tmp/e2b/hello.txt", "/tmp/e2b/renamed.txt")
out["renamed"] = [sbx.files.exists("/tmp/e2b/hello.txt"), sbx.files.read("/tmp/e2b/renamed.txt")]
sbx.files.remove("/tmp/e2b/blob.bin")
out["removed"] = sbx.files.exists("/tmp/e2b/blob.bin")
try:
    sbx.files.read("/tmp/e2b/missing.txt")
    out["read_missing"] = None
except NotFoundException:
    out["read_missing"] = "NotFound"
watch = sbx.files.watch_dir("/tmp/e2b/d")
sbx.files.write("/tmp/e2b/d/new.txt", "w")
seen: list[str] = []


def watched() -> bool:
    seen.extend(f"{e.type.name}:{e.name}" for e in watch.get_new_events())
    return f"{FilesystemEventType.CREATE.name}:new.txt" in seen


out["watch"] = bool(until(watched, 30))
watch.stop()

step("pty")
pty_out = bytearray()
term = sbx.pty.create(PtySize(rows=24, cols=80))
sbx.pty.send_stdin(term.pid, b"stty size; echo pty-$((6*7))\n")


for _stdout, _stderr, data in term:
    if data is not None:
        pty_out.extend(data)
    if b"pty-42" in pty_out:
        break
out["pty_echo"] = b"pty-42" in pty_out and b"24 80" in pty_out
sbx.pty.resize(term.pid, PtySize(rows=40, cols=100))
sbx.pty.send_stdin(term.pid, b"stty size\n")
for _stdout, _stderr, data in term:
    if data is not None:
        pty_out.extend(data)
    if b"40 100" in pty_out:
        break
out["pty_resized"] = b"40 100" in pty_out
out["pty_killed"] = sbx.pty.kill(term.pid)

step("logs")
status, entries = logs()
out["logs_status"] = status
out["logs_exit3"] = exit3_line(entries)
out["logs_bounded"] = 0 < len(entries) <= 1000
newest = max(e.timestamp for e in entries)
status, page = logs(start=int(newest.timestamp() * 1000), limit=1)
out["logs_page"] = (status, len(page))

step("set_timeout")
before = sbx.get_info().end_at
sbx.set_timeout(3600)
after = sbx.get_info().end_at
out["timeout_moved"] = (after - before).total_seconds() > 1800

step("list")
listed = Sandbox.list(query=SandboxQuery(metadata={"run": RUN})).next_items()
out["listed"] = [s.sandbox_id for s in listed] == [sid]
out["listed_other_run"] = Sandbox.list(query=SandboxQuery(metadata={"run": "x"})).next_items()

step("another team")
other = {"api_key": OTHER}
out["other"] = {
    "get_info": refused(lambda: Sandbox.get_info(sid, **other)),
    "connect": refused(lambda: Sandbox.connect(sid, **other)),
    "set_timeout": refused(lambda: Sandbox.set_timeout(sid, 5, **other)),
    "pause": refused(lambda: Sandbox.pause(sid, **other)),
    "metrics": refused(lambda: Sandbox.get_metrics(sid, **other)),
    "kill": refused(lambda: Sandbox.kill(sid, **other)),
    "list": [s.sandbox_id for s in Sandbox.list(**other).next_items()],
    "logs": logs(**other)[0],
    "snapshot": refused(lambda: Sandbox.create_snapshot(sid, **other)),
}

step("pause")
sbx.files.write("/root/kept.txt", "persisted\n")
keeper = sbx.commands.run("sleep 1000", background=True)
out["paused"] = sbx.pause()
out["paused_state"] = str(Sandbox.get_info(sid).state.value)
out["pause_again"] = refused(lambda: Sandbox.pause(sid))
out["running_while_paused"] = sbx.is_running()

# A snapshot of the paused sandbox (no second pause: the time budget); the running case
# (resumed after its snapshot, same end) is tests/integration/cp/test_cp_e2b.py's.
step("snapshot")
snap = sbx.create_snapshot(name=f"e2b-{RUN[:8]}")
print(json.dumps({"snapshot": snap.snapshot_id}), flush=True)
out["snapshot"] = [snap.snapshot_id == f"e2b-{RUN[:8]}:default", snap.names]
out["source_stays_paused"] = str(Sandbox.get_info(sid).state.value)
out["snapshots_listed"] = [s.snapshot_id for s in Sandbox.list_snapshots().next_items()
                           if s.snapshot_id == snap.snapshot_id]  # fmt: skip
out["snapshots_of_sbx"] = [s.snapshot_id for s in sbx.list_snapshots().next_items()]
out["snapshots_other"] = Sandbox.list_snapshots(**other).next_items()
step("a sandbox from the snapshot")
copy = Sandbox.create(snap.snapshot_id, timeout=120)
print(json.dumps({"sandbox": copy.sandbox_id}), flush=True)
out["from_snapshot"] = [copy.files.read("/root/kept.txt"),
                        keeper.pid in [p.pid for p in copy.commands.list()]]  # fmt: skip
out["from_snapshot_killed"] = copy.kill()
out["snapshot_delete_other"] = Sandbox.delete_snapshot(snap.snapshot_id, **other)
out["snapshot_delete"] = Sandbox.delete_snapshot(snap.snapshot_id)
out["snapshot_delete_again"] = Sandbox.delete_snapshot(snap.snapshot_id)

step("connect")
sbx.connect()  # the instance form: the SDK keeps the token it had
out["connected_state"] = str(sbx.get_info().state.value)
out["file_survived"] = sbx.files.read("/root/kept.txt")
out["process_survived"] = keeper.pid in [p.pid for p in sbx.commands.list()]
again = Sandbox.connect(sid)
out["static_connect"] = again.files.read("/root/kept.txt")
out["metrics_type"] = type(sbx.get_metrics()).__name__
out["logs_after_resume"] = exit3_line(logs()[1])  # the ring lives in the guest's memory

step("kill")
out["kill"] = sbx.kill()
out["kill_again"] = Sandbox.kill(sid)
out["after_kill"] = refused(lambda: Sandbox.get_info(sid))
out["running_after_kill"] = refused(sbx.is_running)
try:
    sbx.commands.run("echo hi")
    out["run_after_kill"] = None
except SandboxException as err:
    out["run_after_kill"] = type(err).__name__
step("done")
print(json.dumps(out))
