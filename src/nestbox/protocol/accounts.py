"""Users, sessions, API keys and teams on the public API (Wrenn §1.8), as Create / Update / View
models. Paths:

    POST /v1/auth/signup        SignupCreate      -> 201 AuthView
    POST /v1/auth/login         LoginRequest      -> AuthView
    POST /v1/auth/switch-team   SwitchTeamRequest -> AuthView
    GET  /v1/me                                   -> MeView
    PATCH /v1/me                MeUpdate          -> MeView
    POST /v1/me/password        PasswordUpdate    -> 204
    POST /v1/api-keys           ApiKeyCreate      -> 201 ApiKeyView (with `key`, the only time)
    GET  /v1/api-keys                             -> [ApiKeyView]
    DELETE /v1/api-keys/{id}                      -> 204
    GET/POST /v1/teams, GET/PATCH/DELETE /v1/teams/{id}, members under /v1/teams/{id}/members

Timestamps are always timezone-aware (UTC): the `wrenn` SDK rejects naive ones.
"""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

EMAIL_MAX = 254
PASSWORD_MIN = 8
NAME_MAX = 100


def _email(value: str) -> str:
    value = value.strip().lower()
    local, at, domain = value.partition("@")
    if not (at and local and domain) or any(c.isspace() for c in value) or "@" in domain:
        raise ValueError("not an email address")
    return value


_WS = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
"""What `str.isspace` (the validator's rule) calls white space, spelled out: `\\s` means less
in the document's (ECMA) regexes than in Python's and pydantic's."""
Email = Annotated[
    str,
    Field(min_length=3, max_length=EMAIL_MAX, pattern=rf"^[{_WS}]*[^@{_WS}]+@[^@{_WS}]+[{_WS}]*$"),
    AfterValidator(_email),
]
Password = Annotated[str, Field(min_length=PASSWORD_MIN, max_length=1024)]
DisplayName = Annotated[str, Field(max_length=NAME_MAX)]
TeamName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9 _.-]+$")]


class Role(StrEnum):
    """A user's role in one team. owner > admin > member."""

    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"

    def at_least(self, other: Role) -> bool:
        order = (Role.MEMBER, Role.ADMIN, Role.OWNER)
        return order.index(self) >= order.index(other)


class MemberRole(StrEnum):
    """The roles a member can be given (a team has one owner; ownership moves by a transfer)."""

    ADMIN = "admin"
    MEMBER = "member"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


# ── sessions ──


class SignupCreate(_Request):
    email: Email
    password: Password
    name: DisplayName = ""


class LoginRequest(_Request):
    email: Email
    password: str = Field(max_length=1024)


class SwitchTeamRequest(_Request):
    team_id: str


class AuthView(_View):
    """A session: the JWT for `Authorization: Bearer` and who it speaks for."""

    token: str = Field(description="JWT (HS256); send as `Authorization: Bearer <token>`")
    user_id: str
    team_id: str
    email: str
    name: str
    role: Role
    is_admin: bool
    expires_at: datetime


class MeView(_View):
    id: str
    email: str
    name: str
    is_admin: bool
    has_password: bool
    providers: list[str] = Field(default_factory=list, description="linked OAuth providers")
    team_id: str = Field(description="the team this token or key acts for")
    role: Role
    created_at: datetime


class MeUpdate(_Request):
    name: DisplayName


class PasswordUpdate(_Request):
    """Change a password (needs `current_password`) or set the first one."""

    current_password: str | None = Field(default=None, max_length=1024)
    new_password: Password


# ── API keys ──


class ApiKeyCreate(_Request):
    name: str = Field(default="Unnamed API Key", min_length=1, max_length=128)


class ApiKeyView(_View):
    id: str
    team_id: str
    name: str
    key_prefix: str = Field(description="the key's first characters, for recognising it")
    created_by: str | None
    created_at: datetime
    last_used: datetime | None
    key: str | None = Field(default=None, description="the full key: only in the create answer")


# ── teams ──


class TeamCreate(_Request):
    name: TeamName


class TeamUpdate(_Request):
    name: TeamName


class TeamView(_View):
    id: str
    name: str
    slug: str = Field(description="immutable 12-hex slug, e.g. a1b2c3-d1e2f3")
    created_at: datetime
    role: Role | None = Field(default=None, description="the caller's role in the team")


class MemberCreate(_Request):
    email: Email
    role: MemberRole = MemberRole.MEMBER


class MemberUpdate(_Request):
    role: MemberRole


class TeamMemberView(_View):
    user_id: str
    email: str
    name: str
    role: Role
    joined_at: datetime


class TeamDetailView(_View):
    team: TeamView
    members: list[TeamMemberView]


class UserSearchResult(_View):
    user_id: str
    email: str


# ── platform administration ──


class UserStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class AdminUserView(_View):
    id: str
    email: str
    name: str
    is_admin: bool
    status: UserStatus
    created_at: datetime


class AdminUserUpdate(_Request):
    """What a platform admin may change on a user; absent fields stay as they are."""

    status: UserStatus | None = None
    is_admin: bool | None = None


class AdminTeamView(_View):
    id: str
    name: str
    slug: str
    created_at: datetime
    members: int
