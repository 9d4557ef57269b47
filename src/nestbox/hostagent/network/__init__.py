"""Per-capsule networking: the slot address plan, netns + TAP + veth, firewall, rate limit.

Every command goes through `nestbox.hostagent.system.System`. See `slots` for the plan.
"""

from nestbox.hostagent.network.pool import SlotLease, SlotNetworks
from nestbox.hostagent.network.setup import (
    Leftovers,
    cleanup_leftovers,
    ensure_blackhole,
    open_slot_network,
)
from nestbox.hostagent.network.slots import (
    GUEST_IP,
    GUEST_PREFIX,
    TAP_IP,
    TAP_NAME,
    NoFreeSlot,
    SlotNetwork,
    SlotPool,
    SlotPoolStatistics,
    check_plan,
    plan_slot,
)

__all__ = [
    "GUEST_IP",
    "GUEST_PREFIX",
    "TAP_IP",
    "TAP_NAME",
    "Leftovers",
    "NoFreeSlot",
    "SlotLease",
    "SlotNetwork",
    "SlotNetworks",
    "SlotPool",
    "SlotPoolStatistics",
    "check_plan",
    "cleanup_leftovers",
    "ensure_blackhole",
    "open_slot_network",
    "plan_slot",
]
