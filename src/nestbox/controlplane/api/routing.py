"""`Endpoint` and `Router`: how a route module declares its routes, once, for both Starlette and
the OpenAPI document.

An `Endpoint` names its method, path, auth level, request model and response type; its Starlette
route authenticates the request first (the principal lands in `request.state.principal`), so a
handler never sees an unauthenticated request it did not ask for. Routes that the OpenAPI
document cannot describe (WebSockets, mounts) go into `Router.routes` as plain Starlette routes.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute, Route

from nestbox.controlplane.api import deps

if TYPE_CHECKING:
    from pydantic import BaseModel
    from starlette.requests import Request
    from starlette.responses import Response

Handler = Callable[["Request"], Awaitable["Response"]]


@dataclass(frozen=True, slots=True)
class Query:
    """A query parameter the document types (a plain `(name, description)` pair is an optional
    string): `schema` is its JSON Schema, stating the rules the handler enforces."""

    name: str
    description: str
    schema: dict[str, Any]
    required: bool = False


def int_query(name: str, description: str, lo: int, hi: int) -> Query:
    return Query(name, description, {"type": "integer", "minimum": lo, "maximum": hi})


def enum_query(name: str, description: str, values: Sequence[str]) -> Query:
    return Query(name, description, {"type": "string", "enum": list(values)})


class Auth(Enum):
    PUBLIC = "public"
    """No credentials."""
    TEAM = "team"
    """An API key (`X-API-Key`) or a user session (`Authorization: Bearer`)."""
    SESSION = "session"
    """A user session only (JWT)."""
    ADMIN = "admin"
    """Either credential, of a platform admin."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth = Auth.TEAM
    body: type[BaseModel] | None = None
    response: Any = None
    """A pydantic model, `list[Model]`, or None for an empty answer."""
    status: int = 200
    description: str = ""
    query: Sequence[tuple[str, str] | Query] = ()
    """The query parameters, for the document: `(name, description)` or a typed `Query`."""
    flags: Sequence[tuple[str, str]] = ()
    """(name, description) of the boolean query parameters (`deps.query_bool`)."""
    media_type: str = "application/json"
    """Of the 2xx answer: `text/event-stream` for Server-Sent Events (`response` is then the
    model of one message's `data`)."""
    also: dict[int, Any] = field(default_factory=dict)
    """Other 2xx answers (status -> model), e.g. exec's 202 for a background start."""
    form: dict[str, Any] | None = None
    """The JSON Schema of a `multipart/form-data` body (required when given), for the document:
    the handler parses such bodies itself, as they arrive."""
    rate_limited: bool = False
    """Each client address gets its own token bucket for this route (login, signup, key
    creation); checked before anything else, so refused requests cost nothing."""

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{(\w+)(?::\w+)?}", self.path)

    def route(self) -> Route:
        return Route(self.path, self._endpoint, methods=[self.method], name=self.handler.__name__)

    async def _endpoint(self, request: Request) -> Response:
        if self.rate_limited:
            deps.services(request).limiter.take(self.path, deps.client_address(request))
        if self.auth is not Auth.PUBLIC:
            principal = await deps.authenticate(request)
            if self.auth is Auth.SESSION:
                deps.require_session(principal)
            elif self.auth is Auth.ADMIN:
                principal.require_admin()
            request.state.principal = principal
        return await self.handler(request)


@dataclass(frozen=True, slots=True)
class Router:
    """What one API module contributes: documented endpoints and undocumented raw routes."""

    tag: str
    endpoints: Sequence[Endpoint] = ()
    routes: Sequence[BaseRoute] = field(default_factory=list)

    def starlette_routes(self) -> list[BaseRoute]:
        return [e.route() for e in self.endpoints] + list(self.routes)


def starlette_routes(routers: Sequence[Router]) -> list[BaseRoute]:
    """Every router's routes, the endpoints of one path (from any router) as ONE route: a
    method no endpoint of that path takes then gets a 405 whose `Allow` names every method the
    path has (one route per method would name only its own). Paths with fewer parameters come
    first, so `/v1/hosts/register` is tried before `/v1/hosts/{host_id}` whatever the order
    the routers were listed in (Starlette takes the first route that matches)."""
    by_path: dict[str, list[Endpoint]] = {}
    for router in routers:
        for e in router.endpoints:
            by_path.setdefault(e.path, []).append(e)
    routes: list[BaseRoute] = []
    for path, endpoints in sorted(by_path.items(), key=lambda item: item[0].count("{")):
        if len(endpoints) == 1:
            routes.append(endpoints[0].route())
            continue
        handlers: dict[str, Handler] = {e.method: e._endpoint for e in endpoints}
        if len(handlers) != len(endpoints):
            raise ValueError(f"two endpoints for one method of {path}")
        if "GET" in handlers:
            handlers.setdefault("HEAD", handlers["GET"])

        async def dispatch(request: Request, handlers: dict[str, Handler] = handlers) -> Response:
            return await handlers[request.method](request)  # Route checked the method

        name = "_or_".join(e.handler.__name__ for e in endpoints)
        routes.append(Route(path, dispatch, methods=list(handlers), name=name))
    for router in routers:
        routes.extend(router.routes)
    return routes
