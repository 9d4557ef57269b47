"""The agent's one client of each capsule's envd: one `CapsuleEnvd` per running capsule.

client.py     CapsuleEnvd: lifecycle calls (/init, health, /snapshot/prepare, metrics) + mixins;
              init_request, new_access_token, envd_url
process.py    exec, exec_stream, background processes, list, signals, stdin, connect
pty.py        terminals: attach (new or by tag), input, resize, kill
files.py      streamed and whole file transfers; stat, list, mkdir, remove, move
events.py     Started / Output / Ended and the bounded (256) EventStream
transport.py  one capsule's unary and streaming pools; close_idle() before a snapshot
errors.py     EnvdCallError and its subclasses with stable wire codes
"""

from __future__ import annotations

from nestbox.hostagent.envdconn.client import (
    CapsuleEnvd,
    envd_url,
    init_request,
    new_access_token,
)
from nestbox.hostagent.envdconn.events import (
    EVENT_QUEUE,
    Ended,
    Event,
    EventStream,
    Output,
    Started,
)
from nestbox.hostagent.envdconn.files import CHUNK, FileEntry
from nestbox.hostagent.envdconn.process import BackgroundProcess, ExecResult, ProcessView
from nestbox.hostagent.envdconn.transport import PoolSettings

__all__ = [
    "CHUNK",
    "EVENT_QUEUE",
    "BackgroundProcess",
    "CapsuleEnvd",
    "Ended",
    "Event",
    "EventStream",
    "ExecResult",
    "FileEntry",
    "Output",
    "PoolSettings",
    "ProcessView",
    "Started",
    "envd_url",
    "init_request",
    "new_access_token",
]
