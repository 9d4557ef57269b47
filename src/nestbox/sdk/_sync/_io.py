"""The blocking flavour's I/O primitives: the same names as `_async/_io.py`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar

from websockets.sync.client import ClientConnection, connect

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

T = TypeVar("T")

__all__ = [
    "ClientConnection",
    "monotonic",
    "open_file",
    "read_chunk",
    "run_sync",
    "sleep",
    "write_chunk",
    "ws_connect",
    "ws_recv",
]


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def monotonic() -> float:
    return time.monotonic()


def read_chunk(f: BinaryIO, size: int) -> bytes:
    return f.read(size)


def write_chunk(f: BinaryIO, data: bytes) -> None:
    f.write(data)


def open_file(path: str | os.PathLike[str], mode: Literal["rb", "wb"]) -> BinaryIO:
    return open(path, mode)


def run_sync(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def ws_connect(url: str, headers: dict[str, str], timeout: float | None) -> ClientConnection:
    connection = connect(url, additional_headers=headers, open_timeout=timeout, max_size=None,
                         proxy=None, compression=None)  # fmt: skip
    # Entered here, closed by its owner (the handle or session) later: websockets 17 warns
    # about a connection used without its context manager otherwise.
    return connection.__enter__()


def ws_recv(ws: ClientConnection, timeout: float | None) -> str | bytes:
    """The next message; TimeoutError after `timeout` seconds (None: wait for ever)."""
    return ws.recv(timeout=timeout)
