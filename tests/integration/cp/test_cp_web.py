"""The dashboard's browser session and static files (fake agent, real HTTP):

- login and signup set an HttpOnly, SameSite=Strict cookie whose token never appears in a body;
  the cookie authenticates API requests, state-changing ones only with the session's own
  CSRF token (none, a wrong one or another session's: 403, nothing done);
- logging out ends the session on the server (the same cookie replayed is refused) and closes
  a WebSocket it opened; switching team moves the session, never into a stranger's team;
- a WebSocket handshake never takes the cookie; a ticket opens one socket once (a second use
  or an expired ticket is refused);
- `/`, the app's pages and its files are served from the build, unknown API paths and missing
  assets are the API's 404, a path leaving the build directory reaches nothing, and without
  a build every page says how to build it (503, never 500).
"""

from __future__ import annotations

import http.client
import json
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from sqlalchemy import update
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from nestbox.controlplane.db.base import utcnow
from nestbox.controlplane.db.models import WsTicketRow
from nestbox.protocol.web import SESSION_COOKIE
from tests.integration.cp.cluster import Cluster, cluster
from tests.integration.cp.harness import signup

if TYPE_CHECKING:
    import httpx

    from nestbox.controlplane.settings import CPSettings

PASSWORD = "correct horse"
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
"""What a browser's navigation asks for."""
CLOSE_WITHIN_S = 10.0


def _cookie(r: httpx.Response) -> str:
    [header] = [v for k, v in r.headers.multi_items() if k == "set-cookie"]
    return header


async def _browser(c: Cluster, email: str) -> tuple[dict[str, str], dict[str, Any]]:
    """A new user logged in as a browser: (the Cookie header, the session view)."""
    await signup(c.client, email)
    r = await c.client.post("/v1/auth/session", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    c.client.cookies.clear()  # each test passes its cookies explicitly
    token = r.cookies[SESSION_COOKIE]
    return {"Cookie": f"{SESSION_COOKIE}={token}"}, r.json()


@pytest.fixture
async def c(settings: CPSettings, tmp_path: Path) -> Any:
    build = tmp_path / "build"
    (build / "assets").mkdir(parents=True)
    (build / "index.html").write_text("<!doctype html><title>the app</title>")
    (build / "assets" / "app-1234.js").write_text("console.log('app')")
    (tmp_path / "secret.txt").write_text("outside the build")
    quick = settings.model_copy(update={"dashboard_dir": build, "session_recheck_s": 0.2})
    async with cluster(quick) as running:
        yield running


async def test_login_sets_an_httponly_strict_cookie_and_answers_no_token(c: Cluster) -> None:
    await signup(c.client, "cookie@example.org")
    r = await c.client.post("/v1/auth/session",
                            json={"email": "cookie@example.org", "password": PASSWORD})  # fmt: skip
    assert r.status_code == 200, r.text
    cookie = _cookie(r)
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "path", "max-age", "samesite"} <= attributes, cookie
    assert "samesite=strict" in cookie.lower()
    token = r.cookies[SESSION_COOKIE]
    assert token.startswith("nbs_")
    assert token not in r.text
    assert len(r.json()["csrf_token"]) == 64
    wrong = {"email": "cookie@example.org", "password": "wrong one"}
    r = await c.client.post("/v1/auth/session", json=wrong)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert "set-cookie" not in r.headers


