"""A capsule's lifetime: `POST /v1/capsules/{id}/timeout` and `POST /v1/capsules/{id}/fork`
(protocol/lifetime.py; the rules are in services/lifetime.py and services/fork.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.capsules import CAPSULE
from nestbox.controlplane.api.routing import Endpoint, Router
from nestbox.protocol.capsules import CapsuleView
from nestbox.protocol.lifetime import CapsuleTimeout, ForkCreate, ForkView

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response


async def set_timeout(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, CapsuleTimeout)
    lifetime = deps.services(request).lifetime
    view = await lifetime.set_timeout(
        deps.principal(request), capsule_id, timeout_sec=req.timeout_sec, ttl_sec=req.ttl_sec,
        on_timeout=req.on_timeout,
    )  # fmt: skip
    return deps.json(view)


async def fork_capsule(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, ForkCreate)
    forks = deps.services(request).forks
    return deps.json(await forks.fork(deps.principal(request), capsule_id, req.count), 201)


router = Router(
    tag="capsules",
    endpoints=[
        Endpoint("POST", CAPSULE + "/timeout", set_timeout,
                 "Change a capsule's idle timeout and lifetime", body=CapsuleTimeout,
                 response=CapsuleView,
                 description="Running or paused capsules (else 409 invalid_state). "
                             "timeout_sec: the idle auto-pause (0 = never; raised to 60). "
                             "ttl_sec: the current run ends this long from now (0 = no "
                             "lifetime), then on_timeout: pause or destroy. A resume starts "
                             "a new run with the same ttl_sec."),
        Endpoint("POST", CAPSULE + "/fork", fork_capsule,
                 "Copy a running capsule: memory, processes and files", body=ForkCreate,
                 response=ForkView, status=201,
                 description="count (1-10) new running capsules on the source's host, copies "
                             "of it at one instant; the source is paused for the snapshot "
                             "only (paused_ms) and runs on. Each copy has its own id, host "
                             "name, envd token, network slot and randomness, the source's "
                             "template, size, timeouts and metadata, and outlives it."),
    ],
)  # fmt: skip
