"""`nestbox-agent [serve] [--register TOKEN --address HOST:PORT]`: run the host agent.

With a registration token (or saved credentials from an earlier registration) the agent
registers with the control plane at `NESTBOX_AGENT_CP_URL` first and then accepts only the
control plane's token. Without, it runs unregistered (development, tests) and accepts the
secret in `NESTBOX_AGENT_SECRET` or `<state_dir>/agent-secret`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import TYPE_CHECKING

import anyio

from nestbox.hostagent.app import AgentApp
from nestbox.hostagent.auth import from_credentials, local_auth
from nestbox.hostagent.registration import RegistrationError, ensure_registered, load_credentials
from nestbox.hostagent.server import serve

if TYPE_CHECKING:
    from nestbox.hostagent.registration import HostCredentials
    from nestbox.hostagent.settings import AgentSettings


def add_arguments(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """The serve options, on the top-level parser and on `serve` (there with SUPPRESS
    defaults, so options given before the subcommand survive)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--register",
        metavar="TOKEN",
        default=default,
        help="register with the control plane using this one-time token",
    )
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        default=default,
        help="where the control plane reaches this agent (registration)",
    )
    parser.add_argument(
        "--cp-url",
        metavar="URL",
        default=default,
        help="the control plane (default NESTBOX_AGENT_CP_URL)",
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve_parser = subparsers.add_parser("serve", help="run the agent (the default command)")
    add_arguments(serve_parser, suppress=True)
    serve_parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: AgentSettings) -> int:
    try:
        creds = _credentials(args, settings)
    except RegistrationError as err:
        print(f"nestbox-agent: {err.message}", file=sys.stderr)
        return 2
    auth = from_credentials(creds) if creds is not None else local_auth(settings)
    if creds is None:
        print(f"nestbox-agent: not registered; RPCs need the secret from {auth.source}",
              file=sys.stderr)  # fmt: skip
    app = AgentApp(settings, auth, credentials=creds)
    # uvicorn handles SIGTERM while it serves (graceful stop, then the lifespan pauses the
    # capsules) and re-raises it afterwards: this handler turns that into exit status 0.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        asyncio.run(serve(app, settings))
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        print(f"nestbox-agent: {err!r}", file=sys.stderr)
        return 1
    return 0


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _credentials(args: argparse.Namespace, settings: AgentSettings) -> HostCredentials | None:
    """Register first if asked; else the saved credentials, if any. :raise RegistrationError:"""
    token = getattr(args, "register", None) or (
        settings.registration_token.get_secret_value() if settings.registration_token else None
    )
    cp_url = getattr(args, "cp_url", None) or settings.cp_url
    address = getattr(args, "address", None) or settings.address or settings.listen
    if token or cp_url:
        if not cp_url:
            raise RegistrationError("--register needs the control plane's URL (--cp-url or "
                                    "NESTBOX_AGENT_CP_URL)")  # fmt: skip
        return anyio.run(lambda: ensure_registered(cp_url, token, address, settings.state_dir))
    return load_credentials(settings.state_dir)
