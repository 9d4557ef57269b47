"""The template builder on the control plane with fake agents (`services/builds.py`): every
instruction's agent calls, failures with the step's output and exit code, a bad line before
any capsule, archives (multipart, refused ones), cancel mid-RUN, the live SSE feed seeing a
step's output before the step ends, team scoping, template deletion while in use, the queue
across a control-plane restart and, on PostgreSQL, two workers never claiming one build."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

from nestbox.controlplane.app import create_app
from nestbox.controlplane.db import Database
from nestbox.controlplane.services.bootstrap import bootstrap_admin
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.conftest import HANG_S, eventually
from tests.fakes.agent import event, serve_fake_agent
from tests.integration.cp.cluster import LOAD, Cluster, cluster
from tests.integration.cp.harness import RunningCP, running, signup

if TYPE_CHECKING:
    from nestbox.controlplane.settings import CPSettings
    from tests.fakes.agent import FakeAgent

BUILDS = "/v1/admin/builds"
RECIPE = [
    "USER app", "WORKDIR /srv/app", "COPY . .", "ENV GREETING=hi-$USER", "RUN echo built",
    "START python3 -m http.server 8080",
]  # fmt: skip
ENV = b"USER=app\0HOME=/home/app\0PATH=/usr/bin\0"


def quick(settings: CPSettings, **more: Any) -> CPSettings:
    return settings.model_copy(update={"build_poll_s": 0.05, "reconcile_interval_s": 3600,
                                       "host_monitor_interval_s": 3600, **more})  # fmt: skip


def guest(agent: FakeAgent, workdir: str = "/srv/app") -> None:
    """What the fake guest answers the builder's own commands."""

    def answer(request: pb.ExecRequest) -> tuple[bytes, bytes, int] | None:
        script = request.args[-1] if request.args else ""
        if script == "env -0":
            return ENV, b"", 0
        if "mkdir -p --" in script and script.endswith("pwd"):
            return workdir.encode() + b"\n", b"", 0
        return b"", b"", 0

    agent.exec_hook = answer


def stream(*chunks: bytes, code: int = 0, gate: anyio.Event | None = None,
           start: anyio.Event | None = None) -> Any:  # fmt: skip
    """An ExecStream that waits for `start` (if any), writes `chunks`, waits for `gate` (if
    any) and exits with `code`."""

    async def hook(request: pb.ExecStreamRequest) -> AsyncIterator[pb.ExecStreamResponse]:
        if start is not None:
            await start.wait()
        yield pb.ExecStreamResponse(event=event("started", pb.ProcessEvent.Started(pid=7)))
        for chunk in chunks:
            yield pb.ExecStreamResponse(event=event("stdout", chunk))
        if gate is not None:
            await gate.wait()
        yield pb.ExecStreamResponse(
            event=event("exited", pb.ProcessEvent.Exited(exit_code=code, exited=True))
        )

    return hook


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def submit(c: Cluster, headers: dict[str, str] | None = None, *,
                 archive: bytes | None = None, **config: Any) -> dict[str, Any]:  # fmt: skip
    body = {"name": "web", "skip_pre_post": True, **config}
    if archive is None:
        r = await c.client.post(BUILDS, json=body, headers=headers or c.admin)
    else:
        r = await c.client.post(BUILDS, headers=headers or c.admin, files={
            "config": (None, json.dumps(body), "application/json"),
            "archive": ("site.tar.gz", archive, "application/gzip")})  # fmt: skip
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def finished(c: Cluster, build_id: str, headers: dict[str, str] | None = None,
                   within: float = 30) -> dict[str, Any]:  # fmt: skip
    async def done() -> dict[str, Any] | None:
        doc: dict[str, Any] = (
            await c.client.get(f"{BUILDS}/{build_id}", headers=headers or c.admin)
        ).json()
        return doc if doc["status"] in ("success", "failed", "cancelled") else None

    return await eventually(done, within=within, what=f"build {build_id} ends")


