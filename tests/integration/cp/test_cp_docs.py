"""`/openapi.json` (generated from the routers) and `/docs` (the dashboard's Swagger UI page,
built from npm: works offline)."""

from __future__ import annotations

import re

from nestbox.controlplane.app import ROUTERS
from nestbox.controlplane.settings import SOURCE_DASHBOARD
from tests.integration.cp.harness import RunningCP


async def test_openapi_describes_every_endpoint(cp: RunningCP) -> None:
    r = await cp.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    for router in ROUTERS:
        for endpoint in router.endpoints:
            op = doc["paths"][endpoint.path][endpoint.method.lower()]
            assert op["summary"] == endpoint.summary
    signup = doc["paths"]["/v1/auth/signup"]["post"]
    body_ref = signup["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref.split("/")[-1] in doc["components"]["schemas"]
    assert signup["security"] == []
    assert "201" in signup["responses"]
    error = doc["components"]["schemas"]["ErrorBody"]
    assert "error" in error["properties"]
    keys = doc["paths"]["/v1/api-keys"]["get"]["responses"]["200"]["content"]
    assert keys["application/json"]["schema"]["type"] == "array"


async def test_docs_is_the_dashboards_swagger_ui_built_from_npm(cp: RunningCP) -> None:
    """`/docs` is the dashboard's page (built by `make install`); its references are all local,
    and Swagger UI is in the build (its own chunk, loaded by that page; the browser test checks
    that no request leaves the control plane)."""
    assert (SOURCE_DASHBOARD / "index.html").is_file(), "the dashboard is not built: make install"
    page = await cp.client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    refs = [r for r in re.findall(r'(?:src|href)="([^"]+)"', page.text) if r != "data:,"]
    assert refs, "the page loads its script"
    for ref in refs:
        assert not re.match(r"^(https?:)?//", ref), ref
        asset = await cp.client.get(ref)
        assert asset.status_code == 200, ref
    chunks = list((SOURCE_DASHBOARD / "assets").glob("Docs-*.js"))
    assert chunks, "the reference page's chunk"
    assert any("swagger-ui" in c.read_text() for c in chunks)
    # The same under the /api prefix.
    assert (await cp.client.get("/api/docs")).status_code == 200
    assert (await cp.client.get("/api/openapi.json")).status_code == 200
