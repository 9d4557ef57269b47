"""Per-client rate limits for the routes that guess or mint credentials (login, signup, API-key
creation): a token bucket per (route, client address), in this process's memory.

Each bucket holds up to `burst` tokens and refills `per_s` tokens a second; a request takes one
or is refused with 429 `rate_limited` and a `Retry-After` of the seconds until a token is back.
Memory is bounded: at most `max_buckets` buckets are kept, the least recently used dropped first
(a dropped bucket is a full one again, so an address that floods with many others around it
gets at most `burst` more requests). Several control planes each keep their own buckets; the
client address is the TCP peer unless `forwarded_allow_ips` names a trusted proxy.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from nestbox.controlplane.errors import RateLimited

if TYPE_CHECKING:
    from collections.abc import Callable

MAX_BUCKETS = 10_000


class RateLimiter:
    def __init__(
        self,
        *,
        burst: int,
        per_s: float,
        max_buckets: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.per_s = per_s
        self.max_buckets = max_buckets
        self.clock = clock
        """Seconds, monotonic; tests replace it."""
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, route: str, client: str) -> None:
        """Spend one token of `client`'s bucket for `route`. :raise RateLimited:"""
        now = self.clock()
        key = (route, client)
        tokens, then = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.per_s)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise RateLimited(
                "too many requests from your address; retry later",
                retry_after_s=(1.0 - tokens) / self.per_s,
            )
        self._buckets[key] = (tokens - 1.0, now)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
