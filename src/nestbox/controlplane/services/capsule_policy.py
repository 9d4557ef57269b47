"""What a create asks of a capsule's machine and network, checked against the server's limits.

Sizes: a snapshot template fixes the machine (its baked vCPUs and memory win, whatever the
create asks, as in Wrenn); a base template is booted cold with the vCPUs and memory the create
asks for (else the template's, else the defaults), within `max_vcpus` and `max_memory_mb`
(each host also refuses more vCPUs than it has cores, or more memory than its own setting).

Egress: `allow_internet_access` (E2B's name) or, when a create does not say, the server's
`default_internet_access`; `egress_allow` narrows it to CIDRs and host names and needs it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestbox.controlplane.errors import InvalidRequest
from nestbox.controlplane.scheduling import Demand
from nestbox.controlplane.services.views import DEFAULT_DISK_MB

if TYPE_CHECKING:
    from nestbox.controlplane.db.templates import Template
    from nestbox.protocol.capsules import CapsuleCreate

DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MB = 512
MIN_MEMORY_MB = 128


@dataclass(frozen=True, slots=True)
class CreatePolicy:
    default_internet_access: bool = False
    max_vcpus: int = 8
    max_memory_mb: int = 8192


def demand_for(template: Template, req: CapsuleCreate, policy: CreatePolicy) -> Demand:
    """The machine the capsule will have (and the scheduler places by).

    :raise InvalidRequest: a base template asked for more than the limits allow.
    """
    if template.type != "base":
        # A snapshot fixes the machine: what the request asks is not what the capsule gets, so
        # it is not placed by (a 100 GiB ask for `minimal` found no host: a 503 for a 256 MiB
        # capsule). A snapshot of unknown size is placed as the default machine.
        return Demand(
            vcpus=template.vcpus or DEFAULT_VCPUS,
            memory_mb=template.memory_mb or DEFAULT_MEMORY_MB,
            disk_mb=DEFAULT_DISK_MB,
        )
    vcpus = req.vcpus or template.vcpus or DEFAULT_VCPUS
    memory_mb = req.memory_mb or template.memory_mb or DEFAULT_MEMORY_MB
    if not 1 <= vcpus <= policy.max_vcpus:
        raise InvalidRequest(f"vcpus must be between 1 and {policy.max_vcpus}, not {vcpus}")
    if not MIN_MEMORY_MB <= memory_mb <= policy.max_memory_mb:
        raise InvalidRequest(
            f"memory_mb must be between {MIN_MEMORY_MB} and {policy.max_memory_mb}, not {memory_mb}"
        )
    return Demand(vcpus=vcpus, memory_mb=memory_mb, disk_mb=DEFAULT_DISK_MB)


def egress_for(req: CapsuleCreate, policy: CreatePolicy) -> tuple[bool, list[str]]:
    """(internet access on, allow-list). :raise InvalidRequest: an allow-list without access."""
    allow = list(req.egress_allow or [])
    on = (
        policy.default_internet_access
        if req.allow_internet_access is None
        else (req.allow_internet_access)
    )
    if allow and req.allow_internet_access is False:
        raise InvalidRequest("egress_allow needs allow_internet_access")
    if allow:
        on = True
    return on, allow
