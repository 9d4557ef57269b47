"""Hosts: management (`/v1/hosts`, platform admins; team admins for their BYOC hosts) and the
agents' own calls (register, token refresh, heartbeat: `protocol/hosts.py`). Registration
checks the agent's address (`services/addresses.py`) before it spends the one-time token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Auth, Endpoint, Router
from nestbox.protocol.hosts import (
    HOST_TOKEN_HEADER,
    REFRESH_PATH,
    REGISTER_PATH,
    HeartbeatRequest,
    HeartbeatResponse,
    HostCreate,
    HostCreatedView,
    HostRefreshRequest,
    HostRefreshResponse,
    HostRegisterRequest,
    HostRegisterResponse,
    HostTokenView,
    HostView,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

HOST = "/v1/hosts/{host_id}"


async def create_host(request: Request) -> Response:
    req = await deps.body(request, HostCreate)
    hosts = deps.services(request).hosts
    return deps.json(await hosts.create(deps.principal(request), req), 201)


async def list_hosts(request: Request) -> Response:
    return deps.json(await deps.services(request).hosts.list_for(deps.principal(request)))


async def get_host(request: Request) -> Response:
    host_id = deps.path_param(request, "host_id")
    hosts = deps.services(request).hosts
    return deps.json(await hosts.get(deps.principal(request), host_id))


async def delete_host(request: Request) -> Response:
    host_id = deps.path_param(request, "host_id")
    force = deps.query_bool(request, "force")
    hosts = deps.services(request).hosts
    await hosts.delete(deps.principal(request), host_id, force=force)
    return deps.no_content()


async def new_host_token(request: Request) -> Response:
    host_id = deps.path_param(request, "host_id")
    hosts = deps.services(request).hosts
    return deps.json(await hosts.new_registration_token(deps.principal(request), host_id),
                     201)  # fmt: skip


async def register_host(request: Request) -> Response:
    req = await deps.body(request, HostRegisterRequest)
    return deps.json(await deps.services(request).hosts.register(req))


async def refresh_host_token(request: Request) -> Response:
    req = await deps.body(request, HostRefreshRequest)
    return deps.json(await deps.services(request).hosts.refresh(req))


async def host_heartbeat(request: Request) -> Response:
    host_id = deps.path_param(request, "host_id")
    req = await deps.body(request, HeartbeatRequest)
    hosts = deps.services(request).hosts
    token = request.headers.get(HOST_TOKEN_HEADER)
    return deps.json(await hosts.heartbeat(host_id, token, req))


router = Router(
    tag="hosts",
    endpoints=[
        Endpoint("POST", "/v1/hosts", create_host, "Add a host: answers its one-time "
                 "registration token", body=HostCreate, response=HostCreatedView, status=201,
                 description="Run `nestbox-agent --register <token> --address host:port` on "
                             "the machine. Regular hosts: platform admins; byoc: team admins."),
        Endpoint("GET", "/v1/hosts", list_hosts, "Hosts (every host for platform admins)",
                 response=list[HostView]),
        Endpoint("GET", HOST, get_host, "One host", response=HostView),
        Endpoint("DELETE", HOST, delete_host, "Remove a host (its agent pauses and stops)",
                 status=204, flags=[("force", "even with capsules (they stop)")]),
        Endpoint("POST", HOST + "/token", new_host_token, "A new one-time registration token",
                 response=HostTokenView, status=201),
        Endpoint("POST", REGISTER_PATH, register_host, "An agent registers (one-time token)",
                 auth=Auth.PUBLIC, body=HostRegisterRequest, response=HostRegisterResponse,
                 description="Answers the agent token (RPCs) and the proxy token (/proxy/), "
                             "each good for that only. 400 invalid_request: the address is "
                             "not host:port, or not one this host may use (never link-local "
                             "or the control plane itself; a BYOC host never loopback or the "
                             "control plane's machine); the token is then not spent."),
        Endpoint("POST", REFRESH_PATH, refresh_host_token, "An agent renews its host token",
                 auth=Auth.PUBLIC, body=HostRefreshRequest, response=HostRefreshResponse),
        Endpoint("POST", HOST + "/heartbeat", host_heartbeat, "An agent's heartbeat "
                 "(X-Host-Token)", auth=Auth.PUBLIC, body=HeartbeatRequest,
                 response=HeartbeatResponse),
    ],
)  # fmt: skip
