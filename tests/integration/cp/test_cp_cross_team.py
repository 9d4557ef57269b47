"""Authorisation of every route (fake agents; SQLite, the host tokens on PostgreSQL too).

The routes come from the control plane's own router table (`create_app(...).routes`, checked
against `/openapi.json`), and `test_every_route_is_classified` fails for a route that has no
case here, so a new route cannot ship without one. Each route is exactly one of:
- `CROSS_TEAM`: team B (its key, its session, its key under `/api`) on team A's object: 404
  `not_found`, and nothing changed: not on the agents (no RPC reached them, their state is the
  same) and not in the database (every row of every table).
- `LISTINGS`: B's answer (200) names nothing of team A's.
- `WEBSOCKETS`: B is refused at the handshake (HTTP 404), or, authenticating in the first
  message, with an error frame and close 4404 (`api/wsconn.py`); nothing changes.
- `ADMIN_ONLY`: a member, a team admin and a team owner (key and session) get 403
  `forbidden`, no credentials 401; regular hosts likewise (`REGULAR_HOST`, 403 to add one, 404
  to see, delete or re-token one).
- `AGENT`: the agents' own calls: another host's token is 401 and changes nothing.
- `EXEMPT`, with the reason: it names no object (no path parameter, no id in its body).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.routing import Route, WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from nestbox.controlplane.api.routing import Auth, Endpoint
from nestbox.controlplane.app import ROUTERS, create_app
from nestbox.controlplane.db.base import Base
from nestbox.controlplane.db.models import HostRow
from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.hosts import HOST_TOKEN_HEADER
from tests.integration.cp.cluster import LOAD, Cluster, cluster
from tests.integration.cp.harness import Account, new_key, signup

BEAT = {**LOAD, "memory_available_mb": 1}
RouteKey = tuple[str, str]
"""(method, path as the router declares it); WebSockets have the method `WS`."""


@dataclass(frozen=True)
class Call:
    """How to call a route: a JSON body or a multipart upload; path parameters are filled from
    team A's ids (`ids` renames one, e.g. resume names the paused capsule)."""

    body: dict[str, Any] | None = None
    multipart: bool = False
    query: str = ""
    ids: dict[str, str] = field(default_factory=dict)


