"""`make fuzz`: schemathesis over the control plane's OpenAPI document, against the real
control plane (served by uvicorn on a loopback port, SQLite) with a fake host agent behind it
that stays online (heartbeats every 2 s).

Two runs, one per caller: an ordinary user with an API key, and the platform admin with a user
session (so the session-only routes are fuzzed too, not only refused). The dashboard's cookie
routes (`BROWSER_ONLY`: both callers only ever get 401 there) are fuzzed first, as a browser
logged in with the session cookie and its CSRF token. Every phase runs
(examples, coverage, fuzzing, stateful) with every check schemathesis has. A failure of any
check fails the run, except a schema-valid request refused (400) by one of the operations in
`REFUSALS`, each with the rule no JSON Schema of the document can state: listed, not failed.
Afterwards the platform must still work: the admin key answers `GET /v1/me`, and a control
plane started again on the same data directory serves it too.

Schemathesis lives in a venv of its own (`.cache/venv-schemathesis-<version>`: its pins are not
ours). The seed and the counts are printed; each caller's output and NDJSON report stay in
`.cache/fuzz/`. `tests/reliability/test_fuzz.py` runs a short form in `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nestbox.controlplane.app import ROUTERS, create_app
from nestbox.controlplane.settings import CPSettings
from nestbox.protocol.web import CSRF_HEADER, SESSION_COOKIE
from tests.conftest import ROOT
from tests.integration.cp.cluster import cluster
from tests.integration.cp.harness import new_key, running, signup
from tests.integration.upstream_venv import upstream_venv

VERSION = "4.32.5"
REPORTS = Path(os.environ.get("NESTBOX_FUZZ_REPORTS") or ROOT / ".cache" / "fuzz")
"""Where each caller's output and NDJSON report go (one run at a time per directory)."""
REFUSED = "positive_data_acceptance"
"""schemathesis's check that a request the document allows is not refused with a 400."""
_URL_RULE = ("a channel's URL must resolve to a public address (the address policy resolves it; "
             "a generated name never does here) and which config fields it needs depends on "
             "the provider")  # fmt: skip
_TOKEN = "a paging token must be one this API gave (X-Next-Cursor, x-next-token)"
_STREAMED = ("a streamed upload's `path` part must come before its `file` part (or be ?path=): "
             "the bytes go on to the guest as they arrive")  # fmt: skip
REFUSALS = {
    "POST /v1/channels": _URL_RULE,
    "POST /v1/channels/test": _URL_RULE,
    "PUT /v1/channels/{channel_id}/config": _URL_RULE,
    "POST /v1/hosts/register": "an agent's address must be host:port whose host is a DNS name, "
    "a dotted IPv4 address or a bracketed IPv6 address",
    "PATCH /v1/admin/users/{user_id}": "an admin cannot disable or demote themself",
    "GET /v1/capsules/usage": "from must not be after to, and they span at most 366 days",
    "GET /v1/capsules": _TOKEN,
    "GET /v2/sandboxes": _TOKEN,
    "GET /snapshots": _TOKEN,
    "POST /v1/capsules/{capsule_id}/files/stream/write": _STREAMED,
    "POST /v1/admin/capsules/{capsule_id}/files/stream/write": _STREAMED,
    "GET /templates/{template_id}/files/{files_hash}": "E2B's Template.copy (local files) is not "
    "supported: a 400 naming the step",
    "POST /v2/templates/{template_id}/builds/{build_id}": "E2B's build steps must map onto a "
    "recipe (RUN, ENV pairs, WORKDIR, USER; no COPY, Docker image or private registry): a 400 "
    "naming the step",
    "GET /v1/admin/capsules": _TOKEN,
}
"""Operations whose schema-valid requests may be refused, and the rule each enforces. Every
other refusal of a schema-valid request fails the run: the document must state the rule."""


BROWSER_ONLY = ("POST /v1/auth/ws-ticket", "DELETE /v1/auth/session")
"""Operations only a browser may call (the session cookie, X-CSRF-Token): an API key or a
bearer token gets 401. Each is fuzzed as a browser, a fresh login each (a logout ends it).
(`POST /v1/auth/session/team` wants a user session too, then the cookie: the admin's run
reaches its checks; the document names no cookie scheme a browser run could leave out.)"""


PROBED = "ignored_auth"
"""schemathesis's check that a request with no or made-up credentials is refused (401/403)."""
LIMITED = frozenset(f"{e.method} {e.path}" for router in ROUTERS for e in router.endpoints
                    if e.rate_limited)  # fmt: skip
"""Operations with a rate limit per client address (login, signup, key creation), taken before
the credentials are looked at (a refused guess costs nothing). Every request of a run comes
from one address, so a probe sent after the run spent the bucket meets the documented 429
`rate_limited`, whatever its credentials: that says nothing about them, it is not a failure."""
LIMIT_MET = " (429: the address's rate limit)"


