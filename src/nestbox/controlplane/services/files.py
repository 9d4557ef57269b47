"""A capsule's files, through its host agent: buffered read/write (at most 100 MiB each),
streamed read/write (no limit, constant memory: chunks pass straight through), list, mkdir,
remove, stat and move. The capsule must be running.

Buffered transfers hold a whole file in memory, so together they are bounded by a
`ByteBudget` (`file_buffer_budget_bytes` per process): each one reserves its bytes as they
arrive (a read from the agent's stream, a write from the upload) and gives them back when its
answer is sent or it fails; one that would go over is refused with 503 `unavailable` and a
`Retry-After`, never an out-of-memory. The bytes are counted once; the copies made on the way
(the agent call's message) are transient.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import TYPE_CHECKING, Literal

from protobuf import Oneof

from nestbox.common.batches import batches
from nestbox.controlplane.errors import Busy, TooLarge
from nestbox.controlplane.services.views import file_entry_view
from nestbox.protocol.files import MAX_BUFFERED_FILE, EntryListView, EntryView
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nestbox.controlplane.services.principal import Principal
    from nestbox.controlplane.services.targets import Targets


MESSAGE_BYTES = 1024 * 1024
"""A streamed upload's bytes go to the agent in messages of about this size: the multipart
parser hands out what each network read held (a few KiB to 64 KiB), and every message costs
about the same on each hop (agent, envd) whatever its size."""


class ByteBudget:
    """Bytes that buffered transfers of this process may hold at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def hold(self) -> Held:
        """A new, empty reservation (give it back with `release`)."""
        return Held(self)


class Held:
    """One transfer's share of a `ByteBudget`."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.size = 0

    def add(self, n: int) -> None:
        """Reserve `n` more bytes. :raise Busy: the budget would be exceeded."""
        if self._budget.in_use + n > self._budget.limit:
            raise Busy("too many file transfers in progress; retry, or use files/stream/*",
                       retry_after_s=1)  # fmt: skip
        self._budget.in_use += n
        self.size += n

    def release(self) -> None:
        """Give everything back (idempotent)."""
        self._budget.in_use -= self.size
        self.size = 0


class FileService:
    def __init__(self, targets: Targets, *, buffer_budget_bytes: int = 256 * 1024 * 1024) -> None:
        self._targets = targets
        self.budget = ByteBudget(buffer_budget_bytes)

    async def running(self, principal: Principal, capsule_id: str) -> None:
        """:raise NotFound: :raise InvalidState: not running (checked before an upload)."""
        await self._targets.running(principal, capsule_id)

    async def read(self, principal: Principal, capsule_id: str, path: str, held: Held) -> bytes:
        """The whole file, its bytes reserved in `held` as they arrive (the caller releases
        them once they are sent). :raise NotFound: no such file (or capsule).
        :raise TooLarge: over 100 MiB. :raise Busy: over the process's budget."""
        target = await self._targets.running(principal, capsule_id)
        chunks: list[bytes] = []
        size = 0
        async with aclosing(target.agent.read_file_stream(capsule_id, path)) as source:  # type: ignore[type-var]  # an async generator
            async for chunk in source:
                size += len(chunk)
                if size > MAX_BUFFERED_FILE:
                    raise TooLarge(f"the file is larger than {MAX_BUFFERED_FILE} bytes; "
                                   "use files/stream/read")  # fmt: skip
                held.add(len(chunk))
                chunks.append(chunk)
        return b"".join(chunks)

    async def write(self, principal: Principal, capsule_id: str, path: str, data: bytes) -> None:
        """Replace (or create, with its parents) the file. :raise TooLarge: over 100 MiB."""
        if len(data) > MAX_BUFFERED_FILE:
            raise TooLarge(f"the file is larger than {MAX_BUFFERED_FILE} bytes; "
                           "use files/stream/write")  # fmt: skip
        target = await self._targets.running(principal, capsule_id)
        await target.agent.write_file(capsule_id, path, data)

    async def open_read(
        self, principal: Principal, capsule_id: str, path: str
    ) -> AsyncIterator[bytes]:
        """The file's bytes as they arrive. The first chunk is fetched before this returns,
        so a missing file raises here (`NotFound`), before any answer has started."""
        target = await self._targets.running(principal, capsule_id)
        source = target.agent.read_file_stream(capsule_id, path)
        first = await anext(source, b"")
        return _prepend(first, source)

    async def write_stream(
        self, principal: Principal, capsule_id: str, path: str, chunks: AsyncIterator[bytes]
    ) -> int:
        """Stream `chunks` into the file (replaced when complete); the bytes written."""
        target = await self._targets.running(principal, capsule_id)

        async def messages() -> AsyncIterator[pb.WriteFileStreamRequest]:
            meta = pb.WriteFileMeta(capsule_id=capsule_id, path=path)
            yield pb.WriteFileStreamRequest(message=Oneof[Literal["meta"], pb.WriteFileMeta](
                "meta", meta))  # fmt: skip
            async for batch in batches(chunks, MESSAGE_BYTES):
                yield pb.WriteFileStreamRequest(
                    message=Oneof[Literal["chunk"], bytes]("chunk", b"".join(batch))
                )

        done = await target.agent.write_file_stream(messages())
        return done.bytes_written

    async def list_dir(
        self, principal: Principal, capsule_id: str, path: str, depth: int
    ) -> EntryListView:
        target = await self._targets.running(principal, capsule_id)
        entries = await target.agent.list_dir(capsule_id, path, max(depth, 1))
        return EntryListView(entries=[file_entry_view(e) for e in entries])

    async def make_dir(self, principal: Principal, capsule_id: str, path: str) -> EntryView:
        """:raise Conflict: the path exists (from the agent: `conflict`)."""
        target = await self._targets.running(principal, capsule_id)
        return EntryView(entry=file_entry_view(await target.agent.make_dir(capsule_id, path)))

    async def remove(self, principal: Principal, capsule_id: str, path: str) -> None:
        target = await self._targets.running(principal, capsule_id)
        await target.agent.remove_path(capsule_id, path)

    async def stat(self, principal: Principal, capsule_id: str, path: str) -> EntryView:
        target = await self._targets.running(principal, capsule_id)
        return EntryView(entry=file_entry_view(await target.agent.stat(capsule_id, path)))

    async def move(
        self, principal: Principal, capsule_id: str, source: str, destination: str
    ) -> EntryView:
        target = await self._targets.running(principal, capsule_id)
        moved = await target.agent.move(capsule_id, source, destination)
        return EntryView(entry=file_entry_view(moved))


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async with aclosing(rest):  # type: ignore[type-var]  # an async generator
        if first:
            yield first
        async for chunk in rest:
            yield chunk
