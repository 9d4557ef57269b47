"""`make bench-vm`: raw QEMU vs Nestbox, side by side in one run (root; medians).

  restore → envd /health   raw: a QEMU started by hand (`-incoming defer`, the template's RAM
                           file mapped copy-on-write, a fresh overlay) into a netns made
                           beforehand; Nestbox: `VmRuntime.clone` to envd ready + `/init`
                           (slot, netns, firewall, overlay, QEMU, restore, health, init)
  cold boot → envd /health raw: QEMU by hand; Nestbox: `VmRuntime.boot` (+ network, + /init)
  snapshot                 raw: QMP stop + migrate to a file + kill; Nestbox: `pause` (+
                           /snapshot/prepare, + network teardown)
  RSS per idle clone       VmRSS of each QEMU 3 s after its restore

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
from typing import Any

import anyio

from nestbox.hostagent.image.cache import find_image
from nestbox.hostagent.image.layout import GuestImage
from nestbox.hostagent.runtime import VmRuntime
from nestbox.hostagent.settings import AgentSettings
from nestbox.hostagent.system import RealSystem

SLOT_CIDR, VETH_CIDR = "10.232.0.0/16", "10.231.0.0/16"
GUEST, PORT = "169.254.0.21", 49983
CLONE_NEWNET = 0x40000000


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

    def cmd(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
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
    def __init__(self, work: Path, template_dir: Path, image: GuestImage) -> None:
        self.work, self.tdir, self.image = work, template_dir, image
        self.meta = json.loads((template_dir / "template.json").read_text())
        self.ns = RawNetns()
        self.n = 0
        self.started: list[subprocess.Popen[bytes]] = []

    def _start(
        self, base: Path, base_fmt: str, mem: Path | None, incoming: bool
    ) -> tuple[subprocess.Popen[bytes], Path]:
        self.n += 1
        run = self.work / f"raw{self.n}"
        run.mkdir()
        disk = run / "disk.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_fmt, str(disk))
        out = (run / "qemu.log").open("wb")
        qemu = subprocess.Popen(raw_argv(self.meta, run, disk, mem, self.ns.name, incoming),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        self.started.append(qemu)
        return qemu, run

    def restore(self) -> tuple[float, subprocess.Popen[bytes], Path]:
        t0 = time.monotonic()
        qemu, run = self._start(self.tdir / "disk.qcow2", "qcow2", self.tdir / "mem", True)
        q = RawQmp(run / "qmp.sock")
        q.cmd("migrate-set-capabilities",
              capabilities=[{"capability": "x-ignore-shared", "state": True}])  # fmt: skip
        q.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(self.tdir / 'state'))}")
        while q.cmd("query-status")["status"] == "inmigrate":
            time.sleep(0.002)
        q.cmd("cont")
        return self.ns.wait_health(qemu, t0), qemu, run

    def boot(self) -> float:
        t0 = time.monotonic()
        qemu, _ = self._start(self.image.rootfs, "raw", None, False)
        try:
            return self.ns.wait_health(qemu, t0)
        finally:
            kill(qemu)

    def snapshot(self, qemu: subprocess.Popen[bytes], run: Path) -> float:
        q = RawQmp(run / "qmp.sock")
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 30})
        t0 = time.monotonic()
        q.cmd("stop")
        q.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(run / 'snap.state'))}")
        while q.cmd("query-migrate").get("status") not in ("completed", "failed", "cancelled"):
            time.sleep(0.002)
        kill(qemu)
        return time.monotonic() - t0

    def close(self) -> None:
        for qemu in self.started:
            kill(qemu)
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


async def nestbox_side(rt: VmRuntime, image: GuestImage, n: int, boots: int) -> dict[str, Any]:
    res: dict[str, list[float]] = {"restore": [], "boot": [], "snapshot": [], "rss": []}
    for _ in range(n):
        t0 = time.monotonic()
        [c] = await rt.clone("minimal")
        res["restore"].append(time.monotonic() - t0)
        await anyio.sleep(0.5)
        t0 = time.monotonic()
        await rt.pause(c.id)
        res["snapshot"].append(time.monotonic() - t0)
        await rt.destroy(c.id)
    idle = await rt.clone("minimal", 3)
    await anyio.sleep(3)
    res["rss"] = [rss_mib(c.pid) for c in idle if c.pid]
    await rt.destroy_all()
    for _ in range(boots):
        t0 = time.monotonic()
        c = await rt.boot(image, template_id="bench")
        res["boot"].append(time.monotonic() - t0)
        await rt.destroy(c.id)
    return res


def raw_side(raw: RawBench, n: int, boots: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {"restore": [], "boot": [], "snapshot": [], "rss": []}
    for _ in range(n):
        took, qemu, run = raw.restore()
        res["restore"].append(took)
        time.sleep(0.5)
        res["snapshot"].append(raw.snapshot(qemu, run))
    for _ in range(2):
        took, qemu, _ = raw.restore()
        time.sleep(3)
        res["rss"].append(rss_mib(qemu.pid))
        kill(qemu)
    for _ in range(boots):
        res["boot"].append(raw.boot())
    return res


def _fmt(value: float, unit: str) -> str:
    return f"{value:.3f} s" if unit == "s" else f"{value:.0f} MiB"


def table(raw: dict[str, list[float]], nb: dict[str, list[float]]) -> str:
    rows = [("restore/clone -> envd ready", "restore", "s"),
            ("cold boot -> envd ready", "boot", "s"),
            ("snapshot (raw) / pause (Nestbox)", "snapshot", "s"),
            ("RSS per idle clone", "rss", "MiB")]  # fmt: skip
    out = [f"{'median':<34} {'raw QEMU':>10} {'Nestbox':>10} {'ratio':>7}   runs (raw/Nestbox)"]
    for label, key, unit in rows:
        r, b = statistics.median(raw[key]), statistics.median(nb[key])
        out.append(f"{label:<34} {_fmt(r, unit):>10} {_fmt(b, unit):>10} {b / r:>6.2f}x   "
                   f"{len(raw[key])}/{len(nb[key])}")  # fmt: skip
    return "\n".join(out)


async def main(args: argparse.Namespace, blackholes: str) -> int:
    work = Path(tempfile.mkdtemp(prefix="nbbench-", dir="/tmp"))
    settings = AgentSettings(
        data_dir=work / "d",
        image_cache=AgentSettings().images_dir,
        agent_id="bench",
        slot_cidr=SLOT_CIDR,
        veth_cidr=VETH_CIDR,
        slot_first=1,
        slot_count=20,
    )
    if args.guest_dir:
        d = Path(args.guest_dir)
        image: GuestImage | None = GuestImage(
            "bench-" + d.name, d / "vmlinux", d / "initramfs.cpio.gz", d / "rootfs.ext4"
        )
    else:
        image = find_image(settings)
    if image is None:
        print("no guest image: run 'nestbox-agent image build' first", file=sys.stderr)
        return 1
    raw: RawBench | None = None
    try:
        async with VmRuntime.open(settings, RealSystem()) as rt:
            try:
                t0 = time.monotonic()
                template = await rt.ensure_template(image, "minimal")
                print(f"template minimal built in {time.monotonic() - t0:.1f} s "
                      f"(accel {rt.accel.accel}: {rt.accel.reason})", file=sys.stderr)  # fmt: skip
                raw = RawBench(work, template.dir.root, image)
                print("raw QEMU runs...", file=sys.stderr)
                raw_res = await anyio.to_thread.run_sync(raw_side, raw, args.n, args.boots)
                print("Nestbox runs...", file=sys.stderr)
                nb_res = await nestbox_side(rt, image, args.n, args.boots)
            finally:
                await rt.destroy_all()
        print(table(raw_res, nb_res))
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
    parser.add_argument("-n", type=int, default=7, help="restores and snapshots per side")
    parser.add_argument("--boots", type=int, default=3, help="cold boots per side")
    parser.add_argument("--guest-dir", help="vmlinux/initramfs.cpio.gz/rootfs.ext4 to use")
    if os.geteuid() != 0:
        sys.exit("bench-vm needs root (network namespaces, TAP devices)")
    existing_blackholes = sh("ip", "route", "show", "type", "blackhole")
    sys.exit(anyio.run(main, parser.parse_args(), existing_blackholes))
