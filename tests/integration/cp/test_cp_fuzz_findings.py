"""What `make fuzz` (--max-examples 100) found, kept as plain checks (fake agents): a create
from a snapshot template is placed by the template's machine, never by the size asked; a
metadata filter on a key no capsule can hold lists nothing instead of failing the query."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.cluster import cluster


async def test_a_snapshot_create_is_not_placed_by_the_size_asked(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        # No host has 100 GiB; the capsule gets the template's 256 MiB anyway.
        clone = await c.create(key, template="minimal", memory_mb=100_001, vcpus=27)
        assert (clone["vcpus"], clone["memory_mb"]) == (1, 256)


async def test_a_filter_on_an_impossible_metadata_key_lists_nothing(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        await c.create(key, metadata={"env": "prod"})
        odd = 'a"b\x00\u00e9/>g'
        for path in ("/v2/sandboxes?" + urlencode({"metadata": f"{quote(odd)}=x"}),
                     "/v2/sandboxes?" + urlencode({"metadata": "env=prod"})):  # fmt: skip
            r = await c.client.get(path, headers=key)
            assert r.status_code == 200, r.text
        assert r.json()[0]["metadata"] == {"env": "prod"}
        r = await c.client.get("/v2/sandboxes?" + urlencode({"metadata": f"{quote(odd)}=x"}),
                               headers=key)  # fmt: skip
        assert r.json() == []
