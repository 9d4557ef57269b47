"""The control plane's per-address token buckets: burst, refill, Retry-After, bounded memory."""

from __future__ import annotations

import pytest

from nestbox.controlplane.errors import RateLimited
from nestbox.controlplane.services.ratelimit import RateLimiter


def test_burst_then_refill() -> None:
    now = [0.0]
    limiter = RateLimiter(burst=3, per_s=0.5, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("/login", "10.0.0.1")
    with pytest.raises(RateLimited) as refused:
        limiter.take("/login", "10.0.0.1")
    assert refused.value.headers() == {"Retry-After": "2"}
    limiter.take("/signup", "10.0.0.1")  # another route
    limiter.take("/login", "10.0.0.2")  # another address
    now[0] = 1.9
    with pytest.raises(RateLimited):
        limiter.take("/login", "10.0.0.1")
    now[0] = 2.0
    limiter.take("/login", "10.0.0.1")
    now[0] = 1000.0  # a long pause refills to the burst, not beyond
    for _ in range(3):
        limiter.take("/login", "10.0.0.1")
    with pytest.raises(RateLimited):
        limiter.take("/login", "10.0.0.1")


def test_memory_is_bounded() -> None:
    limiter = RateLimiter(burst=1, per_s=0.001, max_buckets=100, clock=lambda: 0.0)
    for i in range(10_000):
        limiter.take("/login", f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    # The most recent ones are kept: they are still empty.
    with pytest.raises(RateLimited):
        limiter.take("/login", "10.0.39.15")
