"""`make bench-vm`: raw QEMU vs Nestbox, side by side in one run (root; medians).

  restore → envd /health   raw: a QEMU started by hand (`-incoming defer`, the template's RAM
                           file mapped copy-on-write, a fresh overlay) into a netns made
                           beforehand; Nestbox: `VmRuntime.clone` to envd ready + `/init`
                           (slot network, overlay, QEMU, restore, envd answering `/init`)
  cold boot → envd /health raw: QEMU by hand; Nestbox: `VmRuntime.boot` (+ network, + /init)
  snapshot                 raw: QMP stop + migrate to a file + kill; Nestbox: `pause` (+
                           /snapshot/prepare; the slot network goes in the background)
                           The raw side migrates through `exec:cat` as VMM.md's recipe does;
                           Nestbox through `fd:`, which writes a snapshot some 30-50 ms faster:
                           `--raw-fd` gives the raw side `fd:` too (the stricter baseline).
  RSS per idle clone       VmRSS of each QEMU 3 s after its restore, one VM at a time

Fairness: both sides run the same machine (the template's QEMU flags, memory and vCPUs), each
raw QEMU in a cgroup beside Nestbox's VMs with their limits (on a busy host the CPU is shared
per cgroup: outside, a raw QEMU would get far more of it), the iterations alternate between the
sides (and which side goes first), so a change in the host's load hits both alike; the first
iteration of each kind is a warm-up and not counted; before each timed operation the Nestbox
runtime's background work (warm slot builds, slot teardowns) has finished, so it never runs
during a measurement of either side. Nestbox runs as the agent does, with its warm slot pool
(`warm_slots`, default 2; `--warm-slots 0` to turn it off). After the table come both sides'
step breakdowns (medians), which explain the ratios.

No Nestbox code runs in the raw path: its QEMU command line, QMP client and health probe are
written out below (the probe runs in a thread that joined the raw netns, so it talks straight to
169.254.0.21 over the TAP). Everything runs in test-only address ranges, egress off; the data
directory, netns and blackhole routes made here are removed at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from nestbox.hostagent.image.cache import find_image
from nestbox.hostagent.image.layout import GuestImage
from nestbox.hostagent.runtime import VmRuntime
from nestbox.hostagent.settings import AgentSettings
from nestbox.hostagent.system import RealSystem
from nestbox.hostagent.vmm.cgroups import Cgroups, Limits

if TYPE_CHECKING:
    from collections.abc import Callable

SLOT_CIDR, VETH_CIDR = "10.232.0.0/16", "10.231.0.0/16"
GUEST, PORT = "169.254.0.21", 49983
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


# ── raw QEMU, by hand ─────────────────────────────────────────────────────────────────────


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class RawNetns:
    """One netns with tap0 169.254.0.22/30, and a thread inside it for probing the guest."""

    def __init__(self) -> None:
        self.name = f"nbbench-raw-{os.getpid()}"
        sh("ip", "netns", "add", self.name)
        for cmd in (("tuntap", "add", "dev", "tap0", "mode", "tap"),
                    ("addr", "add", "169.254.0.22/30", "dev", "tap0"),
                    ("link", "set", "tap0", "up"), ("link", "set", "lo", "up")):  # fmt: skip
            sh("ip", "-n", self.name, *cmd)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, initializer=self._enter)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)

    def wait_health(self, qemu: subprocess.Popen[bytes], t0: float, limit: float = 300) -> float:
        return self.pool.submit(_poll_health, qemu, t0, limit).result()

    def close(self) -> None:
        self.pool.shutdown()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _poll_health(qemu: subprocess.Popen[bytes], t0: float, limit: float) -> float:
    while time.monotonic() - t0 < limit:
        if qemu.poll() is not None:
            raise RuntimeError(f"raw QEMU exited with {qemu.returncode}")
        try:
            with socket.create_connection((GUEST, PORT), timeout=0.5) as s:
                s.sendall(b"GET /health HTTP/1.0\r\nHost: guest\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.01)
    raise TimeoutError("raw guest did not answer /health")


class RawQmp:
    def __init__(self, path: Path, limit: float = 30) -> None:
        t0 = time.monotonic()
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(str(path))
                break
            except OSError:
                if time.monotonic() - t0 > limit:
                    raise
                time.sleep(0.005)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, fd: int | None = None, **args: Any) -> Any:
        line = json.dumps({"execute": name, "arguments": args}) + "\n"
        if fd is None:
            self.f.write(line)
            self.f.flush()
        else:  # the descriptor travels with the command's bytes (SCM_RIGHTS)
            socket.send_fds(self.s, [line.encode()], [fd])
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")


def raw_argv(
    meta: dict[str, Any], run: Path, disk: Path, mem: Path | None, netns: str, incoming: bool
) -> list[str]:
    """The template's machine, written out by hand (device order as the template's)."""
    size = f"size={meta['memory_mib']}M"
    backend = (f"memory-backend-file,id=mem0,{size},mem-path={mem},share=off" if mem
               else f"memory-backend-ram,id=mem0,{size}")  # fmt: skip
    argv = ["ip", "netns", "exec", netns, "qemu-system-x86_64",
            "-M", "microvm,x-option-roms=off,memory-backend=mem0", "-accel", meta["accel"],
            "-cpu", "host" if meta["accel"] == "kvm" else "max", "-smp", str(meta["vcpus"]),
            "-m", f"{meta['memory_mib']}M", "-object", backend,
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", meta["kernel"], "-append", meta["cmdline"],
            "-serial", f"file:{run}/serial.log", "-qmp", f"unix:{run}/qmp.sock,server=on,wait=off",
            "-drive", f"id=root,file={disk},format=qcow2,if=none,cache=unsafe",
            "-device", "virtio-blk-device,drive=root", "-device", "virtio-rng-device",
            "-initrd", meta["initrd"],
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
            "-device", "virtio-net-device,netdev=n0,mac=02:fc:00:00:00:01"]  # fmt: skip
    return [*argv, "-incoming", "defer"] if incoming else argv


class RawBench:
    def __init__(
        self, work: Path, template_dir: Path, image: GuestImage, fd: bool, settings: AgentSettings
    ) -> None:
        self.work, self.tdir, self.image = work, template_dir, image
        self.fd = fd
        """Migrate through `fd:` (as Nestbox does) instead of VMM.md's `exec:cat`."""
        self.meta = json.loads((template_dir / "template.json").read_text())
        self.ns = RawNetns()
        self.n = 0
        self.started: list[subprocess.Popen[bytes]] = []
        tree = Cgroups.detect(settings.cgroup_root, settings.cgroup_parent, settings.agent_id)
        self.cgroups = tree if tree.enabled else None
        """Each raw QEMU runs in a cgroup beside Nestbox's VMs, with their limits: on a busy
        host the CPU is shared per cgroup, and a raw QEMU outside would get far more of it."""
        self.limits = Limits(
            memory_bytes=(self.meta["memory_mib"] + settings.vm_memory_overhead_mib) << 20,
            cpus=float(self.meta["vcpus"]), pids=settings.vm_pids_max,
        )  # fmt: skip

    def _start(
        self, base: Path, base_fmt: str, mem: Path | None, incoming: bool
    ) -> tuple[subprocess.Popen[bytes], Path]:
        self.n += 1
        run = self.work / f"raw{self.n}"
        run.mkdir()
        disk = run / "disk.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_fmt, str(disk))
        out = (run / "qemu.log").open("wb")
        procs = [] if self.cgroups is None else self.cgroups.create(run.name, self.limits)

        def join_cgroup() -> None:  # in the child, before exec: QEMU starts inside
            for f in procs:
                f.write_text(str(os.getpid()))

        qemu = subprocess.Popen(raw_argv(self.meta, run, disk, mem, self.ns.name, incoming),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=join_cgroup)  # fmt: skip
        self.started.append(qemu)
        return qemu, run

    def restore(self, steps: Steps) -> tuple[float, subprocess.Popen[bytes], Path]:
        t0 = steps.begin()
        qemu, run = self._start(self.tdir / "disk.qcow2", "qcow2", self.tdir / "mem", True)
        steps.mark("disk + qemu exec")
        q = RawQmp(run / "qmp.sock")
        steps.mark("qemu start")
        q.cmd("migrate-set-capabilities",
              capabilities=[{"capability": "x-ignore-shared", "state": True}])  # fmt: skip
        if self.fd:
            with open(self.tdir / "state", "rb") as state:
                q.cmd("getfd", fd=state.fileno(), fdname="state")
            q.cmd("migrate-incoming", uri="fd:state")
        else:
            q.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(self.tdir / 'state'))}")
        while q.cmd("query-status")["status"] == "inmigrate":
            time.sleep(0.002)
        q.cmd("cont")
        steps.mark("restore")
        took = self.ns.wait_health(qemu, t0)
        steps.mark("envd /health")
        return took, qemu, run

    def boot(self) -> float:
        t0 = time.monotonic()
        qemu, _ = self._start(self.image.rootfs, "raw", None, False)
        try:
            return self.ns.wait_health(qemu, t0)
        finally:
            kill(qemu)

    def snapshot(self, qemu: subprocess.Popen[bytes], run: Path, steps: Steps) -> float:
        q = RawQmp(run / "qmp.sock")
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 30})
        t0 = steps.begin()
        q.cmd("stop")
        if self.fd:
            with open(run / "snap.state", "wb") as state:
                q.cmd("getfd", fd=state.fileno(), fdname="state")
            q.cmd("migrate", uri="fd:state")
        else:
            q.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(run / 'snap.state'))}")
        while q.cmd("query-migrate").get("status") not in ("completed", "failed", "cancelled"):
            time.sleep(0.002)
        steps.mark("stop + migrate")
        kill(qemu)
        steps.mark("kill")
        took = time.monotonic() - t0
        (run / "snap.state").unlink(missing_ok=True)
        return took

    def close(self) -> None:
        """Kill every raw QEMU, remove their cgroups (before the runtime removes the agent's
        cgroup directory) and the netns. Idempotent."""
        for qemu in self.started:
            kill(qemu)
        self.started.clear()
        if self.cgroups is not None:
            for i in range(1, self.n + 1):
                self.cgroups.remove(f"raw{i}")
        self.ns.close()


