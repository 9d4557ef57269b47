"""The leak check of the reliability suites: what one agent holds on the host, taken before and
compared after.

`HostState.take(agent)` reads everything the agent can make and leave behind, under its own
names only (other agents and sessions run on this machine at the same time): `leftovers_beyond`
(netns, TAP/veth links, routes, iptables/nft rules, capsule files (disks, overlays, RAM
snapshots, records), QEMU processes, cgroups) plus the mounts under the agent's state directory
or naming its id, and the entries of the shared templates directory (template versions with
their RAM files, staging directories). Capsules and templates that are still meant to exist
(`keep`, `templates`) are left out, so a check in the middle of a run asks "is anything held
that no live capsule or known template owns?". `leaked(before, …)` waits for the agent's
background teardown and gives what is new since `before`: the test asserts it is empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.e2e.stack import leftovers_beyond, records

if TYPE_CHECKING:
    from tests.integration.vm.agent_process import AgentProcess


def mounts(agent: AgentProcess) -> list[str]:
    """Mount points naming the agent's id or under its state directory (not a netns's own
    mount: the netns check counts those, live slots left out)."""
    state, agent_id = str(agent.settings.state_dir), agent.settings.agent_id
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # mountinfo: id parent major:minor root mount-point ...; spaces escaped as \040
        point = line.split(" ")[4]
        if point.startswith("/run/netns/"):
            continue
        if point.startswith(state) or f"-{agent_id}-" in point:
            found.append(point)
    return sorted(found)


def template_entries(agent: AgentProcess, templates: set[str], keep: set[str]) -> list[str]:
    """Entries of the templates directory (`<id>`, `.<id>.v-*`, `.<id>.build-*`,
    `.<id>.link-*`, `.<id>.unanswered`) of templates not in `templates` (ids on the host),
    except the versions the capsules in `keep` are clones of."""
    root = agent.settings.templates_dir
    if not root.exists():
        return []
    used = {Path(r["template_dir"]).name for cid, r in records(agent).items()
            if cid in keep and r.get("template_dir")}  # fmt: skip
    return sorted(p.name for p in root.iterdir()
                  if _owner(p.name) not in templates and p.name not in used)  # fmt: skip


def _owner(name: str) -> str:
    """The template an entry of the templates directory belongs to."""
    return name.lstrip(".").split(".", 1)[0]


@dataclass(frozen=True)
class HostState:
    """What an agent holds on the host, by kind (see the module's docstring)."""

    items: dict[str, frozenset[str]]

    @classmethod
    def take(cls, agent: AgentProcess, keep: set[str] | None = None,
             templates: set[str] | None = None) -> HostState:  # fmt: skip
        held = leftovers_beyond(agent, keep or set(), within=0)
        held["mounts"] = mounts(agent)
        held["templates"] = template_entries(agent, templates or set(), keep or set())
        return cls({kind: frozenset(values) for kind, values in held.items()})

    def new_since(self, before: HostState) -> dict[str, list[str]]:
        """What this state holds that `before` did not (only the kinds with something)."""
        return {
            kind: sorted(values - before.items.get(kind, frozenset()))
            for kind, values in self.items.items()
            if values - before.items.get(kind, frozenset())
        }


def leaked(
    agent: AgentProcess,
    before: HostState,
    keep: set[str] | None = None,
    templates: set[str] | None = None,
    within: float = 30.0,
) -> dict[str, list[str]]:
    """What the agent holds beyond `before`, `keep` and `templates` once its background
    teardown had `within` seconds to finish ({} when nothing leaked). Templates that had
    entries in `before` are not this test's (the session's platform templates: an agent remakes
    one whose image changed), so their new versions do not count."""
    known = (templates or set()) | {_owner(name) for name in before.items.get("templates", ())}
    deadline = time.monotonic() + within
    while True:
        new = HostState.take(agent, keep, known).new_since(before)
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.2)
