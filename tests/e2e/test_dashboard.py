"""The dashboard in a real browser (Debian's chromium, headless, driven by Playwright) against the
real stack: a control plane serving the built dashboard, a registered agent, a QEMU capsule.

One browser, one user, one capsule, in the order a person would go: sign up, log out, log in;
create an API key and use it with an HTTP client; create a capsule and see it go running; in
the terminal type `echo $((6*7))` and see 42, shrink the window and see `tput cols` change,
reload the page and find the same shell; upload a file through the file input and read it
back by exec, preview it; make a folder and delete it; start a background process, see its
output, kill it; see the metrics; pause and resume from the list and see the status change
without a reload; find the capsule's creation in the audit log; make an API key through the
API reference's "try it out" (the session's cookie and CSRF token); destroy the capsule. Every
page is screenshotted into `tests/e2e/screenshots/` (kept out of git). Any uncaught error or
console error in the page fails the test (the pages run under their Content-Security-Policy),
and so does a request to anywhere but the control plane (nothing from a CDN).
The first page's time to interactive is printed (a figure, not a condition).

SQLite only: this is about the browser and the API it uses; the database's part is tested on
both elsewhere.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from nestbox.controlplane.settings import SOURCE_DASHBOARD
from tests.e2e.stack import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Browser, Page

    from tests.e2e.stack import Stack

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]  # the stacks may start first

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).parent / "screenshots"
WITHIN_MS = 60_000
"""A bound for a hang in the browser (a TCG guest on a busy machine is slow), never a condition."""
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright  # a dev dependency: only this module needs it

    assert CHROMIUM.exists(), "Debian's chromium is missing: make system-deps"
    with sync_playwright() as p:
        found = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                  args=["--no-sandbox", "--disable-gpu"])  # fmt: skip
        try:
            yield found
        finally:
            found.close()


class Watched:
    """A page whose errors and foreign requests are collected (checked at the end)."""

    def __init__(self, browser: Browser, base: str) -> None:
        self.base = base
        self.problems: list[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.context.set_default_timeout(WITHIN_MS)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda err: self.problems.append(f"uncaught: {err}"))
        self.page.on("console", self._console)
        self.page.on("dialog", lambda dialog: dialog.accept())
        self.page.on("request", self._request)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.problems.append(f"console error: {message.text} at {message.location}")

    def _request(self, request: Any) -> None:
        url: str = request.url
        if not (url.startswith(self.base) or url.startswith(self.base.replace("http", "ws"))
                or url.startswith(("data:", "blob:"))):  # fmt: skip
            self.problems.append(f"request to elsewhere: {url}")

    def shot(self, name: str) -> None:
        SHOTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"))

    def close(self) -> None:
        self.context.close()


def terminal_text(page: Page) -> str:
    return str(page.locator(".xterm-rows").inner_text())


def type_in_terminal(page: Page, line: str) -> None:
    page.locator(".term-box").click()
    page.keyboard.insert_text(line)  # one input event: one frame, not one per key
    page.keyboard.press("Enter")


def wait_terminal(page: Page, pattern: str) -> re.Match[str]:
    """The first match of `pattern` (multiline) on the terminal's screen; the screen's text in
    the failure (a bound for a hang, never a condition)."""
    deadline = time.monotonic() + WITHIN_MS / 1000
    while True:
        text = terminal_text(page)
        match = re.search(pattern, text, re.MULTILINE)
        if match is not None:
            return match
        if time.monotonic() > deadline:
            pytest.fail(f"{pattern!r} not on the terminal's screen:\n{text}")
        time.sleep(0.1)


def shell_pid(page: Page) -> int:
    mark = secrets.token_hex(3)
    type_in_terminal(page, f"echo P{mark}=$$=")
    return int(wait_terminal(page, rf"^P{mark}=(\d+)=").group(1))


def tput_cols(page: Page) -> int:
    """The shell's idea of the terminal's width (each call's marker is new: the screen scrolls)."""
    mark = secrets.token_hex(3)
    type_in_terminal(page, f"echo C{mark}=$(tput cols)=")
    return int(wait_terminal(page, rf"^C{mark}=(\d+)=").group(1))


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_dashboard_end_to_end(stack: Stack, browser: Browser) -> None:
    assert (SOURCE_DASHBOARD / "index.html").is_file(), "the dashboard is not built: make install"
    base = stack.cp.url
    watched = Watched(browser, base)
    page = watched.page
    email = f"browser-{secrets.token_hex(4)}@example.org"
    key: str | None = None
    capsule: str | None = None
    api = httpx.Client(base_url=base, timeout=300, trust_env=False)
    steps: list[tuple[str, float]] = []
    last = time.monotonic()

    def step(name: str) -> None:
        """Where the time goes (printed at the end: figures, not conditions)."""
        nonlocal last
        now = time.monotonic()
        steps.append((name, now - last))
        last = now

    try:
        # ── sign up, log out, log in; the first page's time to interactive ──
        started = time.monotonic()
        page.goto(base + "/")
        page.get_by_label("Email").wait_for()
        tti_ms = page.evaluate("performance.now()")
        print(f"\ndashboard time to interactive (login page, cold browser): {tti_ms:.0f} ms "
              f"({time.monotonic() - started:.2f} s wall incl. navigation)")  # fmt: skip
        assert page.url.endswith("/login"), page.url
        watched.shot("login")
        page.get_by_role("link", name="Sign up").click()
        page.get_by_label("Name").fill("Browser Test")
        page.get_by_label("Email").fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        watched.shot("signup")
        page.get_by_role("button", name="Sign up").click()
        page.get_by_role("heading", name="Capsules").wait_for()
        page.get_by_role("button", name="Log out").click()
        page.get_by_role("button", name="Log in").wait_for()
        page.get_by_label("Email").fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("heading", name="Capsules").wait_for()
        assert page.url.endswith("/capsules"), page.url

        step("sign up, log out, log in")
        # ── an API key, shown once, used with an HTTP client ──
        page.get_by_role("link", name="API keys").click()
        page.get_by_label("Name").fill("from-the-browser")
        page.get_by_role("button", name="Create key").click()
        key = page.get_by_test_id("new-key").inner_text().strip()
        assert key.startswith("wrn_"), key
        watched.shot("api-keys")
        api.headers["X-API-Key"] = key
        me = api.get("/v1/me")
        assert me.status_code == 200, me.text
        assert me.json()["email"] == email

        step("API key")
        # ── create a capsule; the list shows it running ──
        page.get_by_role("link", name="Capsules", exact=True).click()
        page.get_by_role("button", name="Create capsule").click()
        row = page.locator("tr[data-capsule]")
        row.locator('[data-status="running"]').wait_for()
        capsule = row.get_attribute("data-capsule")
        assert capsule is not None
        assert capsule.startswith("cl-"), capsule
        watched.shot("capsules")

        step("capsule created")
        # ── the terminal: a command, then a resize that reaches the shell ──
        page.get_by_role("link", name=capsule).click()
        page.locator('[data-terminal-state="open"]').wait_for()
        wait_terminal(page, r":~#\s*$")  # bash's prompt: it reads what is typed from now on
        type_in_terminal(page, "echo $((6*7))")
        wait_terminal(page, r"^42\s*$")
        wide = tput_cols(page)
        watched.shot("terminal")
        page.set_viewport_size({"width": 900, "height": 700})
        narrow = wait_for("tput cols to follow the window", lambda: (n := tput_cols(page)) != wide
                          and n, within=WITHIN_MS / 1000)  # fmt: skip
        assert narrow < wide, (wide, narrow)
        page.set_viewport_size({"width": 1280, "height": 800})
        # A reload re-attaches to the same shell (its tag is kept for the tab): same $$.
        shell = shell_pid(page)
        page.reload()
        page.locator('[data-terminal-state="open"]').wait_for()
        assert shell_pid(page) == shell

        step("terminal")
        # ── files: upload through the file input, read it back by exec; a folder made, deleted
        page.get_by_role("tab", name="Files").click()
        content = f"uploaded by the browser {secrets.token_hex(8)}\n"
        upload = watched.page.get_by_test_id("upload")
        upload.set_input_files({"name": "from-browser.txt", "mimeType": "text/plain",
                                "buffer": content.encode()})  # fmt: skip
        page.locator('tr[data-path="/root/from-browser.txt"]').wait_for()
        page.get_by_text("uploaded", exact=True).wait_for()
        done = api.post(f"/v1/capsules/{capsule}/exec",
                        json={"cmd": "/bin/cat", "args": ["/root/from-browser.txt"]})  # fmt: skip
        assert done.status_code == 200, done.text
        assert done.json()["stdout"] == content
        page.get_by_role("button", name="from-browser.txt").click()
        page.get_by_label("Preview").get_by_text(content.strip()).wait_for()
        page.get_by_label("New folder name").fill("made-in-browser")
        page.get_by_role("button", name="New folder").click()
        folder = page.locator('tr[data-path="/root/made-in-browser"]')
        folder.wait_for()
        watched.shot("files")
        folder.get_by_role("button", name="Delete").click()  # the confirm is accepted
        folder.wait_for(state="detached")

        step("files")
        # ── processes: one started in the background, its output attached ──
        page.get_by_role("tab", name="Processes").click()
        page.get_by_label("Command").fill("for i in $(seq 600); do echo tick-$i; sleep 0.2; done")
        page.get_by_role("button", name="Start in background").click()
        page.locator("pre.output").get_by_text(re.compile("tick-[0-9]+")).wait_for()
        watched.shot("processes")
        ticking = page.locator("tr", has_text="seq 600")
        ticking.get_by_role("button", name="Kill").click()
        ticking.wait_for(state="detached")

        step("processes")
        # ── metrics (the tab shows where the API has them) ──
        page.get_by_role("tab", name="Metrics").click()
        page.get_by_text(re.compile(r"now: CPU [0-9.]+ %")).wait_for()
        watched.shot("metrics")

        step("metrics")
        # ── pause and resume from the list, the status changing without a reload ──
        page.get_by_role("link", name="← Capsules", exact=True).click()
        row = page.locator(f'tr[data-capsule="{capsule}"]')
        page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page
        row.get_by_role("button", name="Pause").click()
        row.locator('[data-status="paused"]').wait_for()
        row.get_by_role("button", name="Resume").click()
        row.locator('[data-status="running"]').wait_for()
        assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"

        step("pause, resume")
        # ── the audit log has the capsule's creation ──
        page.get_by_role("link", name="Audit log").click()
        entry = page.locator("tr", has_text=capsule).filter(has_text="capsule.create")
        entry.wait_for()
        watched.shot("audit")

        step("audit")
        # ── the other pages render (screenshots for the README) ──
        for link, name in (("Templates", "templates"), ("Builds", "builds"), ("Team", "team"),
                           ("Hosts", "hosts"), ("API reference", "docs")):  # fmt: skip
            page.get_by_role("link", name=link).click()
            page.get_by_role("heading", level=1).first.wait_for()
            if name == "docs":
                page.locator('.opblock-summary-path[data-path="/v1/capsules"]').first.wait_for()
            watched.shot(name)
        # The reference's "try it out" acts with the session (cookie + CSRF token): a POST.
        op = page.locator("#operations-api-keys-create_api_key")
        op.locator(".opblock-summary").click()
        op.get_by_role("button", name="Try it out").click()
        op.locator("textarea.body-param__text").fill('{"name": "from-the-reference"}')
        op.get_by_role("button", name="Execute").click()
        status = op.locator(".live-responses-table tbody .response-col_status").first
        status.wait_for()
        assert status.inner_text().strip() == "201", status.inner_text()
        assert "from-the-reference" in [k["name"] for k in api.get("/v1/api-keys").json()]

        step("other pages")
        # ── destroy from the list ──
        page.get_by_role("link", name="Capsules", exact=True).click()
        page.locator(f'tr[data-capsule="{capsule}"]').get_by_role("button", name="Destroy").click()
        page.locator(f'tr[data-capsule="{capsule}"]').wait_for(state="detached")
        gone = api.get(f"/v1/capsules/{capsule}")
        assert gone.status_code == 404, gone.text
        capsule = None
        step("destroy")
        print("dashboard test steps: " + ", ".join(f"{n} {t:.1f} s" for n, t in steps))
        assert watched.problems == []
    except BaseException:
        watched.shot("failed")
        raise
    finally:
        watched.close()
        if capsule is not None and key is not None:
            api.delete(f"/v1/capsules/{capsule}")
        api.close()
