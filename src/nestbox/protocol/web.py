"""The dashboard's browser session on the public API (`/v1/auth/session…`): the login and
signup bodies are `accounts.LoginRequest` / `accounts.SignupCreate`; the session itself lives
in an HttpOnly cookie the page cannot read, so the answers carry no token, only the CSRF token
the page must echo in `X-CSRF-Token` on every state-changing request."""

from __future__ import annotations

from datetime import datetime  # noqa: TC003 (pydantic resolves annotations at runtime)

from pydantic import BaseModel, ConfigDict, Field

from nestbox.protocol.accounts import Role  # noqa: TC001 (pydantic resolves annotations at runtime)

SESSION_COOKIE = "nestbox_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_PREFIX = "nbs_"
TICKET_PREFIX = "nbt_"


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class WebSessionView(_View):
    user_id: str
    team_id: str
    email: str
    name: str
    role: Role
    is_admin: bool
    expires_at: datetime
    csrf_token: str = Field(description="send as X-CSRF-Token on POST, PATCH, PUT and DELETE")


class WebSessionStateView(_View):
    """`GET /v1/auth/session`: the browser's session, or null when it has none ("not logged
    in" is an answer there, not an error)."""

    session: WebSessionView | None


class WsTicketView(_View):
    ticket: str = Field(description='send as the first WebSocket frame: {"type": "auth", '
                        '"token": <ticket>}; good for one handshake')  # fmt: skip
    expires_at: datetime
