"""The agent's one envd client (`envdconn.CapsuleEnvd`): `/init` as the readiness probe after a
restore, and the access token it presents before and after, against the tiny fake envd of
`tests/fakes/envd.py` on loopback (real HTTP over the client's real pools)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from nestbox.hostagent.envdconn import CapsuleEnvd, PoolSettings, init_request
from nestbox.hostagent.envdconn.errors import DeadlineExceeded, InvalidRequest, Unauthorized
from nestbox.protocol.envd import InitRequest
from tests.conftest import free_port
from tests.fakes.envd import FakeEnvd, FakeGuest

POOL = PoolSettings(connect_timeout_s=1.0)


@asynccontextmanager
async def envd_with(guest: FakeGuest, **kw: object) -> AsyncIterator[FakeEnvd]:
    async with FakeEnvd.serving({"g": guest}.get, **kw) as envd:  # type: ignore[arg-type]
        yield envd


def body(token: str | None = None) -> InitRequest:
    return init_request(capsule_id="cl-1", template_id="minimal", access_token=token)


async def test_init_is_retried_until_envd_takes_it() -> None:
    """Refused (nothing listens yet), then lost before the answer, then answered: a fresh body
    (timestamp, entropy) per attempt."""
    guest = FakeGuest(drop=2)
    port = free_port()
    built = 0

    def request() -> InitRequest:
        nonlocal built
        built += 1
        return body()

    done = anyio.Event()
    async with CapsuleEnvd(f"http://127.0.0.1:{port}/g", pool=POOL) as client:

        async def init() -> None:
            await client.init_when_ready(request, answer_within=1.0)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(init)
            with anyio.fail_after(5):
                while built < 2:  # noqa: ASYNC110 (refused at least once)
                    await anyio.sleep(0.01)
            async with envd_with(guest, port=port):
                with anyio.fail_after(5):
                    await done.wait()
    inits = [s for s in guest.seen if s.path == "/init"]
    assert len(inits) == 3  # two dropped, one answered
    assert built >= 4
    answered = guest.inits[-1]
    assert answered.body is not None
    assert answered.body["capsuleId"] == "cl-1"


async def test_init_taken_but_not_answered_fails_after_answer_within() -> None:
    guest = FakeGuest(hang={"/init"})
    async with envd_with(guest) as envd, CapsuleEnvd(f"{envd.url}/g", pool=POOL) as client:
        with anyio.fail_after(10), pytest.raises(DeadlineExceeded):
            await client.init_when_ready(body, answer_within=0.3)
    assert len(guest.inits) == 1  # never sent again


async def test_init_refused_fails_at_once() -> None:
    guest = FakeGuest(status={"/init": 400})
    async with envd_with(guest) as envd, CapsuleEnvd(f"{envd.url}/g", pool=POOL) as client:
        with pytest.raises(InvalidRequest):
            await client.init_when_ready(body, answer_within=1.0)
    assert len(guest.inits) == 1


async def test_init_presents_the_old_token_and_the_client_then_sends_the_new_one() -> None:
    guest = FakeGuest(token="template-token")
    async with (
        envd_with(guest) as envd,
        CapsuleEnvd(f"{envd.url}/g", access_token="template-token", pool=POOL) as client,
    ):
        await client.init_when_ready(lambda: body("clone-token"), answer_within=1.0)
        assert [(s.path, s.token) for s in guest.seen] == [("/init", "template-token")]
        assert guest.token == "clone-token"
        assert client.access_token == "clone-token"
        assert client._conn.headers() == {"X-Access-Token": "clone-token"}  # streams too
        await client.prepare_snapshot()
        assert (guest.seen[-1].path, guest.seen[-1].token) == ("/snapshot/prepare", "clone-token")


async def test_an_init_applied_but_unanswered_is_retried_with_its_new_token() -> None:
    """The first `/init` sets the new token but its answer is lost: envd now refuses the old
    token, so the retry presents the new one (which only that `/init` could have set)."""
    guest = FakeGuest(token="template-token", lose=1)
    async with (
        envd_with(guest) as envd,
        CapsuleEnvd(f"{envd.url}/g", access_token="template-token", pool=POOL) as client,
    ):
        await client.init_when_ready(lambda: body("clone-token"), answer_within=1.0)
        assert [(s.path, s.token) for s in guest.seen] == [
            ("/init", "template-token"), ("/init", "template-token"), ("/init", "clone-token")
        ]  # fmt: skip
        assert guest.token == client.access_token == "clone-token"


async def test_a_lost_answer_then_a_refusal_keeps_the_token() -> None:
    """Lost, then refused with both tokens (envd holds another one): Unauthorized, and the
    client keeps presenting the token it had."""
    guest = FakeGuest(token="current", drop=1)
    async with (
        envd_with(guest) as envd,
        CapsuleEnvd(f"{envd.url}/g", access_token="stale", pool=POOL) as client,
    ):
        with pytest.raises(Unauthorized):
            await client.init_when_ready(lambda: body("next"), answer_within=1.0)
        assert [s.token for s in guest.seen] == [None, "stale", "next"]
        assert client.access_token == "stale"
        assert guest.token == "current"


async def test_a_refused_init_keeps_the_token() -> None:
    guest = FakeGuest(token="current")
    async with (
        envd_with(guest) as envd,
        CapsuleEnvd(f"{envd.url}/g", access_token="stale", pool=POOL) as client,
    ):
        with pytest.raises(Unauthorized):
            await client.init_when_ready(lambda: body("next"), answer_within=1.0)
        assert client.access_token == "stale"
        assert guest.token == "current"
        assert await client.is_healthy()  # /health needs no token
