"""Template kinds on a real agent process (see conftest.py: `agent`): base templates boot cold
at the size the create asks for, snapshot templates keep their baked size; CreateTemplate
makes either kind; the platform's `minimal-base` and `base` are made on first use.

`base` needs its image stage (`nestbox-agent image build --with-base`): the one test that uses
it builds the stage if the shared image cache lacks it (minutes, once per machine). Every test
here cold-boots (tens of seconds under TCG, minutes on a busy machine), so the module is
`cold_boots`: `make test-templates` runs it, `make test` leaves it out.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import pytest
from connectrpc.errors import ConnectError

from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.integration.vm.agent_process import reset_agent
from tests.integration.vm.test_agent_api import error_code

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.integration.vm.agent_process import AgentProcess

pytestmark = [pytest.mark.vm, pytest.mark.cold_boots, pytest.mark.timeout(900)]

log = logging.getLogger(__name__)
BASE, SNAPSHOT = pb.TemplateKind.BASE, pb.TemplateKind.SNAPSHOT
LONG_MS = 840_000
"""CreateCapsule of `base` may build its image stage and template first."""


@pytest.fixture(autouse=True)
def _no_capsule_left(agent: AgentProcess) -> Iterator[None]:
    yield
    reset_agent(agent)


async def test_base_templates_boot_at_the_size_asked(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        started = time.monotonic()
        capsule = await rpc.create(template="minimal-base", vcpus=2, memory_mb=512)
        boot_s = time.monotonic() - started
        assert (capsule.vcpus, capsule.memory_mb) == (2, 512)
        assert capsule.template_kind == BASE
        cid = capsule.capsule_id
        assert (await rpc.out(cid, "nproc")).strip() == "2"
        mem_kib = int(await rpc.out(cid, "awk '/MemTotal/ {print $2}' /proc/meminfo"))
        assert 400 * 1024 < mem_kib <= 512 * 1024, mem_kib  # minus the kernel's own
        # Its disk becomes a base template: the file written here is in capsules made from it.
        await rpc.out(cid, "echo kept > /root/marker && sync")
        made: pb.CreateTemplateResponse = await rpc.create_template(
            pb.CreateTemplateRequest(capsule_id=cid, template_id="sized-base", kind=BASE)
        )
        assert made.template is not None
        assert made.template.kind == BASE
        assert made.template.size_bytes > 0
        assert made.capsule is not None
        assert made.capsule.state == pb.CapsuleState.PAUSED  # left paused, as for a snapshot
        child = await rpc.create(template="sized-base", vcpus=1, memory_mb=256)
        assert (child.vcpus, child.memory_mb, child.template_kind) == (1, 256, BASE)
        assert (await rpc.out(child.capsule_id, "cat /root/marker; nproc")).split() == ["kept", "1"]
        # A snapshot template fixes the machine whatever is asked, and says so.
        clone = await rpc.create(template="minimal", vcpus=2, memory_mb=1024)
        assert clone.template_kind == SNAPSHOT
        assert (clone.vcpus, clone.memory_mb) != (2, 1024)
        log.info("minimal-base cold boot (first use, 2 vCPUs, 512 MiB): %.1f s", boot_s)


@pytest.mark.parametrize(
    ("vcpus", "memory_mb", "what"),
    [(4096, 512, "vcpus"), (1, 64, "memory_mb"), (1, 1 << 20, "memory_mb")],
)
async def test_base_template_sizes_out_of_range_are_refused(
    agent: AgentProcess, vcpus: int, memory_mb: int, what: str
) -> None:
    async with agent.connect() as rpc:
        with pytest.raises(ConnectError) as caught:
            await rpc.create(template="minimal-base", vcpus=vcpus, memory_mb=memory_mb)
        assert error_code(caught.value) == "invalid_request"
        assert what in str(caught.value)
        assert await rpc.capsules() == {}


async def test_base_has_what_code_expects(agent: AgentProcess) -> None:
    async with agent.connect() as rpc:
        started = time.monotonic()
        response: pb.CreateCapsuleResponse = await rpc.create_capsule(
            pb.CreateCapsuleRequest(template="base"), timeout_ms=LONG_MS
        )
        first_use_s = time.monotonic() - started
        assert response.capsule is not None
        capsule = response.capsule
        assert capsule.template_kind == SNAPSHOT
        assert (capsule.vcpus, capsule.memory_mb) == (1, 512)
        # made at this first use: the answer says what it takes on disk (the control plane
        # shows the platform's templates with the size their hosts say)
        assert response.template_size_bytes > 1 << 20
        # Each tool's first run in a fresh guest is slow under TCG (node, cc1): a long timeout.
        done = await rpc.sh(
            capsule.capsule_id,
            "git --version && node -e 1 && pip3 --version && cc --version | head -1 "
            "&& curl --version | head -1 && wget --version | head -1 && jq --version "
            "&& unzip -v | head -1 && python3 -m venv --help >/dev/null && echo all-there",
            timeout_sec=600,
        )
        out = done.stdout.decode()
        assert done.exit_code == 0, (out, done.stderr)
        assert out.startswith("git version"), out
        assert out.rstrip().endswith("all-there"), out
        log.info("base on first use (stage cached or not, template, clone): %.1f s", first_use_s)
