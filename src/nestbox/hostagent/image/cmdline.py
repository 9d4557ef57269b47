"""The guest kernel's command line, and the host TSC frequency it needs.

Under TCG a busy host can make the guest's TSC calibration hang; `tsc_early_khz` skips the
calibration. The value must be the host's real TSC rate, so it is read from the host, never
hard-coded: sysfs (when the kernel exports it), else the kernel log's calibration lines, else
/proc/cpuinfo.

The rest keeps an idle guest asleep (the guest kernel is tickless when idle, `NO_HZ_IDLE`; every
wake-up of an idle guest costs the host CPU, most under TCG):
- `tsc=reliable`: no clocksource watchdog. It checks the TSC against jiffies every 0.5 s, and on
  a loaded host (a vCPU thread not scheduled for a while loses ticks, so jiffies lag; the TSC,
  derived from the host's clock, does not) it marks the TSC unstable and the guest falls back to
  the jiffies clocksource (microvm has no HPET or ACPI PM timer), which needs the periodic tick:
  250 timer interrupts a second for the rest of the VM's life (seen in `bench-density`'s guests).
- `nowatchdog`: no soft-lockup watchdog (an hrtimer every 4 s, plus its per-CPU thread); a
  guest stalled by its host is not a lockup to report anyway.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

BASE_ARGS = ("console=ttyS0", "reboot=t", "panic=-1", "root=/dev/vda", "rw", "quiet",
             "tsc=reliable", "nowatchdog")  # fmt: skip
_REFINED = re.compile(r"tsc: Refined TSC clocksource calibration: ([\d.]+) MHz")
_DETECTED = re.compile(r"tsc: Detected ([\d.]+) MHz")
_CPUINFO = re.compile(r"^cpu MHz\s*:\s*([\d.]+)", re.MULTILINE)


def kernel_cmdline(
    guest_ip: str,
    gw: str,
    capsule_id: str,
    template_id: str,
    extra: Sequence[str] = (),
    *,
    tsc_khz: int | None = None,
) -> str:
    """The command line for a capsule VM; `tsc_khz` defaults to `host_tsc_khz()`.

    :raise ValueError: a value is empty where it must not be, or contains whitespace.
    """
    khz = tsc_khz if tsc_khz is not None else host_tsc_khz()
    ours = {
        "nestbox.guest_ip": guest_ip,
        "nestbox.gw": gw,
        "nestbox.capsule_id": capsule_id,
        "nestbox.template_id": template_id,
    }
    for key, value in ours.items():
        if re.search(r"\s", value) or (not value and key in ("nestbox.guest_ip", "nestbox.gw")):
            raise ValueError(f"bad kernel parameter {key}={value!r}")
    args = [*BASE_ARGS, f"tsc_early_khz={khz}", *(f"{k}={v}" for k, v in ours.items() if v)]
    return " ".join([*args, *extra])


@functools.cache
def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz (read once per process).

    :raise RuntimeError: no source gave a value.
    """
    for source in (_from_sysfs, _from_kmsg, _from_cpuinfo):
        khz = source()
        if khz:
            return khz
    raise RuntimeError("cannot determine the host TSC frequency")


def parse_kernel_log(text: str) -> int | None:
    """kHz from the kernel's TSC lines; the refined calibration wins over the first guess."""
    for pattern in (_REFINED, _DETECTED):
        if found := pattern.findall(text):
            return _mhz_to_khz(found[-1])
    return None


def parse_cpuinfo(text: str) -> int | None:
    m = _CPUINFO.search(text)
    return _mhz_to_khz(m.group(1)) if m else None


def _mhz_to_khz(mhz: str) -> int:
    return round(float(mhz) * 1000)


def _from_sysfs() -> int | None:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        return None


def _from_kmsg() -> int | None:
    """Read the kernel log's records without blocking (root only; None otherwise)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    records: list[str] = []
    try:
        while True:
            try:
                records.append(os.read(fd, 8192).decode(errors="replace"))
            except BlockingIOError:
                break  # the end of the buffer
            except OSError as err:
                if err.errno != errno.EPIPE:  # EPIPE: a record was overwritten; keep going
                    break
    finally:
        os.close(fd)
    return parse_kernel_log("\n".join(records))


def _from_cpuinfo() -> int | None:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None
