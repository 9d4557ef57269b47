"""Published events (`services/events.py` writes them, the SSE hub and the channel outbox read
them by id), and how a commit wakes the readers.

On PostgreSQL `notify` queues `pg_notify('nestbox_events', '<id>')` in the transaction: the
server delivers it at commit, to every control plane LISTENing, this one included, in commit
order, and never for a rolled-back transaction. On SQLite (one process) the id goes to the
in-process listeners registered for the database's URL once the session commits.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, event, select, text
from sqlalchemy.engine import make_url

from nestbox.controlplane.db.models import EventRow

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from datetime import datetime

    from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "nestbox_events"
_LOCAL: defaultdict[str, set[Callable[[int], None]]] = defaultdict(set)
"""In-process listeners by database URL (SQLite)."""


def listen_locally(url: str, callback: Callable[[int], None]) -> Callable[[], None]:
    """Call `callback(event_id)` after each commit that published an event on the database at
    `url` (SQLite; PostgreSQL uses LISTEN). Returns the function that stops it."""
    key = make_url(url).render_as_string(hide_password=False)
    _LOCAL[key].add(callback)
    return lambda: _LOCAL[key].discard(callback)


class EventRepo:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(
        self, team_id: str | None, kind: str, payload: dict[str, Any], created_at: datetime
    ) -> int:
        row = EventRow(team_id=team_id, type=kind, payload=payload, created_at=created_at)
        self._s.add(row)
        await self._s.flush()
        return row.id

    async def notify(self, event_id: int) -> None:
        """Wake every reader of events once this transaction commits."""
        bind = self._s.get_bind()
        if bind.dialect.name == "postgresql":
            await self._s.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": NOTIFY_CHANNEL, "payload": str(event_id)},
            )
            return
        url = bind.engine.url.render_as_string(hide_password=False)

        def after_commit(_session: Any) -> None:
            for callback in list(_LOCAL.get(url, ())):
                try:
                    callback(event_id)
                except Exception as err:  # one listener must not stop the others
                    log.error("event listener failed: %r", err)

        event.listen(self._s.sync_session, "after_commit", after_commit, once=True)

    async def by_ids(self, ids: Iterable[int]) -> list[tuple[int, str | None, dict[str, Any]]]:
        """(id, team_id, payload) of the events with these ids, oldest first."""
        wanted = list(ids)
        if not wanted:
            return []
        rows = await self._s.scalars(
            select(EventRow).where(EventRow.id.in_(wanted)).order_by(EventRow.id)
        )
        return [(r.id, r.team_id, dict(r.payload)) for r in rows]

    async def payload(self, event_id: int) -> dict[str, Any] | None:
        row = await self._s.get(EventRow, event_id)
        return dict(row.payload) if row is not None else None

    async def prune(self, before: datetime) -> int:
        """Forget events older than `before` (their deliveries go with them)."""
        result = await self._s.execute(delete(EventRow).where(EventRow.created_at < before))
        return int(getattr(result, "rowcount", 0) or 0)
