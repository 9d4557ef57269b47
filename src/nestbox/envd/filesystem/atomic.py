"""Files written under a hidden temporary name and renamed over their target when complete.

A failed or interrupted upload therefore leaves the old file (or nothing) in place, never half a
file. The temporary file sits in the target's directory, so the rename stays on one filesystem,
and its name starts with `TEMP_PREFIX`, which the directory watchers skip.

Watchers see an upload as E2B's envd (which writes in place) makes it look, the sequence E2B's
SDK tests wait for: CREATE, CHMOD, WRITE for a new file, WRITE for a replaced one that already
belonged to the user. So after the rename the file is chowned to the user (reported as CHMOD;
skipped for a replaced file whose owner does not change) and its length is set again (a no-op
for the content, reported as WRITE); and a file replacing another is renamed from a
`REPLACE_PREFIX` name, whose rename the watchers drop.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from typing import TYPE_CHECKING

from nestbox.envd.filesystem.paths import chown_to

if TYPE_CHECKING:
    from pathlib import Path

    from nestbox.envd.users import User

TEMP_PREFIX = ".nestbox-upload-"
REPLACE_PREFIX = TEMP_PREFIX + "r-"  # mkstemp's random part never contains "-"
NEW_FILE_MODE = 0o644


class AtomicFile:
    """One file being written. Blocking calls: use from a worker thread.

    :raise OSError: from the constructor and `write` (ENOSPC included).
    """

    def __init__(self, target: Path, user: User, *, requested: Path | None = None) -> None:
        self.target = target
        self.requested = requested or target
        """The path the client named; `target` differs when that is a symlink."""
        self.user = user
        self.size = 0
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
        self._fd: int | None = fd
        self._tmp: str | None = tmp

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None, "write after commit or abort"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self.size += n

    def fileno(self) -> int:
        """The temporary file's descriptor, for writes made elsewhere (`grew` counts them)."""
        assert self._fd is not None, "fileno after commit or abort"
        return self._fd

    def grew(self, n: int) -> None:
        """`n` more bytes were written at `fileno()`'s position by someone else (splice)."""
        self.size += n

    def commit(self) -> None:
        """Rename the finished file over the target, keeping the target's mode if it existed."""
        assert self._fd is not None, "commit after commit or abort"
        assert self._tmp is not None
        fd = self._fd
        existing: os.stat_result | None
        try:
            existing = os.stat(self.target)
        except FileNotFoundError:
            existing = None
        if existing is None:
            os.fchmod(fd, NEW_FILE_MODE)
        else:
            os.fchmod(fd, stat.S_IMODE(existing.st_mode))
            replacing = os.path.join(
                os.path.dirname(self._tmp), REPLACE_PREFIX + os.urandom(8).hex()
            )
            os.rename(self._tmp, replacing)
            self._tmp = replacing
        os.rename(self._tmp, self.target)
        self._tmp = None
        try:
            owner = (self.user.uid, self.user.gid)
            if existing is None or (existing.st_uid, existing.st_gid) != owner:
                chown_to(fd, self.user)
            os.ftruncate(fd, self.size)  # see the module docstring: reported as WRITE
        finally:
            self._fd = None
            os.close(fd)

    def abort(self) -> None:
        """Drop the temporary file; idempotent, never raises."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None
