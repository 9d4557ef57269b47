"""The control plane's background loops (`app.BACKGROUND`): the host monitor, the reconciler,
and the owner of the agents' connection pools. Each runs in the app's task group."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from nestbox.controlplane.services.container import Services

log = logging.getLogger(__name__)


async def host_monitor(
    services: Services, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Every `host_monitor_interval_s`: hosts silent for `heartbeat_unreachable_after_s`
    become unreachable and their capsules missing (heartbeats bring them back). Silence is
    counted from this process's start at the earliest (`HostService.mark_silent`)."""
    settings = services.settings
    started = anyio.current_time()
    task_status.started()
    while True:
        await anyio.sleep(settings.host_monitor_interval_s)
        try:
            await services.hosts.mark_silent(
                settings.heartbeat_unreachable_after_s,
                listened_for_s=anyio.current_time() - started,
            )
        except Exception as err:  # the next round tries again; the loop must live on
            log.error("host monitor round failed: %r", err)
            log.debug("host monitor traceback", exc_info=err)


async def reconciler(
    services: Services, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Database vs agents, every `reconcile_interval_s` (`services/reconciler.py`)."""
    await services.reconciler.run(services.settings.reconcile_interval_s, task_status=task_status)


async def lifetimes(
    services: Services, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Capsules whose lifetime (`ttl_sec`) ended are paused or destroyed, every
    `lifetime_interval_s` (`services/lifetime.py`)."""
    await services.lifetime.run(services.settings.lifetime_interval_s, task_status=task_status)


async def agent_connections(
    services: Services, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Owns the agents' RPC pools: closes them when the app stops."""
    task_status.started()
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await services.agents.aclose()


async def events(
    services: Services, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Hears of committed events and feeds the SSE streams and the outbox
    (`services/events.py`)."""
    await services.events.run(task_status=task_status)


async def outbox(
    services: Services, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Delivers channel notifications (`services/outbox.py`)."""
    await services.outbox.run(task_status=task_status)


async def stats_sampler(
    services: Services, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Samples what each team holds every `stats_interval_s` (`services/stats.py`)."""
    await services.stats.run(task_status=task_status)


async def builds(
    services: Services, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """The template build worker: claims queued builds and runs them (`services/builds.py`)."""
    await services.builds.serve(task_status=task_status)