FILE = {"path": "/root/secret.txt"}
PLATFORM = Call(ids={"capsule_id": "platform_capsule"})
CROSS_TEAM: dict[RouteKey, Call] = {
    ("POST", "/v1/auth/switch-team"): Call({"team_id": "{team_id}"}),
    ("POST", "/v1/auth/session/team"): Call({"team_id": "{team_id}"}),
    ("DELETE", "/v1/api-keys/{key_id}"): Call(),
    ("GET", "/v1/teams/{team_id}"): Call(),
    ("PATCH", "/v1/teams/{team_id}"): Call({"name": "Taken"}),
    ("DELETE", "/v1/teams/{team_id}"): Call(),
    ("GET", "/v1/teams/{team_id}/members"): Call(),
    ("POST", "/v1/teams/{team_id}/members"): Call({"email": "{b_email}", "role": "admin"}),
    ("PATCH", "/v1/teams/{team_id}/members/{user_id}"): Call({"role": "member"}),
    ("DELETE", "/v1/teams/{team_id}/members/{user_id}"): Call(),
    ("POST", "/v1/teams/{team_id}/leave"): Call(),
    ("POST", "/v1/capsules"): Call({"template": "{name}"}),
    ("GET", "/v1/capsules/{capsule_id}"): Call(),
    ("DELETE", "/v1/capsules/{capsule_id}"): Call(),
    ("POST", "/v1/capsules/{capsule_id}/pause"): Call(),
    ("POST", "/v1/capsules/{capsule_id}/resume"): Call(ids={"capsule_id": "paused_id"}),
    ("POST", "/v1/capsules/{capsule_id}/ping"): Call(),
    ("POST", "/v1/capsules/{capsule_id}/exec"): Call({"cmd": "echo hi"}),
    ("GET", "/v1/capsules/{capsule_id}/processes"): Call(),
    ("DELETE", "/v1/capsules/{capsule_id}/processes/{selector}"): Call(query="?signal=SIGKILL"),
    ("POST", "/v1/capsules/{capsule_id}/files/read"): Call(FILE),
    ("POST", "/v1/capsules/{capsule_id}/files/write"): Call(multipart=True),
    ("POST", "/v1/capsules/{capsule_id}/files/stream/read"): Call(FILE),
    ("POST", "/v1/capsules/{capsule_id}/files/stream/write"): Call(multipart=True),
    ("POST", "/v1/capsules/{capsule_id}/files/list"): Call({"path": "/root"}),
    ("POST", "/v1/capsules/{capsule_id}/files/mkdir"): Call({"path": "/root/new"}),
    ("POST", "/v1/capsules/{capsule_id}/files/remove"): Call(FILE),
    ("POST", "/v1/capsules/{capsule_id}/files/stat"): Call(FILE),
    ("POST", "/v1/capsules/{capsule_id}/files/move"): Call(
        {"source": "/root/secret.txt", "destination": "/tmp/taken"}
    ),
    # lifetime, fork, stdin and watch (issue 13)
    ("POST", "/v1/capsules/{capsule_id}/timeout"): Call({"timeout_sec": 120, "ttl_sec": 60}),
    ("POST", "/v1/capsules/{capsule_id}/fork"): Call({"count": 2}),
    ("POST", "/v1/capsules/{capsule_id}/processes/{selector}/stdin"): Call({"data": "taken"}),
    ("DELETE", "/v1/capsules/{capsule_id}/processes/{selector}/stdin"): Call(),
    ("GET", "/v1/capsules/{capsule_id}/files/watch"): Call(query="?path=/root"),
    ("POST", "/v1/snapshots"): Call({"sandbox_id": "{capsule_id}", "name": "taken"}),
    ("DELETE", "/v1/snapshots/{name}"): Call(),
    ("POST", "/v1/hosts"): Call({"type": "byoc", "team_id": "{team_id}"}),
    ("GET", "/v1/hosts/{host_id}"): Call(),
    ("DELETE", "/v1/hosts/{host_id}"): Call(query="?force=true"),
    ("POST", "/v1/hosts/{host_id}/token"): Call(),
    # metrics and channels (issue 13)
    ("GET", "/v1/capsules/{capsule_id}/metrics"): Call(query="?range=10m"),
    ("GET", "/v1/channels/{channel_id}"): Call(),
    ("PATCH", "/v1/channels/{channel_id}"): Call({"name": "taken", "events": ["host.up"]}),
    ("DELETE", "/v1/channels/{channel_id}"): Call(),
    ("PUT", "/v1/channels/{channel_id}/config"): Call({"config": {"url": "http://127.0.0.1:9/t"}}),
    ("GET", "/v1/channels/{channel_id}/deliveries"): Call(),
    # the template builder: team admins on their own team's builds and templates (issue 12)
    ("POST", "/v1/admin/builds"): Call({"name": "taken", "base_template": "{name}"}),
    ("GET", "/v1/admin/builds/{build_id}"): Call(),
    ("POST", "/v1/admin/builds/{build_id}/cancel"): Call(),
    ("GET", "/v1/admin/builds/{build_id}/events"): Call(),
    ("DELETE", "/v1/admin/templates/{name}"): Call(),
    # E2B's facade (issue 16)
    ("POST", "/v2/sandboxes"): Call({"templateID": "{name}"}),
    ("POST", "/sandboxes"): Call({"templateID": "{name}"}),
    ("GET", "/sandboxes/{capsule_id}"): Call(),
    ("DELETE", "/sandboxes/{capsule_id}"): Call(),
    ("POST", "/sandboxes/{capsule_id}/pause"): Call(),
    ("POST", "/sandboxes/{capsule_id}/resume"): Call({}, ids={"capsule_id": "paused_id"}),
    ("POST", "/sandboxes/{capsule_id}/connect"): Call({}, ids={"capsule_id": "paused_id"}),
    ("POST", "/v2/sandboxes/{capsule_id}/connect"): Call({}, ids={"capsule_id": "paused_id"}),
    ("POST", "/sandboxes/{capsule_id}/timeout"): Call({"timeout": 5}),
    ("POST", "/sandboxes/{capsule_id}/refreshes"): Call({"duration": 60}),
    ("GET", "/sandboxes/{capsule_id}/metrics"): Call(),
    ("GET", "/sandboxes/{capsule_id}/logs"): Call(),
    ("GET", "/v2/sandboxes/{capsule_id}/logs"): Call(),
    ("POST", "/sandboxes/{capsule_id}/snapshots"): Call({"name": "taken"}),
    ("DELETE", "/templates/{template_id}"): Call(ids={"template_id": "name"}),
    ("GET", "/templates/{template_id}/files/{files_hash}"): Call(
        ids={"template_id": "name", "files_hash": "name"}
    ),
    ("POST", "/v2/templates/{template_id}/builds/{build_id}"): Call(
        {"fromTemplate": "minimal", "steps": []}, ids={"template_id": "name"}
    ),
    ("GET", "/templates/{template_id}/builds/{build_id}/status"): Call(ids={"template_id": "name"}),
}
LISTINGS: dict[RouteKey, str] = {
    ("GET", "/v1/api-keys"): "",
    ("GET", "/v1/teams"): "",
    ("GET", "/v1/users/search"): "?email=owner-a@",  # teammates by prefix only
    ("GET", "/v1/audit-logs"): "?limit=500",
    ("GET", "/v1/capsules"): "",
    ("GET", "/v1/snapshots"): "",
    ("GET", "/v1/hosts"): "",
    ("GET", "/v1/channels"): "",
    ("GET", "/v1/admin/builds"): "",
    ("GET", "/v1/admin/templates"): "",
    ("GET", "/v2/sandboxes"): "",
    ("GET", "/sandboxes"): "",
    ("GET", "/snapshots"): "",
}
WEBSOCKETS: dict[RouteKey, dict[str, Any] | None] = {
    # route: the first frame the owner sends (the positive control), None: nothing to send
    ("WS", "/v1/capsules/{capsule_id}/exec/stream"): {"type": "start", "cmd": "echo hi"},
    ("WS", "/v1/capsules/{capsule_id}/processes/{selector}/stream"): None,
    ("WS", "/v1/capsules/{capsule_id}/pty"): {"type": "start", "cmd": "/bin/bash"},
}
ADMIN_ONLY: dict[RouteKey, list[Call]] = {
    ("GET", "/v1/admin/audit-logs"): [Call()],
    ("GET", "/v1/admin/users"): [Call()],
    ("PATCH", "/v1/admin/users/{user_id}"): [
        Call({"is_admin": True}, ids={"user_id": "self_id"}),  # promote oneself
        Call({"status": "disabled"}, ids={"user_id": "admin_id"}),  # lock the operator out
    ],
    ("GET", "/v1/admin/teams"): [Call()],
    # platform capsules (issue 13); `platform_capsule` is the admin's own, with FILE in it
    ("GET", "/v1/admin/capsules"): [Call()],
    ("POST", "/v1/admin/capsules"): [Call({"template": "minimal"})],
    ("GET", "/v1/admin/capsules/{capsule_id}"): [PLATFORM],
    ("POST", "/v1/admin/capsules/{capsule_id}/files/read"): [replace(PLATFORM, body=FILE)],
    ("POST", "/v1/admin/capsules/{capsule_id}/files/stream/read"): [replace(PLATFORM, body=FILE)],
    ("POST", "/v1/admin/capsules/{capsule_id}/files/list"): [
        replace(PLATFORM, body={"path": "/root"})
    ],
    ("POST", "/v1/admin/capsules/{capsule_id}/files/stat"): [replace(PLATFORM, body=FILE)],
    ("POST", "/v1/admin/capsules/{capsule_id}/files/mkdir"): [
        replace(PLATFORM, body={"path": "/root/made"})
    ],
    ("POST", "/v1/admin/capsules/{capsule_id}/files/write"): [replace(PLATFORM, multipart=True)],
    ("POST", "/v1/admin/capsules/{capsule_id}/files/stream/write"): [
        replace(PLATFORM, multipart=True)
    ],
    ("POST", "/v1/admin/capsules/{capsule_id}/files/move"): [
        replace(PLATFORM, body={"source": "/root/secret.txt", "destination": "/tmp/moved"})
    ],
    ("POST", "/v1/admin/capsules/{capsule_id}/files/remove"): [
        replace(PLATFORM, body={"path": "/tmp/moved"})
    ],
    ("DELETE", "/v1/admin/capsules/{capsule_id}"): [PLATFORM],
}
REGULAR_HOST: list[tuple[RouteKey, Call, int]] = [
    (("POST", "/v1/hosts"), Call({}), 403),
    (("POST", "/v1/hosts"), Call({"type": "regular", "provider": "mine"}), 403),
    (("GET", "/v1/hosts/{host_id}"), Call(), 404),
    (("DELETE", "/v1/hosts/{host_id}"), Call(query="?force=true"), 404),
    (("POST", "/v1/hosts/{host_id}/token"), Call(), 404),
]
AGENT: dict[RouteKey, str] = {
    ("POST", "/v1/hosts/auth/refresh"): "test_host_tokens_serve_their_own_host_only",
    ("POST", "/v1/hosts/{host_id}/heartbeat"): "test_host_tokens_serve_their_own_host_only",
}
OWN = "acts on the caller's own user or team only; names no other object"
DOC = "public document: the API's description, no team's data"
EXEMPT: dict[RouteKey, str] = {
    ("POST", "/v1/auth/signup"): "public: makes a new user and team",
    ("POST", "/v1/auth/login"): "public: the caller's own email and password",
    ("GET", "/v1/me"): OWN,
    ("PATCH", "/v1/me"): OWN,
    ("POST", "/v1/me/password"): OWN,
    ("POST", "/v1/api-keys"): "makes a key in the caller's own team",
    ("POST", "/v1/teams"): "makes a new team owned by the caller",
    ("POST", "/v3/templates"): "E2B: asks for a template build in the caller's own team "
    "(signed ids, nothing stored)",
    ("POST", "/v1/hosts/register"): "an agent's call: the one-time registration token is the "
    "credential and names its host (test_cp_hosts.py::test_registration_contract)",
    ("GET", "/openapi.json"): DOC,
    ("GET", "/docs"): DOC,
    ("GET", "/docs/"): DOC,
    ("POST", "/v1/auth/session"): "public: the caller's own email and password (a browser)",
    ("POST", "/v1/auth/session/signup"): "public: makes a new user and team (a browser)",
    ("GET", "/v1/auth/session"): "the browser's own session cookie; names no other object",
    ("DELETE", "/v1/auth/session"): "ends the browser's own session (cookie + CSRF token)",
    ("POST", "/v1/auth/ws-ticket"): "a ticket for the browser's own session; names no object",
    ("GET", "/v1/capsules/stats"): "the caller's own team's totals, no object named "
    "(test_cp_usage.py::test_stats: another team's capsules are not counted)",
    ("GET", "/v1/capsules/usage"): "the caller's own team's usage, no object named "
    "(test_cp_usage.py: another team's capsule is not counted)",
    ("GET", "/v1/events/stream"): "the caller's own team's events, no object named "
    "(test_cp_events.py: another team's never reach it)",
    ("POST", "/v1/channels"): "makes a channel in the caller's own team",
    ("POST", "/v1/channels/test"): "sends a test event to the config in its body, keeps nothing",
}
TEAM_ADMIN = {route for route in [*CROSS_TEAM, *LISTINGS] if route[1].startswith("/v1/admin/")}
"""`/v1/admin/` routes that team owners and admins use on their own team's objects (the
template builder, wrenn-surface §1.7): cross-team cases, not admin-only ones."""
TABLES: dict[str, Any] = {"CROSS_TEAM": CROSS_TEAM, "LISTINGS": LISTINGS,
                          "WEBSOCKETS": WEBSOCKETS, "ADMIN_ONLY": ADMIN_ONLY, "AGENT": AGENT,
                          "EXEMPT": EXEMPT}  # fmt: skip


