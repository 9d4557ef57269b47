"""Teams and members: `/v1/teams…`, and `/v1/users/search` for adding members."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Auth, Endpoint, Query, Router
from nestbox.protocol.accounts import (
    MemberCreate,
    MemberUpdate,
    Role,
    TeamCreate,
    TeamDetailView,
    TeamMemberView,
    TeamUpdate,
    TeamView,
    UserSearchResult,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response


async def list_teams(request: Request) -> Response:
    return deps.json(await deps.services(request).teams.teams_of(deps.principal(request)))


async def create_team(request: Request) -> Response:
    req = await deps.body(request, TeamCreate)
    teams = deps.services(request).teams
    return deps.json(await teams.create(deps.principal(request), req.name), 201)


async def get_team(request: Request) -> Response:
    teams = deps.services(request).teams
    return deps.json(await teams.get(deps.principal(request), deps.path_param(request, "team_id")))


async def rename_team(request: Request) -> Response:
    req = await deps.body(request, TeamUpdate)
    teams = deps.services(request).teams
    team_id = deps.path_param(request, "team_id")
    return deps.json(await teams.rename(deps.principal(request), team_id, req.name))


async def delete_team(request: Request) -> Response:
    teams = deps.services(request).teams
    await teams.delete(deps.principal(request), deps.path_param(request, "team_id"))
    return deps.no_content()


async def list_members(request: Request) -> Response:
    teams = deps.services(request).teams
    team_id = deps.path_param(request, "team_id")
    return deps.json(await teams.members(deps.principal(request), team_id))


async def add_member(request: Request) -> Response:
    req = await deps.body(request, MemberCreate)
    teams = deps.services(request).teams
    team_id = deps.path_param(request, "team_id")
    return deps.json(await teams.add_member(deps.principal(request), team_id, req.email,
                                               Role(req.role)),
                     201)  # fmt: skip


async def update_member(request: Request) -> Response:
    req = await deps.body(request, MemberUpdate)
    teams = deps.services(request).teams
    team_id, user_id = deps.path_param(request, "team_id"), deps.path_param(request, "user_id")
    await teams.set_role(deps.principal(request), team_id, user_id, Role(req.role))
    return deps.no_content()


async def remove_member(request: Request) -> Response:
    teams = deps.services(request).teams
    team_id, user_id = deps.path_param(request, "team_id"), deps.path_param(request, "user_id")
    await teams.remove_member(deps.principal(request), team_id, user_id)
    return deps.no_content()


async def leave_team(request: Request) -> Response:
    teams = deps.services(request).teams
    await teams.leave(deps.principal(request), deps.path_param(request, "team_id"))
    return deps.no_content()


async def search_users(request: Request) -> Response:
    teams = deps.services(request).teams
    prefix = request.query_params.get("email", "")
    return deps.json(await teams.search_users(deps.principal(request), prefix))


TEAM = "/v1/teams/{team_id}"
MEMBER = TEAM + "/members/{user_id}"

router = Router(
    tag="teams",
    endpoints=[
        Endpoint("GET", "/v1/teams", list_teams, "Your teams, each with your role",
                 response=list[TeamView]),
        Endpoint("POST", "/v1/teams", create_team, "Create a team (you own it)",
                 auth=Auth.SESSION, body=TeamCreate, response=TeamView, status=201),
        Endpoint("GET", TEAM, get_team, "A team and its members", response=TeamDetailView),
        Endpoint("PATCH", TEAM, rename_team, "Rename a team (admin)", body=TeamUpdate,
                 response=TeamView),
        Endpoint("DELETE", TEAM, delete_team, "Delete a team (owner)", status=204),
        Endpoint("GET", TEAM + "/members", list_members, "A team's members",
                 response=list[TeamMemberView]),
        Endpoint("POST", TEAM + "/members", add_member, "Add a user by email (admin)",
                 body=MemberCreate, response=TeamMemberView, status=201),
        Endpoint("PATCH", MEMBER, update_member, "Change a member's role (admin)",
                 body=MemberUpdate, status=204),
        Endpoint("DELETE", MEMBER, remove_member, "Remove a member (admin, or yourself)",
                 status=204),
        Endpoint("POST", TEAM + "/leave", leave_team, "Leave a team (not its owner)",
                 status=204),
        Endpoint("GET", "/v1/users/search", search_users, "Users by email prefix",
                 response=list[UserSearchResult],
                 query=[Query("email", "the start of the email, with its @",
                              {"type": "string", "minLength": 3, "maxLength": 254,
                               "pattern": "@"}, required=True)]),
    ],
)  # fmt: skip
