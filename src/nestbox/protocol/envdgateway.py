"""The envd gateway's contract (issue 16): what an E2B-style client may ask of a capsule's envd
through the control plane, and how the control plane hands it to the capsule's agent.

Both ends check a request against one allow-list (`envd_route`), so they cannot disagree: the
path must be exactly one of envd's RPC or file routes (bytes compared whole: no prefix, no
percent-encoding, no dot segments can match), with a method that route takes. `/init`,
`/snapshot/prepare` and anything else envd serves are never reachable. Only `/files` takes a
query (printable ASCII, no `#`); it names the file inside the capsule, which envd checks for
the user it acts for.

The control plane calls the agent at `AGENT_PREFIX + capsule_id + path` with its agent token
(`X-Agent-Token`, never the proxy token); the agent adds the capsule's own envd token. The
caller's `X-Access-Token` never reaches envd.
"""

from __future__ import annotations

from nestbox.protocol.envd import ENVD_PORT

AGENT_PREFIX = "/envd/"
"""The agent's gateway path: `/envd/{capsule_id}{envd path}`."""
SANDBOX_ID_HEADER = "E2b-Sandbox-Id"
SANDBOX_PORT_HEADER = "E2b-Sandbox-Port"
GATEWAY_PORT = ENVD_PORT
"""The only port the gateway serves (E2B's SDK names envd's port in `E2b-Sandbox-Port`)."""

PROCESS_METHODS = (
    "Start", "Connect", "List", "SendInput", "StreamInput", "SendSignal", "CloseStdin", "Update",
)  # fmt: skip
FILESYSTEM_METHODS = (
    "Stat", "MakeDir", "Move", "ListDir", "Remove", "WatchDir", "CreateWatcher",
    "GetWatcherEvents", "RemoveWatcher",
)  # fmt: skip
ROUTES: dict[bytes, frozenset[str]] = {
    **{f"/process.Process/{m}".encode(): frozenset({"POST"}) for m in PROCESS_METHODS},
    **{f"/filesystem.Filesystem/{m}".encode(): frozenset({"POST"}) for m in FILESYSTEM_METHODS},
    b"/files": frozenset({"GET", "POST"}),
    b"/health": frozenset({"GET", "HEAD"}),
    b"/metrics": frozenset({"GET"}),
    b"/envs": frozenset({"GET"}),
}
"""envd's routes the gateway serves, and their methods."""
QUERY_ROUTES = frozenset({b"/files"})


def envd_route(method: str, raw_path: bytes, query: bytes) -> str | None:
    """Why `method raw_path?query` may not pass the gateway, or None when it may."""
    methods = ROUTES.get(raw_path)
    if methods is None:
        return "not an envd route the gateway serves"
    if method not in methods:
        return f"{method} is not allowed on this route"
    if query:
        if raw_path not in QUERY_ROUTES:
            return "this route takes no query"
        if any(b < 0x21 or b > 0x7E for b in query) or b"#" in query:
            return "the query holds bytes outside printable ASCII"
    return None
