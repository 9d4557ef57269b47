"""The audit trail (`/v1/audit-logs`) and platform administration (`/v1/admin/*`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Auth, Endpoint, Router, int_query
from nestbox.protocol.accounts import AdminTeamView, AdminUserUpdate, AdminUserView
from nestbox.protocol.audit import AuditEntryView

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

PAGE = [int_query("limit", "at most this many (default 100)", 1, 500),
        int_query("before", "only entries with a smaller id (paging)", 0, 2**62)]  # fmt: skip


async def _audit(request: Request, *, everyone: bool) -> Response:
    limit = deps.query_int(request, "limit", 100, lo=1, hi=500)
    before = deps.query_int(request, "before", 0, lo=0, hi=2**62) or None
    accounts = deps.services(request).accounts
    entries = await accounts.audit_log(deps.principal(request), everyone=everyone, limit=limit,
                                       before=before)  # fmt: skip
    return deps.json(entries)


async def team_audit_log(request: Request) -> Response:
    return await _audit(request, everyone=False)


async def admin_audit_log(request: Request) -> Response:
    return await _audit(request, everyone=True)


async def admin_list_users(request: Request) -> Response:
    limit = deps.query_int(request, "limit", 100, lo=1, hi=1000)
    offset = deps.query_int(request, "offset", 0, lo=0, hi=2**31)
    accounts = deps.services(request).accounts
    return deps.json(await accounts.list_users(deps.principal(request), limit=limit, offset=offset))


async def admin_update_user(request: Request) -> Response:
    req = await deps.body(request, AdminUserUpdate)
    accounts = deps.services(request).accounts
    user = await accounts.update_user(deps.principal(request), deps.path_param(request, "user_id"),
                                      status=req.status, is_admin=req.is_admin)  # fmt: skip
    return deps.json(user)


async def admin_list_teams(request: Request) -> Response:
    return deps.json(await deps.services(request).accounts.list_teams(deps.principal(request)))


router = Router(
    tag="admin",
    endpoints=[
        Endpoint("GET", "/v1/audit-logs", team_audit_log, "The team's audit trail (team admin)",
                 response=list[AuditEntryView], query=PAGE),
        Endpoint("GET", "/v1/admin/audit-logs", admin_audit_log, "Every team's audit trail",
                 auth=Auth.ADMIN, response=list[AuditEntryView], query=PAGE),
        Endpoint("GET", "/v1/admin/users", admin_list_users, "Every user", auth=Auth.ADMIN,
                 response=list[AdminUserView],
                 query=[int_query("limit", "default 100", 1, 1000),
                        int_query("offset", "skip this many", 0, 2**31)]),
        Endpoint("PATCH", "/v1/admin/users/{user_id}", admin_update_user,
                 "Disable or enable a user; grant or take platform admin", auth=Auth.ADMIN,
                 body=AdminUserUpdate, response=AdminUserView),
        Endpoint("GET", "/v1/admin/teams", admin_list_teams, "Every team", auth=Auth.ADMIN,
                 response=list[AdminTeamView]),
    ],
)  # fmt: skip
