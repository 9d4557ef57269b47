"""The runtime's envd client: `/init` as the readiness probe after a restore."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from nestbox.hostagent import envd_client
from nestbox.hostagent.envd_client import EnvdClient, EnvdError, init_request
from nestbox.protocol.envd import InitRequest


def client_with(handler: httpx.MockTransport) -> EnvdClient:
    client = EnvdClient("http://10.201.0.5:49983")
    client._http = httpx.AsyncClient(base_url=client.base_url, transport=handler)
    return client


async def test_init_is_retried_until_envd_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envd_client, "POLL_S", 0.0)
    seen: list[dict[str, object]] = []
    failures = [httpx.ConnectError("refused"), httpx.ConnectTimeout("no SYN-ACK"),
                httpx.RemoteProtocolError("closed before the answer")]  # fmt: skip

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/init"
        seen.append(json.loads(request.content))
        if failures:
            raise failures.pop(0)
        return httpx.Response(204)

    built = 0

    def body() -> InitRequest:
        nonlocal built
        built += 1
        return init_request(capsule_id="cl-1", template_id="minimal")

    async with client_with(httpx.MockTransport(handle)) as client:
        with anyio.fail_after(5):
            await client.init_when_ready(body, answer_within=1.0)
    assert len(seen) == 4
    assert built == 4  # a fresh body (timestamp, entropy) per attempt
    assert len({str(s["entropy"]) for s in seen}) == 4
    assert all(s["capsuleId"] == "cl-1" for s in seen)


@pytest.mark.parametrize(
    ("answer", "error"),
    [(httpx.ReadTimeout("no answer"), httpx.ReadTimeout), (httpx.Response(400), EnvdError)],
)
async def test_init_taken_but_not_answered_or_refused_fails_at_once(
    answer: httpx.Response | Exception, error: type[Exception]
) -> None:
    calls = 0

    def handle(_request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    async with client_with(httpx.MockTransport(handle)) as client:
        with pytest.raises(error):
            await client.init_when_ready(InitRequest, answer_within=1.0)
    assert calls == 1


async def test_connect_timeouts_grow_per_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envd_client, "POLL_S", 0.0)
    timeouts: list[float | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["connect"])
        if len(timeouts) < 5:
            raise httpx.ConnectTimeout("no SYN-ACK")
        return httpx.Response(204)

    async with client_with(httpx.MockTransport(handle)) as client:
        await client.init_when_ready(InitRequest, answer_within=7.0)
    assert timeouts == [0.5, 1.0, 2.0, 2.0, 2.0]


def token_checking(accepted: str, seen: list[tuple[str, str | None]]) -> httpx.MockTransport:
    """envd holding `accepted`: 401 without it; records (path, X-Access-Token) of each request."""

    def handle(request: httpx.Request) -> httpx.Response:
        token = request.headers.get("X-Access-Token")
        seen.append((request.url.path, token))
        if token != accepted:
            return httpx.Response(401)
        return httpx.Response(204)

    return httpx.MockTransport(handle)


async def test_init_presents_the_old_token_and_the_client_then_sends_the_new_one() -> None:
    seen: list[tuple[str, str | None]] = []
    client = EnvdClient("http://10.201.0.5:49983", access_token="template-token")
    client._http = httpx.AsyncClient(
        base_url=client.base_url, transport=token_checking("template-token", seen),
        headers=client._headers,
    )  # fmt: skip
    body = init_request(capsule_id="cl-1", template_id="minimal", access_token="clone-token")
    async with client:
        await client.init_when_ready(lambda: body, answer_within=1.0)
        assert seen == [("/init", "template-token")]
        assert client.access_token == "clone-token"
        assert client._headers == {"X-Access-Token": "clone-token"}  # process streams too
        with pytest.raises(EnvdError):  # the mock still holds the template's: refused
            await client.prepare_snapshot()
    assert seen[-1] == ("/snapshot/prepare", "clone-token")


async def test_a_refused_init_keeps_the_token() -> None:
    seen: list[tuple[str, str | None]] = []
    client = EnvdClient("http://10.201.0.5:49983", access_token="stale")
    client._http = httpx.AsyncClient(
        base_url=client.base_url, transport=token_checking("current", seen),
        headers=client._headers,
    )  # fmt: skip
    body = init_request(capsule_id="cl-1", template_id="minimal", access_token="next")
    async with client:
        with pytest.raises(EnvdError, match="401"):
            await client.init_when_ready(lambda: body, answer_within=1.0)
    assert client.access_token == "stale"
