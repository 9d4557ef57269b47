"""The async flavour's I/O primitives; `_sync/_io.py` has the same names, blocking. Local
file reads and writes go to a worker thread so the event loop never waits on a disk."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar

import anyio
import anyio.to_thread
from websockets.asyncio.client import ClientConnection, connect

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


async def sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


def monotonic() -> float:
    return time.monotonic()


async def read_chunk(f: BinaryIO, size: int) -> bytes:
    return await anyio.to_thread.run_sync(f.read, size)


async def write_chunk(f: BinaryIO, data: bytes) -> None:
    await anyio.to_thread.run_sync(f.write, data)


async def open_file(path: str | os.PathLike[str], mode: Literal["rb", "wb"]) -> BinaryIO:
    return await anyio.to_thread.run_sync(_open, path, mode)


def _open(path: str | os.PathLike[str], mode: Literal["rb", "wb"]) -> BinaryIO:
    return open(path, mode)


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(fn, *args)


async def ws_connect(url: str, headers: dict[str, str], timeout: float | None) -> ClientConnection:
    return await connect(url, additional_headers=headers, open_timeout=timeout, max_size=None,
                         proxy=None, compression=None)  # fmt: skip


async def ws_recv(ws: ClientConnection, timeout: float | None) -> str | bytes:
    """The next message; TimeoutError after `timeout` seconds (None: wait for ever)."""
    with anyio.fail_after(timeout) if timeout is not None else nullcontext():
        return await ws.recv()