def endpoints() -> dict[RouteKey, Endpoint]:
    return {(e.method, e.path): e for r in ROUTERS for e in r.endpoints}


def served(settings: CPSettings) -> set[RouteKey]:
    """Every route the app serves, from its router table (nothing is opened: no lifespan)."""
    found: set[RouteKey] = set()
    for route in create_app(settings).routes:
        if isinstance(route, WebSocketRoute):
            found.add(("WS", route.path))
        elif isinstance(route, Route):
            methods = set(route.methods or ())
            if "GET" in methods:
                methods.discard("HEAD")  # Starlette answers HEAD for every GET
            found |= {(m, route.path) for m in methods}
        else:  # a mount or a new kind of route: it must be classified too
            found.add((type(route).__name__, str(getattr(route, "path", route))))
    return found


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format_map(ids)
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def _url(route: RouteKey, call: Call, ids: dict[str, str]) -> str:
    names = {**ids, **{param: ids[key] for param, key in call.ids.items()}}
    return route[1].format_map(names) + call.query


async def _send(client: httpx.AsyncClient, route: RouteKey, call: Call, ids: dict[str, str],
                headers: dict[str, str], prefix: str = "") -> httpx.Response:  # fmt: skip
    kw: dict[str, Any] = {}
    if call.multipart:
        kw = {"files": {"file": ("u", b"taken")}, "data": {"path": "/root/secret.txt"}}
    elif call.body is not None:
        kw = {"json": _fill(call.body, ids)}
    return await client.request(route[0], prefix + _url(route, call, ids), headers=headers, **kw)


