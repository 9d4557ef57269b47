"""What handlers need from a request: the services, the authenticated principal, a validated
body, and a JSON answer. Also the authentication used by `Endpoint` and by WebSocket handlers.
"""

from __future__ import annotations

import json as jsonlib
import re
from typing import TYPE_CHECKING, TypeVar, cast

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response

from nestbox.controlplane.errors import InvalidRequest, NotFound, TooLarge, Unauthorized
from nestbox.controlplane.services.auth import Credentials
from nestbox.controlplane.services.sessions import SessionCredentials
from nestbox.protocol.capsules import SAFE_NAME
from nestbox.protocol.ids import IdPrefix, is_id
from nestbox.protocol.web import CSRF_HEADER, SESSION_COOKIE

if TYPE_CHECKING:
    from collections.abc import Sequence

    from starlette.requests import HTTPConnection, Request

    from nestbox.controlplane.services.container import Services
    from nestbox.controlplane.services.principal import Principal
    from nestbox.controlplane.services.sessions import WebSessions

M = TypeVar("M", bound=BaseModel)

API_KEY_HEADER = "X-API-Key"
MAX_JSON_BODY = 1024 * 1024
MAX_ERRORS_SHOWN = 5


def services(conn: HTTPConnection) -> Services:
    return cast("Services", conn.app.state.services)


def principal(request: Request) -> Principal:
    """The principal `Endpoint` authenticated. :raise Unauthorized: a public endpoint asked."""
    found = getattr(request.state, "principal", None)
    if found is None:
        raise Unauthorized()
    return cast("Principal", found)


def credentials(conn: HTTPConnection) -> Credentials:
    """`X-API-Key` and `Authorization: Bearer …` of a request or WebSocket handshake."""
    bearer = None
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        bearer = token.strip()
    # A present but empty X-API-Key is a (bad) key, never "no key": a request must not pass on
    # the strength of another credential while carrying a broken one.
    return Credentials(api_key=conn.headers.get(API_KEY_HEADER), bearer=bearer)


async def authenticate(conn: HTTPConnection) -> Principal:
    """The principal behind a request or WebSocket handshake: `X-API-Key`, `Authorization:
    Bearer`, or (HTTP requests only, never a WebSocket) the dashboard's session cookie, which
    needs `X-CSRF-Token` on state-changing methods (`services/sessions.py`).
    :raise Unauthorized: :raise Forbidden: a cookie request without its CSRF token."""
    creds = credentials(conn)
    if creds.api_key is None and creds.bearer is None and conn.scope["type"] == "http":
        token = conn.cookies.get(SESSION_COOKIE)
        if token:
            return await web_sessions(conn).authenticate(
                token, method=str(conn.scope["method"]), csrf=conn.headers.get(CSRF_HEADER)
            )
    return await authenticate_with(conn, creds)


async def authenticate_with(conn: HTTPConnection, creds: Credentials) -> Principal:
    """The principal behind `creds`, a browser session's (a spent WebSocket ticket) included.
    :raise Unauthorized:"""
    if isinstance(creds, SessionCredentials):
        return await web_sessions(conn).principal_of(creds)
    return await services(conn).auth.authenticate(creds)


def web_sessions(conn: HTTPConnection) -> WebSessions:
    return cast("WebSessions", conn.app.state.web_sessions)


def client_address(conn: HTTPConnection) -> str:
    """The client's address: the TCP peer (uvicorn puts a trusted proxy's X-Forwarded-For
    there only when `forwarded_allow_ips` names that proxy)."""
    return conn.client.host if conn.client is not None else "unknown"


def require_session(found: Principal) -> None:
    if not found.is_session:
        raise Unauthorized("this needs a user session (Authorization: Bearer), not an API key")


