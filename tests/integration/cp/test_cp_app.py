"""Extending the app as the capsule and host modules will: another router, a background loop."""

from __future__ import annotations

from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.routing import Endpoint, Router
from nestbox.controlplane.app import ROUTERS, create_app
from nestbox.controlplane.services.container import Services
from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.harness import running, signup


class EchoView(BaseModel):
    team_id: str


async def whoami(request: Request) -> Response:
    return deps.json(EchoView(team_id=deps.principal(request).team_id))


async def test_routers_and_background_loops_plug_in(tmp_path: Path) -> None:
    events: list[str] = []

    async def ticker(
        services: Services, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        assert services.db is not None
        events.append("ready")
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            events.append("stopped")

    extra = Router(tag="extra", endpoints=[Endpoint("GET", "/v1/whoami", whoami, "Echo")])
    app = create_app(
        CPSettings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/cp.db"),
        routers=(*ROUTERS, extra),
        background=[ticker],
    )
    async with running(app) as cp:
        assert events == ["ready"]
        account = await signup(cp.client, "ext@example.org")
        r = await cp.client.get("/v1/whoami", headers=account.headers)
        assert r.json() == {"team_id": account.team_id}
        assert (await cp.client.get("/v1/whoami")).status_code == 401
        doc = (await cp.client.get("/openapi.json")).json()
        assert doc["paths"]["/v1/whoami"]["get"]["operationId"] == "whoami"
    assert events == ["ready", "stopped"]