def agent_state(c: Cluster) -> Any:
    """Everything a request could change on the fake agents."""
    return [
        (
            {cid: (cap.state, cap.last_active_ms, dict(cap.files), sorted(cap.dirs),
                   sorted(cap.processes), sorted(cap.ptys), cap.host_ip)
             for cid, cap in h.agent.capsules.items()},
            sorted(h.agent.templates), list(h.agent.calls), len(h.agent.exec_requests),
            len(h.app.rpcs),
        )
        for h in c.hosts
    ]  # fmt: skip


def quiet(settings: CPSettings) -> CPSettings:
    """No background pass during the test: any change is a request's."""
    return settings.model_copy(update={"reconcile_interval_s": 3600,
                                       "host_monitor_interval_s": 3600,
                                       "stats_interval_s": 3600,
                                       "channels_allow_private": True})  # fmt: skip


@dataclass
class World:
    """Team A (an owner, an admin member, two capsules, a background process, a file, a
    snapshot, a BYOC host) and team B (an owner with a key and a session)."""

    a_owner: Account
    a_key: dict[str, str]
    b: Account
    b_key: dict[str, str]
    ids: dict[str, str]
    markers: list[str]
    """Strings that identify team A's things: none may appear in B's answers."""

    async def database(self, c: Cluster) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table, but for what B's own requests may change: the last use
        of B's own key."""
        dump = {}
        async with c.services.db.transaction() as tx:
            for table in Base.metadata.sorted_tables:
                rows = [dict(r._mapping) for r in await tx.session.execute(select(table))]
                for row in rows:
                    if table.name == "api_keys" and row["team_id"] == self.b.team_id:
                        row["last_used_at"] = None
                dump[table.name] = sorted(rows, key=repr)
        return dump