async def test_the_cookie_needs_the_sessions_csrf_token_to_change_anything(c: Cluster) -> None:
    cookie, view = await _browser(c, "csrf@example.org")
    _, other = await _browser(c, "other-csrf@example.org")
    me = await c.client.get("/v1/me", headers=cookie)
    assert me.status_code == 200, me.text
    assert me.json()["email"] == "csrf@example.org"
    for csrf in (None, "", "0" * 64, other["csrf_token"], view["csrf_token"][:-1]):
        headers = {**cookie, **({"X-CSRF-Token": csrf} if csrf is not None else {})}
        r = await c.client.post("/v1/api-keys", json={"name": "nope"}, headers=headers)
        assert r.status_code == 403, (csrf, r.text)
        assert r.json()["error"]["code"] == "forbidden"
    keys = await c.client.get("/v1/api-keys", headers=cookie)
    assert keys.json() == []
    r = await c.client.post("/v1/api-keys", json={"name": "yes"},
                            headers={**cookie, "X-CSRF-Token": view["csrf_token"]})  # fmt: skip
    assert r.status_code == 201, r.text
    # The session itself, without a cookie: "none" is an answer, not an error.
    none = await c.client.get("/v1/auth/session")
    assert (none.status_code, none.json()) == (200, {"session": None})
    got = await c.client.get("/v1/auth/session", headers=cookie)
    assert got.json()["session"]["csrf_token"] == view["csrf_token"]


async def test_logout_ends_the_session_and_its_websocket(c: Cluster) -> None:
    cookie, view = await _browser(c, "bye@example.org")
    csrf = {"X-CSRF-Token": view["csrf_token"]}
    key = await c.client.post("/v1/api-keys", json={"name": "k"}, headers={**cookie, **csrf})
    cid = (await c.create({"X-API-Key": key.json()["key"]}))["id"]
    ticket = await c.client.post("/v1/auth/ws-ticket", headers={**cookie, **csrf})
    assert ticket.status_code == 201, ticket.text
    ws = await connect(f"{c.ws_url}/v1/capsules/{cid}/pty")
    await ws.send(json.dumps({"type": "auth", "token": ticket.json()["ticket"]}))
    await ws.send(json.dumps({"type": "start", "cmd": "/bin/bash"}))
    assert json.loads(await ws.recv())["type"] == "started"
    assert (await c.client.delete("/v1/auth/session", headers=cookie)).status_code == 403
    r = await c.client.delete("/v1/auth/session", headers={**cookie, **csrf})
    assert r.status_code == 204, r.text
    assert SESSION_COOKIE in _cookie(r)  # told to forget it
    with anyio.fail_after(CLOSE_WITHIN_S):
        frames = []
        try:
            async for message in ws:
                frames.append(message)
        except ConnectionClosed:
            pass
    assert ws.close_code == 1008, (ws.close_code, frames)
    assert (await c.client.get("/v1/me", headers=cookie)).status_code == 401
    assert (await c.client.get("/v1/auth/session", headers=cookie)).json() == {"session": None}


