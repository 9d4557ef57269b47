"""The OpenAPI 3.1 document, generated from the routers' `Endpoint`s and the pydantic models
they name (`protocol/`). Nothing here is written by hand but the security schemes."""

from __future__ import annotations

import re
import typing
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from nestbox import __version__
from nestbox.controlplane.api.routing import Auth, Query
from nestbox.protocol.errors import ErrorBody

if TYPE_CHECKING:
    from collections.abc import Iterable

    from nestbox.controlplane.api.routing import Endpoint, Router

REF = "#/components/schemas/{model}"
SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    Auth.PUBLIC: [],
    Auth.TEAM: [{"apiKeyAuth": []}, {"bearerAuth": []}],
    Auth.SESSION: [{"bearerAuth": []}],
    Auth.ADMIN: [{"apiKeyAuth": []}, {"bearerAuth": []}],
}
SECURITY_SCHEMES = {
    "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                   "description": "a team API key, `wrn_` + 32 hex (POST /v1/api-keys)"},
    "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                   "description": "a session token from /v1/auth/login or /v1/auth/signup"},
}  # fmt: skip


class _Schemas:
    """Collects component schemas; hands out `$ref`s."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, tp: Any, mode: typing.Literal["validation", "serialization"]) -> dict[str, Any]:
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            return {"type": "array", "items": self.ref(item, mode)}
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
            raise TypeError(f"OpenAPI: cannot describe {tp!r}; name a pydantic model")
        schema = tp.model_json_schema(ref_template=REF, mode=mode)
        self.components.update(schema.pop("$defs", {}))
        self.components[tp.__name__] = schema
        return {"$ref": REF.format(model=tp.__name__)}


def build_openapi(routers: Iterable[Router], *, title: str = "Nestbox API") -> dict[str, Any]:
    schemas = _Schemas()
    error = {"description": "error", "content": {"application/json": {"schema": schemas.ref(
        ErrorBody, "serialization")}}}  # fmt: skip
    paths: dict[str, dict[str, Any]] = {}
    tags = []
    seen: set[str] = set()
    for router in routers:
        if router.endpoints:
            tags.append({"name": router.tag})
        for endpoint in router.endpoints:
            op = _operation(endpoint, router.tag, schemas, error)
            if op["operationId"] in seen:
                raise ValueError(f"two endpoints are named {op['operationId']}: rename a handler")
            seen.add(op["operationId"])
            paths.setdefault(_openapi_path(endpoint.path), {})[endpoint.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__,
                 "description": "Errors are always {\"error\": {\"code\", \"message\"}}."},
        "tags": tags,
        "paths": paths,
        "components": {"schemas": schemas.components, "securitySchemes": SECURITY_SCHEMES},
    }  # fmt: skip


def _operation(
    endpoint: Endpoint, tag: str, schemas: _Schemas, error: dict[str, Any]
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": endpoint.handler.__name__,
        "summary": endpoint.summary,
        "tags": [tag],
        "security": SECURITY[endpoint.auth],
    }
    if endpoint.description:
        op["description"] = endpoint.description
    params = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
        for p in endpoint.path_params
    ] + [_query(q) for q in endpoint.query] + [
        {"name": n, "in": "query", "required": False, "description": d,
         "schema": {"type": "boolean", "default": False}}
        for n, d in endpoint.flags
    ]  # fmt: skip
    if params:
        op["parameters"] = params
    if endpoint.body is not None:
        op["requestBody"] = {
            # An empty body counts as `{}` (deps.body): optional when `{}` is a valid one.
            "required": not _valid(endpoint.body, {}),
            "content": {"application/json": {"schema": schemas.ref(endpoint.body, "validation")}},
        }
    elif endpoint.form is not None:
        op["requestBody"] = {
            "required": True, "content": {"multipart/form-data": {"schema": endpoint.form}},
        }  # fmt: skip
    ok: dict[str, Any] = {"description": "OK" if endpoint.status < 300 else "done"}
    if endpoint.response is not None:
        schema = schemas.ref(endpoint.response, "serialization")
        if endpoint.media_type == "text/event-stream":
            schema = _sse_event(schema)
        ok["content"] = {endpoint.media_type: {"schema": schema}}
    op["responses"] = {str(endpoint.status): ok, "default": error}
    for status, model in endpoint.also.items():
        op["responses"][str(status)] = {"description": "OK", "content": {
            "application/json": {"schema": schemas.ref(model, "serialization")}}}  # fmt: skip
    if endpoint.rate_limited:
        op["responses"]["429"] = {
            **error,
            "description": "rate_limited: too many requests from this address; retry after "
            "`Retry-After` seconds",
        }
    return op


def _valid(model: type[BaseModel], doc: dict[str, Any]) -> bool:
    try:
        model.model_validate(doc)
    except ValidationError:
        return False
    return True


def _query(param: tuple[str, str] | Query) -> dict[str, Any]:
    if not isinstance(param, Query):
        param = Query(*param, schema={"type": "string"})
    return {"name": param.name, "in": "query", "required": param.required,
            "description": param.description, "schema": param.schema}  # fmt: skip


def _sse_event(data: dict[str, Any]) -> dict[str, Any]:
    """One Server-Sent Event (OpenAPI 3.1 reads a stream's `schema` as one event's): its `data:`
    is JSON that `data` describes."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": data},
        },
    }  # fmt: skip


def _openapi_path(path: str) -> str:
    """Starlette's `{name:conv}` → OpenAPI's `{name}`."""
    return re.sub(r"{(\w+):\w+}", r"{\1}", path)