async def _world(c: Cluster) -> World:
    a_owner, a_key = await c.user("owner-a@example.com")
    a_admin = await signup(c.client, "admin-a@example.com")
    r = await c.client.post(f"/v1/teams/{a_owner.team_id}/members",
                            json={"email": a_admin.email, "role": "admin"},
                            headers=a_owner.headers)  # fmt: skip
    assert r.status_code == 201, r.text
    cid = (await c.create(a_key))["id"]
    bg = {"cmd": "sleep", "args": ["300"], "background": True, "tag": "a-proc"}
    r = await c.client.post(f"/v1/capsules/{cid}/exec", json=bg, headers=a_key)
    assert r.status_code == 202, r.text
    r = await c.client.post(f"/v1/capsules/{cid}/files/write", data=FILE,
                            files={"file": ("s", b"team A's secret")}, headers=a_key)  # fmt: skip
    assert r.status_code == 204, r.text
    paused = (await c.create(a_key))["id"]
    r = await c.client.post("/v1/snapshots", json={"sandbox_id": paused, "name": "a-snapshot"},
                            headers=a_key)  # fmt: skip
    assert r.status_code == 201, r.text
    r = await c.client.post("/v1/hosts", json={"type": "byoc"}, headers=a_key)
    assert r.status_code == 201, r.text
    byoc = r.json()["host"]["id"]
    [key] = (await c.client.get("/v1/api-keys", headers=a_key)).json()
    r = await c.client.post("/v1/admin/builds", json={"name": "a-build", "recipe": ["BOGUS"]},
                            headers=a_key)  # fmt: skip
    assert r.status_code == 201, r.text  # failed at once (a bad line): nothing runs later
    build = r.json()["id"]
    r = await c.client.post(
        "/v1/channels",
        headers=a_key,
        json={
            "name": "a-channel",
            "provider": "webhook",
            "config": {"url": "http://127.0.0.1:9/a"},
            "events": ["host.down"],
        },
    )  # host.down only: no event of this test is delivered
    assert r.status_code == 201, r.text
    channel = r.json()["id"]
    b, b_key = await c.user("b@example.com")
    ids = {"team_id": a_owner.team_id, "key_id": key["id"], "user_id": a_admin.user_id,
           "channel_id": channel, "capsule_id": cid, "paused_id": paused,
           "selector": "a-proc", "name": "a-snapshot", "host_id": byoc, "b_email": b.email,
           "build_id": build}  # fmt: skip
    markers = [a_owner.team_id, key["id"], key["key_prefix"], a_owner.user_id, a_admin.user_id,
               a_owner.email, a_admin.email, cid, paused, "a-snapshot", byoc, build,
               "a-build", channel, "a-channel"]  # fmt: skip
    return World(a_owner, a_key, b, b_key, ids, markers)


# ── the meta-test: every route is classified ──


async def test_every_route_is_classified(tmp_path: Path) -> None:
    settings = CPSettings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'unused.db'}")
    routes = served(settings)
    tables = {name: set(table) for name, table in TABLES.items()}
    classified = set().union(*tables.values())
    assert routes - classified == set(), "routes without a cross-team/auth case: add one"
    assert classified - routes == set(), "cases for routes that do not exist"
    for (one, a), (other, b) in itertools.combinations(tables.items(), 2):
        assert a & b == set(), f"in both {one} and {other}"

    # The OpenAPI document describes the same routes (the docs' own pages and WebSockets aside).
    app = create_app(settings)
    doc = app.state.openapi
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    raw = {("WS", r.path) if isinstance(r, WebSocketRoute) else ("GET", getattr(r, "path", ""))
           for router in ROUTERS for r in router.routes}  # fmt: skip
    assert documented == routes - raw

    by_route = endpoints()
    for route in routes:
        endpoint = by_route.get(route)
        admin = endpoint is not None and endpoint.auth is Auth.ADMIN
        if admin or (route[1].startswith("/v1/admin/") and route not in TEAM_ADMIN):
            assert route in ADMIN_ONLY, f"{route} is for platform admins: put it in ADMIN_ONLY"
        if route[0] == "WS":
            assert route in WEBSOCKETS, route
    for route, reason in EXEMPT.items():
        assert reason, route
        assert "{" not in route[1], f"{route} names an object in its path: it cannot be exempt"
        endpoint = by_route.get(route)
        if endpoint is not None and endpoint.body is not None:
            fields = endpoint.body.model_fields
            assert not [f for f in fields if f.endswith("_id")], f"{route}'s body names an id"
            assert endpoint.body.model_config.get("extra") == "forbid", route
    for route in CROSS_TEAM:
        endpoint = by_route[route]  # documented HTTP routes
        assert endpoint.auth in (Auth.TEAM, Auth.SESSION), route


