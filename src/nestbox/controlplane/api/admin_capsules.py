"""Platform capsules for platform admins (Wrenn's `/v1/admin/capsules`): capsules of the platform
team (the one owning the platform templates; builds run there), with the same verbs, bodies and
answers as a team's own capsule routes: list, create, get, destroy, and the files routes.

Each handler is the team route's own, run with the admin acting as an owner of the platform
team (`platform_principal`): the team rule is then the platform team's, so a team's capsule id
is 404 here, and a platform capsule's id is 404 on the team routes of every other team.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from nestbox.controlplane.api import capsules, deps, files
from nestbox.controlplane.api.routing import Auth, Endpoint, Router
from nestbox.controlplane.db.templates import PLATFORM_TEAM_ID
from nestbox.protocol.accounts import Role

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from nestbox.controlplane.api.routing import Handler
    from nestbox.controlplane.services.principal import Principal

ADMIN_CAPSULES = "/v1/admin/capsules"


def platform_principal(admin: Principal) -> Principal:
    """`admin` acting in the platform team, as its owner."""
    admin.require_admin()
    return replace(admin, team_id=PLATFORM_TEAM_ID, role=Role.OWNER)


def as_platform(handler: Handler) -> Handler:
    async def run(request: Request) -> Response:
        request.state.principal = platform_principal(deps.principal(request))
        return await handler(request)

    run.__name__ = "admin_" + handler.__name__
    run.__doc__ = handler.__doc__
    return run


def _admin_endpoint(team: Endpoint) -> Endpoint:
    path = team.path.replace("/v1/capsules", ADMIN_CAPSULES, 1)
    return replace(team, path=path, handler=as_platform(team.handler), auth=Auth.ADMIN,
                   summary=team.summary + " (platform team)")  # fmt: skip


_WANTED = {
    ("POST", "/v1/capsules"), ("GET", "/v1/capsules"), ("GET", capsules.CAPSULE),
    ("DELETE", capsules.CAPSULE),
}  # fmt: skip

router = Router(
    tag="admin",
    endpoints=[_admin_endpoint(e) for e in capsules.router.endpoints
               if (e.method, e.path) in _WANTED]
    + [_admin_endpoint(e) for e in files.router.endpoints],
)  # fmt: skip
