"""Browser sessions for the dashboard: an opaque token in an HttpOnly, SameSite=Strict cookie,
a CSRF token for state-changing requests, and single-use WebSocket tickets.

The cookie holds `nbs_` + 32 random bytes; the database keeps only its SHA-256
(`web_sessions`), so logging out (deleting the row) ends it everywhere. Each request re-reads
the user and membership, as for a bearer session: a disabled user or a removed member is out
at once. The CSRF token is an HMAC of the session token under the control plane's session
secret: the page learns it from the login answer (or `GET /v1/auth/session`) and sends it as
`X-CSRF-Token`; a cookie-authenticated POST/PUT/PATCH/DELETE without it is refused (403), so
another site cannot act with the cookie even where SameSite is not honoured.

A browser cannot set headers on a WebSocket handshake, and a cookie-authenticated handshake
could be started by any page (cross-site WebSocket hijacking): the cookie never opens a
WebSocket. Instead the page trades its session for a ticket (`nbt_`…, 30 s, one use, stored
as SHA-256 in `ws_tickets`) and sends it as the socket's first frame; the socket then acts
for the session, and its periodic credential check (`wsconn.watch_credentials`) re-checks
the session, so logging out closes it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from nestbox.controlplane.db.web_sessions import WebSessionRepo
from nestbox.controlplane.errors import Forbidden, NotFound, Unauthorized
from nestbox.controlplane.services.auth import Credentials, key_hash
from nestbox.controlplane.services.principal import Principal
from nestbox.protocol.ids import IdPrefix, is_id
from nestbox.protocol.web import SESSION_PREFIX, TICKET_PREFIX, WebSessionView, WsTicketView

if TYPE_CHECKING:
    from collections.abc import Callable

    from nestbox.controlplane.db import Database
    from nestbox.protocol.accounts import AuthView

TICKET_TTL_S = 30
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class SessionCredentials(Credentials):
    """A WebSocket's credentials after its ticket was spent: the browser session it acts for."""

    web_session: str = ""
    """The session's id (SHA-256 of its cookie token)."""


class WebSessions:
    def __init__(self, db: Database, *, secret: bytes, ttl_s: int,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:  # fmt: skip
        self._db = db
        self._csrf_key = hmac.new(secret, b"nestbox csrf", hashlib.sha256).digest()
        self._ttl = timedelta(seconds=ttl_s)
        self._clock = clock

    def csrf_token(self, token: str) -> str:
        return hmac.new(self._csrf_key, token.encode(), hashlib.sha256).hexdigest()

    async def open(self, auth: AuthView) -> tuple[str, WebSessionView]:
        """A new session for the user and team `auth` (a checked login or signup) names: the
        cookie's token and the view."""
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        now = self._clock()
        async with self._db.transaction() as tx:
            repo = WebSessionRepo(tx.session)
            await repo.purge_expired(now)
            made = await repo.create(key_hash(token), auth.user_id, auth.team_id, now=now,
                                     expires_at=now + self._ttl)  # fmt: skip
        view = WebSessionView(
            user_id=auth.user_id, team_id=auth.team_id, email=auth.email, name=auth.name,
            role=auth.role, is_admin=auth.is_admin, expires_at=made.expires_at,
            csrf_token=self.csrf_token(token),
        )  # fmt: skip
        return token, view

    async def authenticate(self, token: str, *, method: str, csrf: str | None) -> Principal:
        """The principal of a cookie-authenticated request.
        :raise Unauthorized: unknown or expired session. :raise Forbidden: a state-changing
        request without the session's CSRF token."""
        principal = await self._principal(key_hash(token))
        if method.upper() not in SAFE_METHODS and not (
            csrf and hmac.compare_digest(csrf, self.csrf_token(token))
        ):
            raise Forbidden("missing or wrong X-CSRF-Token for this session")
        return principal

    async def view(self, token: str) -> WebSessionView:
        """The session behind a cookie. :raise Unauthorized:"""
        principal = await self._principal(key_hash(token))
        async with self._db.transaction() as tx:
            found = await WebSessionRepo(tx.session).get(key_hash(token), now=self._clock())
        if found is None:
            raise Unauthorized("this session is no longer valid")
        assert principal.user_id is not None
        return WebSessionView(
            user_id=principal.user_id, team_id=principal.team_id, email=principal.email,
            name=principal.name, role=principal.role, is_admin=principal.is_admin,
            expires_at=found.expires_at, csrf_token=self.csrf_token(token),
        )  # fmt: skip

    async def close(self, token: str) -> None:
        async with self._db.transaction() as tx:
            await WebSessionRepo(tx.session).delete(key_hash(token))

    async def check_member(self, principal: Principal, team_id: str) -> None:
        """:raise NotFound: `team_id` is not one of the principal's user's teams."""
        if not is_id(team_id, IdPrefix.TEAM) or principal.user_id is None:
            raise NotFound("team", ascii(team_id)[1:-1][:80])
        async with self._db.transaction() as tx:
            if await tx.teams.membership(team_id, principal.user_id) is None:
                raise NotFound("team", team_id)

    async def switch_team(self, token: str, team_id: str) -> WebSessionView:
        """Point the session at another of its user's teams. :raise NotFound: not theirs."""
        await self.check_member(await self._principal(key_hash(token)), team_id)
        async with self._db.transaction() as tx:
            await WebSessionRepo(tx.session).set_team(key_hash(token), team_id)
        return await self.view(token)

    async def ticket(self, token: str) -> WsTicketView:
        """A single-use WebSocket ticket for the session. :raise Unauthorized:"""
        session_id = key_hash(token)
        await self._principal(session_id)
        ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
        now = self._clock()
        expires = now + timedelta(seconds=TICKET_TTL_S)
        async with self._db.transaction() as tx:
            repo = WebSessionRepo(tx.session)
            await repo.purge_expired(now)  # tickets never used, sessions never logged out
            await repo.add_ticket(key_hash(ticket), session_id, expires)
        return WsTicketView(ticket=ticket, expires_at=expires)

    async def redeem(self, ticket: str) -> SessionCredentials:
        """Spend a ticket. :raise Unauthorized: unknown, spent or expired."""
        async with self._db.transaction() as tx:
            found = await WebSessionRepo(tx.session).take_ticket(key_hash(ticket),
                                                                 now=self._clock())  # fmt: skip
        if found is None:
            raise Unauthorized("invalid, used or expired WebSocket ticket")
        return SessionCredentials(web_session=found)

    async def principal_of(self, creds: SessionCredentials) -> Principal:
        """A ticket-opened WebSocket's principal, re-checked. :raise Unauthorized:"""
        return await self._principal(creds.web_session)

    async def _principal(self, session_id: str) -> Principal:
        async with self._db.transaction() as tx:
            found = await WebSessionRepo(tx.session).get(session_id, now=self._clock())
            user = await tx.users.get(found.user_id) if found is not None else None
            membership = (await tx.teams.membership(found.team_id, found.user_id)
                          if found is not None else None)  # fmt: skip
        if found is None or user is None or not user.is_active or membership is None:
            raise Unauthorized("this session is no longer valid; log in again")
        return Principal(team_id=membership.team.id, role=membership.role, user_id=user.id,
                         email=user.email, name=user.name, is_admin=user.is_admin)  # fmt: skip