# ── team B on team A's things ──


async def test_another_teams_objects_are_404_on_every_route(settings: CPSettings) -> None:
    async with cluster(quiet(settings)) as c:
        w = await _world(c)
        by_route = endpoints()
        problems: list[str] = []
        before = await w.database(c)
        for route, call in CROSS_TEAM.items():
            session_only = by_route[route].auth is Auth.SESSION
            callers = [("session", "", w.b.headers)]
            if not session_only:
                callers += [("key", "", w.b_key), ("key", "/api", w.b_key)]
            agents = agent_state(c)
            for who, prefix, headers in callers:
                r = await _send(c.client, route, call, w.ids, headers, prefix)
                code = r.json().get("error", {}).get("code") if r.content else None
                if (r.status_code, code) != (404, "not_found"):
                    problems.append(f"{route} by B's {who}{prefix}: {r.status_code} {r.text}")
                if agent_state(c) != agents:
                    problems.append(f"{route} by B's {who}{prefix} reached the agent")
            if (now := await w.database(c)) != before:
                problems.append(f"{route} changed the database")
                before = now  # so the next route is judged on its own
        assert problems == []

        # The checks above would have seen a change: the owner's own call makes one.
        before, agents = await w.database(c), agent_state(c)
        r = await c.client.post(f"/v1/capsules/{w.ids['capsule_id']}/exec",
                                json={"cmd": "echo hi"}, headers=w.a_key)  # fmt: skip
        assert r.status_code == 200
        r = await c.client.patch(f"/v1/teams/{w.ids['team_id']}", json={"name": "Renamed"},
                                 headers=w.a_owner.headers)  # fmt: skip
        assert r.status_code == 200
        assert agent_state(c) != agents
        assert await w.database(c) != before


async def test_listings_show_nothing_of_another_team(settings: CPSettings) -> None:
    async with cluster(quiet(settings)) as c:
        w = await _world(c)
        problems = []
        for route, query in LISTINGS.items():
            for who, headers in (("key", w.b_key), ("session", w.b.headers)):
                r = await c.client.request(route[0], route[1] + query, headers=headers)
                if r.status_code != 200:
                    problems.append(f"{route} by B's {who}: {r.status_code} {r.text}")
                    continue
                seen = [m for m in w.markers if m in r.text]
                if seen:
                    problems.append(f"{route} by B's {who} shows team A's {seen}")
                # The owner's same listing does show team A's things: the check can fail.
                r = await c.client.request(route[0], route[1] + query, headers=w.a_owner.headers)
                assert any(m in r.text for m in w.markers), route
        assert problems == []


async def _ws_frames(ws: Any) -> list[Any]:
    frames = []
    try:
        async for message in ws:
            frames.append(json.loads(message) if isinstance(message, str) else message)
    except ConnectionClosed:
        pass
    return frames


async def test_another_teams_websockets_are_refused(settings: CPSettings) -> None:
    async with cluster(quiet(settings)) as c:
        w = await _world(c)
        before = await w.database(c)
        for route in WEBSOCKETS:
            url = c.ws_url + route[1].format_map(w.ids)
            for who, headers, token in (("key", w.b_key, w.b_key["X-API-Key"]),
                                        ("session", w.b.headers, w.b.token)):  # fmt: skip
                agents = agent_state(c)
                # Credentials on the handshake: refused before the upgrade.
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(url, additional_headers=headers):
                        pass
                assert refused.value.response.status_code == 404, (route, who)
                body = json.loads(refused.value.response.body or b"{}")
                assert body["error"]["code"] == "not_found", (route, who)
                # Credentials in the first message: an error frame, then close 4404.
                async with connect(url) as ws:
                    await ws.send(json.dumps({"type": "auth", "token": token}))
                    frames = await _ws_frames(ws)
                assert ws.close_code == 4404, (route, who, ws.close_code)
                assert frames[-1]["type"] == "error", (route, who)
                assert agent_state(c) == agents, (route, who)
        assert await w.database(c) == before

        # Positive control: the owner's key opens each of them.
        for route, first in WEBSOCKETS.items():
            url = c.ws_url + route[1].format_map(w.ids)
            async with connect(url, additional_headers=w.a_key) as ws:
                if first is not None:
                    await ws.send(json.dumps(first))
                frame = json.loads(await ws.recv())
            assert frame["type"] in ("start", "started"), (route, frame)


