"""Files over 100 MiB through the control plane's streamed routes (`files/stream/write`, as the
SDK's `upload_stream` sends it: multipart, chunked, `path` first; `files/stream/read`) to and
from a real agent and guest, checked by size (in the guest) and SHA-256 (of what comes back).
The control plane's peak RSS growth during each direction is printed; it is asserted only far
below the file's size (a streamed route must not hold the file).

On SQLite only: the database is not on the bytes' path (the control plane reads it once per
request, for the caller and the capsule's host, as every other test here does on both), and
the guest, under TCG, takes ~15 s each way.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

CHUNK = 1 << 20
SIZE = 100 * CHUNK + 12_345
"""Over 100 MiB (the buffered routes' limit), and not a whole number of chunks."""
PATH = "/root/big.bin"


def content(seed: int) -> Iterator[bytes]:
    """SIZE pseudo-random bytes, 1 MiB at a time (made as they are sent: never all in memory)."""
    rng = random.Random(seed)
    left = SIZE
    while left:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def peak_rss_reset(pid: int) -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS since the last reset) in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_streamed_files_over_100_mib(stack: Stack, capsule: str) -> None:
    seed, boundary = secrets.randbits(32), secrets.token_hex(16)
    expect = hashlib.sha256()
    for chunk in content(seed):
        expect.update(chunk)
    digest = expect.hexdigest()

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n{PATH}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="upload.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        yield from content(seed)
        yield f"\r\n--{boundary}--\r\n".encode()

    pid = stack.cp.pid
    before, _ = peak_rss_mib(pid)
    peak_rss_reset(pid)
    started = time.monotonic()
    r = stack.api.post(
        f"/v1/capsules/{capsule}/files/stream/write",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 204, r.text
    up_s = time.monotonic() - started
    _, up_peak = peak_rss_mib(pid)

    assert stack.out(capsule, f"stat -c %s {PATH}") == f"{SIZE}\n"

    peak_rss_reset(pid)
    got, n = hashlib.sha256(), 0
    started = time.monotonic()
    with stack.api.stream(
        "POST", f"/v1/capsules/{capsule}/files/stream/read", json={"path": PATH}
    ) as answer:
        assert answer.status_code == 200, answer.read()
        for chunk in answer.iter_bytes():
            got.update(chunk)
            n += len(chunk)
    down_s = time.monotonic() - started
    _, down_peak = peak_rss_mib(pid)
    assert (n, got.hexdigest()) == (SIZE, digest)
    stack.out(capsule, f"rm {PATH}")

    mib = SIZE / CHUNK
    print(
        f"\n{stack.db}: {mib:.1f} MiB up in {up_s:.1f} s ({mib / up_s:.0f} MiB/s), down in "
        f"{down_s:.1f} s ({mib / down_s:.0f} MiB/s); control plane RSS {before:.0f} MiB, "
        f"peak growth up {up_peak - before:+.1f} MiB, down {down_peak - before:+.1f} MiB"
    )
    assert up_peak - before < mib / 2
    assert down_peak - before < mib / 2
