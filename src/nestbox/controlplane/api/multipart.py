"""Streaming `multipart/form-data` for the file upload routes: parts come out as they arrive,
each part's data as chunks, so an upload of any size passes through in constant memory.

python-multipart's parser is push-based (feed bytes, get callbacks); `parts()` turns it into
pull: it feeds the request body a chunk at a time and hands out what each chunk produced.
The caller must finish (or abandon) one part's `data()` before asking for the next part.

Bounded: a part has at most `MAX_PART_HEADERS` headers of at most `MAX_HEADER_BYTES` each, a
body at most `MAX_PARTS` parts (400 `invalid_request` beyond), so headers never grow without
limit in memory whatever the client sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from nestbox.controlplane.errors import InvalidRequest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

MAX_FIELD = 64 * 1024
"""A text field (`path`) may not be longer than this."""
MAX_PART_HEADERS = 8
"""Headers one part may have (a file part has two or three)."""
MAX_HEADER_BYTES = 4096
"""Bytes of one part header, name and value together."""
MAX_PARTS = 64
"""Parts one body may have (the upload routes read two)."""
HEADER_SYNTAX_BYTES = 128
"""What the parser counts in a header line beyond its name and value (colon, spaces, CRLF)."""


@dataclass
class _Events:
    """What the parser's callbacks produced for the chunk just fed."""

    items: list[tuple[str, bytes]] = field(default_factory=list)
    header_name: bytes = b""
    header_value: bytes = b""
    headers: int = 0
    """Headers of the current part so far."""
    parts: int = 0


@dataclass
class Part:
    name: str
    filename: str | None
    _reader: Reader

    def data(self) -> AsyncIterator[bytes]:
        """This part's bytes, chunk by chunk."""
        return self._reader.part_data()

    async def text(self, limit: int = MAX_FIELD) -> str:
        """The whole part as UTF-8 text. :raise InvalidRequest: too long or not UTF-8."""
        buf = bytearray()
        async for chunk in self.data():
            buf += chunk
            if len(buf) > limit:
                raise InvalidRequest(f"form field {self.name} is too long")
        try:
            return buf.decode()
        except UnicodeDecodeError:
            raise InvalidRequest(f"form field {self.name} is not UTF-8") from None


class Reader:
    """Parts of one multipart body read from `body`."""

    def __init__(self, content_type: str, body: AsyncIterator[bytes]) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidRequest("the body must be multipart/form-data with a boundary")
        self._body = body
        self._events = _Events()
        self._pending: list[tuple[str, bytes]] = []
        self._done = False
        ev = self._events

        # Header bytes are gathered across chunks, so each header and their number per part
        # are bounded: by the parser (told our limits explicitly, not trusting its defaults)
        # and again here, where they are gathered.
        def grow(held: bytes, data: bytes, start: int, end: int) -> bytes:
            if len(ev.header_name) + len(ev.header_value) + end - start > MAX_HEADER_BYTES:
                raise InvalidRequest(f"a multipart header is longer than {MAX_HEADER_BYTES} "
                                     "bytes")  # fmt: skip
            return held + data[start:end]

        def on_header_field(data: bytes, start: int, end: int) -> None:
            ev.header_name = grow(ev.header_name, data, start, end)

        def on_header_value(data: bytes, start: int, end: int) -> None:
            ev.header_value = grow(ev.header_value, data, start, end)

        def on_header_end() -> None:
            ev.headers += 1
            if ev.headers > MAX_PART_HEADERS:
                raise InvalidRequest(f"a multipart part has more than {MAX_PART_HEADERS} headers")
            ev.items.append(("header", ev.header_name.lower() + b"\0" + ev.header_value))
            ev.header_name = ev.header_value = b""

        def on_part_begin() -> None:
            ev.parts += 1
            if ev.parts > MAX_PARTS:
                raise InvalidRequest(f"the body has more than {MAX_PARTS} parts")
            ev.headers = 0
            ev.items.append(("begin", b""))

        def on_part_data(data: bytes, start: int, end: int) -> None:
            ev.items.append(("data", bytes(data[start:end])))

        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": lambda: ev.items.append(("headers", b"")),
            "on_part_data": on_part_data,
            "on_part_end": lambda: ev.items.append(("end", b"")),
        }, max_header_count=MAX_PART_HEADERS,
           max_header_size=MAX_HEADER_BYTES + HEADER_SYNTAX_BYTES)  # fmt: skip

    async def _next(self) -> tuple[str, bytes] | None:
        while not self._pending:
            if self._done:
                return None
            chunk = await anext(self._body, None)
            try:
                if chunk is None:
                    self._done = True
                    self._parser.finalize()
                elif chunk:
                    self._parser.write(chunk)
            except MultipartParseError as err:
                raise InvalidRequest(f"malformed multipart body: {err}") from None
            self._pending, self._events.items = self._events.items, []
        return self._pending.pop(0)

    async def parts(self) -> AsyncIterator[Part]:
        """Each part once its headers are in; skip the data you do not read."""
        headers: dict[bytes, bytes] = {}
        while (event := await self._next()) is not None:
            kind, value = event
            if kind == "begin":
                headers = {}
            elif kind == "header":
                name, _, val = value.partition(b"\0")
                headers[name] = val
            elif kind == "headers":
                _, options = parse_options_header(headers.get(b"content-disposition", b""))
                filename = options.get(b"filename")
                yield Part(
                    name=options.get(b"name", b"").decode("utf-8", "replace"),
                    filename=filename.decode("utf-8", "replace") if filename else None,
                    _reader=self,
                )

    async def part_data(self) -> AsyncIterator[bytes]:
        while (event := await self._next()) is not None:
            kind, value = event
            if kind == "data":
                yield value
            elif kind == "end":
                return
