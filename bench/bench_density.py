"""`make bench-density`: what N idle capsules cost the host, vs raw idle QEMU guests (root).

For each N (`--counts`, default 10,40; `DENSITY_N=100 make bench-density` for 100), in one run:

  memory per capsule   PSS and RSS of each idle capsule's QEMU (`/proc/<pid>/smaps_rollup`),
                       and the agent's RSS growth per capsule (the agent is this process: the
                       bench drives `VmRuntime` in-process, with its per-capsule exit watchers
                       and metrics samplers, as the agent does)
  CPU per idle capsule utime + stime of each idle QEMU over a fixed window (`--window`, after
                       `--settle` seconds of quiet), and the agent's own CPU over that window
                       divided by N; the ratio is (QEMU + agent share) / raw QEMU, the raw
                       guests measured in the same window (they run beside the capsules)
  wake-ups             context switches per second of each QEMU's threads, ours and raw in
                       the same window: how often an idle guest makes its host work
  exec p50/p99         `true` through envd in one more capsule (the probe), sequentially, with
                       the N idle capsules running; the ratio is against N=0 (the probe alone)

The raw side: `--raw-count` QEMU guests (default min(10, max N)) started by hand with the
template's machine (the same QEMU flags, kernel, initramfs, kernel command line, memory and
vCPUs; `bench_vm.raw_argv`), each in a netns of its own with a TAP, booted cold with the
initramfs's busybox `sleep` as PID 1 (`rdinit=/bin/sleep`): the same kernel idling with no
envd and no agent. Their CPU is measured alone before the capsules start (the header's figure)
and again in each row's window, beside the capsules (the ratio's figure): both sides run the
same machine, in the same run, under the same load (the load average is printed with each row).

Everything runs in its own address ranges, agent id `dens` and slots 3501.. (`--slot-first`);
the data directory, netns, TAPs, cgroups, QEMUs and blackhole routes made here are removed at the
end, also on Ctrl-C or SIGTERM; a run killed with SIGKILL leaves them to the next run, which
sweeps this agent's leftovers before it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from bench_vm import guest_image, raw_argv, sh

from nestbox.hostagent.lifecycle import Timeouts
from nestbox.hostagent.network import cleanup_leftovers
from nestbox.hostagent.runtime import VmRuntime
from nestbox.hostagent.settings import AgentSettings
from nestbox.hostagent.system import RealSystem
from nestbox.hostagent.vmm import confine

if TYPE_CHECKING:
    from nestbox.hostagent.capsule import Capsule

SLOT_CIDR, VETH_CIDR = "10.226.0.0/16", "10.225.0.0/16"
AGENT_ID = "dens"
DATA_DIR = Path("/tmp/nbbench-density")
CLK_TCK = os.sysconf("SC_CLK_TCK")
TIMEOUTS = Timeouts(boot=900.0, restore=300.0, envd_ready=300.0, init=120.0, prepare=30.0)
"""Bounds for a hang on a host shared with other work (load 20-30 seen here): the template
build's `/snapshot/prepare` gets 30 s (the agent's 3 s is a best-effort bound for pauses; a
template snapshotted without it is unusable), a clone's `/init` 120 s."""
CLONE_BATCH = 4
"""Capsules created at once (a bound on the host's load while they start)."""
CLONE_ATTEMPTS = 3
"""A batch whose clone fails is destroyed whole by the runtime and made again, up to this many
times: on a host shared with other work (load 26 seen) a clone's `/init` can pass its 120 s
bound, which used to end the whole run at N=100 (the failures are counted in the output)."""


# ── /proc ─────────────────────────────────────────────────────────────────────────────────


