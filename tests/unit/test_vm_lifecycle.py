"""The capsule state machine, its record on disk, and the undo stacks the lifecycle runs on."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from nestbox.hostagent import capsule as cap
from nestbox.hostagent.capsule import (
    CapsuleRecord,
    CapsuleState,
    InvalidState,
    MachineRecord,
)
from nestbox.hostagent.lifecycle import UndoStack, unwind, unwind_after_failure
from nestbox.hostagent.undo import TeardownError
from nestbox.hostagent.vmm.base import RamSpec

S = CapsuleState


def record(tmp_path: Path, state: CapsuleState = S.STARTING) -> CapsuleRecord:
    machine = MachineRecord(kernel=Path("/k"), initrd=None, cmdline="quiet", vcpus=1,
                            memory_mib=256, image_version="v1")  # fmt: skip
    return CapsuleRecord(id=cap.new_capsule_id(), template_id="minimal", state=state,
                         machine=machine, ram="anonymous", dir=tmp_path / "c",
                         disk=tmp_path / "c" / "disk.qcow2")  # fmt: skip


def test_capsule_ids() -> None:
    cid = cap.new_capsule_id()
    assert cid.startswith("cl-")
    assert len(cid) == 28
    assert cid[3:].isalnum()
    assert cid[3:] == cid[3:].lower()


def test_legal_path_through_the_states(tmp_path: Path) -> None:
    r = record(tmp_path)
    for state in (S.RUNNING, S.PAUSING, S.PAUSED, S.RESUMING, S.RUNNING, S.SNAPSHOTTING,
                  S.STOPPED):  # fmt: skip
        r = r.moved_to(state)
    assert r.state == S.STOPPED


@pytest.mark.parametrize(("current", "target"), [(S.STARTING, S.PAUSING), (S.PAUSED, S.RUNNING),
                                                 (S.STOPPED, S.STOPPING)])  # fmt: skip
def test_illegal_moves_raise(tmp_path: Path, current: CapsuleState, target: CapsuleState) -> None:
    with pytest.raises(InvalidState) as err:
        record(tmp_path, current).moved_to(target)
    assert err.value.current == current


def test_every_state_can_be_stopped_but_stopped() -> None:
    for state, moves in cap.TRANSITIONS.items():
        assert (S.STOPPING in moves) or state in (S.STOPPING, S.STOPPED, S.ERROR)
    assert cap.TRANSITIONS[S.ERROR] == {S.STOPPED}  # nothing is left of it: destroy forgets it


def test_every_state_but_stopped_can_fail() -> None:
    for state, moves in cap.TRANSITIONS.items():
        assert (S.ERROR in moves) or state in (S.STOPPED, S.ERROR)


def test_record_round_trip(tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    cap.records_dir(state_dir).mkdir(parents=True)
    r = record(tmp_path).model_copy(update={"slot": 4, "pid": 123, "env_vars": {"A": "b"}})
    cap.write_record(state_dir, r)
    assert cap.read_records(state_dir) == [r]
    cap.remove_record(state_dir, r.id)
    assert cap.read_records(state_dir) == []


def test_read_records_skips_unreadable_ones(tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    cap.records_dir(state_dir).mkdir(parents=True)
    r = record(tmp_path)
    cap.write_record(state_dir, r)
    (cap.records_dir(state_dir) / "cl-broken.json").write_text("{not json")
    assert cap.read_records(state_dir) == [r]
    assert cap.read_records(tmp_path / "nowhere") == []


def test_ram_spec_and_run_dir_follow_the_record(tmp_path: Path) -> None:
    r = record(tmp_path)
    mem = tmp_path / "mem"
    assert r.ram_spec() == RamSpec()
    assert r.model_copy(update={"ram": "template", "ram_file": mem}).ram_spec() == RamSpec(
        file=mem, share=False
    )
    assert r.model_copy(update={"ram": "shared", "ram_file": mem}).ram_spec() == RamSpec(
        file=mem, share=True
    )
    assert r.model_copy(update={"ram": "shared"}).ram_spec() == RamSpec()  # no file recorded
    assert r.run_dir == tmp_path / "c" / "run"


async def test_undo_runs_every_step_in_reverse_and_collects_failures() -> None:
    done: list[str] = []
    stack = UndoStack("test")

    async def undo(name: str, fail: bool = False) -> None:
        done.append(name)
        if fail:
            raise RuntimeError(name)

    stack.push_async_callback(undo, "first")
    stack.push_async_callback(undo, "second", fail=True)
    stack.push_async_callback(undo, "third", fail=True)
    with pytest.raises(TeardownError) as err:
        await unwind(stack, 5)
    assert done == ["third", "second", "first"]
    assert [str(e) for e in err.value.errors] == ["third", "second"]


async def test_unwind_is_shielded_from_cancellation() -> None:
    done: list[str] = []
    stack = UndoStack("test")

    async def slow_undo() -> None:
        await anyio.sleep(0.05)
        done.append("undone")

    stack.push_async_callback(slow_undo)
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.lowlevel.checkpoint()
        finally:
            await unwind_after_failure(stack, 5)
    assert done == ["undone"]


async def test_unwind_has_its_own_deadline() -> None:
    stack = UndoStack("test")
    stack.push_async_callback(anyio.sleep, 10)
    with pytest.raises(TeardownError) as err:
        await unwind(stack, 0.05)
    assert isinstance(err.value.errors[0], TimeoutError)
