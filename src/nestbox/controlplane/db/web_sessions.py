"""Browser sessions and their WebSocket tickets (`web_sessions`, `ws_tickets`). Both are keyed
by the SHA-256 of a random token the browser holds; the tokens themselves are never stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, update

from nestbox.controlplane.db.models import WebSessionRow, WsTicketRow

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class WebSession:
    id: str
    """SHA-256 hex of the cookie's token."""
    user_id: str
    team_id: str
    created_at: datetime
    expires_at: datetime


def _record(row: WebSessionRow) -> WebSession:
    return WebSession(id=row.id, user_id=row.user_id, team_id=row.team_id,
                      created_at=row.created_at, expires_at=row.expires_at)  # fmt: skip


class WebSessionRepo:
    def __init__(self, session: AsyncSession) -> None:
        self.s = session

    async def create(self, session_id: str, user_id: str, team_id: str, *, now: datetime,
                     expires_at: datetime) -> WebSession:  # fmt: skip
        row = WebSessionRow(id=session_id, user_id=user_id, team_id=team_id, created_at=now,
                            expires_at=expires_at)  # fmt: skip
        self.s.add(row)
        await self.s.flush()
        return _record(row)

    async def get(self, session_id: str, *, now: datetime) -> WebSession | None:
        """The session, unless it has expired."""
        row = await self.s.get(WebSessionRow, session_id)
        return _record(row) if row is not None and row.expires_at > now else None

    async def set_team(self, session_id: str, team_id: str) -> None:
        await self.s.execute(
            update(WebSessionRow).where(WebSessionRow.id == session_id).values(team_id=team_id)
        )

    async def delete(self, session_id: str) -> None:
        await self.s.execute(delete(WebSessionRow).where(WebSessionRow.id == session_id))

    async def purge_expired(self, now: datetime) -> None:
        """Expired sessions and tickets (their rows are useless; keeps the tables small)."""
        await self.s.execute(delete(WsTicketRow).where(WsTicketRow.expires_at <= now))
        await self.s.execute(delete(WebSessionRow).where(WebSessionRow.expires_at <= now))

    async def add_ticket(self, ticket_id: str, session_id: str, expires_at: datetime) -> None:
        self.s.add(WsTicketRow(id=ticket_id, session_id=session_id, expires_at=expires_at))
        await self.s.flush()

    async def take_ticket(self, ticket_id: str, *, now: datetime) -> str | None:
        """Spend a ticket: the session it was made for, or None if unknown, spent or expired.
        The row is deleted in the same statement that reads it, so two redeemers racing get
        it once."""
        found = await self.s.execute(
            delete(WsTicketRow).where(WsTicketRow.id == ticket_id)
            .returning(WsTicketRow.session_id, WsTicketRow.expires_at)
        )  # fmt: skip
        row = found.first()
        if row is None:
            return None
        session_id, expires_at = row
        return str(session_id) if expires_at > now else None