def cpu_s(pid: int) -> float:
    """utime + stime of every thread of `pid` (seconds)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mem_mib(pid: int) -> tuple[float, float]:
    """(PSS, RSS) of `pid` in MiB."""
    kib: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        kib[name] = int(rest.split()[0])
    return kib.get("Pss", 0) / 1024, kib.get("Rss", 0) / 1024


def own_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def qemu_pids(data_dir: Path) -> list[int]:
    """QEMU processes whose command line names `data_dir` (this bench's, and only its)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"qemu-system" in argv[0] and str(data_dir).encode() in b" ".join(argv):
                    found.append(int(proc.name))
    return found


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ── the raw side ──────────────────────────────────────────────────────────────────────────


class RawGuests:
    """`count` raw QEMU guests idling with the template's kernel and no envd."""

    def __init__(self, work: Path, meta: dict[str, Any], rootfs: Path) -> None:
        self.work, self.rootfs = work, rootfs
        self.meta = {**meta, "cmdline": f"{meta['cmdline']} rdinit=/bin/sleep -- 2000000000"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.netns: list[str] = []

    def start(self, count: int) -> None:
        for i in range(count):
            ns = f"nbdens-raw-{i}"
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # a killed run's
            sh("ip", "netns", "add", ns)
            self.netns.append(ns)
            sh("ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap")
            run = self.work / f"raw{i}"
            run.mkdir(parents=True)
            disk = run / "disk.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.rootfs), "-F", "raw",
               str(disk))  # fmt: skip
            with (run / "qemu.log").open("wb") as out:
                self.procs.append(subprocess.Popen(
                    raw_argv(self.meta, run, disk, None, ns, incoming=False),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True))  # fmt: skip

    def pids(self) -> list[int]:
        """The QEMU pids (`ip netns exec` execs QEMU in place: same pid)."""
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"raw QEMU exited with {p.returncode}")
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            with suppress(ProcessLookupError):
                p.kill()
            p.wait()
        self.procs.clear()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.netns.clear()


# ── measurements ──────────────────────────────────────────────────────────────────────────


class Row:
    def __init__(self, n: int) -> None:
        self.n = n
        self.pss = self.rss = self.cpu = self.agent_cpu = self.agent_mib = float("nan")
        self.raw_cpu = self.wakes = self.raw_wakes = float("nan")
        self.clone_failures = 0
        self.p50 = self.p99 = float("nan")
        self.load = ""


def switches(pid: int) -> int:
    """Context switches of every thread of `pid` so far: each wake-up of an idle QEMU is one."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
    return total


async def idle_window(
    groups: list[list[int]], window: float
) -> tuple[list[float], list[float], float]:
    """Over one window: per group of QEMU pids, the mean CPU seconds per second and context
    switches per second of a pid; and this process's CPU seconds per second."""
    pids = [p for g in groups for p in g]
    before = {p: (cpu_s(p), switches(p)) for p in pids}
    own = own_cpu_s()
    t0 = time.monotonic()
    await anyio.sleep(window)
    took = time.monotonic() - t0
    own = own_cpu_s() - own
    used = {p: (cpu_s(p) - c, switches(p) - w) for p, (c, w) in before.items()}
    cpu = [statistics.fmean(used[p][0] for p in g) / took for g in groups]
    wakes = [statistics.fmean(used[p][1] for p in g) / took for g in groups]
    return cpu, wakes, own / took


async def exec_latencies(probe: Capsule, count: int) -> list[float]:
    # The probe idled through the other capsules' starts and the window: its pooled
    # connections may be past envd's keep-alive (75 s) but not the pool's expiry (90 s).
    await probe.envd.close_idle()
    await probe.envd.exec("true")  # a warm-up (connection, first paths)
    took = []
    for _ in range(count):
        t0 = time.monotonic()
        result = await probe.envd.exec("true")
        took.append(time.monotonic() - t0)
        if result.exit_code != 0:
            raise RuntimeError(f"exec true: exit {result.exit_code}")
    return took


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def run(
    args: argparse.Namespace, settings: AgentSettings, raw_row: Row, base: Row, rows: list[Row]
) -> None:
    """Measure into `raw_row` (the raw guests alone), `base` (N=0) and `rows` (one per N)."""
    image = guest_image(settings, args.guest_dir)
    if image is None:
        raise SystemExit("no guest image: run 'nestbox-agent image build' first")
    async with VmRuntime.open(settings, RealSystem(), timeouts=TIMEOUTS) as rt:
        try:
            t0 = time.monotonic()
            template = await rt.ensure_template(image, "minimal")
            meta = json.loads((template.dir.root / "template.json").read_text())
            print(f"template minimal ready in {time.monotonic() - t0:.1f} s (accel "
                  f"{rt.accel.accel}); cmdline: {meta['cmdline']}", file=sys.stderr)  # fmt: skip

            # raw guests first, alone on the host (no capsule runs yet); they keep running
            raw = RawGuests(DATA_DIR / "raw", meta, image.rootfs)
            try:
                print(f"raw: {args.raw_count} guests booting...", file=sys.stderr)
                raw.start(args.raw_count)
                await anyio.sleep(args.settle + args.raw_boot)
                pids = raw.pids()
                [raw_row.cpu], [raw_row.wakes], _ = await idle_window([pids], args.window)
                mems = [mem_mib(p) for p in pids]
                raw_row.pss = statistics.fmean(m[0] for m in mems)
                raw_row.rss = statistics.fmean(m[1] for m in mems)
                raw_row.load = load()
                await capsules(args, rt, raw, base, rows, raw_row)
            finally:
                raw.close()
        finally:
            with anyio.CancelScope(shield=True):
                await rt.destroy_all()


