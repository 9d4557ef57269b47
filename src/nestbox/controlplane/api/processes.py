"""Commands and processes over HTTP: exec (foreground, or background -> 202), list, kill.
The WebSocket routes are in `streams.py` and `pty.py`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nestbox.controlplane.api import deps
from nestbox.controlplane.api.capsules import CAPSULE
from nestbox.controlplane.api.routing import Endpoint, Router, enum_query
from nestbox.controlplane.services.processes import SIGNALS
from nestbox.protocol.capsules import BackgroundView, ExecCreate, ExecResultView, ProcessListView

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response


async def exec_command(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    req = await deps.body(request, ExecCreate)
    processes = deps.services(request).processes
    done = await processes.exec(deps.principal(request), capsule_id, req)
    return deps.json(done, 202 if isinstance(done, BackgroundView) else 200)


async def list_processes(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    processes = deps.services(request).processes
    return deps.json(await processes.list(deps.principal(request), capsule_id))


async def kill_process(request: Request) -> Response:
    capsule_id = deps.path_param(request, "capsule_id")
    processes = deps.services(request).processes
    await processes.kill(deps.principal(request), capsule_id,
                         deps.path_param(request, "selector"),
                         request.query_params.get("signal"))  # fmt: skip
    return deps.no_content()


router = Router(
    tag="processes",
    endpoints=[
        Endpoint("POST", CAPSULE + "/exec", exec_command, "Run a command", body=ExecCreate,
                 response=ExecResultView, also={202: BackgroundView},
                 description="Foreground: runs to its end (timeout_sec, default 30) and "
                             "answers its output, base64 when not UTF-8. background=true: "
                             "answers 202 with the pid and tag at once."),
        Endpoint("GET", CAPSULE + "/processes", list_processes, "Processes envd tracks",
                 response=ProcessListView),
        Endpoint("DELETE", CAPSULE + "/processes/{selector}", kill_process,
                 "Signal a process by pid or tag", status=204,
                 query=[enum_query("signal", "default SIGKILL", sorted(SIGNALS))]),
    ],
)  # fmt: skip
