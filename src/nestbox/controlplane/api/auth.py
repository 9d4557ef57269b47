"""Sessions and the caller's own account: `/v1/auth/*` and `/v1/me`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Auth, Endpoint, Router
from nestbox.protocol.accounts import (
    AuthView,
    LoginRequest,
    MeUpdate,
    MeView,
    PasswordUpdate,
    SignupCreate,
    SwitchTeamRequest,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response


async def signup(request: Request) -> Response:
    req = await deps.body(request, SignupCreate)
    view = await deps.services(request).auth.signup(req.email, req.password, req.name)
    return deps.json(view, 201)


async def login(request: Request) -> Response:
    req = await deps.body(request, LoginRequest)
    return deps.json(await deps.services(request).auth.login(req.email, req.password))


async def switch_team(request: Request) -> Response:
    req = await deps.body(request, SwitchTeamRequest)
    auth = deps.services(request).auth
    return deps.json(await auth.switch_team(deps.principal(request), req.team_id))


async def get_me(request: Request) -> Response:
    return deps.json(await deps.services(request).accounts.me(deps.principal(request)))


async def update_me(request: Request) -> Response:
    req = await deps.body(request, MeUpdate)
    accounts = deps.services(request).accounts
    return deps.json(await accounts.rename(deps.principal(request), req.name))


async def set_password(request: Request) -> Response:
    req = await deps.body(request, PasswordUpdate)
    accounts = deps.services(request).accounts
    await accounts.set_password(deps.principal(request), req.current_password, req.new_password)
    return deps.no_content()


router = Router(
    tag="auth",
    endpoints=[
        Endpoint("POST", "/v1/auth/signup", signup, "Create an account and its personal team",
                 auth=Auth.PUBLIC, body=SignupCreate, response=AuthView, status=201,
                 rate_limited=True),
        Endpoint("POST", "/v1/auth/login", login, "Log in with email and password",
                 auth=Auth.PUBLIC, body=LoginRequest, response=AuthView, rate_limited=True),
        Endpoint("POST", "/v1/auth/switch-team", switch_team, "A session for another of your teams",
                 auth=Auth.SESSION, body=SwitchTeamRequest, response=AuthView),
        Endpoint("GET", "/v1/me", get_me, "Who the credentials speak for", response=MeView),
        Endpoint("PATCH", "/v1/me", update_me, "Change your display name", body=MeUpdate,
                 response=MeView),
        Endpoint("POST", "/v1/me/password", set_password, "Change (or set a first) password",
                 body=PasswordUpdate, status=204),
    ],
)  # fmt: skip