async def body(request: Request, model: type[M]) -> M:
    """The JSON body validated as `model`, strictly (JSON's types as the document states them:
    `"true"` is not a boolean, `0` not a string); an empty body counts as `{}` (the document
    marks such bodies optional). :raise InvalidRequest: not JSON, or not valid. :raise
    TooLarge: over 1 MiB."""
    raw = await _read_limited(request, MAX_JSON_BODY)
    try:
        return model.model_validate_json(_integral_floats(raw) if raw.strip() else b"{}",
                                         strict=True)  # fmt: skip
    except ValidationError as err:
        if any(e["type"] == "json_invalid" for e in err.errors()):
            raise InvalidRequest("the body is not valid JSON") from None
        raise InvalidRequest(validation_message(err)) from None


_FRACTION = re.compile(rb"[0-9][.eE]")


def _integral_floats(raw: bytes) -> bytes:
    """The body with numbers like `2.0` or `1e3` written as integers: JSON Schema counts them
    as integers, pydantic's strict mode would not. Not JSON: returned as it is (the parser
    then says so)."""
    if _FRACTION.search(raw) is None:
        return raw  # no number with a fraction or an exponent: nothing to do
    try:
        doc = jsonlib.loads(raw, parse_float=_number, parse_constant=_no_constant)
    except ValueError:
        return raw
    return jsonlib.dumps(doc, separators=(",", ":")).encode()  # ASCII: lone surrogates stay escaped


def _number(text: str) -> int | float:
    value = float(text)
    if value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def validation_message(err: ValidationError) -> str:
    """pydantic's errors as one line for the client (field: problem; …), without the input."""
    parts = []
    for e in err.errors(include_url=False, include_input=False)[:MAX_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    more = err.error_count() - MAX_ERRORS_SHOWN
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


ID_PARAMS: dict[str, tuple[str, IdPrefix]] = {
    "capsule_id": ("capsule", IdPrefix.CAPSULE),
    "team_id": ("team", IdPrefix.TEAM),
    "user_id": ("user", IdPrefix.USER),
    "key_id": ("API key", IdPrefix.API_KEY),
    "host_id": ("host", IdPrefix.HOST),
    "build_id": ("build", IdPrefix.BUILD),
    "channel_id": ("channel", IdPrefix.CHANNEL),
}
"""Path parameters that are ids, and what they name."""
NAME_PARAMS: dict[str, tuple[str, re.Pattern[str]]] = {
    "name": ("template", re.compile(SAFE_NAME.removeprefix("^").removesuffix("$"))),
}


def path_param(conn: HTTPConnection, name: str) -> str:
    """A parameter of the route's path (`{capsule_id}`, `{host_id}`, …). An id must be whole
    and well-formed (`is_id`: nothing before, after or inside it, not even a newline), a
    template name must match all of `SAFE_NAME`. :raise NotFound: it is not."""
    value = str(conn.path_params[name])
    if name in ID_PARAMS:
        kind, prefix = ID_PARAMS[name]
        if not is_id(value, prefix):
            raise NotFound(kind, ascii(value)[1:-1][:80])
    elif name in NAME_PARAMS:
        kind, pattern = NAME_PARAMS[name]
        if pattern.fullmatch(value) is None:
            raise NotFound(kind, ascii(value)[1:-1][:80])
    return value


def query_bool(request: Request, name: str) -> bool:
    """A yes/no query parameter: `true`, `1` or `yes` (any case) is yes; `false`, `0`, `no` or
    absent is no; anything else, empty included, is a 400 (a typo must not quietly mean "no").
    :raise InvalidRequest:"""
    raw = request.query_params.get(name, "false").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    raise InvalidRequest(f"{name} must be true or false")


def query_int(request: Request, name: str, default: int, *, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi]. :raise InvalidRequest:"""
    raw = request.query_params.get(name)
    if raw is None:
        return default  # (empty is not an integer: 400, as the document says)
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}")
    return value


def json(content: BaseModel | Sequence[BaseModel], status: int = 200) -> JSONResponse:
    """A view (or a list of views) as the JSON answer."""
    if isinstance(content, BaseModel):
        return JSONResponse(content.model_dump(mode="json"), status_code=status)
    return JSONResponse([v.model_dump(mode="json") for v in content], status_code=status)


def no_content() -> Response:
    return Response(status_code=204)


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
