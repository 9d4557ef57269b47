"""The template builder on the real stack (control plane, agent, QEMU guests): a recipe that
uses every instruction, with an archive, becomes a snapshot template whose capsules start with
its user, environment and working directory, the copied files owned by that user and the
START server already answering through the port proxy; a cancel mid-RUN ends the build within
5 s and leaves no capsule, disk, network namespace or process behind.

On SQLite only: what depends on the database (the queue's claims, SKIP LOCKED, a restart) is
proved with fake agents on both databases (`tests/integration/cp/test_cp_builds.py`); here
the guest side is what is new.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.e2e.stack import leftovers_beyond, records, wait_for
from tests.e2e.wire import request

if TYPE_CHECKING:
    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]
SQLITE = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

BUILDS = "/v1/admin/builds"
PORT = 8080
PAGE = b"<h1>served from the template</h1>\n"
RECIPE = [
    "USER app",
    "WORKDIR /home/app/site",
    "COPY site/. .",
    "ENV DATA_DIR=$HOME/data",
    "ENV GREETING='hello from ${DATA_DIR}'",
    'RUN --timeout=60s mkdir -p "$DATA_DIR" && echo "built by $(id -un) in $(pwd)" > built.txt',
    f"START python3 -m http.server {PORT}",
]
HEALTHCHECK = (
    f"--interval=1s --timeout=60s --retries=120 bash -c 'echo > /dev/tcp/127.0.0.1/{PORT}'"
)
"""The server listens (bash alone: a Python start-up each second is slow under TCG)."""


def site() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("site/index.html", PAGE), ("site/notes/readme.txt", b"notes\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def submit(stack: Stack, config: dict[str, Any], archive: bytes | None = None) -> dict[str, Any]:
    files: dict[str, Any] = {"config": (None, json.dumps(config), "application/json")}
    if archive is not None:
        files["archive"] = ("site.tar.gz", archive, "application/gzip")
    r = stack.api.post(BUILDS, files=files)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


def build_of(stack: Stack, build_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = stack.api.get(f"{BUILDS}/{build_id}").json()
    return doc


def ended(stack: Stack, build_id: str, within: float) -> dict[str, Any]:
    last: list[dict[str, Any]] = [{}]

    def check() -> dict[str, Any] | None:
        doc = last[0] = build_of(stack, build_id)
        return doc if doc["status"] in ("success", "failed", "cancelled") else None

    try:
        return dict(wait_for(f"build {build_id} ends", check, within=within, every=0.5))
    except BaseException:
        print(json.dumps(last[0], indent=1), stack.cp.log_tail(6000))  # what it was doing
        raise


@SQLITE
def test_a_recipe_with_every_instruction_makes_a_working_template(stack: Stack) -> None:
    made = submit(stack, {"name": "e2e-site", "recipe": RECIPE, "healthcheck": HEALTHCHECK,
                          "skip_pre_post": True}, site())  # fmt: skip
    build = ended(stack, made["id"], within=900)
    assert build["status"] == "success", json.dumps(build, indent=1)
    assert (build["template_type"], build["default_user"]) == ("snapshot", "app")
    assert build["default_workdir"] == "/home/app/site"
    assert build["default_env"] == {"DATA_DIR": "/home/app/data",
                                    "GREETING": "hello from /home/app/data"}  # fmt: skip
    assert [e["ok"] for e in build["logs"]] == [True] * len(RECIPE)
    assert build["logs"][5]["exit"] == 0
    assert stack.api.get(f"/v1/capsules/{build['sandbox_id']}").status_code == 404  # consumed

    capsule = stack.create(template="e2e-site")["id"]
    try:
        # The START server runs in the clone without being started: through the port proxy.
        status, _, body = request(stack.cp.url, f"/proxy/{capsule}/{PORT}/index.html".encode())
        assert (status, body) == (200, PAGE)
        out = stack.out(capsule, 'id -un; pwd; echo "$DATA_DIR|$GREETING"; cat built.txt; '
                        "stat -c '%U %n' index.html notes notes/readme.txt built.txt")  # fmt: skip
        assert out.splitlines() == [
            "app", "/home/app/site", "/home/app/data|hello from /home/app/data",
            "built by app in /home/app/site", "app index.html", "app notes",
            "app notes/readme.txt", "app built.txt",
        ]  # fmt: skip
        assert stack.out(capsule, "test -d /home/app/data && sudo -n true && echo ok") == "ok\n"
        assert stack.out(capsule, "ls /tmp | grep -c build-files || true") == "0\n"
    finally:
        stack.destroy(capsule)
    r = stack.api.delete("/v1/admin/templates/e2e-site")
    assert r.status_code == 204, r.text


@SQLITE
def test_cancel_mid_run_leaves_nothing(stack: Stack) -> None:
    ticking = "RUN --timeout=10m while :; do echo tick; sleep 1; done"
    made = submit(stack, {"name": "e2e-cancel", "skip_pre_post": True, "recipe": [ticking]})
    with (
        httpx.Client(base_url=stack.cp.url, headers=stack.cp.admin, trust_env=False,
                     timeout=300) as client,
        client.stream("GET", f"{BUILDS}/{made['id']}/events") as events,
    ):  # fmt: skip
        for line in events.iter_lines():  # the RUN's output, live: the step is under way
            if line.startswith("data: ") and json.loads(line[6:]).get("line") == "tick":
                break
    sandbox = build_of(stack, made["id"])["sandbox_id"]
    keep = set(records(stack.agent)) - {sandbox}  # the other tests' capsules
    assert sandbox
    assert stack.status(sandbox) == "running"

    asked = time.monotonic()
    r = stack.api.post(f"{BUILDS}/{made['id']}/cancel")
    assert r.status_code == 200, r.text
    build = ended(stack, made["id"], within=30)
    assert time.monotonic() - asked < 5
    assert build["status"] == "cancelled"
    assert [e["ok"] for e in build["logs"]] == [False]
    assert stack.api.get(f"/v1/capsules/{sandbox}").status_code == 404
    left = leftovers_beyond(stack.agent, keep=keep)
    assert left == {k: [] for k in left}, left