# ── platform administration ──


Member = tuple[str, dict[str, str], dict[str, str]]


async def _member(c: Cluster, owner: Account, email: str, role: str) -> Member:
    """A user with `role` in `owner`'s team: their id, a session and a key in that team."""
    user = await signup(c.client, email)
    r = await c.client.post(f"/v1/teams/{owner.team_id}/members",
                            json={"email": email, "role": role}, headers=owner.headers)  # fmt: skip
    assert r.status_code == 201, r.text
    r = await c.client.post("/v1/auth/switch-team", json={"team_id": owner.team_id},
                            headers=user.headers)  # fmt: skip
    session = {"Authorization": f"Bearer {r.json()['token']}"}
    r = await c.client.post("/v1/api-keys", json={"name": role}, headers=session)
    assert r.status_code == 201, r.text
    return user.user_id, session, {"X-API-Key": r.json()["key"]}


async def test_admin_routes_refuse_non_admins(settings: CPSettings) -> None:
    async with cluster(quiet(settings)) as c:
        owner = await signup(c.client, "owner@example.com")
        owner_key = await new_key(c.client, owner)
        admin_id, admin_session, admin_key = await _member(c, owner, "adm@example.com", "admin")
        member_id, member_session, member_key = await _member(c, owner, "mem@example.com",
                                                              "member")  # fmt: skip
        me = (await c.client.get("/v1/me", headers=c.admin)).json()
        host = c.hosts[0]
        r = await c.client.post("/v1/admin/capsules", json={}, headers=c.admin)
        assert r.status_code == 201, r.text
        platform = r.json()["id"]
        r = await c.client.post(f"/v1/admin/capsules/{platform}/files/write", data=FILE,
                                files={"file": ("s", b"platform")}, headers=c.admin)  # fmt: skip
        assert r.status_code == 204, r.text
        callers = [
            ("member key", member_key, member_id),
            ("member session", member_session, member_id),
            ("team admin key", admin_key, admin_id),
            ("team admin session", admin_session, admin_id),
            ("owner key", owner_key, owner.user_id),
            ("owner session", owner.headers, owner.user_id),
        ]
        before = {e["id"] for e in (await c.client.get("/v1/admin/audit-logs?limit=500",
                                                       headers=c.admin)).json()}  # fmt: skip
        agents = agent_state(c)
        problems = []

        async def expect(route: RouteKey, call: Call, ids: dict[str, str], who: str,
                         headers: dict[str, str], status: int, code: str) -> None:  # fmt: skip
            r = await _send(c.client, route, call, ids, headers)
            got = r.json()["error"]["code"] if r.status_code >= 400 else None
            if (r.status_code, got) != (status, code):
                problems.append(f"{route} {call.body} by {who}: {r.status_code} {r.text}")

        nobody = [("no credentials", {}), ("a made-up key", {"X-API-Key": "wrn_" + "0" * 32})]
        for who, headers, self_id in callers:
            ids = {
                "self_id": self_id,
                "admin_id": me["id"],
                "host_id": host.host_id,
                "platform_capsule": platform,
            }
            for route, calls in ADMIN_ONLY.items():
                for call in calls:
                    await expect(route, call, ids, who, headers, 403, "forbidden")
            for route, call, status in REGULAR_HOST:
                code = "forbidden" if status == 403 else "not_found"
                await expect(route, call, ids, who, headers, status, code)
            listed = (await c.client.get("/v1/hosts", headers=headers)).json()
            if host.host_id in json.dumps(listed):
                problems.append(f"GET /v1/hosts by {who} lists the regular host")
        ids = {
            "self_id": member_id,
            "admin_id": me["id"],
            "host_id": host.host_id,
            "platform_capsule": platform,
        }
        for who, headers in nobody:
            for route, calls in ADMIN_ONLY.items():
                for call in calls:
                    await expect(route, call, ids, who, headers, 401, "unauthorized")
            for route, call, _ in REGULAR_HOST:
                await expect(route, call, ids, who, headers, 401, "unauthorized")
        assert problems == []

        # Nothing changed: no admin made, nobody disabled, the host untouched and still online.
        for user_headers in (member_key, admin_key, owner_key):
            assert (await c.client.get("/v1/me", headers=user_headers)).json()["is_admin"] is False
        assert (await c.client.get("/v1/me", headers=c.admin)).status_code == 200
        r = await c.client.get(f"/v1/hosts/{host.host_id}", headers=c.admin)
        assert r.json()["status"] == "online"
        assert agent_state(c) == agents
        after = (await c.client.get("/v1/admin/audit-logs?limit=500", headers=c.admin)).json()
        assert [e["action"] for e in after if e["id"] not in before] == []

        # Positive control: the platform admin gets through (a no-op update for the PATCH).
        ids = {
            "self_id": member_id,
            "admin_id": me["id"],
            "host_id": host.host_id,
            "platform_capsule": platform,
        }
        harmless = Call({"status": "active"}, ids={"user_id": "self_id"})
        for route, calls in ADMIN_ONLY.items():
            call = harmless if route[0] == "PATCH" else calls[0]
            r = await _send(c.client, route, call, ids, c.admin)
            assert r.is_success, (route, r.text)
        r = await _send(c.client, ("GET", "/v1/hosts/{host_id}"), Call(), ids, c.admin)
        assert r.status_code == 200


