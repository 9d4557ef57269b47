"""Capsule sizes by template kind, and the egress setting, through the public API (fake
agents: what the control plane asks of its host, checks and shows)."""

from __future__ import annotations

from sqlalchemy import update

from nestbox.controlplane.db.models import HostRow
from nestbox.controlplane.settings import CPSettings
from tests.integration.cp.cluster import cluster


async def test_base_template_gets_the_size_asked_a_snapshot_its_own(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        agent = c.hosts[0].agent
        made = await c.create(key, template="minimal-base", vcpus=2, memory_mb=512)
        assert (made["vcpus"], made["memory_mb"], made["template_type"]) == (2, 512, "base")
        request = agent.create_requests[-1]
        assert (request.vcpus, request.memory_mb) == (2, 512)
        # a snapshot template's baked size wins, and the view says which kind it came from
        clone = await c.create(key, template="minimal", vcpus=4, memory_mb=2048)
        assert (clone["vcpus"], clone["memory_mb"], clone["template_type"]) == (1, 256, "snapshot")
        got = (await c.client.get(f"/v1/capsules/{made['id']}", headers=key)).json()
        assert (got["vcpus"], got["template_type"]) == (2, "base")


async def test_a_platform_templates_size_is_what_its_host_says(settings: CPSettings) -> None:
    """The platform's templates are made on each host at first use: their rows start at 0
    bytes and take the size a host's create answer gives; a team's own template keeps the size
    it was made with, and an answer that says nothing (0) changes nothing."""

    def sizes(listed: list[dict[str, object]]) -> dict[object, object]:
        return {t["name"]: t["size_bytes"] for t in listed}

    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        agent = c.hosts[0].agent
        before = sizes((await c.client.get("/v1/snapshots", headers=key)).json())
        assert before["minimal"] == 0
        await c.create(key, template="minimal")  # the host does not say: unchanged
        assert sizes((await c.client.get("/v1/snapshots", headers=key)).json())["minimal"] == 0
        agent.template_sizes["minimal"] = 41 << 20
        await c.create(key, template="minimal")
        after = sizes((await c.client.get("/v1/snapshots", headers=key)).json())
        assert after["minimal"] == 41 << 20
        assert after["minimal-base"] == before["minimal-base"]  # not created from: unchanged
        agent.template_sizes["minimal"] = 42 << 20  # remade after an upgrade: the latest wins
        await c.create(key, template="minimal")
        assert sizes((await c.client.get("/v1/snapshots", headers=key)).json())["minimal"] == (
            42 << 20
        )
        # a team's own template: made with its size; a create's answer does not touch it
        source = (await c.create(key))["id"]
        r = await c.client.post("/v1/snapshots", json={"sandbox_id": source, "name": "mine"},
                                headers=key)  # fmt: skip
        assert r.status_code == 201, r.text
        made = sizes((await c.client.get("/v1/snapshots", headers=key)).json())["mine"]
        agent.template_sizes["mine"] = 7 << 20
        await c.create(key, template="mine")
        assert sizes((await c.client.get("/v1/snapshots", headers=key)).json())["mine"] == made


async def test_a_team_host_does_not_set_a_platform_templates_size(settings: CPSettings) -> None:
    """A BYOC host is its team's machine: what it says a platform template takes is not shown
    to every team."""

    async def minimal_size(headers: dict[str, str]) -> object:
        listed = (await c.client.get("/v1/snapshots", headers=headers)).json()
        return next(t["size_bytes"] for t in listed if t["name"] == "minimal")

    async with cluster(settings, hosts=0) as c:
        ann, key = await c.user("ann@example.com")
        own = await c.add_host("ann's")
        # made ann's team's own (a BYOC host may not register a loopback address: set here)
        async with c.services.db.transaction() as tx:
            await tx.session.execute(update(HostRow).where(HostRow.id == own.host_id)
                                     .values(type="byoc", team_id=ann.team_id))  # fmt: skip
        own.agent.template_sizes["minimal"] = 1
        made = await c.create(key, template="minimal")
        assert made["host_id"] == own.host_id
        assert await minimal_size(key) == 0
        shared = await c.add_host("shared")
        shared.agent.template_sizes["minimal"] = 5 << 20
        _, bob = await c.user("bob@example.com")  # another team: only the shared host takes it
        assert (await c.create(bob, template="minimal"))["host_id"] == shared.host_id
        assert await minimal_size(key) == await minimal_size(bob) == 5 << 20


BAD = [
    ({"vcpus": 9}, "vcpus must be between 1 and 8"),
    ({"vcpus": 0}, "vcpus"),
    ({"memory_mb": 64}, "memory_mb"),
    ({"memory_mb": 16384}, "memory_mb must be between 128 and 8192"),
    ({"egress_allow": ["1.2.3.4/8"], "allow_internet_access": False}, "egress_allow"),
    ({"egress_allow": ["not a host"]}, "egress_allow"),
]


async def test_bad_sizes_and_egress_are_400(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        for body, needle in BAD:
            r = await c.client.post(
                "/v1/capsules", json={"template": "minimal-base", **body}, headers=key
            )
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_request"
            assert needle in error["message"], (body, error)
        assert c.hosts[0].agent.create_requests == []  # refused before any host was asked


async def test_egress_setting_reaches_the_host_and_shows(settings: CPSettings) -> None:
    async with cluster(settings) as c:
        _, key = await c.user("ann@example.com")
        agent = c.hosts[0].agent
        # Wrenn's body unchanged: no egress (the server's default, off)
        plain = await c.create(key, template="minimal", vcpus=1, memory_mb=512, timeout_sec=0)
        assert plain["allow_internet_access"] is False
        assert agent.create_requests[-1].egress is False
        online = await c.create(key, allow_internet_access=True)
        assert online["allow_internet_access"] is True
        assert agent.create_requests[-1].egress is True
        narrow = await c.create(key, egress_allow=["pypi.org", "198.51.100.0/24"])
        assert (narrow["allow_internet_access"], narrow["egress_allow"]) == (
            True, ["pypi.org", "198.51.100.0/24"],
        )  # fmt: skip
        request = agent.create_requests[-1]
        assert (request.egress, list(request.egress_allow)) == (
            True, ["pypi.org", "198.51.100.0/24"],
        )  # fmt: skip
        got = (await c.client.get(f"/v1/capsules/{narrow['id']}", headers=key)).json()
        assert got["egress_allow"] == ["pypi.org", "198.51.100.0/24"]


async def test_egress_default_comes_from_the_setting(settings: CPSettings) -> None:
    on = settings.model_copy(update={"default_internet_access": True})
    async with cluster(on) as c:
        _, key = await c.user("ann@example.com")
        assert (await c.create(key))["allow_internet_access"] is True
        assert (await c.create(key, allow_internet_access=False))["allow_internet_access"] is False
        assert [r.egress for r in c.hosts[0].agent.create_requests] == [True, False]
