# ruff: noqa: F811  (the e2e fixtures are imported by name, and taken as arguments)
"""`make bench-files`: 100 MiB up and down through the public API vs raw TCP into the same guest,
side by side in one run (root; a real control plane, agent and TCG guest).

  raw TCP       the host opens a TCP connection to the capsule's host-facing address (the one
                the agent reaches envd at: DNATed in the slot's netns to the guest, over the TAP)
                on a port where a stdlib python3 server in the guest (started through exec)
                discards what it receives / sends 100 MiB from memory.
  ours          `files/stream/write` (multipart, `path` first, as the SDK's `upload_stream`
                sends it) and `files/stream/read` on the control plane: CP -> agent (Connect
                client stream / server stream) -> envd `/files` -> the guest's disk.

The breakdown measures the same transfer at each hop, so the gaps between them say where the
time goes: raw TCP into a file in the guest (the guest's disk under TCG: received and written by
the stdlib server, and spliced socket -> pipe -> file, the kernel alone, as envd does), envd's
`/files` straight from the host (envd's HTTP and write path), the agent's `WriteFileStream` /
`ReadFileStream` (the agent's relay and its Connect messages), the control plane's route (its
multipart parsing and its Connect client). Each cell also gives the CPU seconds the control
plane, the agent and the guest's QEMU (the guest's whole work, under TCG) spent on the transfer:
on a loaded machine they vary far less than the rates; and `vcpu`, the share of the transfer's
time the QEMU's busiest thread (the guest's one vCPU) ran: near 100%, the guest's own work is
what bounds that hop, and every byte of guest work a hop adds lowers its rate. The control
plane's and the agent's RSS growth (peak, VmHWM reset before each transfer) is printed for the
public route; the target is < 64 MiB.

The stack is the end-to-end tier's (`tests/e2e/stack.py`, its pytest fixtures: one `minimal`
template cold boot, a control plane on SQLite, one agent), so this script runs itself under
pytest; slots from `NESTBOX_TEST_SLOT_FIRST` (default 3001) + 200. The machine may be loaded by
other work: compare the ratios of one run, and read the load averages printed with them.
Every round alternates the order of the hops; the figures are medians over `--rounds`. Before
each upload the guest writes back what earlier transfers left dirty (`sync`, untimed): a 256 MiB
guest starts writing back after ~15 MiB are dirty and throttles the writer after ~23 MiB, so a
hop that followed another upload paid for the writes of the hop before it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NESTBOX_TEST_SLOT_FIRST", "3001")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
import pytest
from protobuf import Oneof
from tests.e2e.conftest import capsule, stack, stacks  # noqa: F401
from tests.e2e.stack import records
from tests.integration.vm.session import guest_image, minimal_template, vm_settings  # noqa: F401

from nestbox.protocol.envd import ACCESS_TOKEN_HEADER, ENVD_PORT
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from tests.e2e.stack import Stack

MIB = 1 << 20
SIZE = int(os.environ.get("NESTBOX_BENCH_FILES_MIB", "100")) * MIB
WARMUP = 1 * MIB
AGENT_HEADERS: dict[str, str] = {}
SEND_CHUNK = MIB
RAW_PORT = 7000
GUEST_DIR = "/root/bench"
TARGET_RATIO, RSS_LIMIT_MIB = 0.5, 64

RAW_SERVER = r"""
import fcntl, os, socket, sys
buf = bytearray(1 << 20)
out = memoryview(bytes(1 << 20))
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(4)
while True:
    conn, _ = srv.accept()
    with conn:
        head = b""
        while not head.endswith(b"\n"):
            head += conn.recv(1)
        verb, n, *path = head.decode().split()
        n = int(n)
        if verb == "S":  # spliced socket -> pipe -> file: what the guest's kernel alone does
            fd = os.open(path[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            r, w = os.pipe()
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
            while n:
                got = os.splice(conn.fileno(), w, min(n, 1 << 20))
                if not got:
                    break
                left = got
                while left:
                    left -= os.splice(r, fd, left)
                n -= got
            for x in (fd, r, w):
                os.close(x)
            conn.sendall(b"OK\n")
        elif verb in ("W", "F"):
            f = open(path[0], "wb") if verb == "F" else None
            view = memoryview(buf)
            while n:
                got = conn.recv_into(view, min(n, len(buf)))
                if not got:
                    break
                if f:
                    f.write(view[:got])
                n -= got
            if f:
                f.close()
            conn.sendall(b"OK\n")
        elif verb == "Y":  # sync: what earlier writes left dirty is written back
            os.sync()
            conn.sendall(b"OK\n")
        elif verb == "R":
            while n:
                k = min(n, len(out))
                conn.sendall(out[:k])
                n -= k
"""


class Figures:
    """Seconds per (hop, direction), over the rounds."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], list[float]] = {}
        self.rss: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self.last_cpu: tuple[float, ...] = ()
        self.cpu: dict[tuple[str, str], list[tuple[float, ...]]] = {}
        """CPU seconds of (control plane, agent, the guest's QEMU) during each transfer, and the
        share of the transfer's time the QEMU's busiest thread ran: under TCG a one-vCPU guest
        runs all its code (kernel and envd) on one thread, so near 100% the guest is the bound."""

    def add(self, hop: str, way: str, seconds: float) -> None:
        self.seconds.setdefault((hop, way), []).append(seconds)

    def rate(self, hop: str, way: str) -> float:
        """MiB/s of the median round."""
        return SIZE / MIB / statistics.median(self.seconds[(hop, way)])


# ── the guest side and its addresses ──────────────────────────────────────────────────────


def find_key(doc: Any, key: str) -> Any:
    """The first value of `key` anywhere in a JSON document."""
    if isinstance(doc, dict):
        if doc.get(key):
            return doc[key]
        doc = list(doc.values())
    if isinstance(doc, list):
        for item in doc:
            if (found := find_key(item, key)) is not None:
                return found
    return None


def guest_addresses(stack: Stack, capsule_id: str) -> tuple[str, str]:
    """The capsule's host-facing address and envd's access token, from the agent's record."""
    record = records(stack.agent)[capsule_id]
    address, token = find_key(record, "host_address"), find_key(record, "access_token")
    assert address, f"no host address in the record: {sorted(record)}"
    assert token, f"no access token in the record: {sorted(record)}"
    return str(address), str(token)


def start_raw_server(stack: Stack, capsule_id: str) -> None:
    stack.out(capsule_id, f"mkdir -p {GUEST_DIR} && rm -f {GUEST_DIR}/*")
    stack.write_file(capsule_id, "/root/rawsrv.py", RAW_SERVER.encode())
    stack.exec(capsule_id, f"exec python3 /root/rawsrv.py {RAW_PORT}", background=True)


def connect_raw(address: str) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        try:
            return socket.create_connection((address, RAW_PORT), timeout=120)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def payload() -> Iterator[memoryview]:
    data = memoryview(os.urandom(SEND_CHUNK))
    for _ in range(SIZE // SEND_CHUNK):
        yield data


# ── the hops, each one transfer of SIZE bytes ─────────────────────────────────────────────


def raw_up(address: str, path: str | None = None, verb: str = "F") -> None:
    """`SIZE` bytes into the raw server: dropped, or into the file `path` (`verb` F: received
    and written; S: spliced)."""
    with connect_raw(address) as s:
        s.sendall(f"{verb} {SIZE} {path}\n".encode() if path else f"W {SIZE}\n".encode())
        for chunk in payload():
            s.sendall(chunk)
        assert s.recv(3) == b"OK\n"


def settle(address: str) -> None:
    """Untimed, before each upload: the guest writes back what earlier transfers left dirty
    (`sync`), so each hop pays for its own writes, not for the hop before it."""
    with connect_raw(address) as s:
        s.sendall(b"Y 0\n")
        assert s.recv(3) == b"OK\n"


def raw_down(address: str) -> None:
    with connect_raw(address) as s:
        s.sendall(f"R {SIZE}\n".encode())
        drain_socket(s)


def drain_socket(s: socket.socket) -> None:
    buf, seen = bytearray(MIB), 0
    while n := s.recv_into(buf):
        seen += n
    assert seen == SIZE, seen


def http_up(host: str, port: int, target: str, headers: dict[str, str], head: bytes = b"",
            tail: bytes = b"") -> None:  # fmt: skip
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        conn.putrequest("POST", target, skip_accept_encoding=True)
        for k, v in {**headers, "Content-Length": str(len(head) + SIZE + len(tail))}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(head)
        for chunk in payload():
            conn.send(chunk)
        conn.send(tail)
        r = conn.getresponse()
        body = r.read()
        assert r.status in (200, 204), (r.status, body[:500])
    finally:
        conn.close()


def http_down(host: str, port: int, method: str, target: str, headers: dict[str, str],
              body: bytes | None = None) -> None:  # fmt: skip
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        conn.request(method, target, body=body, headers=headers)
        r = conn.getresponse()
        assert r.status == 200, (r.status, r.read(500))
        buf, seen = bytearray(MIB), 0
        while n := r.readinto(buf):
            seen += n
        assert seen == SIZE, seen
    finally:
        conn.close()


def envd_up(address: str, token: str, path: str) -> None:
    headers = {ACCESS_TOKEN_HEADER: token, "Content-Type": "application/octet-stream"}
    http_up(address, ENVD_PORT, f"/files?path={path}", headers)


def envd_down(address: str, token: str, path: str) -> None:
    http_down(address, ENVD_PORT, "GET", f"/files?path={path}", {ACCESS_TOKEN_HEADER: token})


def agent_token(stack: Stack) -> dict[str, str]:
    """What the control plane presents to the agent (opened from its database)."""
    token, _ = stack.cp.host_tokens()[stack.host_id(stack.agent)]
    return {"X-Agent-Token": token}


def agent_up(stack: Stack, capsule_id: str, path: str) -> None:
    async def run() -> None:
        async def messages() -> AsyncIterator[pb.WriteFileStreamRequest]:
            meta = pb.WriteFileMeta(capsule_id=capsule_id, path=path)
            yield pb.WriteFileStreamRequest(message=Oneof("meta", meta))
            for chunk in payload():
                yield pb.WriteFileStreamRequest(message=Oneof("chunk", bytes(chunk)))

        async with stack.agent.connect() as rpc:
            rpc.headers = AGENT_HEADERS
            done = await rpc.write_file_stream(messages())
            assert done.bytes_written == SIZE, done

    anyio.run(run)


def agent_down(stack: Stack, capsule_id: str, path: str) -> None:
    async def run() -> None:
        seen = 0
        async with stack.agent.connect() as rpc:
            rpc.headers = AGENT_HEADERS
            request = pb.ReadFileStreamRequest(capsule_id=capsule_id, path=path)
            async for message in rpc.read_file_stream(request):
                seen += len(message.chunk)
        assert seen == SIZE, seen

    anyio.run(run)


def api_up(stack: Stack, capsule_id: str, path: str) -> None:
    boundary = "benchboundary0123456789"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n{path}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.bin"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {**stack.cp.admin, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    target = f"/v1/capsules/{capsule_id}/files/stream/write"
    http_up("127.0.0.1", stack.cp.port, target, headers, head, tail)


def api_down(stack: Stack, capsule_id: str, path: str) -> None:
    headers = {**stack.cp.admin, "Content-Type": "application/json"}
    body = json.dumps({"path": path}).encode()
    target = f"/v1/capsules/{capsule_id}/files/stream/read"
    http_down("127.0.0.1", stack.cp.port, "POST", target, headers, body)


# ── RSS ───────────────────────────────────────────────────────────────────────────────────


def rss_reset(pid: int) -> float:
    """Reset the peak RSS (VmHWM) to the current RSS; the current RSS in MiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss(pid)[0]


def rss(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS since the last reset) in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# ── the run ───────────────────────────────────────────────────────────────────────────────


def _stat_cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process (all its threads) so far."""
    return _stat_cpu(Path(f"/proc/{pid}/stat"))


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU time of each of the process's threads so far."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            seconds[task.name] = _stat_cpu(task / "stat")
    return seconds


def qemu_of(capsule_id: str) -> int:
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            if proc.name.isdigit() and b"qemu-system" in cmdline and capsule_id.encode() in cmdline:
                return int(proc.name)
    raise LookupError(f"no QEMU for {capsule_id}")


def measure(stack: Stack, capsule_id: str, rounds: int) -> Figures:
    address, token = guest_addresses(stack, capsule_id)
    AGENT_HEADERS.update(agent_token(stack))
    start_raw_server(stack, capsule_id)
    f = f"{GUEST_DIR}/f.bin"
    cp_pid, agent_pid = stack.cp.pid, stack.agent.proc.pid  # type: ignore[union-attr]
    figures = Figures()
    pids = (cp_pid, agent_pid, qemu_of(capsule_id))

    def timed(fn: Callable[[], None]) -> float:
        cpu, threads = [cpu_seconds(p) for p in pids], thread_seconds(pids[2])
        started = time.perf_counter()
        fn()
        seconds = time.perf_counter() - started
        figures.last_cpu = tuple(cpu_seconds(p) - c for p, c in zip(pids, cpu, strict=True))
        after = thread_seconds(pids[2])
        busiest = max(after[t] - threads.get(t, 0.0) for t in after)
        figures.last_cpu += (busiest / seconds,)
        return seconds

    def api(way: str, fn: Callable[[], None]) -> float:
        before = (rss_reset(cp_pid), rss_reset(agent_pid))
        seconds = timed(fn)
        growth = (rss(cp_pid)[1] - before[0], rss(agent_pid)[1] - before[1])
        if SIZE != WARMUP:
            figures.rss.setdefault(("api", way), []).append(growth)
        return seconds

    hops: list[tuple[str, Callable[[], float], Callable[[], float]]] = [
        ("raw TCP", lambda: timed(lambda: raw_up(address)),
         lambda: timed(lambda: raw_down(address))),
        ("raw TCP to a file", lambda: timed(lambda: raw_up(address, f)), lambda: 0.0),
        ("raw TCP spliced", lambda: timed(lambda: raw_up(address, f, "S")), lambda: 0.0),
        ("envd /files", lambda: timed(lambda: envd_up(address, token, f)),
         lambda: timed(lambda: envd_down(address, token, f))),
        ("agent RPC", lambda: timed(lambda: agent_up(stack, capsule_id, f)),
         lambda: timed(lambda: agent_down(stack, capsule_id, f))),
        ("api", lambda: api("up", lambda: api_up(stack, capsule_id, f)),
         lambda: api("down", lambda: api_down(stack, capsule_id, f))),
    ]  # fmt: skip
    global SIZE
    measured, SIZE = SIZE, WARMUP
    for i in range(rounds + 1):  # round 0 warms every hop up with a few MiB; not counted
        SIZE = measured if i else WARMUP
        order = hops if i % 2 else hops[::-1]
        for hop, up, down in order:
            for way, fn in (("up", up), ("down", down)):
                if way == "up":
                    settle(address)
                seconds = fn()
                if i and seconds:
                    print(f"    {hop} {way}: {SIZE / MIB / seconds:.1f} MiB/s", flush=True)
                if i and seconds:
                    figures.add(hop, way, seconds)
                    figures.cpu.setdefault((hop, way), []).append(figures.last_cpu)
        print(f"  round {i}{' (warm-up)' if not i else ''} done, load {load()}", flush=True)
    return figures


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(figures: Figures, load_before: str) -> str:
    raw_up_rate, raw_down_rate = figures.rate("raw TCP", "up"), figures.rate("raw TCP", "down")
    lines = [
        f"load average before: {load_before}, after: {load()} (2 cores)",
        "",
        f"{f'{SIZE // MIB} MiB':<30}{'ours':>12}{'raw':>12}{'ratio':>8}{'target':>9}",
    ]
    for way, raw in (("up", raw_up_rate), ("down", raw_down_rate)):
        ours = figures.rate("api", way)
        verdict = "ok" if ours / raw >= TARGET_RATIO else "MISSED"
        name = "write (files/stream/write)" if way == "up" else "read (files/stream/read)"
        lines.append(f"{name:<30}{ours:>8.1f} MiB/s{raw:>7.1f} MiB/s{ours / raw:>7.0%}"
                     f"  >=50% {verdict}")  # fmt: skip
    for way in ("up", "down"):
        growth = figures.rss[("api", way)]
        cp, agent = max(g[0] for g in growth), max(g[1] for g in growth)
        verdict = "ok" if max(cp, agent) < RSS_LIMIT_MIB else "MISSED"
        lines.append(f"  RSS growth ({way}): control plane {cp:.1f} MiB, agent {agent:.1f} MiB "
                     f"(< {RSS_LIMIT_MIB} MiB: {verdict})")  # fmt: skip
    lines += [
        "",
        f"breakdown: the same {SIZE // MIB} MiB at each hop (MiB/s, median; % of raw TCP)",
    ]
    for hop in ("raw TCP", "raw TCP to a file", "raw TCP spliced", "envd /files", "agent RPC",
                "api"):  # fmt: skip
        cells = []
        for way, raw in (("up", raw_up_rate), ("down", raw_down_rate)):
            if (hop, way) in figures.seconds:
                rate = figures.rate(hop, way)
                cpu = [statistics.median(c[k] for c in figures.cpu[(hop, way)]) for k in range(4)]
                cells.append(f"{way} {rate:6.1f} ({rate / raw:4.0%}) cpu s cp/agent/qemu "
                             + "/".join(f"{c:.1f}" for c in cpu[:3])
                             + f" vcpu {cpu[3]:4.0%}")  # fmt: skip
        lines.append(f"  {hop:<18}" + "  ".join(cells))
    return "\n".join(lines)


ROUNDS = int(os.environ.get("NESTBOX_BENCH_FILES_ROUNDS", "2"))


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_bench_files(stack: Stack, capsule: str) -> None:
    load_before = load()
    figures = measure(stack, capsule, ROUNDS)
    print("\n" + report(figures, load_before), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="measured rounds (median)")
    parser.add_argument("--mib", type=int, default=SIZE // MIB, help="MiB per transfer")
    args = parser.parse_args()
    os.environ["NESTBOX_BENCH_FILES_ROUNDS"] = str(args.rounds)
    os.environ["NESTBOX_BENCH_FILES_MIB"] = str(args.mib)
    os.chdir(Path(__file__).resolve().parents[1])
    with contextlib.suppress(KeyError):
        del os.environ["NESTBOX_REQUIRE_ALL"]
    # Its own base directory: other pytest runs on this machine prune the shared one's old runs.
    basetemp = Path(tempfile.mkdtemp(prefix="nbbench-files-"))
    code = pytest.main([__file__, "-s", "-q", "-p", "no:cacheprovider", "-W", "default",
                        f"--basetemp={basetemp}"])  # fmt: skip
    if code == 0:
        shutil.rmtree(basetemp, ignore_errors=True)
    else:
        print(f"the stack's logs are in {basetemp}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
