"""Listing capsules a page at a time: `GET /v1/capsules?limit=&cursor=&status=&metadata.k=v`.

Pages are keyed on (created_at, id), the order of the listing: a cursor is the key of the last
capsule of the page before (base64url of its JSON), and the next page is what sorts after it.
So every capsule that existed when the listing began is returned exactly once, however many
are created meanwhile (they sort after every page already read, and appear on a later page).
Without `limit` the listing is whole, as the `wrenn` SDK expects (a bare JSON array); the next
page's cursor travels in the `X-Next-Cursor` header, absent on the last page.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from nestbox.controlplane.db.capsules import PageKey
from nestbox.controlplane.errors import InvalidRequest
from nestbox.protocol.capsules import CapsuleStatus
from nestbox.protocol.metadata import FILTER_PREFIX, check_key

if TYPE_CHECKING:
    from collections.abc import Iterable

    from nestbox.controlplane.services.capsules import CapsuleService
    from nestbox.controlplane.services.principal import Principal
    from nestbox.protocol.capsules import CapsuleView

MAX_LIMIT = 1000
NEXT_CURSOR_HEADER = "X-Next-Cursor"
STATUSES = frozenset(s.value for s in CapsuleStatus)


@dataclass(frozen=True, slots=True)
class ListQuery:
    statuses: list[str] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    after: PageKey | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class Page:
    capsules: list[CapsuleView]
    next_cursor: str | None


def parse_query(params: Iterable[tuple[str, str]]) -> ListQuery:
    """`status` (repeated or comma-separated), `metadata.<key>=<value>` (every pair must
    match), `limit` (1-1000), `cursor`. :raise InvalidRequest:"""
    statuses: list[str] = []
    metadata: dict[str, str] = {}
    after: PageKey | None = None
    limit: int | None = None
    for name, value in params:
        if name == "status":
            statuses += [s for s in value.split(",") if s]
        elif name.startswith(FILTER_PREFIX):
            key = name.removeprefix(FILTER_PREFIX)
            try:
                check_key(key)
            except ValueError as err:
                raise InvalidRequest(str(err)) from None
            metadata[key] = value
        elif name == "limit":
            if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
                raise InvalidRequest(f"limit must be 1 to {MAX_LIMIT}")
            limit = int(value)
        elif name == "cursor":
            after = decode_cursor(value) if value else None
    unknown = [s for s in statuses if s not in STATUSES]
    if unknown:
        raise InvalidRequest(f"unknown status {unknown[0][:40]!r}")
    return ListQuery(statuses or None, metadata, after, limit)


async def list_page(capsules: CapsuleService, principal: Principal, query: ListQuery) -> Page:
    """One page of the caller's capsules (all of them without a limit)."""
    found = await capsules.list_for(
        principal, statuses=query.statuses, metadata=query.metadata, after=query.after,
        limit=None if query.limit is None else query.limit + 1,
    )  # fmt: skip
    if query.limit is None or len(found) <= query.limit:
        return Page(found, None)
    page = found[: query.limit]
    return Page(page, encode_cursor(PageKey(page[-1].created_at, page[-1].id)))


def encode_cursor(key: PageKey) -> str:
    raw = json.dumps([key.created_at.isoformat(), key.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> PageKey:
    """:raise InvalidRequest: not a cursor this server made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, capsule_id = json.loads(raw)
        when = datetime.fromisoformat(created_at)
        if not isinstance(capsule_id, str) or when.tzinfo is None:
            raise ValueError(cursor)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidRequest("bad cursor") from None
    return PageKey(when, capsule_id)
