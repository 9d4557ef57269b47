"""`make run`: the whole platform on this machine: the control plane on 127.0.0.1:9725 and one
host agent on 127.0.0.1:9726, registered with it.

A launcher, not a program: it starts `nestbox-cp` and `nestbox-agent` as processes and speaks to
them only over HTTP (it imports nothing of Nestbox). The first run creates the admin (its API
key is in $NESTBOX_DIR/admin-api-key; the dashboard password this launcher gives them, in
admin-password beside it), creates a host and registers the agent with its one-time
token; later runs find both again (the agent's saved credentials, the capsules it paused).

Recovery: when the saved admin key no longer works (revoked, its team deleted, the admin
demoted), `nestbox-cp admin reset-key` mints a new one from the database (`admin_key`). The
agent's saved credentials are moved aside only when the control plane says their host does not
exist (404) or they name another control plane; any other answer (401, 5xx) stops the launcher
with the credentials left in place (`saved_host_verdict`).

Ctrl-C (or SIGTERM) stops the agent first, which pauses every running capsule, then the control
plane. Logs: $NESTBOX_DIR/logs/{cp,agent}.log. Run as root (the agent needs netns, TAP, QEMU).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATA = Path(os.environ.get("NESTBOX_DIR", "/var/lib/nestbox"))
CP_LISTEN = os.environ.get("NESTBOX_CP_LISTEN", "127.0.0.1:9725")
AGENT_LISTEN = os.environ.get("NESTBOX_AGENT_LISTEN", "127.0.0.1:9726")
AGENT_ID = os.environ.get("NESTBOX_AGENT_AGENT_ID", "a0")
CP_URL = f"http://{CP_LISTEN}"
LOGS = DATA / "logs"
PASSWORD_FILE = "admin-password"
START_TIMEOUT_S = 120.0
AGENT_STOP_TIMEOUT_S = 180.0
"""The agent pauses every running capsule before it exits (at most 120 s by default)."""


def say(message: str) -> None:
    sys.stdout.write(f"make run: {message}\n")
    sys.stdout.flush()


class Child:
    """One program, in its own session so that Ctrl-C reaches only this launcher, which then
    stops the programs in order."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.log = LOGS / f"{name}.log"
        with self.log.open("ab") as out:
            out.write(f"\n=== {time.strftime('%F %T')} make run: {' '.join(argv)}\n".encode())
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, start_new_session=True)  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"{self.name} did not stop in {timeout:.0f} s; killing it")
            self.proc.kill()
            self.proc.wait(10)


