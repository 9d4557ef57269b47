"""Sessions and credentials: signup, login, switching team, and turning an `X-API-Key` or a
`Bearer` JWT into a `Principal`.

API keys: only their SHA-256 is stored; `last_used_at` is written at most once a minute per key,
so a busy key does not turn every read into a write. A key works only while its maker is an
active member of its team. Sessions: HS256 JWTs (`services/jwt.py`)
valid `jwt_ttl_s`; each request re-reads the user and membership, so a disabled user or a removed
member is locked out at once, whatever their token says.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio.to_thread

from nestbox.controlplane.errors import Conflict, Forbidden, NotFound, Unauthorized
from nestbox.controlplane.services import jwt
from nestbox.controlplane.services.passwords import dummy_hash, hash_password, verify_password
from nestbox.controlplane.services.principal import Principal
from nestbox.protocol.accounts import AuthView, Role
from nestbox.protocol.ids import IdPrefix, is_api_key, is_id

if TYPE_CHECKING:
    from collections.abc import Callable

    from nestbox.controlplane.db import Database, Tx
    from nestbox.controlplane.db.teams import Membership
    from nestbox.controlplane.db.users import User

log = logging.getLogger(__name__)

LAST_USED_RESOLUTION = timedelta(seconds=60)
PERSONAL_TEAM = "Personal"
USER_TOKEN = ""
"""`typ` claim of a user session (Wrenn's); host tokens say "host"."""


def key_hash(key: str) -> str:
    """How a random credential is stored and looked up (API keys, host registration and
    refresh tokens): its SHA-256, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


async def hash_password_async(password: str) -> str:
    return await anyio.to_thread.run_sync(hash_password, password)


async def verify_password_async(password: str, stored: str | None) -> bool:
    ok = await anyio.to_thread.run_sync(verify_password, password, stored or dummy_hash())
    return ok and stored is not None


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presented: `X-API-Key` and/or `Authorization: Bearer`."""

    api_key: str | None = None
    bearer: str | None = None


class AuthService:
    def __init__(
        self,
        db: Database,
        *,
        secret: bytes,
        session_ttl_s: int,
        signup_enabled: bool = True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._secret = secret
        self._ttl = session_ttl_s
        self._signup_enabled = signup_enabled
        self._clock = clock

    # ── sessions ──

    async def signup(self, email: str, password: str, name: str) -> AuthView:
        """A new user with a personal team they own. :raise Conflict: email taken."""
        if not self._signup_enabled:
            raise Forbidden("signup is disabled on this server")
        password_hash = await hash_password_async(password)
        async with self._db.transaction() as tx:
            if await tx.users.get_by_email(email) is not None:
                raise Conflict(f"an account for {email} already exists")
            user = await tx.users.create(email, name, password_hash)
            membership = await self._personal_team(tx, user)
            await tx.audit.record(
                Principal(team_id=membership.team.id, role=Role.OWNER, user_id=user.id,
                          email=user.email).audit("signup", "user", user.id)
            )  # fmt: skip
        return self.issue(user, membership)

    async def login(self, email: str, password: str) -> AuthView:
        """:raise Unauthorized: wrong email or password. :raise Forbidden: account disabled."""
        async with self._db.transaction() as tx:
            user = await tx.users.get_by_email(email)
        stored = user.password_hash if user is not None else None
        if not await verify_password_async(password, stored) or user is None:
            raise Unauthorized("invalid email or password")
        if not user.is_active:
            raise Forbidden("this account is disabled")
        async with self._db.transaction() as tx:
            teams = await tx.teams.memberships(user.id)
            membership = teams[0] if teams else await self._personal_team(tx, user)
        return self.issue(user, membership)

    async def switch_team(self, principal: Principal, team_id: str) -> AuthView:
        """A session for another team of the same user. :raise NotFound: not their team."""
        if not principal.is_session or principal.user_id is None:
            raise Unauthorized("switching team needs a user session (Authorization: Bearer)")
        if not is_id(team_id, IdPrefix.TEAM):
            raise NotFound("team", ascii(team_id)[1:-1][:80])
        async with self._db.transaction() as tx:
            user = await tx.users.get(principal.user_id)
            membership = await tx.teams.membership(team_id, principal.user_id)
        if user is None or membership is None:
            raise NotFound("team", team_id)
        return self.issue(user, membership)

    def issue(self, user: User, membership: Membership) -> AuthView:
        """A signed session token for `user` acting in `membership`'s team."""
        now = self._clock()
        exp = int((now + timedelta(seconds=self._ttl)).timestamp())
        claims = {
            "sub": user.id,
            "team_id": membership.team.id,
            "role": str(membership.role),
            "email": user.email,
            "name": user.name,
            "is_admin": user.is_admin,
            "typ": USER_TOKEN,
            "iat": int(now.timestamp()),
            "exp": exp,
        }
        return AuthView(
            token=jwt.encode(claims, self._secret),
            user_id=user.id,
            team_id=membership.team.id,
            email=user.email,
            name=user.name,
            role=membership.role,
            is_admin=user.is_admin,
            expires_at=datetime.fromtimestamp(exp, UTC),
        )

    async def _personal_team(self, tx: Tx, user: User) -> Membership:
        team = await tx.teams.create(PERSONAL_TEAM)
        return await tx.teams.add_member(team.id, user.id, Role.OWNER, is_default=True)

    # ── authentication of requests ──

    async def authenticate(self, creds: Credentials) -> Principal:
        """The principal behind `creds`; an API key wins over a bearer token.
        :raise Unauthorized: missing, malformed, unknown, expired or revoked credentials."""
        if creds.api_key is not None:
            return await self._by_api_key(creds.api_key)
        if creds.bearer is not None:
            return await self._by_session(creds.bearer)
        raise Unauthorized("missing credentials: send X-API-Key or Authorization: Bearer")

    async def _by_api_key(self, key: str) -> Principal:
        if not is_api_key(key):
            raise Unauthorized("invalid API key")
        now = self._clock()
        async with self._db.transaction() as tx:
            found = await tx.api_keys.by_hash(key_hash(key))
            if found is None:
                raise Unauthorized("invalid API key")
            if found.last_used_at is None or now - found.last_used_at >= LAST_USED_RESOLUTION:
                await tx.api_keys.touch(found.id, now)
            user = await tx.users.get(found.created_by) if found.created_by else None
            membership = await tx.teams.membership(found.team_id, user.id) if user else None
        if user is not None and not user.is_active:
            raise Unauthorized("the API key's owner is disabled")
        if user is None or membership is None:
            # Its maker left the team (their keys were revoked then) or is gone: a key never
            # outlives its maker's place in the team.
            raise Unauthorized("the API key's maker is no longer a member of its team")
        return Principal(
            team_id=found.team_id,
            role=membership.role,
            user_id=user.id,
            email=user.email,
            name=user.name,
            is_admin=user.is_admin,
            api_key_id=found.id,
        )

    async def _by_session(self, token: str) -> Principal:
        try:
            claims = jwt.decode(token, self._secret, now=self._clock().timestamp())
        except jwt.TokenError as err:
            log.debug("rejected session token: %s", err)
            raise Unauthorized("invalid or expired session token") from None
        user_id, team_id = claims.get("sub"), claims.get("team_id")
        if claims.get("typ") != USER_TOKEN or not isinstance(user_id, str):
            raise Unauthorized("not a user session token")
        async with self._db.transaction() as tx:
            user = await tx.users.get(user_id)
            membership = await tx.teams.membership(str(team_id), user_id)
        if user is None or not user.is_active or membership is None:
            raise Unauthorized("this session is no longer valid")
        return Principal(
            team_id=membership.team.id,
            role=membership.role,
            user_id=user.id,
            email=user.email,
            name=user.name,
            is_admin=user.is_admin,
        )
