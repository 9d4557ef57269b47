"""Which slots a test session's agents use: a band of 1000 claimed with a lock, so that two
sessions on one machine (a developer's `make test` beside CI's, say) never plan the same
addresses. Each slot is a host route and a veth pair: two sessions on the same slot fail with
`RTNETLINK answers: File exists`, or worse, reach each other's guests.

`NESTBOX_TEST_SLOT_FIRST` picks the first slot outright (the benchmarks set it; no lock then).
Otherwise the session takes the first band whose lock file under /run/nestbox-tests it can
lock: 1, 1001, 2001, 5001, … (3001 and 4001 are the benchmarks' defaults). The lock is an
flock held by an open descriptor for the life of the process, so the kernel drops it when the
session ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_DIR = Path("/run/nestbox-tests")
BAND = 1000
BANDS = [1 + BAND * k for k in range(16) if k not in (3, 4)]
"""1 + 1000k: the highest slot a session plans (its first + 399) stays under the limit of a
/16 veth range (16383 slots of four addresses)."""

_claimed: tuple[int, int] | None = None
"""(first slot, the descriptor holding its band's lock), for the life of the process."""


def _try_lock(first: int) -> int | None:
    """A descriptor holding the lock of band `first`, or None when another session holds it."""
    fd = os.open(LOCK_DIR / f"slots-{first}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def claim_slot_first() -> int:
    """The first slot of this session's band (the same band on every call)."""
    global _claimed
    chosen = os.environ.get("NESTBOX_TEST_SLOT_FIRST")
    if chosen:
        return int(chosen)
    if _claimed:
        return _claimed[0]
    try:
        LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return BANDS[0]  # not root: the VM tiers skip (or fail) for that reason, not this one
    for first in BANDS:
        fd = _try_lock(first)
        if fd is not None:
            _claimed = (first, fd)
            return first
    raise RuntimeError(f"every test slot band is in use ({len(BANDS)} sessions at once)")


def sole_session() -> bool:
    """Whether no other session holds a band: only then may this one remove the blackhole
    routes the sessions share."""
    if not LOCK_DIR.is_dir():
        return True
    ours = _claimed[0] if _claimed else None
    for first in BANDS:
        if first == ours:
            continue
        fd = _try_lock(first)
        if fd is None:
            return False
        os.close(fd)
    return True
