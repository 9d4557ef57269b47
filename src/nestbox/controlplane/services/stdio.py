"""A process's stdin and a directory watch, relayed to envd through the capsule's agent
(`SendStdin`, `CloseStdin`, `WatchDir`). The capsule must be running (a paused one with
`auto_resume` is resumed first, as for every guest call)."""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
from typing import TYPE_CHECKING

from nestbox.controlplane.errors import InvalidRequest
from nestbox.controlplane.services.processes import selector
from nestbox.protocol.gen.hostagent.v1 import hostagent_pb as pb
from nestbox.protocol.stdio import BASE64, WatchEventView

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nestbox.controlplane.services.principal import Principal
    from nestbox.controlplane.services.targets import Target, Targets
    from nestbox.protocol.stdio import StdinWrite

WATCH_TYPES = frozenset({"start", "create", "write", "remove", "rename", "chmod"})


class StdioService:
    def __init__(self, targets: Targets) -> None:
        self._targets = targets

    async def send_stdin(
        self, principal: Principal, capsule_id: str, which: str, req: StdinWrite
    ) -> None:
        """Write to the stdin of process `which` (pid or tag). :raise InvalidRequest: bad
        base64. :raise AgentCallError: (`not_found`, or `invalid_request` without stdin)"""
        if req.encoding == "base64":
            # Exactly what the document's pattern says (b64decode alone also takes extra `=`).
            if re.fullmatch(BASE64, req.data) is None:
                raise InvalidRequest("data is not valid base64")
            try:
                data = base64.b64decode(req.data, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequest("data is not valid base64") from None
        else:
            data = req.data.encode()
        target = await self._targets.running(principal, capsule_id)
        await target.agent.send_stdin(
            pb.SendStdinRequest(capsule_id=capsule_id, selector=selector(which), data=data)
        )

    async def close_stdin(self, principal: Principal, capsule_id: str, which: str) -> None:
        target = await self._targets.running(principal, capsule_id)
        await target.agent.close_stdin(
            pb.CloseStdinRequest(capsule_id=capsule_id, selector=selector(which))
        )

    async def open_watch(self, principal: Principal, capsule_id: str) -> Target:
        """The running capsule a watch will use (checked before the stream answers)."""
        return await self._targets.running(principal, capsule_id)

    @staticmethod
    async def watch(
        target: Target, path: str, *, recursive: bool = False
    ) -> AsyncIterator[WatchEventView | None]:
        """The watch's events, `start` first; None for a keepalive (every 15 s of quiet).
        :raise AgentCallError: (e.g. `not_found`)"""
        request = pb.WatchDirRequest(capsule_id=target.capsule.id, path=path, recursive=recursive)
        async for event in target.agent.watch_dir(request):
            if event.type == "keepalive":
                yield None
                continue
            kind = event.type if event.type in WATCH_TYPES else "unknown"
            full = posixpath.join(path, event.name) if event.name else ""
            yield WatchEventView(type=kind, name=event.name, path=full)  # type: ignore[arg-type]  # narrowed by WATCH_TYPES
