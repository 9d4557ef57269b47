"""The dashboard: its browser session routes (`/v1/auth/session…`, `/v1/auth/ws-ticket`) and
the built single-page app served at `/`.

Session routes: login and signup set an HttpOnly, SameSite=Strict cookie holding an opaque
session token (`services/sessions.py`) and answer the CSRF token the page sends back as
`X-CSRF-Token`; every API route then accepts the cookie (`deps.authenticate`), checking the
CSRF token on state-changing methods. WebSockets never take the cookie: the page gets a
single-use ticket here and sends it as the socket's first frame.

Static files: `settings.dashboard_dir` (the Vite build, `dashboard/build`). Paths the router
does not know fall through to `Dashboard` (installed as the router's default): a GET for a
built file gets it (hashed `/assets/*` cached for a year, the rest revalidated); any other GET
outside `/v1/` that asks for HTML (a browser's navigation) gets `index.html`, whose client-side
router shows the page; everything else (an SDK asking an unknown path) is the API's usual 404.
Without a build every dashboard page is a 503 page that says how to build it (`make
install`), never a 500.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Auth, Endpoint, Router
from nestbox.controlplane.errors import Unauthorized
from nestbox.protocol.accounts import LoginRequest, SignupCreate, SwitchTeamRequest
from nestbox.protocol.web import (
    CSRF_HEADER,
    SESSION_COOKIE,
    WebSessionStateView,
    WebSessionView,
    WsTicketView,
)

if TYPE_CHECKING:
    from pathlib import Path

    from starlette.requests import Request
    from starlette.types import ASGIApp, Receive, Scope, Send

SESSION = "/v1/auth/session"
API_PATHS = ("/v1/", "/openapi.json")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
CSP = "; ".join((
    "default-src 'self'", "script-src 'self'", "connect-src 'self'", "img-src 'self' data: blob:",
    "style-src 'self' 'unsafe-inline'",  # xterm.js and Swagger UI set styles from script
    "font-src 'self' data:", "object-src 'none'", "base-uri 'none'", "form-action 'self'",
    "frame-ancestors 'none'",
))  # fmt: skip
"""The dashboard loads and talks to this origin only (no CDN, no other API), and is never framed."""
HARDENING = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _token(request: Request) -> str:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise Unauthorized("not logged in")
    return token


def _with_cookie(request: Request, view: WebSessionView, token: str, status: int = 200) -> Response:
    """The session's view, and its token in an HttpOnly, SameSite=Strict cookie (Secure over
    HTTPS) that lives as long as the session."""
    response = deps.json(view, status)
    ttl = deps.services(request).settings.jwt_ttl_s
    response.set_cookie(SESSION_COOKIE, token, max_age=ttl, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
    return response


async def login_session(request: Request) -> Response:
    req = await deps.body(request, LoginRequest)
    auth = await deps.services(request).auth.login(req.email, req.password)
    token, view = await deps.web_sessions(request).open(auth)
    return _with_cookie(request, view, token)


async def signup_session(request: Request) -> Response:
    req = await deps.body(request, SignupCreate)
    auth = await deps.services(request).auth.signup(req.email, req.password, req.name)
    token, view = await deps.web_sessions(request).open(auth)
    return _with_cookie(request, view, token, 201)


async def get_session(request: Request) -> Response:
    """The session, or `{"session": null}` when the browser has none (a page asks this first:
    "not logged in" is an answer here, not an error); a dead session's cookie is cleared."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        try:
            view = await deps.web_sessions(request).view(token)
            return deps.json(WebSessionStateView(session=view))
        except Unauthorized:
            pass
    response = deps.json(WebSessionStateView(session=None))
    if token:
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def logout_session(request: Request) -> Response:
    token = _token(request)
    web = deps.web_sessions(request)
    await web.authenticate(token, method="DELETE", csrf=request.headers.get(CSRF_HEADER))
    await web.close(token)
    response = deps.no_content()
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def switch_session_team(request: Request) -> Response:
    """Authenticated like any route (the cookie, with its CSRF token), so a team that is not
    the caller's is 404 whoever asks; only then the cookie is needed."""
    req = await deps.body(request, SwitchTeamRequest)
    web = deps.web_sessions(request)
    await web.check_member(deps.principal(request), req.team_id)
    return deps.json(await web.switch_team(_token(request), req.team_id))


async def ws_ticket(request: Request) -> Response:
    token = _token(request)
    web = deps.web_sessions(request)
    await web.authenticate(token, method="POST", csrf=request.headers.get(CSRF_HEADER))
    return deps.json(await web.ticket(token), 201)