async def capsules(
    args: argparse.Namespace, rt: VmRuntime, raw: RawGuests, base: Row, rows: list[Row],
    raw_row: Row,
) -> None:  # fmt: skip
    """The probe alone (N=0), then each N, with the raw guests running beside them."""
    rt.networks.start()
    await rt.networks.settle()
    [probe] = await rt.clone("minimal")
    await anyio.sleep(args.settle)
    lat = await exec_latencies(probe, args.execs)
    base.p50, base.p99, base.load = pct(lat, 0.5), pct(lat, 0.99), load()
    agent_before = own_rss_mib()
    idle: list[Capsule] = []
    for n in sorted(args.counts):
        row = Row(n)
        print(f"N={n}: starting {n - len(idle)} capsules...", file=sys.stderr)
        while len(idle) < n:
            await rt.networks.settle()
            idle += await clone_batch(rt, min(CLONE_BATCH, n - len(idle)), row)
        await rt.networks.settle()
        await anyio.sleep(args.settle)
        pids = [c.pid for c in idle if c.pid is not None]
        [row.cpu, row.raw_cpu], [row.wakes, row.raw_wakes], own = await idle_window(
            [pids, raw.pids()], args.window
        )
        row.agent_cpu = own / n
        row.load = load()
        mems = [mem_mib(p) for p in pids]
        row.pss = statistics.fmean(m[0] for m in mems)
        row.rss = statistics.fmean(m[1] for m in mems)
        row.agent_mib = (own_rss_mib() - agent_before) / n
        lat = await exec_latencies(probe, args.execs)
        row.p50, row.p99 = pct(lat, 0.5), pct(lat, 0.99)
        rows.append(row)
        print(table(raw_row, base, rows, header=False)[-1], file=sys.stderr)


async def clone_batch(rt: VmRuntime, count: int, row: Row) -> list[Capsule]:
    """`count` clones of the template; a failed batch (destroyed whole) is made again."""
    for attempt in range(1, CLONE_ATTEMPTS + 1):
        try:
            return await rt.clone("minimal", count)
        except Exception as err:  # GuestUnreachable, VmError, or a group of them
            row.clone_failures += 1
            if attempt == CLONE_ATTEMPTS:
                raise
            print(f"a clone of {count} failed ({err!r:.160}); made again (load {load()})",
                  file=sys.stderr)  # fmt: skip
            await rt.networks.settle()
    raise AssertionError("unreachable")


def table(raw: Row, base: Row, rows: list[Row], header: bool = True) -> list[str]:
    out = []
    if header:
        out += [
            f"raw idle guest (same kernel, no envd; {raw.n} guests, alone): CPU "
            f"{raw.cpu * 1000:.1f} ms/s each, {raw.wakes:.0f} wake-ups/s, PSS {raw.pss:.0f} "
            f"MiB, RSS {raw.rss:.0f} MiB (load {raw.load})",
            f"exec `true` at N=0 (the probe alone): p50 {base.p50 * 1000:.0f} ms, "
            f"p99 {base.p99 * 1000:.0f} ms (load {base.load})",
            "",
            f"{'N':>4} {'PSS/cap':>8} {'RSS/cap':>8} {'raw RSS':>8} {'agent/cap':>9} "
            f"{'CPU/cap':>8} {'agent/cap':>9} {'raw':>7} {'ratio':>6} {'wakes':>6} {'raw':>5} "
            f"{'exec p50':>9} {'x N=0':>6} {'exec p99':>9} {'x N=0':>6}  load 1/5/15",
            f"{'':>4} {'MiB':>8} {'MiB':>8} {'MiB':>8} {'MiB':>9} "
            f"{'ms/s':>8} {'ms/s':>9} {'ms/s':>7} {'':>6} {'/s':>6} {'/s':>5} {'ms':>9} "
            f"{'':>6} {'ms':>9}",
        ]
    for r in rows:
        ratio = (r.cpu + r.agent_cpu) / r.raw_cpu if r.raw_cpu > 0 else float("inf")
        retried = (
            f"  ({r.clone_failures} failed clone batches made again)" if r.clone_failures else ""
        )
        out.append(
            f"{r.n:>4} {r.pss:>8.1f} {r.rss:>8.1f} {raw.rss:>8.1f} {r.agent_mib:>9.2f} "
            f"{r.cpu * 1000:>8.1f} {r.agent_cpu * 1000:>9.2f} {r.raw_cpu * 1000:>7.1f} "
            f"{ratio:>5.2f}x {r.wakes:>6.0f} {r.raw_wakes:>5.0f} "
            f"{r.p50 * 1000:>9.0f} {r.p50 / base.p50:>5.2f}x "
            f"{r.p99 * 1000:>9.0f} {r.p99 / base.p99:>5.2f}x  {r.load}{retried}"
        )
    return out


