"""The port proxies' one rule for what a proxied request may name (both the control plane's
public proxy and the agent's `/proxy/` use it, so they can never disagree).

A proxied request names a capsule, a port and a path on that port. The path is checked as the
raw bytes the client sent (ASGI `raw_path`), never as a decoded string, and the proxies send
exactly these bytes on: nothing between the client and the capsule normalises them. So a path
that could mean something else to any hop is refused, with 400 `invalid_request`:

- not starting with `/`; bytes outside printable ASCII (raw), `#`;
- a `.` or `..` segment, raw or percent-encoded once, twice or more (`%2e`, `%252E`, `.%2e`…);
- a backslash (`\\`, `%5c`, `%255c`…) or an encoded slash (`%2f`, `%252f`…);
- NUL or another control byte at any decoding depth (`%00`, `%0a`, `%250d`…);
- still percent-encoded after `MAX_DECODES` rounds of decoding.

Ports are 1-65535, and envd's port (`ENVD_PORT`) is refused with 403 `forbidden`: envd is
reached by the agent alone, never through a proxy. Queries are passed on as sent but must be
printable ASCII without `#`, so no hop re-encodes them.

`RefusalLog` writes one WARNING per refusal (capsule id, reason, the path shortened), at most
`burst` per `window_s`; past that it counts, and says how many it skipped with the next line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from nestbox.protocol.envd import ENVD_PORT
from nestbox.protocol.errors import ErrorCode

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

MAX_DECODES = 4
"""Percent-decoding rounds looked through; a path still encoded after them is refused."""
MAX_PATH_BYTES = 8192
LOG_PATH_CHARS = 160
"""How much of a refused path a log line shows."""
_DOT_SEGMENTS = (b".", b"..")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a proxied request is turned away: the answer's status and code, and a reason that
    goes to the client and the log (it never quotes the request)."""

    status: int
    code: ErrorCode
    reason: str


def path_problem(raw: bytes) -> str | None:
    """Why the capsule-side path `raw` (without the query) may not be proxied, or None."""
    if not raw.startswith(b"/"):
        return "the path must start with /"
    if len(raw) > MAX_PATH_BYTES:
        return f"the path is longer than {MAX_PATH_BYTES} bytes"
    if any(b < 0x21 or b > 0x7E for b in raw):
        return "the path holds bytes outside printable ASCII"
    if b"#" in raw:
        return "the path holds a #"
    layer = raw
    for depth in range(MAX_DECODES + 1):
        problem = _layer_problem(layer, depth)
        if problem is not None:
            return problem
        if b"%" not in layer:
            return None
        decoded = unquote_to_bytes(layer)
        if decoded == layer:
            return None
        layer = decoded
    return "the path is percent-encoded too many times"


def _layer_problem(layer: bytes, depth: int) -> str | None:
    """What is wrong with the path after `depth` rounds of percent-decoding."""
    how = "" if depth == 0 else " (percent-encoded)"
    if any(b < 0x20 or b == 0x7F for b in layer):
        return "the path holds a control byte" + how
    if b"\\" in layer:
        return "the path holds a backslash" + how
    if any(segment in _DOT_SEGMENTS for segment in layer.split(b"/")):
        return "the path holds a . or .. segment" + how
    if b"%2f" in layer.lower():
        return "the path holds an encoded slash"
    return None


def query_problem(raw: bytes) -> str | None:
    """Why the query `raw` (after `?`) may not be proxied, or None."""
    if any(b < 0x21 or b > 0x7E for b in raw):
        return "the query holds bytes outside printable ASCII"
    if b"#" in raw:
        return "the query holds a #"
    return None


def port_refusal(port: int) -> Refusal | None:
    if not 1 <= port <= 65535:
        return Refusal(400, ErrorCode.INVALID_REQUEST, f"port {port} is out of range")
    if port == ENVD_PORT:
        return Refusal(403, ErrorCode.FORBIDDEN, f"port {ENVD_PORT} (envd) is not proxied")
    return None


def refusal(port: int, path: bytes, query: bytes) -> Refusal | None:
    """Why a request for `port` with this raw path and query is refused, or None."""
    found = port_refusal(port)
    if found is not None:
        return found
    problem = path_problem(path)
    if problem is None:
        problem = query_problem(query)
    if problem is None:
        return None
    return Refusal(400, ErrorCode.INVALID_REQUEST, problem)


def shown(raw: bytes, limit: int = LOG_PATH_CHARS) -> str:
    """`raw` for a log line: escaped, at most `limit` characters."""
    text = raw.decode("ascii", "backslashreplace").encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit})"


class RefusalLog:
    """One WARNING per refused proxied request, at most `burst` per `window_s` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 50,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._burst = burst
        self._window_s = window_s
        self._now = clock
        self._window_start = -window_s
        self._logged = 0
        self._skipped = 0

    def refused(self, capsule_id: str, reason: str, path: bytes, *, where: str = "") -> None:
        now = self._now()
        if now - self._window_start >= self._window_s:
            self._window_start, self._logged = now, 0
        if self._logged >= self._burst:
            self._skipped += 1
            return
        self._logged += 1
        skipped, self._skipped = self._skipped, 0
        more = f" ({skipped} earlier refusals not logged)" if skipped else ""
        self._log.warning(
            "proxy refused%s: capsule %s: %s; path %s%s",
            f" ({where})" if where else "", capsule_id, reason, shown(path), more,
            extra={"capsule_id": capsule_id},
        )  # fmt: skip