async def test_every_instruction_reaches_the_agent(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        agent = c.hosts[0].agent
        guest(agent)
        agent.stream_hook = stream(b"built\n")
        site = tar_gz({"index.html": b"<h1>hi</h1>", "sub/a.txt": b"a"})
        check = "--interval=10ms --retries=2 test -f index.html"
        made = await submit(c, archive=site, recipe=RECIPE, healthcheck=check)
        assert (made["status"], made["total_steps"], made["has_archive"]) == ("pending", 6, True)
        build = await finished(c, made["id"])
        assert (build["status"], build["error"]) == ("success", None), build
        assert [e["ok"] for e in build["logs"]] == [True] * 6
        assert build["current_step"] == 6
        assert build["logs"][4]["stdout"] == "built\n"
        assert build["template_type"] == "snapshot"
        assert (build["default_user"], build["default_workdir"]) == ("app", "/srv/app")
        assert build["default_env"] == {"GREETING": "hi-app"}

        scripts = [" ".join(r.args) for r in agent.exec_requests]
        users = {r.user for r in agent.exec_requests}
        assert any("useradd --create-home" in s and "NOPASSWD:ALL" in s for s in scripts)
        assert any("tar -xzf /tmp/build-files.tar.gz -C /tmp/build-files" in s for s in scripts)
        copy = next(s for s in scripts if "cp -R" in s)
        assert "chown -R app: --" in copy
        assert "realpath -m" in copy
        start = next(r for r in agent.exec_requests if "setsid -f nohup" in r.args[-1])
        assert (start.user, start.cwd, dict(start.envs)) == (
            "app",
            "/srv/app",
            {"GREETING": "hi-app"},
        )
        hc = [r for r in agent.exec_requests if r.args[-1] == "test -f index.html"]
        assert hc
        assert all(r.user == "app" for r in hc)
        assert users == {"root", "app"}
        [run] = agent.stream_requests
        assert (run.args[-1], run.user, run.cwd, dict(run.envs)) == (
            "echo built",
            "app",
            "/srv/app",
            {"GREETING": "hi-app"},
        )
        assert agent.capsules == {}  # the build capsule was consumed by the template
        assert build["template_id"] in agent.templates

        templates = (await c.client.get("/v1/admin/templates", headers=c.admin)).json()
        [web] = [t for t in templates if t["name"] == "web"]
        assert (web["type"], web["default_user"], web["default_workdir"]) == (
            "snapshot",
            "app",
            "/srv/app",
        )
        # A capsule from it gets the template's defaults.
        capsule = await c.create(c.admin, template="web")
        assert capsule["status"] == "running"
        build_capsule, made_from = agent.create_requests
        assert (build_capsule.template, build_capsule.egress) == ("minimal", True)
        assert dict(build_capsule.default_env) == {}
        assert (made_from.default_user, dict(made_from.default_env), made_from.default_workdir) == (
            "app",
            {"GREETING": "hi-app"},
            "/srv/app",
        )
        # The archive is dropped just after the final status is recorded.
        archive = settings.data_dir / "builds" / f"{made['id']}.archive"
        await eventually(lambda: not archive.exists(), what="the build's archive is dropped")


async def test_no_healthcheck_makes_a_base_template(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        guest(c.hosts[0].agent)
        build = await finished(c, (await submit(c, recipe=["ENV A=1"]))["id"])
        assert (build["status"], build["template_type"]) == ("success", "base"), build
        templates = (await c.client.get("/v1/snapshots?type=base", headers=c.admin)).json()
        assert "web" in [t["name"] for t in templates]


async def test_pre_and_post_build_phases(settings: CPSettings) -> None:
    """Without `skip_pre_post`: apt-get update as root, then the recipe as `user` in its home,
    then apt's clean-up as root (Wrenn's phases)."""
    async with cluster(quick(settings)) as c:
        agent = c.hosts[0].agent
        guest(agent, workdir="/home/user")
        agent.stream_hook = stream(b"ok\n")
        build = await finished(c, (await submit(c, skip_pre_post=False, recipe=["RUN make"]))["id"])
        assert build["status"] == "success", build
        assert [(e["phase"], e["cmd"].split()[0]) for e in build["logs"]] == [
            ("pre-build", "RUN"), ("pre-build", "USER"), ("pre-build", "WORKDIR"),
            ("recipe", "RUN"), ("post-build", "RUN"), ("post-build", "RUN"), ("post-build", "RUN"),
        ]  # fmt: skip
        runs = [(r.args[-1].split(" ")[-1], r.user, r.cwd) for r in agent.stream_requests]
        assert runs == [("update", "root", ""), ("make", "user", "/home/user"),
                        ("clean", "root", "/home/user"), ("-y", "root", "/home/user"),
                        ("/tmp/build-files.*", "root", "/home/user")]  # fmt: skip
        assert (build["default_user"], build["default_workdir"]) == ("user", "/home/user")


async def test_a_failing_run_fails_with_its_output_and_exit_code(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        agent = c.hosts[0].agent
        guest(agent)
        agent.stream_hook = stream(b"compiling\n", b"error: no such file\n", code=7)
        build = await finished(c, (await submit(c, recipe=["RUN make", "RUN never"]))["id"])
        assert build["status"] == "failed"
        [entry] = build["logs"]
        assert (entry["exit"], entry["ok"], entry["cmd"]) == (7, False, "RUN make")
        assert entry["stdout"] == "compiling\nerror: no such file\n"
        assert "step 1 (RUN make) failed: exited with code 7" in build["error"]
        assert len(agent.stream_requests) == 1  # the second RUN never ran
        assert agent.capsules == {}  # the build capsule was destroyed
        assert "web" not in [
            t["name"] for t in (await c.client.get("/v1/snapshots", headers=c.admin)).json()
        ]


async def test_a_bad_line_fails_before_any_capsule(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        agent = c.hosts[0].agent
        made = await submit(c, recipe=["RUN true", "", "FROM debian"])
        assert made["status"] == "failed"
        assert made["error"].startswith("recipe line 3 ('FROM debian'): unknown instruction")
        bad_check = await submit(c, recipe=["RUN true"], healthcheck="--interval=soon x")
        assert bad_check["status"] == "failed"
        assert "healthcheck" in bad_check["error"]
        await anyio.sleep(0.3)  # several polls of the worker: nothing is picked up
        assert "create" not in agent.calls
        assert agent.capsules == {}


async def test_refused_archives_make_no_build(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        evil = io.BytesIO()
        with tarfile.open(fileobj=evil, mode="w") as tar:
            info = tarfile.TarInfo("../../etc/cron.d/x")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        for data, says in ((evil.getvalue(), "'..'"), (b"not an archive", "not a readable")):
            r = await c.client.post(BUILDS, headers=c.admin, files={
                "config": (None, json.dumps({"name": "x"})),
                "archive": ("a.tar", data)})  # fmt: skip
            assert r.status_code == 400, r.text
            assert says in r.json()["error"]["message"]
        r = await c.client.post(BUILDS, headers=c.admin,
                                files={"archive": ("a.tgz", tar_gz({"a": b"1"}))})  # fmt: skip
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request")
        assert (await c.client.get(BUILDS, headers=c.admin)).json() == []
        assert [p.name for p in (settings.data_dir / "builds").iterdir()] == []


async def test_cancel_mid_run(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        agent = c.hosts[0].agent
        guest(agent)
        agent.stream_hook = stream(b"working\n", gate=anyio.Event())  # never ends by itself
        made = await submit(c, recipe=["RUN sleep 1000"])
        await eventually(lambda: agent.stream_requests, what="the RUN started")
        assert len(agent.capsules) == 1
        with anyio.fail_after(HANG_S):
            r = await c.client.post(f"{BUILDS}/{made['id']}/cancel", headers=c.admin)
            assert r.status_code == 200, r.text
            build = await finished(c, made["id"], within=HANG_S)
        assert (build["status"], build["error"]) == ("cancelled", "cancelled")
        [entry] = build["logs"]  # the step cut short, with its output so far
        assert (entry["ok"], entry["exit"], entry["stdout"]) == (False, None, "working\n")
        assert agent.capsules == {}
        listed = (await c.client.get("/v1/capsules", headers=c.admin)).json()
        assert listed == []
        # Cancelling a finished build changes nothing.
        r = await c.client.post(f"{BUILDS}/{made['id']}/cancel", headers=c.admin)
        assert r.json()["status"] == "cancelled"


async def _events(c: Cluster, build_id: str, seen: list[dict[str, Any]],
                  step_output: anyio.Event, opened: anyio.Event) -> None:  # fmt: skip
    async with (
        httpx.AsyncClient(base_url=c.url, trust_env=False, timeout=30) as client,
        client.stream("GET", f"{BUILDS}/{build_id}/events", headers=c.admin) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                doc = json.loads(line.removeprefix("data: "))
                assert doc["type"] == kind
                seen.append(doc)
                opened.set()  # subscribed: what happens from now on reaches this stream
                if kind == "output" and doc["line"] == "half way":
                    step_output.set()
                if kind == "done":
                    return


@pytest.mark.parametrize("late", [False, True], ids=["subscribed-early", "subscribed-late"])
async def test_the_event_stream_shows_output_before_the_step_ends(
    settings: CPSettings, late: bool
) -> None:
    async with cluster(quick(settings)) as c:
        agent = c.hosts[0].agent
        guest(agent)
        gate, opened = anyio.Event(), anyio.Event()
        agent.stream_hook = stream(b"half", b" way\nsecond ", gate=gate, start=opened)
        made = await submit(c, recipe=["RUN ./long-step"])
        if late:  # the worker began the step (its exec was asked for) before the stream opens
            await eventually(lambda: agent.stream_requests, what="the step's exec")
        seen: list[dict[str, Any]] = []
        step_output = anyio.Event()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_events, c, made["id"], seen, step_output, opened)
                await step_output.wait()
                # The step is still running (its process has not exited): it ends only now.
                assert [d["type"] for d in seen if d["type"] == "step_end"] == []
                gate.set()
        kinds = [d["type"] for d in seen]
        assert kinds[0] == "build"
        assert kinds[-1] == "done"
        assert kinds.index("output") < kinds.index("step_end")
        # `step_start` reaches the stream only when it subscribed before the worker began the
        # step (the worker may be first: then the opening `build` view shows it running, no
        # step done yet).
        if late:
            assert "step_start" not in kinds
        if "step_start" in kinds:
            assert kinds.index("step_start") < kinds.index("output")
        else:
            opening = seen[0]["build"]  # the BuildView
            assert (opening["status"], opening["current_step"]) == ("running", 0), seen[0]
        lines = [d["line"] for d in seen if d["type"] == "output"]
        assert lines == ["half way", "second "]
        end = next(d for d in seen if d["type"] == "step_end")
        assert (end["step"], end["exit"], end["ok"]) == (1, 0, True)
        assert seen[-1]["status"] == "success"

        # A finished build's stream: the build, then done.
        r = await c.client.get(f"{BUILDS}/{made['id']}/events", headers=c.admin)
        assert [ln for ln in r.text.splitlines() if ln.startswith("event:")] == [
            "event: build",
            "event: done",
        ]


async def test_team_admins_build_for_their_team_members_may_not(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        guest(c.hosts[0].agent)
        owner, owner_key = await c.user("owner@example.com")
        member = await signup(c.client, "member@example.com")
        r = await c.client.post(f"/v1/teams/{owner.team_id}/members",
                                json={"email": member.email, "role": "member"},
                                headers=owner.headers)  # fmt: skip
        assert r.status_code == 201
        r = await c.client.post("/v1/auth/switch-team", json={"team_id": owner.team_id},
                                headers=member.headers)  # fmt: skip
        as_member = {"Authorization": f"Bearer {r.json()['token']}"}
        for method, path in (("POST", BUILDS), ("GET", BUILDS), ("GET", "/v1/admin/templates")):
            r = await c.client.request(method, path, json={"name": "x"}, headers=as_member)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), path

        mine = await submit(c, owner_key, name="team-web", recipe=["ENV A=1"])
        assert (await finished(c, mine["id"], owner_key))["status"] == "success"
        theirs = await submit(c, name="platform-web", recipe=["ENV B=2"])
        await finished(c, theirs["id"])
        listed = (await c.client.get(BUILDS, headers=owner_key)).json()
        assert [b["id"] for b in listed] == [mine["id"]]
        r = await c.client.get(f"{BUILDS}/{theirs['id']}", headers=owner_key)
        assert r.status_code == 404
        everything = (await c.client.get(BUILDS, headers=c.admin)).json()
        assert {b["id"] for b in everything} == {mine["id"], theirs["id"]}
        # The template is the team's: its capsules use it, the admin's team does not see it.
        assert (await c.create(owner_key, template="team-web"))["template"] == "team-web"
        r = await c.client.post("/v1/capsules", json={"template": "team-web"}, headers=c.admin)
        assert r.status_code == 404
        # A platform template's name is reserved; a base template must be visible.
        r = await c.client.post(BUILDS, json={"name": "minimal"}, headers=owner_key)
        assert (r.status_code, r.json()["error"]["code"]) == (409, "conflict")
        r = await c.client.post(BUILDS, json={"name": "x", "base_template": "platform-web"},
                                headers=owner_key)  # fmt: skip
        assert r.status_code == 404


async def test_a_template_in_use_is_not_deleted(settings: CPSettings) -> None:
    async with cluster(quick(settings)) as c:
        guest(c.hosts[0].agent)
        build = await finished(c, (await submit(c, recipe=["ENV A=1"]))["id"])
        assert build["status"] == "success"
        capsule = await c.create(c.admin, template="web")
        r = await c.client.delete("/v1/admin/templates/web", headers=c.admin)
        assert (r.status_code, r.json()["error"]["code"]) == (409, "conflict")
        assert r.json()["capsule_ids"] == [capsule["id"]]
        r = await c.client.delete("/v1/admin/templates/minimal", headers=c.admin)
        assert r.status_code == 403
        assert (await c.client.delete(f"/v1/capsules/{capsule['id']}",
                                      headers=c.admin)).status_code == 204  # fmt: skip
        r = await c.client.delete("/v1/admin/templates/web", headers=c.admin)
        assert r.status_code == 204, r.text
        assert build["template_id"] not in c.hosts[0].agent.templates
        r = await c.client.delete("/v1/admin/templates/web", headers=c.admin)
        assert r.status_code == 404


# ── the queue across a restart ──


@contextlib.asynccontextmanager
async def control_plane(settings: CPSettings) -> AsyncIterator[RunningCP]:
    async with running(create_app(settings)) as cp:
        yield cp


async def test_the_queue_survives_a_restart(settings: CPSettings) -> None:
    """One worker (concurrency 1): build A runs (its RUN blocks), B waits in the queue. The
    control plane stops; the next one takes A over (its worker is stale) and runs both."""
    settings = quick(settings, build_concurrency=1, build_stale_after_s=1.0)
    async with serve_fake_agent("h0") as (agent, _app):
        guest(agent)
        gate = anyio.Event()
        agent.stream_hook = stream(b"first try\n", gate=gate)
        async with control_plane(settings) as cp:
            client = cp.client
            boot = await bootstrap_admin(cp.services.db, settings.data_dir, "admin@test.io")
            assert boot is not None
            admin = {"X-API-Key": boot.api_key}
            await _register(client, admin, agent)
            a = (
                await client.post(
                    BUILDS,
                    json={"name": "a", "skip_pre_post": True, "recipe": ["RUN step"]},
                    headers=admin,
                )
            ).json()
            b = (
                await client.post(
                    BUILDS,
                    json={"name": "b", "skip_pre_post": True, "recipe": ["ENV X=1"]},
                    headers=admin,
                )
            ).json()
            await eventually(lambda: agent.stream_requests, what="A's RUN started")
            first_capsule = next(iter(agent.capsules))
            r = await client.get(f"{BUILDS}/{b['id']}", headers=admin)
            assert r.json()["status"] == "pending"
        # The control plane is gone; A's capsule is still on the agent, its RUN running.
        assert first_capsule in agent.capsules
        agent.stream_hook = stream(b"second try\n")
        async with control_plane(settings) as cp:
            client = cp.client

            async def ended(build_id: str) -> dict[str, Any] | None:
                doc: dict[str, Any] = (await client.get(f"{BUILDS}/{build_id}",
                                                        headers=admin)).json()  # fmt: skip
                return doc if doc["status"] in ("success", "failed", "cancelled") else None

            done_a = await eventually(lambda: ended(a["id"]), within=30)
            done_b = await eventually(lambda: ended(b["id"]), within=30)
        gate.set()
        assert (done_a["status"], done_b["status"]) == ("success", "success"), (done_a, done_b)
        assert done_a["logs"][0]["stdout"] == "second try\n"
        assert first_capsule not in agent.capsules  # the interrupted attempt's capsule went
        assert agent.capsules == {}
        rows = await _attempts(settings, a["id"], b["id"])
        assert rows == {a["id"]: 2, b["id"]: 1}


def _db(settings: CPSettings) -> Database:
    return Database(settings.db_url)


async def _register(client: httpx.AsyncClient, admin: dict[str, str], agent: FakeAgent) -> None:
    r = await client.post("/v1/hosts", json={}, headers=admin)
    token = r.json()["registration_token"]
    r = await client.post("/v1/hosts/register", json={
        "token": token, "address": agent.address, "arch": "x86_64", "cpu_cores": 8,
        "memory_mb": 32768, "disk_gb": 500})  # fmt: skip
    doc = r.json()
    agent.token, agent.proxy_token = doc["agent_token"], doc["proxy_token"]
    r = await client.post(f"/v1/hosts/{doc['host']['id']}/heartbeat", json=LOAD,
                          headers={"X-Host-Token": doc["token"]})  # fmt: skip
    assert r.status_code == 200, r.text


async def _attempts(settings: CPSettings, *ids: str) -> dict[str, int]:
    db = _db(settings)
    try:
        async with db.transaction() as tx:
            return {i: (b.attempts if (b := await tx.builds.get(i)) else -1) for i in ids}
    finally:
        await db.aclose()


@pytest.mark.postgres
async def test_two_workers_never_claim_one_build(settings: CPSettings) -> None:
    """Two transactions claim at once: the second skips the row the first holds."""
    async with running(create_app(quick(settings, build_poll_s=3600))) as cp:
        db = cp.services.db
        owner = await signup(cp.client, "o@example.com")
        async with db.transaction() as tx:
            for name in ("one", "two"):
                await tx.builds.create(
                    id=f"bld-{name:0>25}", team_id=owner.team_id, name=name,
                    base_template="minimal", recipe=[], skip_pre_post=True, status="pending",
                    logs=[], default_env={}, attempts=0, current_step=0, total_steps=0,
                )  # fmt: skip
        stale = datetime.now(UTC) - timedelta(hours=1)
        held = anyio.Event()
        release = anyio.Event()
        claimed: dict[str, str | None] = {}

        async def first() -> None:
            async with db.transaction() as tx:
                build = await tx.builds.claim("w1", stale_before=stale)
                claimed["w1"] = build.id if build else None
                held.set()
                await release.wait()

        async def second() -> None:
            await held.wait()
            if db.dialect == "postgresql":
                async with db.transaction() as tx:
                    build = await tx.builds.claim("w2", stale_before=stale)
                    claimed["w2"] = build.id if build else None
            release.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                tg.start_soon(second)
        if db.dialect == "postgresql":
            assert sorted(v for v in claimed.values() if v) == [
                f"bld-{'one':0>25}",
                f"bld-{'two':0>25}",
            ]
        # Afterwards (either database) nothing is left to claim; a stale one is taken over.
        async with db.transaction() as tx:
            left = await tx.builds.claim("w3", stale_before=stale)
            assert (left is None) == (db.dialect == "postgresql")
            later = await tx.builds.claim("w3", stale_before=datetime.now(UTC) + timedelta(1))
            assert later is not None
            assert later.attempts == 2
