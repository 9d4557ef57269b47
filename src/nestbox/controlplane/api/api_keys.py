"""Team API keys: `/v1/api-keys`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Endpoint, Router
from nestbox.protocol.accounts import ApiKeyCreate, ApiKeyView

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response


async def create_api_key(request: Request) -> Response:
    req = await deps.body(request, ApiKeyCreate)
    keys = deps.services(request).api_keys
    return deps.json(await keys.create(deps.principal(request), req.name), 201)


async def list_api_keys(request: Request) -> Response:
    return deps.json(await deps.services(request).api_keys.list_keys(deps.principal(request)))


async def delete_api_key(request: Request) -> Response:
    keys = deps.services(request).api_keys
    await keys.delete(deps.principal(request), deps.path_param(request, "key_id"))
    return deps.no_content()


router = Router(
    tag="api-keys",
    endpoints=[
        Endpoint("POST", "/v1/api-keys", create_api_key, "Create a team API key",
                 body=ApiKeyCreate, response=ApiKeyView, status=201,
                 description="The answer's `key` is the only time the full key is shown.",
                 rate_limited=True),
        Endpoint("GET", "/v1/api-keys", list_api_keys, "List the team's API keys",
                 response=list[ApiKeyView]),
        Endpoint("DELETE", "/v1/api-keys/{key_id}", delete_api_key, "Revoke an API key",
                 status=204),
    ],
)  # fmt: skip
