"""Generate the blocking client from the async one: `python src/nestbox/sdk/_codegen.py` writes
`_sync/client.py` from `_async/client.py` (`--check` only compares; a unit test runs it).

The rewrite is by whole words (as httpcore's `unasync`): `async`/`await` dropped, `Async`
prefixes dropped (`AsyncNestbox` -> `Nestbox`, `httpx.AsyncClient` -> `httpx.Client`), the
async dunders and httpx/websockets method names mapped to their blocking twins, and the
`_async` package to `_sync` (whose `_io.py` has the blocking primitives). The result is put
through `ruff format`, so it reads as written by hand.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "_async" / "client.py"
TARGET = HERE / "_sync" / "client.py"
HEADER = "# Generated from nestbox/sdk/_async/client.py by nestbox/sdk/_codegen.py: do not edit.\n"

SUBSTITUTIONS = [
    (r"nestbox\.sdk\._async", "nestbox.sdk._sync"),
    (r"_async/client\.py", "_sync/client.py"),
    (r"asynccontextmanager", "contextmanager"),
    (r"AsyncIterator", "Iterator"),
    (r"AsyncIterable", "Iterable"),
    (r"AsyncBaseTransport", "BaseTransport"),
    (r"Async([A-Z][A-Za-z0-9_]*)", r"\1"),
    (r"async def", "def"),
    (r"async with", "with"),
    (r"async for", "for"),
    (r"await ", ""),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"__aiter__", "__iter__"),
    (r"__anext__", "__next__"),
    (r"StopAsyncIteration", "StopIteration"),
    (r"aclose", "close"),
    (r"aiter_bytes", "iter_bytes"),
    (r"aiter_lines", "iter_lines"),
    (r"aread", "read"),
    (r"anext", "next"),
    (r"The async client", "The blocking client"),
]
COMPILED = [
    (re.compile(r"(?<!\w)" + pattern + ("" if pattern.endswith(" ") else r"(?!\w)")), repl)
    for pattern, repl in SUBSTITUTIONS
]


def unasync(source: str) -> str:
    """The blocking twin of `source`, formatted."""
    for pattern, repl in COMPILED:
        source = pattern.sub(repl, source)
    return format_source(HEADER + source)


def format_source(source: str) -> str:
    """Imports sorted again (names changed), then `ruff format`."""
    ruff = [sys.executable, "-m", "ruff"]
    for args in (["check", "--select", "I", "--fix", "--quiet"], ["format"]):
        source = subprocess.run(
            [*ruff, *args, "--stdin-filename", str(TARGET), "-"],
            input=source, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    return source


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    generated = unasync(SOURCE.read_text())
    if "--check" in args:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != generated:
            sys.stderr.write(f"{TARGET} is out of date: run python src/nestbox/sdk/_codegen.py\n")
            return 1
        return 0
    TARGET.write_text(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
