"""How each QEMU process is confined, in the spirit of Firecracker's jailer.

QEMU starts as root inside its slot's netns (so it opens its disk, RAM file, kernel, TAP, QMP
socket, serial log and pid file with root's rights), then, right before the guest runs:

- `-chroot <empty root-owned directory>`: from then on it can open no path at all;
- `-runas <uid>:<gid>` with uid = gid = `vm_uid_base + slot`: unique per running VM, so two
  VMMs can never signal, trace or read each other (nor share an RLIMIT_NPROC count); its only
  group is that gid (no supplementary groups; on KVM hosts `/dev/kvm` is opened before the drop,
  so no `kvm` group is needed);
- `-sandbox on` (seccomp): obsolete, spawn (fork/exec) and resourcecontrol syscalls denied.
  `elevateprivileges` must stay allowed: QEMU 7.2 calls setgid/setuid for `-runas` *after* the
  filter is installed (denying it kills QEMU with SIGSYS). After the drop the process has a
  non-zero uid and no capabilities, so the setuid family can no longer gain it anything.
  The fully denied filter would need QEMU started unprivileged with every file handed over as a
  file descriptor, which 7.2 rules out: it opens a template's RAM file O_RDWR even for a private
  (share=off) mapping, so the unprivileged user would need write access to the template.

Before QEMU's `exec` (through `sh` and `prlimit` in front of it, `wrap`): the VM's own cgroup
(`cgroups.py`: memory = guest RAM + `vm_memory_overhead_mib`, CPU = its vCPUs, pids), rlimits
(open files, processes of its uid, no core dumps); and umask 077 (files QEMU creates, such as a
RAM file, are 0600).

What the host lacks is switched off and said (`items`: doctor, and a WARNING at start-up);
nothing is ever off silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nestbox.hostagent.vmm.cgroups import Cgroups, Limits

if TYPE_CHECKING:
    from nestbox.hostagent.settings import AgentSettings
    from nestbox.hostagent.vmm.base import VmSpec

log = logging.getLogger(__name__)

SANDBOX = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
JOIN_CGROUPS = 'for f do shift; [ "$f" = -- ] && break; echo $$ > "$f" || exit 111; done; exec "$@"'
"""`sh -c` script: write our pid into each file argument up to `--`, then exec the rest."""
DENIED = "obsolete, spawn (fork/exec), resourcecontrol"
PROBE_TIMEOUT_S = 10.0
DIR_MODE = 0o700
FILE_MODE = 0o600
CHROOT_DIR = "vmm-root"
"""The empty directory (in the agent's state dir) every VMM is chrooted into."""


@dataclass(frozen=True, slots=True)
class Item:
    """One confinement measure: on or off, and why."""

    name: str
    on: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Confinement:
    """The confinement every VMM of this agent gets. Build it with `probe`."""

    sandbox: bool = False
    uid_base: int | None = None
    """-runas uid = gid = uid_base + slot; None: QEMU stays root."""
    chroot: Path | None = None
    cgroups: Cgroups | None = None
    memory_overhead_mib: int = 0
    pids_max: int = 0
    nofile_max: int = 0
    rlimits: bool = False
    items: tuple[Item, ...] = field(default=())

    @classmethod
    def off(cls, reason: str = "not confined") -> Confinement:
        return cls(items=(Item("confinement", False, reason),))

    @classmethod
    def probe(cls, settings: AgentSettings) -> Confinement:
        """What this host and QEMU support, as `settings` asks. Blocking (a `qemu -version`
        and a few cgroupfs reads, about 25 ms); call it once at start-up."""
        if not settings.confine:
            return cls.off("confine=false in the settings: QEMU runs as root, unconfined")
        items: list[Item] = []
        sandbox, why = _probe_sandbox(settings.qemu_binary)
        items.append(Item("seccomp", sandbox, why))
        uid_base = settings.vm_uid_base
        last = uid_base + settings.slot_first + settings.slot_count - 1
        runas = f"uid = gid = {uid_base} + slot (up to {last}), unique per running VM; "
        items.append(Item("runas", True, runas + "no supplementary groups, no capabilities"))
        jail = settings.state_dir / CHROOT_DIR
        chroot = f"{jail} (empty, root-owned, read-only): after start-up QEMU can open no path"
        items.append(Item("chroot", True, chroot))
        tree = Cgroups.detect(settings.cgroup_root, settings.cgroup_parent, settings.agent_id)
        items += _cgroup_items(tree, settings)
        has_prlimit = shutil.which("prlimit") is not None
        rlimits = (
            f"RLIMIT_NOFILE {settings.vm_nofile_max}, RLIMIT_NPROC {settings.vm_pids_max} "
            "(its uid), RLIMIT_CORE 0"
            if has_prlimit else "no `prlimit` (util-linux) on PATH"
        )  # fmt: skip
        items.append(Item("rlimits", has_prlimit, rlimits))
        return cls(
            sandbox=sandbox, uid_base=uid_base, chroot=jail, cgroups=tree if tree.enabled else None,
            memory_overhead_mib=settings.vm_memory_overhead_mib, pids_max=settings.vm_pids_max,
            nofile_max=settings.vm_nofile_max, rlimits=has_prlimit, items=tuple(items),
        )  # fmt: skip

    def warn_missing(self) -> None:
        """One WARNING per measure that is off (at agent start)."""
        for item in self.items:
            if not item.on:
                log.warning("VM confinement: %s is off: %s", item.name, item.detail)

    # ── per VM ──────────────────────────────────────────────────────────────────────────

    def ids(self, spec: VmSpec) -> tuple[int, int] | None:
        """The VMM's uid and gid (None: it stays root). A VM without a slot gets the base
        itself, which no slot's VM uses (slots start at 1)."""
        if self.uid_base is None:
            return None
        uid = self.uid_base + (spec.slot or 0)
        return uid, uid

    def qemu_args(self, spec: VmSpec) -> list[str]:
        args: list[str] = []
        ids = self.ids(spec)
        if ids is not None:
            args += ["-runas", f"{ids[0]}:{ids[1]}"]
        if self.chroot is not None:
            args += ["-chroot", str(self.chroot)]
        if self.sandbox:
            args += ["-sandbox", SANDBOX]
        return args

    def limits(self, spec: VmSpec) -> Limits:
        return Limits(
            memory_bytes=(spec.memory_mib + self.memory_overhead_mib) << 20,
            cpus=float(spec.vcpus),
            pids=self.pids_max,
        )

    def prepare(self, spec: VmSpec) -> list[Path]:
        """Make what the VMM needs before it starts (its cgroup with limits, the empty chroot);
        return the `cgroup.procs` files it must join (`wrap`). Blocking: run it in a worker
        thread. :raise OSError:"""
        if self.chroot is not None:
            ensure_empty_dir(self.chroot)
        if self.cgroups is None:
            return []
        return self.cgroups.create(spec.name, self.limits(spec))

    def wrap(self, argv: list[str], procs: list[Path]) -> list[str]:
        """`argv` run through `sh` (joins the cgroups: `$$` is the pid QEMU will have, as
        everything after it is `exec`ed) and `prlimit` (the rlimits), both before QEMU's
        `exec`. Not a `preexec_fn`: that makes Python fork instead of vfork, ~20 ms of a
        blocked event loop per launch for an agent-sized process; this costs ~1.5 ms there and
        ~4 ms more in the child. A failed cgroup write ends the child (exit 111, the shell's
        message in the VMM log) before QEMU runs."""
        prefix: list[str] = []
        if procs:
            prefix += ["sh", "-c", JOIN_CGROUPS, "sh", *map(str, procs), "--"]
        if self.rlimits:
            n, p = self.nofile_max, self.pids_max
            prefix += ["prlimit", f"--nofile={n}:{n}", f"--nproc={p}:{p}", "--core=0:0", "--"]
        return prefix + argv

    def release(self, name: str) -> None:
        """Remove the VM's cgroup once its VMM has exited. Blocking. :raise OSError:"""
        if self.cgroups is not None:
            self.cgroups.remove(name)


# ── host checks ─────────────────────────────────────────────────────────────────────────


def _probe_sandbox(binary: str) -> tuple[bool, str]:
    """Whether QEMU accepts our `-sandbox` (it parses the option before `-version` exits) and
    the kernel has seccomp."""
    if "Seccomp:" not in Path("/proc/self/status").read_text():
        return False, "the kernel has no seccomp support"
    try:
        out = subprocess.run(
            [binary, "-sandbox", SANDBOX, "-version"],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"cannot run {binary}: {err}"
    if out.returncode != 0:
        return False, f"{binary} refuses -sandbox: {out.stderr.strip()[-300:]}"
    return True, (
        f"-sandbox {SANDBOX}: {DENIED} denied; elevateprivileges allowed because -runas calls "
        "setuid after the filter is installed (afterwards uid != 0 and no capabilities, so it "
        "gains nothing)"
    )


def _cgroup_items(tree: Cgroups, settings: AgentSettings) -> list[Item]:
    if tree.version is None:
        why = "; ".join(tree.missing.values())
        return [Item("cgroup", False, why)]
    where = f"cgroup v{tree.version} under {settings.cgroup_root}, "
    where += f"<{settings.cgroup_parent}/{settings.agent_id}/capsule>"
    items = [Item("cgroup", True, where)]
    if tree.version == 2:
        swap = "memory.swap.max 0 where the kernel accounts swap"
    elif (settings.cgroup_root / "memory/memory.memsw.limit_in_bytes").exists():
        swap = "no swap beyond it (memsw)"
    else:
        swap = "swap not limited (the kernel has no swap accounting)"
    details = {
        "memory": f"guest RAM + {settings.vm_memory_overhead_mib} MiB, {swap}",
        "cpu": "one core per vCPU (CFS quota)",
        "pids": f"{settings.vm_pids_max} tasks",
    }
    for controller, detail in details.items():
        on = controller in tree.bases
        items.append(
            Item(f"cgroup {controller}", on, detail if on else tree.missing.get(controller, "?"))
        )
    return items


def ensure_empty_dir(path: Path) -> None:
    """`path` exists, is an empty directory owned by root, and nobody may write into it."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o555)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or any(path.iterdir()):
        log.warning("recreating the VMM chroot %s (it was not an empty root-owned dir)", path)
        if stat.S_ISDIR(st.st_mode) and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        path.mkdir(mode=0o555)
        st = path.lstat()
    if stat.S_IMODE(st.st_mode) != 0o555:
        path.chmod(0o555)


def secure_dirs(paths: list[Path]) -> list[str]:
    """Make each directory (parents first) 0700, owner only: create it so, or fix and log an
    existing one that is looser. Return what was fixed."""
    fixed = []
    for path in paths:
        try:
            path.mkdir(mode=DIR_MODE, parents=True)
            continue
        except FileExistsError:
            pass
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != DIR_MODE:
            os.chmod(path, DIR_MODE)
            fixed.append(f"{path} was {mode:04o}")
            log.warning("set %s to 0700 (it was %04o)", path, mode)
    return fixed


def secure_data_dirs(settings: AgentSettings) -> list[str]:
    """`$NESTBOX_DIR` and this agent's directories, 0700 (disks, RAM files, snapshots and
    secrets live below them). The shared image cache keeps its own mode."""
    return secure_dirs([
        settings.data_dir, settings.data_dir / "agents", settings.state_dir,
        settings.state_dir / "capsules", settings.templates_dir,
    ])  # fmt: skip


def remove_leftover_cgroups(settings: AgentSettings, live: set[str]) -> list[str]:
    """Start-up recovery: remove this agent's VM cgroups whose VM is not in `live` (killing
    any process still in one: an orphan VMM). Whether or not `confine` is on now."""
    tree = Cgroups.detect(settings.cgroup_root, settings.cgroup_parent, settings.agent_id)
    removed = tree.remove_leftovers(live)
    if removed:
        log.warning("removed %d leftover VM cgroup(s): %s", len(removed), ", ".join(removed))
    return removed


def remove_agent_cgroups(settings: AgentSettings) -> None:
    """When the runtime closes: this agent's cgroup directories, if no VM is left in them."""
    Cgroups.detect(
        settings.cgroup_root, settings.cgroup_parent, settings.agent_id
    ).remove_agent_dirs()
