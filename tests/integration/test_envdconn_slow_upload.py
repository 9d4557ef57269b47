"""A streamed upload that takes longer than the response-head timeout (envd answers only once
the whole body is in): it succeeds, since the head's deadline starts when the last chunk is
sent. A real envd on localhost; the timeout is shrunk to 0.3 s and the body takes ~1 s."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from nestbox.hostagent.envdconn import CapsuleEnvd, PoolSettings
from tests.integration.envd_process import EnvdProcess, run_envd

HEAD_TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def envd_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvdProcess]:
    with run_envd(tmp_path_factory.mktemp("envd")) as proc:
        yield proc


async def slow_body(chunks: int, pause_s: float) -> AsyncIterator[bytes]:
    for i in range(chunks):
        await anyio.sleep(pause_s)
        yield bytes([i]) * 1000


async def test_a_slow_streamed_upload_outlasts_the_head_timeout(
    envd_process: EnvdProcess, tmp_path: Path
) -> None:
    pool = PoolSettings(response_header_timeout_s=HEAD_TIMEOUT_S)
    target = tmp_path / "slow.bin"
    async with CapsuleEnvd(envd_process.url, pool=pool) as client:
        with anyio.fail_after(30):
            written = await client.write_file_stream(str(target), slow_body(10, 0.1))
    assert written == str(target)
    assert target.read_bytes() == b"".join(bytes([i]) * 1000 for i in range(10))