@contextlib.contextmanager
def names_stay_local() -> Iterator[None]:
    """While it lasts, this process resolves only address literals and `localhost`; any other
    name fails as an unknown one does (`gaierror`). Generated channel URLs and host addresses
    carry made-up names, and the control plane (in this process) would ask the system's
    resolver about each: DNS traffic off this machine. The answer it gives for an unknown name
    (400) is the one it gives here."""
    real = socket.getaddrinfo

    def local_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is None or name == "localhost" or _is_literal(name):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, f"{name}: names are not resolved while fuzzing")

    socket.getaddrinfo = local_only
    try:
        yield
    finally:
        socket.getaddrinfo = real


def _is_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def allowed(check: str, where: str) -> bool:
    """Whether a failed check at `where` ("METHOD /path: title") is one `REFUSALS` explains, or
    a credentials probe that met the rate limit of a `LIMITED` operation."""
    op = where.split(":", 1)[0]
    if check == PROBED:
        return op in LIMITED and where.endswith(LIMIT_MET)
    return check == REFUSED and op in REFUSALS


@dataclass
class Outcome:
    who: str
    seconds: float
    cases: int = 0
    failures: dict[str, set[str]] = field(default_factory=dict)
    """Check name -> the operations (and first line of the message) it failed on."""

    def failed(self, checks: set[str] | None = None) -> Counter[str]:
        return Counter({name: len(ops) for name, ops in self.failures.items()
                        if checks is None or name in checks})  # fmt: skip


async def password_of(client: httpx.AsyncClient, key: dict[str, str]) -> dict[str, str]:
    """The key's user's email and password (a new one, set with the key)."""
    password = "fuzz " + os.urandom(8).hex()
    r = await client.post("/v1/me/password", json={"new_password": password}, headers=key)
    assert r.status_code == 204, r.text
    email = (await client.get("/v1/me", headers=key)).json()["email"]
    return {"email": email, "password": password}


async def session_of(client: httpx.AsyncClient, login: dict[str, str]) -> dict[str, str]:
    """`Authorization: Bearer` for a user session."""
    r = await client.post("/v1/auth/login", json=login)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


async def browser_of(url: str, login: dict[str, str]) -> dict[str, str]:
    """A browser's headers: the session cookie and its CSRF token (a client of its own: the
    shared one would send the cookie along with every later request)."""
    async with httpx.AsyncClient(base_url=url, trust_env=False) as browser:
        r = await browser.post("/v1/auth/session", json=login)
    assert r.status_code == 200, r.text
    return {"Cookie": f"{SESSION_COOKIE}={r.cookies[SESSION_COOKIE]}",
            CSRF_HEADER: r.json()["csrf_token"]}  # fmt: skip


def schemathesis() -> Path:
    """The `st` command, installed on first use."""
    return upstream_venv("schemathesis", VERSION).parent / "st"


def read_report(path: Path, outcome: Outcome) -> None:
    """Count the cases and collect the failed checks of one NDJSON report."""
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished is None:
            continue
        recorder = finished["recorder"]
        outcome.cases += len(recorder.get("cases", {}))
        for checks in recorder.get("checks", {}).values():
            for check in checks:
                if check.get("status") != "failure":
                    continue
                failure = check["failure_info"]["failure"]
                where = f"{failure.get('operation', recorder['label'])}: {failure['title']}"
                if check["name"] == PROBED and "got `429 " in failure.get("message", ""):
                    where += LIMIT_MET
                outcome.failures.setdefault(check["name"], set()).add(where)


def _fresh_report(who: str) -> Path:
    REPORTS.mkdir(parents=True, exist_ok=True)
    report = REPORTS / f"{who}.ndjson"
    report.unlink(missing_ok=True)
    return report


CONFIG = "max-stream-events = 1\n"
"""schemathesis.toml. An event stream (`/v1/events/stream`, a build's events, a watch) never
ends by itself and sends its first `data:` event at once: schemathesis would otherwise read it
until 20 events or the 30 s request timeout, ~11 s per case on the team's quiet stream (181 s
for its 16 coverage cases, hours at --max-examples 100). The first event is still checked
against the document."""


async def fuzz_once(st: Path, url: str, who: str, headers: dict[str, str], *, seed: int,
                    examples: int, phases: str, max_time: int | None,
                    only: str | None = None) -> Outcome:  # fmt: skip
    """One schemathesis run as `who` (every operation, or the one named `only`)."""
    report = _fresh_report(who)
    config = REPORTS / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [str(st), "--config-file", str(config), "run", f"{url}/openapi.json", "--seed",
           str(seed), "--max-examples",
           str(examples), "--phases", phases, "--checks", "all", "--request-timeout", "30",
           "--no-color", "--report", "ndjson", "--report-ndjson-path", str(report),
           "--workers", "1", "--suppress-health-check", "all"]  # fmt: skip
    if max_time:
        cmd += ["--max-time", str(max_time)]
    if only:
        cmd += ["--include-name", only]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    out, _ = await proc.communicate()
    (REPORTS / f"{who}.log").write_text(out.decode(errors="replace"))
    outcome = Outcome(who, time.monotonic() - start)
    if not report.exists():
        raise RuntimeError(f"schemathesis wrote no report (exit {proc.returncode}):\n"
                           f"{out.decode(errors='replace')[-3000:]}")  # fmt: skip
    read_report(report, outcome)
    return outcome


