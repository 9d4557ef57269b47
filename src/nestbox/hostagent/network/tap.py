"""The TAP device QEMU attaches to, and the rate limit on what the guest sends.

Rate-limit choice: the guest *transmits* into tap0, so its traffic arrives as tap0's
**ingress**. Ingress can only be policed (dropped), not shaped, and the police action is not
built into these hosts' kernels. So tap0's ingress is redirected (u32 match-all + mirred) to an
IFB device in the same netns, `ifb0`, whose egress has a token bucket (tbf): rate
`tap_rate_mbytes`, bucket `tap_burst_mbytes` (MB = 10^6 bytes). This catches every frame the
guest sends, before netfilter and routing see it, including frames the firewall then drops,
and it queues rather than drops, which suits TCP. Host -> guest traffic is not limited here:
the host is the one sending it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.hostagent.network.slots import GUEST_PREFIX, TAP_IP, TAP_NAME

if TYPE_CHECKING:
    from nestbox.hostagent.system import System

IFB_NAME = "ifb0"
#: Deep enough to absorb bursts from a virtio queue, short enough to keep latency low.
TAP_TXQUEUELEN = 5000
MB = 1_000_000
#: tbf's queue (not the bucket): 20 ms at the configured rate, within [256 KiB, 4 MiB], so a
#: guest flooding UDP holds at most 4 MiB of host memory in its queue.
QUEUE_SECONDS = 0.02
QUEUE_MIN_BYTES = 256 * 1024
QUEUE_MAX_BYTES = 4 * 1024 * 1024


async def create_tap(system: System, netns: str) -> None:
    """tap0 in `netns`, 169.254.0.22/30, up (no carrier until QEMU opens it)."""
    await system.ip("tuntap", "add", "dev", TAP_NAME, "mode", "tap", netns=netns)
    await system.ip("link", "set", TAP_NAME, "txqueuelen", str(TAP_TXQUEUELEN), "up", netns=netns)
    await system.ip("addr", "add", f"{TAP_IP}/{GUEST_PREFIX}", "dev", TAP_NAME, netns=netns)


def tbf_args(rate_mbytes: int, burst_mbytes: int) -> tuple[str, ...]:
    """`tc qdisc ... tbf` parameters in explicit units (tc reads a bare rate as bits/s and
    `mb` as MiB; spelling out `bit` and bytes leaves no doubt)."""
    rate = rate_mbytes * MB
    queue = int(min(max(rate * QUEUE_SECONDS, QUEUE_MIN_BYTES), QUEUE_MAX_BYTES))
    return ("tbf", "rate", f"{rate * 8}bit", "burst", str(burst_mbytes * MB), "limit", str(queue))


async def limit_guest_rate(system: System, netns: str, rate_mbytes: int, burst_mbytes: int) -> None:
    """Shape everything the guest transmits (see the module docstring)."""
    await system.ip("link", "add", IFB_NAME, "type", "ifb", netns=netns)
    await system.ip("link", "set", IFB_NAME, "up", netns=netns)
    # The bucket first, then the redirect into it: no frame ever bypasses the bucket.
    await system.tc(
        "qdisc", "add", "dev", IFB_NAME, "root", *tbf_args(rate_mbytes, burst_mbytes),
        netns=netns,
    )  # fmt: skip
    await system.tc("qdisc", "add", "dev", TAP_NAME, "handle", "ffff:", "ingress", netns=netns)
    await system.tc(
        "filter", "add", "dev", TAP_NAME, "parent", "ffff:", "protocol", "all",
        "u32", "match", "u32", "0", "0",
        "action", "mirred", "egress", "redirect", "dev", IFB_NAME,
        netns=netns,
    )  # fmt: skip