COOKIE = "Needs the session cookie; also X-CSRF-Token (the answer of the login) but for GET."

router = Router(
    tag="session",
    endpoints=[
        Endpoint("POST", SESSION, login_session, "Log in a browser: sets the session cookie",
                 auth=Auth.PUBLIC, body=LoginRequest, response=WebSessionView,
                 rate_limited=True,
                 description="Sets an HttpOnly, SameSite=Strict cookie; answers the CSRF "
                             "token to send as X-CSRF-Token on state-changing requests."),
        Endpoint("POST", SESSION + "/signup", signup_session,
                 "Create an account and log the browser in", auth=Auth.PUBLIC,
                 body=SignupCreate, response=WebSessionView, status=201, rate_limited=True),
        Endpoint("GET", SESSION, get_session, "The browser's session and its CSRF token",
                 auth=Auth.PUBLIC, response=WebSessionStateView,
                 description="Reads the session cookie; `session` is null when the browser "
                             "has no live session."),
        Endpoint("DELETE", SESSION, logout_session, "Log the browser out (ends the session)",
                 auth=Auth.PUBLIC, status=204, description=COOKIE),
        Endpoint("POST", SESSION + "/team", switch_session_team,
                 "Make the browser's session act in another of your teams", auth=Auth.SESSION,
                 body=SwitchTeamRequest, response=WebSessionView, description=COOKIE),
        Endpoint("POST", "/v1/auth/ws-ticket", ws_ticket,
                 "A single-use WebSocket ticket for the browser's session", auth=Auth.PUBLIC,
                 response=WsTicketView, status=201,
                 description=COOKIE + ' Good for 30 s and one handshake: send '
                             '{"type": "auth", "token": <ticket>} as the first frame.'),
    ],
)  # fmt: skip


# ── the single-page app ──


NOT_BUILT = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Nestbox: dashboard not built</title></head>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto;line-height:1.5">
<h1>The dashboard is not built</h1>
<p>This control plane serves the dashboard from <code>{where}</code>, which holds no build.
Build it from a source checkout with <code>make install</code> (or <code>make dashboard</code>;
both need Node.js and npm). The API works without it: <a href="/openapi.json">/openapi.json</a>.
</p></body></html>"""


def wants_html(scope: Scope) -> bool:
    """A browser navigating (it asks for HTML); an API client asking an unknown path does not,
    and keeps getting the API's 404 JSON."""
    accept = dict(scope.get("headers") or []).get(b"accept", b"")
    return b"text/html" in accept


class _Files(StaticFiles):
    """StaticFiles (it refuses paths leaving the directory) with cache headers and the SPA
    fallback: a path with no file behind it whose last segment has no dot is a page."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory=directory, check_dir=False)
        self.index = directory / "index.html"

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            response = await super().get_response(path, scope)
        except HTTPException as err:
            last = path.rsplit("/", 1)[-1]
            if err.status_code != 404 or ("." in last and path != ".") or not wants_html(scope):
                raise
            response = FileResponse(self.index, media_type="text/html; charset=utf-8")
        immutable = path.startswith("assets/") and response.status_code in (200, 304)
        response.headers["Cache-Control"] = IMMUTABLE if immutable else REVALIDATE
        response.headers.update(HARDENING)
        return response


class Dashboard:
    """Serves the built dashboard for GETs the API routes did not take; else `fallback`."""

    def __init__(self, directory: Path, fallback: ASGIApp) -> None:
        self.directory = directory
        self.fallback = fallback
        self.files = _Files(directory)

    def built(self) -> bool:
        return self.files.index.is_file()

    def page(self) -> Response:
        """The app's page (`index.html`), or the page that says how to build it."""
        if not self.built():
            where = html.escape(str(self.directory))
            return HTMLResponse(NOT_BUILT.format(where=where), status_code=503,
                                headers={"Cache-Control": REVALIDATE, **HARDENING})  # fmt: skip
        return FileResponse(self.files.index, media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": REVALIDATE, **HARDENING})  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (scope["type"] != "http" or scope["method"] not in ("GET", "HEAD")
                or path.startswith(API_PATHS) or path == "/v1"):  # fmt: skip
            await self.fallback(scope, receive, send)
            return
        if not self.built():
            if wants_html(scope):
                await self.page()(scope, receive, send)
            else:
                await self.fallback(scope, receive, send)
            return
        await self.files(scope, receive, send)
