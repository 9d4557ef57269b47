"""`/openapi.json` (generated from the routers) and `/docs` (served locally, works offline)."""

from __future__ import annotations

import re

from nestbox.controlplane.app import ROUTERS
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


async def test_docs_page_needs_nothing_from_elsewhere(cp: RunningCP) -> None:
    page = await cp.client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs, "the page loads its script"
    for ref in refs:
        assert not re.match(r"^(https?:)?//", ref), ref
        asset = await cp.client.get("/" + ref.lstrip("./"))
        assert asset.status_code == 200, ref
        assert "http://" not in asset.text
        assert "https://" not in asset.text
    script = await cp.client.get("/docs/docs.js")
    assert 'fetch("openapi.json")' in script.text
    # Relative references resolve the same under the /api prefix.
    assert (await cp.client.get("/api/docs")).status_code == 200
    assert (await cp.client.get("/api/docs/docs.js")).status_code == 200
    assert (await cp.client.get("/api/openapi.json")).status_code == 200
