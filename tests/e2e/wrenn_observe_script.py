"""Runs inside the wrenn venv (the unmodified `wrenn` 0.3.0 SDK) against a real Nestbox stack:
`events.stream()` while a capsule is created, used, paused, resumed and destroyed and another
one, made with a 3 s idle timeout, is auto-paused by its host; `capsules.metrics` of the first
(running, then paused), `capsules.stats` and `capsules.usage`. Prints one JSON document (last
line of stdout); steps go to stderr. Nothing waits on the clock: conditions are polled
(`until`) with generous deadlines.
"""

import datetime as dt
import json
import threading
import time

from sdk_steps import step, until  # beside this script
from wrenn import Capsule, WrennClient

out: dict[str, object] = {}
events: list[dict[str, object]] = []


def kinds(capsule_id: str) -> list[str]:
    return [
        str(e["event"]) for e in list(events) if (e.get("resource") or {}).get("id") == capsule_id
    ]


def listen(client: WrennClient) -> None:
    for ev in client.events.stream():
        events.append(json.loads(ev.model_dump_json()))


client = WrennClient()
threading.Thread(target=listen, args=(client,), daemon=True).start()
step("stream")
assert until(lambda: any(e["event"] == "connected" for e in events), 30), "no connected event"

step("create")
capsule = Capsule(wait=True)
cid = capsule.capsule_id
busy = "python3 -c 'sum(i*i for i in range(300_000))'; head -c 200000 /dev/urandom > /root/b"
capsule.commands.run(busy)


def metric_points(range_: str) -> list:  # type: ignore[type-arg]
    return client.capsules.metrics(cid, range=range_).points or []


step("metrics")
points = until(lambda: len(metric_points("5m")) >= 3 and metric_points("5m"), 90)
last = points[-1]
out["metrics_running"] = {
    "count": len(points),
    "mem": last.mem_bytes > 0,
    "disk": last.disk_bytes > 0,
    "cpu_seen": any((p.cpu_pct or 0) > 0 for p in points),
    "recent": abs(time.time() - last.timestamp_unix) < 120,
}
out["metrics_2h"] = len(metric_points("2h")) >= 1
out["metrics_24h"] = len(metric_points("24h")) >= 1

step("stats")


def sampled():  # type: ignore[no-untyped-def]
    s = client.capsules.stats(range="5m")
    return s if max(s.series.running or [0]) >= 1 else None


stats = until(sampled, 90)
out["stats"] = {
    "range": stats.range.value,
    "running_now": stats.current.running_count,
    "vcpus_now": stats.current.vcpus_reserved,
    "peak_running": stats.peaks.running_count,
    "labels_aware": all(x.tzinfo is not None for x in stats.series.labels or []),
    "series_max": max(stats.series.running or [0]),
}

step("pause, resume")
capsule.pause(wait=True)
paused_points = metric_points("10m")
out["metrics_paused"] = len(paused_points) >= len(points)
capsule.resume(wait=True)

step("usage")
today = dt.datetime.now(dt.UTC).date()
usage = client.capsules.usage(from_=today - dt.timedelta(days=1), to=today)
out["usage"] = {
    "days": [str(p.date) for p in usage.points or []],
    "today_cpu": (usage.points or [])[-1].cpu_minutes,
    "today_ram": (usage.points or [])[-1].ram_mb_minutes,
}

step("destroy")
capsule.destroy()

step("auto-pause (3 s idle)")
idle = client.capsules.create(timeout_sec=3)
idle_id = idle.id
until(lambda: client.capsules.get(idle_id).status.value == "running", 120)
until(lambda: "capsule.state.changed" in kinds(idle_id) and "capsule.pause" in kinds(idle_id), 120)
auto = [e for e in events if (e.get("resource") or {}).get("id") == idle_id]
out["auto"] = {
    "status": client.capsules.get(idle_id).status.value,
    "changed": [e["metadata"] for e in auto if e["event"] == "capsule.state.changed"],
    "pause_actor": [e["actor"]["type"] for e in auto if e["event"] == "capsule.pause"],
}
client.capsules.destroy(idle_id)

until(lambda: "capsule.destroy" in kinds(cid) and "capsule.resume" in kinds(cid), 60)
out["kinds"] = kinds(cid)
out["first"] = next(
    (
        e
        for e in events
        if e["event"] == "capsule.create" and (e.get("resource") or {}).get("id") == cid
    ),
    None,
)
out["connected"] = events[0]["event"]
step("done")
print(json.dumps(out, default=str))