async def test_websockets_take_a_ticket_once_and_never_the_cookie(c: Cluster) -> None:
    cookie, view = await _browser(c, "ws@example.org")
    csrf = {"X-CSRF-Token": view["csrf_token"]}
    key = await c.client.post("/v1/api-keys", json={"name": "k"}, headers={**cookie, **csrf})
    cid = (await c.create({"X-API-Key": key.json()["key"]}))["id"]
    url = f"{c.ws_url}/v1/capsules/{cid}/pty"
    start = json.dumps({"type": "start", "cmd": "/bin/bash"})

    async def refused(first: str, **kw: Any) -> int | None:
        async with connect(url, **kw) as ws:
            await ws.send(first)
            with anyio.fail_after(CLOSE_WITHIN_S):
                while True:  # an error frame, then the close
                    try:
                        frame = await ws.recv()
                    except ConnectionClosed:
                        return ws.close_code
                    assert json.loads(frame)["type"] == "error", frame

    # The cookie alone: the first frame is taken as the auth frame and refused.
    assert await refused(start, additional_headers=cookie) == 4401
    token = cookie["Cookie"].split("=", 1)[1]
    assert await refused(json.dumps({"type": "auth", "token": token})) == 4401
    # A ticket is good once.
    assert (await c.client.post("/v1/auth/ws-ticket", headers=cookie)).status_code == 403
    ticket = (await c.client.post("/v1/auth/ws-ticket", headers={**cookie, **csrf})).json()
    assert ticket["ticket"].startswith("nbt_")
    auth = json.dumps({"type": "auth", "token": ticket["ticket"]})
    async with connect(url) as ws:
        await ws.send(auth)
        await ws.send(start)
        assert json.loads(await ws.recv())["type"] == "started"
    assert await refused(auth) == 4401
    # An expired one is refused too.
    late = (await c.client.post("/v1/auth/ws-ticket", headers={**cookie, **csrf})).json()
    async with c.services.db.transaction() as tx:
        await tx.session.execute(
            update(WsTicketRow).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert await refused(json.dumps({"type": "auth", "token": late["ticket"]})) == 4401


async def test_switching_team_moves_the_session_only_into_its_users_teams(c: Cluster) -> None:
    cookie, view = await _browser(c, "switch@example.org")
    csrf = {"X-CSRF-Token": view["csrf_token"]}
    made = await c.client.post("/v1/teams", json={"name": "Second"}, headers={**cookie, **csrf})
    assert made.status_code == 201, made.text
    second = made.json()["id"]
    _, stranger = await _browser(c, "stranger@example.org")
    r = await c.client.post("/v1/auth/session/team", json={"team_id": stranger["team_id"]},
                            headers={**cookie, **csrf})  # fmt: skip
    assert r.status_code == 404, r.text
    r = await c.client.post("/v1/auth/session/team", json={"team_id": second},
                            headers={**cookie, **csrf})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["team_id"] == second
    assert (await c.client.get("/v1/me", headers=cookie)).json()["team_id"] == second


def _raw_get(c: Cluster, path: str) -> tuple[int, str, bytes]:
    host, port = c.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Accept", "text/html")  # as a browser: the app's page where no file is
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.getheader("content-type") or "", r.read()
    finally:
        conn.close()


async def test_the_app_is_served_at_the_root_and_the_api_keeps_its_404s(c: Cluster) -> None:
    for path in ("/", "/capsules", "/capsules/cl-anything?tab=files", "/login", "/docs",
                 "/api/docs"):  # fmt: skip
        r = await c.client.get(path, headers=HTML)
        assert r.status_code == 200, path
        assert "the app" in r.text, path
        assert r.headers["cache-control"] == "no-cache", path
        # Never framed, scripts from here only (the browser test runs the app under this policy).
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
        assert "script-src 'self';" in r.headers["content-security-policy"], path
        assert r.headers["x-frame-options"] == "DENY", path
    asset = await c.client.get("/assets/app-1234.js")
    assert asset.status_code == 200
    assert "immutable" in asset.headers["cache-control"]
    for path in ("/assets/gone-1.js", "/v1/nothing", "/v1", "/favicon.ico"):
        r = await c.client.get(path, headers=HTML)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found", path
    # An API client (no HTML asked) on a path nobody serves: the API's 404, not the app's page.
    for path in ("/capsules", "/sandboxes/nothing/here", "/v2/whatever"):
        r = await c.client.get(path, headers={"Accept": "application/json"})
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found", path
    r = await c.client.post("/capsules")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    for raw in ("/../secret.txt", "/assets/../../secret.txt", "/%2e%2e/secret.txt",
                "/assets/%2e%2e/%2e%2e/secret.txt", "/..%2fsecret.txt"):  # fmt: skip
        status, _, body = await anyio.to_thread.run_sync(_raw_get, c, raw)
        assert b"outside the build" not in body, raw
        assert status in (200, 400, 404), (raw, status)  # 200: the app's page, never the file


async def test_without_a_build_every_page_says_how_to_build_it(
    settings: CPSettings, tmp_path: Path
) -> None:
    missing = settings.model_copy(update={"dashboard_dir": tmp_path / "never-built"})
    async with cluster(missing) as c:
        for path in ("/", "/capsules", "/docs"):
            r = await c.client.get(path, headers=HTML)
            assert r.status_code == 503, path
            assert r.headers["content-type"].startswith("text/html")
            assert "make install" in r.text
        assert (await c.client.get("/openapi.json")).status_code == 200
        assert (await c.client.get("/v1/nothing")).status_code == 404
        assert (await c.client.get("/capsules")).status_code == 404  # an API client