# ── the agents' own routes: host tokens ──


async def _host_row(c: Cluster, host_id: str) -> dict[str, Any]:
    async with c.services.db.transaction() as tx:
        row = await tx.session.scalar(select(HostRow).where(HostRow.id == host_id))
        assert row is not None
        return {col.key: getattr(row, col.key) for col in HostRow.__mapper__.column_attrs}


@pytest.mark.postgres
async def test_host_tokens_serve_their_own_host_only(settings: CPSettings) -> None:
    async with cluster(quiet(settings), hosts=2) as c:
        a, b = c.hosts
        user, key = await c.user("ann@example.com")
        beat = f"/v1/hosts/{b.host_id}/heartbeat"
        before, rpcs = await _host_row(c, b.host_id), list(b.app.rpcs)

        wrong = {"host A's host token": {HOST_TOKEN_HEADER: a.host_token},
                 "host A's refresh token": {HOST_TOKEN_HEADER: a.refresh_token},
                 "host A's agent token": {HOST_TOKEN_HEADER: a.agent.token},
                 "host A's proxy token": {HOST_TOKEN_HEADER: a.agent.proxy_token},
                 "host B's refresh token": {HOST_TOKEN_HEADER: b.refresh_token},
                 "host A's token as a bearer": {"Authorization": f"Bearer {a.host_token}"},
                 "a user's session": {HOST_TOKEN_HEADER: user.token},
                 "a team key": {HOST_TOKEN_HEADER: key["X-API-Key"]},
                 "the admin key": {HOST_TOKEN_HEADER: c.admin["X-API-Key"]},
                 "the admin key as such": c.admin, "nothing": {}}  # fmt: skip
        for what, headers in wrong.items():
            r = await c.client.post(beat, json=BEAT, headers=headers)
            assert r.status_code == 401, (what, r.text)
            assert r.json()["error"]["code"] == "unauthorized", what

        # Refresh: only a refresh token renews, and only its own host's token.
        for what, token in (("host A's host token", a.host_token),
                            ("host B's host token", b.host_token),
                            ("host B's agent token", b.agent.token)):  # fmt: skip
            r = await c.client.post("/v1/hosts/auth/refresh", json={"refresh_token": token},
                                    headers={HOST_TOKEN_HEADER: b.host_token})  # fmt: skip
            assert r.status_code == 401, (what, r.text)
        r = await c.client.post("/v1/hosts/auth/refresh", json={"refresh_token": a.refresh_token},
                                headers={HOST_TOKEN_HEADER: b.host_token})  # fmt: skip
        assert r.status_code == 200, r.text
        renewed = r.json()["token"]
        r = await c.client.post(beat, json=BEAT, headers={HOST_TOKEN_HEADER: renewed})
        assert r.status_code == 401  # host A's new token is still host A's
        r = await c.client.post(f"/v1/hosts/{a.host_id}/heartbeat", json=LOAD,
                                headers={HOST_TOKEN_HEADER: renewed})  # fmt: skip
        assert r.status_code == 200

        assert await _host_row(c, b.host_id) == before
        assert b.app.rpcs == rpcs  # not even a reconcile of host B was set off
        # Host B's own credentials still work (its refresh token was not spent), and a
        # heartbeat of its own does change the row: the comparison above could fail.
        r = await c.client.post("/v1/hosts/auth/refresh", json={"refresh_token": b.refresh_token})
        assert r.status_code == 200, r.text
        r = await c.client.post(beat, json=BEAT, headers={HOST_TOKEN_HEADER: r.json()["token"]})
        assert r.status_code == 200, r.text
        after = await _host_row(c, b.host_id)
        assert after["load"]["memory_available_mb"] == 1
        assert after["last_heartbeat_at"] > before["last_heartbeat_at"]
