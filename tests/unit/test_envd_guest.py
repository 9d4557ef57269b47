"""guest.py: outside a VM nothing touches the machine; inside, the right syscalls are made."""

from __future__ import annotations

import os
import pwd
import struct
import time
from typing import TYPE_CHECKING, cast

import pytest

from nestbox.envd import guest, users
from nestbox.envd.errors import UnknownUser
from nestbox.envd.guest import RNDADDENTROPY, RNDRESEEDCRNG, GuestMachine
from nestbox.envd.metrics import parse_cpu_times, parse_meminfo
from nestbox.envd.state import Identity
from tests.fakes.guest import FakeSyscalls

if TYPE_CHECKING:
    from pathlib import Path


def far_future_ns() -> int:
    """An hour from now (computed when asked: the suite may run long after import)."""
    return (time.time_ns() // 10**9 + 3600) * 10**9


def test_outside_a_vm_every_function_is_a_no_op() -> None:
    machine = GuestMachine(in_vm=False, syscalls=FakeSyscalls(refuse=True))
    assert machine.set_clock(far_future_ns()) is None
    assert machine.reseed_rng(b"\x01" * 32) is False
    machine.sync()
    assert machine.kernel_params() == {}
    assert machine.forward_address({"nestbox.guest_ip": "10.0.0.2"}) is None


def test_in_a_vm_the_rng_gets_the_entropy_then_a_forced_reseed() -> None:
    fake = FakeSyscalls()
    assert GuestMachine(in_vm=True, syscalls=fake).reseed_rng(b"\xaa" * 40)
    (add, reseed) = fake.calls
    assert add[0] == "rng_ioctl"
    request, info = cast("tuple[int, bytes]", add[1])
    assert request == RNDADDENTROPY
    assert struct.unpack("ii", info[:8]) == (40 * 8, 40)
    assert info[8:] == b"\xaa" * 40
    assert reseed == ("rng_ioctl", (RNDRESEEDCRNG, None))


def test_in_a_vm_the_clock_is_stepped_only_when_far_off() -> None:
    fake = FakeSyscalls()
    machine = GuestMachine(in_vm=True, syscalls=fake)
    assert machine.set_clock(time.time_ns()) is None  # within tolerance
    assert fake.calls == []
    target = far_future_ns()
    step = machine.set_clock(target)
    assert step is not None
    assert 3590 < step <= 3601
    assert fake.calls == [("clock_settime_ns", target)]


def test_in_a_vm_prepare_syncs_the_disks() -> None:
    fake = FakeSyscalls()
    GuestMachine(in_vm=True, syscalls=fake).sync()
    assert fake.calls == [("sync", None)]


def test_kernel_command_line_gives_identity_and_forward_address() -> None:
    cmdline = (
        "console=ttyS0 root=/dev/vda nestbox.capsule_id=cl-abc "
        "nestbox.template_id=minimal nestbox.guest_ip=10.11.0.2 quiet\n"
    )
    fake = FakeSyscalls(files={"/proc/cmdline": cmdline}, interfaces={"eth0": "10.99.0.2"})
    machine = GuestMachine(in_vm=True, syscalls=fake)
    params = machine.kernel_params()
    identity = Identity()
    guest.identity_from_params(params, identity)
    assert identity == Identity(capsule_id="cl-abc", template_id="minimal")
    assert machine.forward_address(params) == "10.11.0.2"
    assert machine.forward_address({}) == "10.99.0.2"  # no parameter: eth0's address
    assert machine.forward_address({"nestbox.guest_ip": "169.254.0.21/30"}) == "169.254.0.21"


def test_identity_files_are_written_in_both_modes(tmp_path: Path) -> None:
    guest.write_identity(tmp_path / "run", Identity(capsule_id="cl-1", template_id="t-1"))
    assert (tmp_path / "run" / "NESTBOX_CAPSULE_ID").read_text() == "cl-1"
    assert (tmp_path / "run" / "NESTBOX_TEMPLATE_ID").read_text() == "t-1"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "NESTBOX_CAPSULE_ID",
        "NESTBOX_TEMPLATE_ID",
    ]


def test_identity_files_unchanged_since_the_last_write_are_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    written = guest.write_identity(run, Identity(capsule_id="cl-1", template_id="t-1"))
    (run / "NESTBOX_TEMPLATE_ID").unlink()  # would come back if it were rewritten
    written = guest.write_identity(run, Identity(capsule_id="cl-2", template_id="t-1"), written)
    assert written == {"NESTBOX_CAPSULE_ID": "cl-2", "NESTBOX_TEMPLATE_ID": "t-1"}
    assert (run / "NESTBOX_CAPSULE_ID").read_text() == "cl-2"
    assert not (run / "NESTBOX_TEMPLATE_ID").exists()


def test_metrics_parsers() -> None:
    stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\n"
    times = parse_cpu_times(stat)
    assert (times.busy, times.total) == (150, 1000)
    total, used = parse_meminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 600 kB\n")
    assert (total, used) == (1000 * 1024, 400 * 1024)


def test_found_users_are_cached_until_the_user_files_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restore the page cache is empty: a cached look-up costs two stats, no reads.
    `cached_user` (what a Start uses on the event loop) answers from the cache only."""
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text("v1")
    group.write_text("v1")
    monkeypatch.setattr(users, "USER_FILES", (passwd, group))
    monkeypatch.setattr(users, "_cache", {})
    me = pwd.getpwuid(os.geteuid()).pw_name
    reads: list[str] = []
    real = users._read_user

    def read_user(name: str) -> users.User:
        reads.append(name)
        return real(name)

    monkeypatch.setattr(users, "_read_user", read_user)
    assert users.cached_user(me) is None
    first = users.lookup_user(me)
    assert users.lookup_user(me) == first
    assert users.cached_user(me) == first
    assert reads == [me]
    group.write_text("v2, longer")  # a group edit: looked up again
    assert users.cached_user(me) is None
    assert users.lookup_user(me) == first
    assert reads == [me, me]
    with pytest.raises(UnknownUser):
        users.lookup_user("no-such-user-here")
    with pytest.raises(UnknownUser):
        users.lookup_user("no-such-user-here")  # misses are never cached


def test_the_host_name_and_its_hosts_line_are_set_apart(tmp_path: Path) -> None:
    """`/init` sets the kernel's name; `/etc/hosts` is written later (`lifecycle.pin_hostname`)."""
    outside = GuestMachine(in_vm=False, syscalls=FakeSyscalls(refuse=True))
    assert outside.set_hostname("cl-1") is False
    outside.pin_hostname("cl-1")
    fake = FakeSyscalls()
    machine = GuestMachine(in_vm=True, syscalls=fake)
    assert machine.set_hostname("cl-1") is True
    assert fake.calls == [("set_hostname", "cl-1")]
    machine.pin_hostname("cl-1")
    assert fake.calls[-1] == ("pin_in_hosts", "cl-1")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n127.0.1.1\tthe-template\n::1\tlocalhost\n")
    guest._pin_in_hosts(hosts, "cl-1")
    assert hosts.read_text() == "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\tcl-1\n"
    assert hosts.stat().st_mode & 0o777 == 0o644