def kill(qemu: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        qemu.kill()
    qemu.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ── the run ───────────────────────────────────────────────────────────────────────────────


class Steps:
    """Durations between consecutive marks, per step name (summed when a name repeats)."""

    def __init__(self) -> None:
        self.took: dict[str, float] = {}
        self._last = time.monotonic()

    def begin(self) -> float:
        self.took.clear()
        self._last = time.monotonic()
        return self._last

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.took[name] = self.took.get(name, 0.0) + now - self._last
        self._last = now

    async def hook(self, step: str) -> None:
        """A `StepHook` that files the runtime's steps under the breakdown's names."""
        self.mark(NESTBOX_STEPS.get(step, step))


NESTBOX_STEPS = {
    "dir": "files", "disk": "disk", "record": "files", "slot": "slot network",
    "network": "slot network", "vmm": "qemu start", "restore": "restore",
    "envd": "envd ready + /init", "init": "envd ready + /init",
    "prepare": "prepare (+ migration set-up)", "save": "stop + migrate + kill",
}  # fmt: skip


class Results:
    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {"restore": [], "boot": [], "snapshot": [],
                                               "rss": []}  # fmt: skip
        self.steps: dict[str, dict[str, list[float]]] = {"restore": {}, "snapshot": {}}
        self.warm = 0

    def add(self, key: str, value: float, steps: Steps | None = None) -> None:
        self.values[key].append(value)
        if steps is not None:
            for name, took in steps.took.items():
                self.steps[key].setdefault(name, []).append(took)


async def nestbox_restore_pause(rt: VmRuntime, res: Results | None) -> None:
    steps = Steps()
    await rt.networks.settle()
    t0 = steps.begin()
    [c] = await rt.clone("minimal", hook=steps.hook)
    took = time.monotonic() - t0
    warm = c.run is not None and c.run.lease.warm
    if res is not None:
        res.add("restore", took, steps)
        res.warm += warm
    await anyio.sleep(0.5)
    await rt.networks.settle()  # the warm pool's refill
    t0 = steps.begin()
    await rt.pause(c.id, hook=steps.hook)
    took = time.monotonic() - t0
    if res is not None:
        res.add("snapshot", took, steps)
    await rt.destroy(c.id)
    await rt.networks.settle()


def raw_restore_snapshot(raw: RawBench, res: Results | None) -> None:
    steps = Steps()
    took, qemu, run = raw.restore(steps)
    if res is not None:
        res.add("restore", took, steps)
    time.sleep(0.5)
    took = raw.snapshot(qemu, run, steps)
    if res is not None:
        res.add("snapshot", took, steps)


async def nestbox_rss(rt: VmRuntime) -> float:
    await rt.networks.settle()
    [c] = await rt.clone("minimal")
    await anyio.sleep(3)
    assert c.pid is not None
    rss = rss_mib(c.pid)
    await rt.destroy(c.id)
    await rt.networks.settle()
    return rss


def raw_rss(raw: RawBench) -> float:
    _, qemu, _ = raw.restore(Steps())
    time.sleep(3)
    rss = rss_mib(qemu.pid)
    kill(qemu)
    return rss


async def nestbox_boot(rt: VmRuntime, image: GuestImage) -> float:
    await rt.networks.settle()
    t0 = time.monotonic()
    c = await rt.boot(image, template_id="bench")
    took = time.monotonic() - t0
    await rt.destroy(c.id)
    await rt.networks.settle()
    return took


async def run_both(
    rt: VmRuntime, raw: RawBench, image: GuestImage, args: argparse.Namespace
) -> tuple[Results, Results]:
    """Alternate the sides (and which goes first); iteration 0 of each kind is a warm-up."""
    nb, rw = Results(), Results()

    async def raw_side(fn: Callable[..., T], *a: Any) -> T:
        await rt.networks.settle()
        return await anyio.to_thread.run_sync(fn, *a)

    def sides(i: int) -> tuple[str, str]:
        return ("nestbox", "raw") if i % 2 else ("raw", "nestbox")

    for i in range(args.n + 1):
        counted_nb, counted_rw = (nb, rw) if i else (None, None)
        for side in sides(i):
            if side == "nestbox":
                await nestbox_restore_pause(rt, counted_nb)
            else:
                await raw_side(raw_restore_snapshot, raw, counted_rw)
    for i in range(args.rss):
        for side in sides(i):
            if side == "nestbox":
                nb.add("rss", await nestbox_rss(rt))
            else:
                rw.add("rss", await raw_side(raw_rss, raw))
    for i in range(args.boots):
        for side in sides(i):
            if side == "nestbox":
                nb.add("boot", await nestbox_boot(rt, image))
            else:
                rw.add("boot", await raw_side(raw.boot))
    return rw, nb


def _fmt(value: float, unit: str) -> str:
    return f"{value:.3f} s" if unit == "s" else f"{value:.0f} MiB"


def table(raw: Results, nb: Results) -> str:
    rows = [("restore/clone -> envd ready", "restore", "s"),
            ("cold boot -> envd ready", "boot", "s"),
            ("snapshot (raw) / pause (Nestbox)", "snapshot", "s"),
            ("RSS per idle clone", "rss", "MiB")]  # fmt: skip
    out = [f"{'median':<34} {'raw QEMU':>10} {'Nestbox':>10} {'ratio':>7}   runs (raw/Nestbox)"]
    for label, key, unit in rows:
        if not raw.values[key] or not nb.values[key]:
            continue  # not measured this run (`--boots 0`, `--rss 0`)
        r, b = statistics.median(raw.values[key]), statistics.median(nb.values[key])
        out.append(f"{label:<34} {_fmt(r, unit):>10} {_fmt(b, unit):>10} {b / r:>6.2f}x   "
                   f"{len(raw.values[key])}/{len(nb.values[key])}")  # fmt: skip
    return "\n".join(out)


def breakdown(raw: Results, nb: Results, *, verbose: bool) -> str:
    out = ["", "step breakdown (medians, ms; a step's median, so they need not add up):"]
    for key, title in (("restore", "restore/clone"), ("snapshot", "snapshot/pause")):
        for side, res in (("raw", raw), ("Nestbox", nb)):
            parts = [
                f"{name} {statistics.median(v) * 1000:.0f}" for name, v in res.steps[key].items()
            ]
            out.append(f"  {title:<15} {side:<8} " + ", ".join(parts))
            if verbose:
                runs = " ".join(f"{v * 1000:.0f}" for v in res.values[key])
                out.append(f"  {'':<15} {'':<8} every run: {runs}")
    out.append(
        f"  Nestbox clones that got a warm slot network: {nb.warm}/{len(nb.values['restore'])}"
    )
    return "\n".join(out)


def _loadavg() -> str:
    """The host's load: figures taken on a busy machine are noisier (both sides alike)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def guest_image(settings: AgentSettings, guest_dir: str | None) -> GuestImage | None:
    """The image in `guest_dir` (vmlinux, initramfs.cpio.gz, rootfs.ext4), else this tree's."""
    if not guest_dir:
        return find_image(settings)
    d = Path(guest_dir)
    return GuestImage("bench-" + d.name, d / "vmlinux", d / "initramfs.cpio.gz", d / "rootfs.ext4")


async def main(args: argparse.Namespace, blackholes: str) -> int:
    work = Path(tempfile.mkdtemp(prefix="nbbench-", dir="/tmp"))
    settings = AgentSettings(
        data_dir=work / "d",
        image_cache=AgentSettings().images_dir,
        agent_id="bench",
        slot_cidr=SLOT_CIDR,
        veth_cidr=VETH_CIDR,
        slot_first=args.slot_first,
        slot_count=20,
        warm_slots=args.warm_slots,
    )
    image = guest_image(settings, args.guest_dir)
    if image is None:
        print("no guest image: run 'nestbox-agent image build' first", file=sys.stderr)
        return 1
    raw: RawBench | None = None
    load_before = _loadavg()
    try:
        async with VmRuntime.open(settings, RealSystem()) as rt:
            try:
                t0 = time.monotonic()
                template = await rt.ensure_template(image, "minimal")
                print(f"template minimal built in {time.monotonic() - t0:.1f} s "
                      f"(accel {rt.accel.accel}: {rt.accel.reason})", file=sys.stderr)  # fmt: skip
                raw = RawBench(work, template.dir.root, image, fd=args.raw_fd, settings=settings)
                rt.networks.start()
                print("raw QEMU and Nestbox runs, alternating...", file=sys.stderr)
                raw_res, nb_res = await run_both(rt, raw, image, args)
            finally:
                await rt.destroy_all()
                if raw is not None:
                    raw.close()
        print(table(raw_res, nb_res))
        print(f"load average (1/5/15 min) before: {load_before}, after: {_loadavg()}")
        print(breakdown(raw_res, nb_res, verbose=args.verbose))
        return 0
    finally:
        if raw is not None:
            raw.close()
        shutil.rmtree(work, ignore_errors=True)
        for cidr in (SLOT_CIDR, VETH_CIDR):
            if cidr not in blackholes:
                await anyio.run_process(["ip", "route", "del", "blackhole", cidr], check=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="restores and snapshots per side")
    parser.add_argument("--boots", type=int, default=3, help="cold boots per side")
    parser.add_argument("--rss", type=int, default=3, help="idle clones measured per side")
    parser.add_argument("--warm-slots", type=int, default=AgentSettings().warm_slots,
                        help="Nestbox's warm slot pool (the agent's default)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run too")
    parser.add_argument("--raw-fd", action="store_true",
                        help="the raw side migrates through fd: (as Nestbox does), "
                             "not VMM.md's exec:cat")  # fmt: skip
    parser.add_argument("--slot-first", type=int,
                        default=int(os.environ.get("NESTBOX_TEST_SLOT_FIRST", "1")),
                        help="first of the 20 slots used (default $NESTBOX_TEST_SLOT_FIRST or 1: "
                             "a run beside a test session needs slots of its own)")  # fmt: skip
    parser.add_argument("--guest-dir", help="vmlinux/initramfs.cpio.gz/rootfs.ext4 to use")
    if os.geteuid() != 0:
        sys.exit("bench-vm needs root (network namespaces, TAP devices)")
    existing_blackholes = sh("ip", "route", "show", "type", "blackhole")
    sys.exit(anyio.run(main, parser.parse_args(), existing_blackholes))