def wait_http(child: Child, url: str, ready: Callable[[httpx.Response], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not child.alive():
            raise SystemExit(f"make run: {child.name} exited ({child.proc.returncode}):\n"
                             f"{child.tail()}")  # fmt: skip
        try:
            r = httpx.get(url, timeout=2.0, trust_env=False)
            if ready(r):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"make run: {child.name} did not come up:\n{child.tail()}")


def key_works(cp_url: str, key: str) -> bool:
    """Whether the control plane takes `key` as a platform admin's. :raise SystemExit: it
    answers something else than yes or no (it is broken: nothing is changed then)."""
    r = httpx.get(f"{cp_url}/v1/me", headers={"X-API-Key": key}, timeout=10, trust_env=False)
    if r.status_code == 200:
        return bool(r.json().get("is_admin"))
    if r.status_code in (401, 403):
        return False
    raise SystemExit(f"make run: the control plane answered /v1/me with {r.status_code} {r.text}")


def admin_key(cp_url: str, data: Path, env: dict[str, str], cp_command: list[str]) -> str:
    """The saved admin API key if it still works, else a new one that `cp_command admin
    reset-key` mints from the database into `data`/admin-api-key."""
    path = data / "admin-api-key"
    key = path.read_text().strip() if path.exists() else ""
    if key and key_works(cp_url, key):
        return key
    say("the saved admin API key does not work; minting a new one (nestbox-cp admin reset-key)")
    done = subprocess.run([*cp_command, "admin", "reset-key"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"make run: nestbox-cp admin reset-key failed:\n{done.stderr}")
    key = path.read_text().strip()
    if not key_works(cp_url, key):
        raise SystemExit("make run: the key nestbox-cp admin reset-key made does not work")
    return key


def admin_login(cp_url: str, data: Path, key: str) -> tuple[str, str | None]:
    """The admin's email and dashboard password. The first start made the admin without a
    password: give them a generated one, saved next to the key in `data`/admin-password (0600,
    written before it is set, through a temporary file and a rename); later runs read it back
    and check it still logs in. None: the admin has a password the file does not hold (they
    changed it)."""
    path = data / PASSWORD_FILE
    me = httpx.get(f"{cp_url}/v1/me", headers={"X-API-Key": key}, timeout=10, trust_env=False)
    me.raise_for_status()
    email, saved = str(me.json()["email"]), path.read_text().strip() if path.exists() else ""
    if me.json()["has_password"]:
        if saved:
            r = httpx.post(f"{cp_url}/v1/auth/login", json={"email": email, "password": saved},
                           timeout=30, trust_env=False)  # fmt: skip
            if r.status_code == 200:
                return email, saved
        return email, None
    password = secrets.token_urlsafe(12)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    r = httpx.post(f"{cp_url}/v1/me/password", json={"new_password": password},
                   headers={"X-API-Key": key}, timeout=30, trust_env=False)  # fmt: skip
    if r.status_code != 204:
        path.unlink(missing_ok=True)
        raise SystemExit(f"make run: setting the admin's password failed: {r.status_code} {r.text}")
    return email, password


def saved_host_verdict(status: int, saved_url: str, cp_url: str) -> bool:
    """Whether the agent's saved credentials still hold (True) or name a host this control
    plane does not have (False: register again), from the answer to GET /v1/hosts/<id>.
    :raise SystemExit: any other answer, a failure of ours (a bad admin key, the control plane
    down): the agent's credentials must not be moved aside for it."""
    if saved_url.rstrip("/") != cp_url:
        return False  # registered with another control plane
    if status == 200:
        return True
    if status == 404:
        return False
    raise SystemExit(f"make run: checking the agent's saved host failed ({status}); its "
                     "credentials are left in place")  # fmt: skip


def registration_args(
    admin: dict[str, str],
    *,
    cp_url: str = CP_URL,
    data: Path = DATA,
    agent_id: str = AGENT_ID,
    agent_listen: str = AGENT_LISTEN,
) -> list[str]:
    """`--register TOKEN --address …` unless the agent's saved credentials still name a host
    this control plane knows."""
    creds = data / "agents" / agent_id / "host-credentials.json"
    if creds.exists():
        saved = json.loads(creds.read_text())
        r = httpx.get(f"{cp_url}/v1/hosts/{saved['host_id']}", headers=admin, trust_env=False)
        if saved_host_verdict(r.status_code, saved.get("cp_url", ""), cp_url):
            say(f"agent {agent_id} is registered as {saved['host_id']}")
            return []
        stale = creds.with_name(creds.name + f".stale-{int(time.time())}")
        creds.rename(stale)
        say(f"the control plane does not know the agent's host; registering again ({stale})")
    r = httpx.post(f"{cp_url}/v1/hosts", json={"provider": "local"}, headers=admin,
                   trust_env=False)  # fmt: skip
    if r.status_code != 201:
        raise SystemExit(f"make run: creating the host failed: {r.status_code} {r.text}")
    doc = r.json()
    say(f"created host {doc['host']['id']}; registering the agent")
    return ["--register", doc["registration_token"], "--address", agent_listen]


def warm_up(admin: dict[str, str]) -> None:
    """The first run: have the agent build the `minimal` template now (one cold boot, tens of
    seconds under TCG), so that the first capsule a client makes starts in about a second:
    the SDK gives a create 30 s."""
    if (DATA / "templates" / "minimal").exists():
        return
    say("first run: building the minimal template (one cold boot)…")
    with httpx.Client(base_url=CP_URL, headers=admin, timeout=600, trust_env=False) as http:
        r = http.post("/v1/capsules", json={"template": "minimal"})
        if r.status_code != 201:
            raise SystemExit(f"make run: the first capsule failed: {r.status_code} {r.text}")
        http.delete(f"/v1/capsules/{r.json()['id']}")


def banner(key: str, email: str, password: str | None) -> None:
    login = (f"{email} / {password}\n                    (password also in {DATA / PASSWORD_FILE})"
             if password else f"{email} with the password you set")  # fmt: skip
    sys.stdout.write(f"""
  Nestbox is running.
    dashboard       {CP_URL}/
    log in as       {login}
    API             {CP_URL}   (docs: {CP_URL}/docs)
    admin API key   {key}
                    (also in {DATA / 'admin-api-key'})
    logs            {LOGS}/cp.log, {LOGS}/agent.log
    internet        capsules have none unless created with "allow_internet_access": true
                    (default for all: NESTBOX_CP_DEFAULT_INTERNET_ACCESS=true); the agent
                    turns forwarding on for the uplink while one has it, guarded so only
                    replies to capsules are forwarded ('nestbox-agent doctor' shows it)
    templates       minimal (default, fastest), minimal-base (boots at the size you ask),
                    base (git, node, pip, cc, ...; its first use builds it: minutes)

  Try the wrenn SDK:  WRENN_BASE_URL={CP_URL} WRENN_API_KEY={key} python -c \\
      "from wrenn import Capsule; c = Capsule(wait=True); print(c.commands.run('uname -a').stdout)"

  Ctrl-C stops both (running capsules are paused; the next `make run` finds them again).

""")  # fmt: skip
    sys.stdout.flush()


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("make run: run as root (the agent makes network namespaces, TAP "
                         "devices and iptables rules, and runs QEMU)")  # fmt: skip
    LOGS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NESTBOX_DIR": str(DATA)}
    stopping: list[int] = []
    signal.signal(signal.SIGINT, lambda sig, frame: stopping.append(sig))
    signal.signal(signal.SIGTERM, lambda sig, frame: stopping.append(sig))

    cp = Child("cp", [str(BIN / "nestbox-cp")], {**env, "NESTBOX_CP_LISTEN": CP_LISTEN})
    agent: Child | None = None
    try:
        wait_http(cp, f"{CP_URL}/openapi.json", lambda r: r.status_code == 200)
        key = admin_key(CP_URL, DATA, env, [str(BIN / "nestbox-cp")])
        admin = {"X-API-Key": key}
        args = registration_args(admin)
        agent = Child("agent", [str(BIN / "nestbox-agent"), "serve", "--cp-url", CP_URL, *args],
                      {**env, "NESTBOX_AGENT_LISTEN": AGENT_LISTEN,
                       "NESTBOX_AGENT_AGENT_ID": AGENT_ID})  # fmt: skip
        agent_url = f"http://{AGENT_LISTEN}/health"
        wait_http(agent, agent_url, lambda r: r.status_code == 200 and r.json()["status"] == "ok")
        warm_up(admin)
        banner(key, *admin_login(CP_URL, DATA, key))
        while not stopping and cp.alive() and agent.alive():
            time.sleep(0.5)
        for child in (cp, agent):
            if not child.alive():
                say(f"{child.name} exited ({child.proc.returncode}); stopping:\n{child.tail()}")
                return 1
        return 0
    finally:
        # Ctrl-C again while stopping must not leave things half-stopped: ignore it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if agent is not None and agent.alive():
            say("stopping the agent (pausing running capsules)…")
            agent.stop(AGENT_STOP_TIMEOUT_S)
        if cp.alive():
            say("stopping the control plane…")
            cp.stop(30)
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