# ── set-up and clean-up ───────────────────────────────────────────────────────────────────


def kill_raw_leftovers() -> None:
    for pid in qemu_pids(DATA_DIR):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for i in range(400):
        if not Path(f"/var/run/netns/nbdens-raw-{i}").exists():
            break
        subprocess.run(["ip", "netns", "del", f"nbdens-raw-{i}"], capture_output=True)


def fresh_data_dir() -> None:
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    DATA_DIR.mkdir(parents=True)


async def sweep(settings: AgentSettings) -> None:
    """Remove whatever this bench's agent id and data directory hold on the host."""
    kill_raw_leftovers()
    await cleanup_leftovers(RealSystem(), settings, set())
    confine.remove_leftover_cgroups(settings, set())
    confine.remove_agent_cgroups(settings)


def leftovers(settings: AgentSettings) -> list[str]:
    netns = [ln for ln in sh("ip", "netns", "list").splitlines()
             if ln.startswith((f"nbx-{AGENT_ID}-", "nbdens-raw-"))]  # fmt: skip
    links = [ln for ln in sh("ip", "-o", "link").splitlines() if f"nbh{AGENT_ID}x" in ln]
    return [*netns, *links, *map(str, qemu_pids(DATA_DIR))]


async def main(args: argparse.Namespace, blackholes: str) -> int:
    settings = AgentSettings(
        data_dir=DATA_DIR / "d",
        image_cache=AgentSettings().images_dir,
        agent_id=AGENT_ID,
        slot_cidr=SLOT_CIDR,
        veth_cidr=VETH_CIDR,
        slot_first=args.slot_first,
        slot_count=399,
    )
    await sweep(settings)
    fresh_data_dir()
    raw, base = Row(args.raw_count), Row(0)
    rows: list[Row] = []
    try:
        await run(args, settings, raw, base, rows)
    finally:
        with anyio.CancelScope(shield=True):
            await sweep(settings)
            shutil.rmtree(DATA_DIR, ignore_errors=True)
            for cidr in (SLOT_CIDR, VETH_CIDR):
                if cidr not in blackholes:
                    await anyio.run_process(["ip", "route", "del", "blackhole", cidr],
                                            check=False)  # fmt: skip
            left = leftovers(settings)
            print(f"leftovers after clean-up: {left or 'none'}", file=sys.stderr)
            print("\n".join(table(raw, base, rows)))  # what was measured, also after a failure
    print("\nCPU/cap: each idle capsule's QEMU; agent/cap: this process (VmRuntime: watchers, "
          "samplers) over the same window / N; raw: the raw guests in the same window; "
          "ratio = (QEMU + agent) / raw QEMU; wakes: context switches/s of a QEMU's "
          "threads")  # fmt: skip
    return 1 if left else 0


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,40",
                        help="comma-separated N of idle capsules (each 256 MiB)")  # fmt: skip
    parser.add_argument("--raw-count", type=int, default=0, help="raw guests (0: min(10, max N))")
    parser.add_argument("--window", type=float, default=30.0, help="idle CPU window (s)")
    parser.add_argument("--settle", type=float, default=70.0,
                        help="quiet time before it (s): past envd's 60 s of 1 s port scans "
                        "after its last request (`port_scan_active_s`)")  # fmt: skip
    parser.add_argument("--raw-boot", type=float, default=20.0,
                        help="extra time for the raw guests' cold boots (s)")  # fmt: skip
    parser.add_argument("--execs", type=int, default=20, help="execs per latency sample")
    parser.add_argument("--slot-first", type=int, default=3501)
    parser.add_argument("--guest-dir", help="vmlinux/initramfs.cpio.gz/rootfs.ext4 to use "
                        "(default: the image of this tree)")  # fmt: skip
    if os.geteuid() != 0:
        sys.exit("bench-density needs root (network namespaces, TAP devices, cgroups)")
    parsed = parser.parse_args()
    parsed.counts = [int(x) for x in str(parsed.counts).split(",") if x.strip()]
    parsed.raw_count = parsed.raw_count or min(10, max(parsed.counts))
    signal.signal(signal.SIGTERM, _sigterm)
    existing_blackholes = sh("ip", "route", "show", "type", "blackhole")
    sys.exit(anyio.run(main, parsed, existing_blackholes))