async def run(seed: int, examples: int, phases: str, max_time: int | None,
              data: Path) -> tuple[list[Outcome], list[str]]:  # fmt: skip
    """The runs' outcomes (the browser's, the user's, the admin's), and what no longer works
    afterwards."""
    settings = CPSettings(data_dir=data / "nestbox", database_url="")
    st = await asyncio.to_thread(schemathesis)
    outcomes: list[Outcome] = []
    broken: list[str] = []
    async with cluster(settings, hosts=2) as c:
        user = await signup(c.client, "fuzz-user@test.io")
        admin = await password_of(c.client, c.admin)
        # Logged in before any run: the runs' logins with made-up passwords meet the limit.
        browsers = [await browser_of(c.url, admin) for _ in BROWSER_ONLY]
        callers = {"user": await new_key(c.client, user),
                   "admin": await session_of(c.client, admin)}  # fmt: skip
        stop = asyncio.Event()

        async def heartbeats() -> None:  # hosts stay online (a real agent beats every 5 s)
            while not stop.is_set():
                for host in list(c.hosts):
                    try:
                        await c.heartbeat(host)
                    except AssertionError:  # the admin's run deleted it: another takes its place
                        c.hosts.remove(host)
                        await c.add_host(f"h{len(c.hosts) + random.randrange(10**6)}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2)

        beating = asyncio.create_task(heartbeats())
        try:
            browser = Outcome("browser", 0.0)
            for i, (op, headers) in enumerate(zip(BROWSER_ONLY, browsers, strict=True)):
                once = await fuzz_once(st, c.url, f"browser-{i}", headers, seed=seed,
                                       examples=examples, phases=phases, max_time=max_time,
                                       only=op)  # fmt: skip
                browser.seconds += once.seconds
                browser.cases += once.cases
                for name, ops in once.failures.items():
                    browser.failures.setdefault(name, set()).update(ops)
            outcomes.append(browser)
            for who, headers in callers.items():
                outcomes.append(await fuzz_once(st, c.url, who, headers, seed=seed,
                                                examples=examples, phases=phases,
                                                max_time=max_time))  # fmt: skip
        finally:
            stop.set()
            await beating
        r = await c.client.get("/v1/me", headers=c.admin)
        if r.status_code != 200:
            broken.append(f"the admin key stopped working: {r.status_code} {r.text}")
        admin_key = c.admin
    async with running(create_app(settings)) as again:  # the platform starts again
        r = await again.client.get("/v1/me", headers=admin_key)
        if r.status_code != 200:
            broken.append(f"after a restart the admin key fails: {r.status_code} {r.text}")
    return outcomes, broken


def fuzz(*, seed: int, examples: int, phases: str, max_time: int | None) -> tuple[bool, str]:
    """Run every caller; (passed, the printed summary)."""
    with tempfile.TemporaryDirectory(prefix="nestbox-fuzz-") as tmp, names_stay_local():
        outcomes, broken = asyncio.run(run(seed, examples, phases, max_time, Path(tmp)))
    lines = [f"schemathesis {VERSION}, seed {seed}, --max-examples {examples}, phases {phases}"]
    passed = not broken
    for o in outcomes:
        hard = [op for name, ops in o.failures.items() for op in ops if not allowed(name, op)]
        passed &= not hard
        lines.append(f"== {o.who}: {o.cases} cases in {o.seconds:.0f} s; failed checks: "
                     f"{dict(o.failed()) or 'none'}")  # fmt: skip
        for name, ops in sorted(o.failures.items()):
            lines += [f"   [{'allowed' if allowed(name, op) else 'FAIL'}] {name}: {op}"
                      for op in sorted(ops)]  # fmt: skip
    lines += [f"== afterwards: {line}" for line in broken] or ["== afterwards: admin key works, "
                                                             "restart serves it"]  # fmt: skip
    lines.append(f"== {'passed' if passed else 'FAILED'} (logs in {REPORTS})")
    return passed, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="schemathesis over the control plane's API")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--examples", type=int, default=100, help="--max-examples per operation")
    parser.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    parser.add_argument("--max-time", type=int, default=None, help="seconds, per caller")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    passed, summary = fuzz(seed=seed, examples=args.examples, phases=args.phases,
                           max_time=args.max_time)  # fmt: skip
    print(summary)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
