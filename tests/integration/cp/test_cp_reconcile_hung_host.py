"""The reconciler and an agent that hangs (fake agents): a host whose agent takes every request
and answers none (a stopped process, a machine gone silent) is still `online` until the host
monitor sees its silence. A reconcile pass must not wait on it: the other host's rows follow
their agent in the same pass, and the pass ends once the hung host's time is up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from nestbox.controlplane.services.reconciler import Reconciler
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from tests.integration.cp.cluster import cluster

if TYPE_CHECKING:
    from nestbox.controlplane.settings import CPSettings


async def test_a_hung_agent_holds_no_other_host(settings: CPSettings) -> None:
    async with cluster(settings, hosts=2) as c:
        _, key = await c.user("hung@example.com")
        first, second = [(await c.create(key))["id"] for _ in range(2)]
        healthy, hung = c.host_of(first), c.host_of(second)
        assert healthy is not hung, "least-loaded placement put both on one host"
        healthy.agent.capsules[first].state = pb.CapsuleState.PAUSED  # the row says running
        release = anyio.Event()

        async def no_answer(scope: Any, receive: Any, send: Any) -> None:
            await release.wait()
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        hung.app.rpc = no_answer
        reconciler = Reconciler(c.services.db, c.services.targets, host_timeout_s=0.5)
        try:
            with anyio.fail_after(20):  # the call's own timeout is 60 s
                await reconciler.run_once()
            async with c.services.db.transaction() as tx:
                row = await tx.capsules.get(first)
                other = await tx.capsules.get(second)
            assert row is not None
            assert other is not None
            assert row.status == "paused"
            assert other.status == "running"  # not touched: its agent never answered
        finally:
            release.set()
