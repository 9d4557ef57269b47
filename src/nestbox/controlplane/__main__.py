"""`nestbox-cp` (`python -m nestbox.controlplane`): load settings once, then serve with uvicorn.
The app's lifespan migrates the database; right after, on the very first start, this makes the
admin and their API key and prints the key, all before the first request is answered.

`nestbox-cp admin reset-key [--email E]`: the operator's way back in. It needs only the database
(the server may be running or not): it mints a new platform admin API key, writes it to
`$NESTBOX_DIR/admin-api-key` (0600, atomically) and prints it (`services/bootstrap.py`).

Settings that do not load (a JWT secret shorter than 32 bytes, say) and an unusable data
directory end the program with one line on stderr and exit status 2, before anything starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, NoReturn

import anyio
import uvicorn
from pydantic import ValidationError

from nestbox.common.logging import configure
from nestbox.controlplane.app import create_app
from nestbox.controlplane.db import Database
from nestbox.controlplane.secretbox import load_secret_key
from nestbox.controlplane.services.bootstrap import bootstrap_admin, reset_admin_key
from nestbox.controlplane.settings import (
    ADMIN_KEY_FILE,
    CPSettings,
    jwt_secret,
    prepare_data_dir,
    split_listen,
)

if TYPE_CHECKING:
    from nestbox.controlplane.services.bootstrap import Bootstrapped

KEEPALIVE_IDLE_S = 620
"""Longer than common load balancers' 600 s idle timeout, as Wrenn's servers do."""
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestbox-cp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--print-config", action="store_true", help="print settings and exit")
    commands = parser.add_subparsers(dest="command")
    admin = commands.add_parser("admin", help="operator commands").add_subparsers(
        dest="admin_command", required=True
    )
    reset = admin.add_parser(
        "reset-key", help="mint a new platform admin API key into $NESTBOX_DIR/admin-api-key"
    )
    reset.add_argument("--email", help="the admin's email (default: the configured admin, "
                       "else the oldest active admin)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = _load_settings()
    if args.print_config:
        print(json.dumps(settings.redacted(), indent=2))
        return
    configure(settings.log_level, json_lines=settings.log_json)
    try:
        prepare_data_dir(settings.data_dir)
        jwt_secret(settings)  # made or checked now, so a bad one stops us before serving
    except (OSError, ValueError) as err:
        _fail(f"cannot use the data directory {settings.data_dir}: {err}")
    if args.command == "admin":
        anyio.run(_reset_key, settings, args.email)
        return

    async def first_start(db: Database) -> None:
        """In the lifespan, once migrated: make the first admin if there is none; greet."""
        _greet(settings, await bootstrap_admin(db, settings.data_dir, settings.admin_email))

    host, port = split_listen(settings.listen)
    forwarded = settings.forwarded_allow_ips
    uvicorn.run(
        create_app(settings, prepare=first_start),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_keep_alive=KEEPALIVE_IDLE_S,
        server_header=False,
        # The client address (rate limits, logs) is the TCP peer unless a proxy is trusted.
        proxy_headers=bool(forwarded),
        forwarded_allow_ips=forwarded or None,
    )


def _load_settings() -> CPSettings:
    try:
        return CPSettings()
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        _fail(f"invalid setting {where}: {first['msg'].removeprefix('Value error, ')}{more}")


def _fail(message: str) -> NoReturn:
    print(f"nestbox-cp: {message}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


async def _reset_key(settings: CPSettings, email: str | None) -> None:
    db = Database(settings.db_url)
    try:
        key = await anyio.to_thread.run_sync(load_secret_key, settings.data_dir)
        await db.migrate(secret_key=key)
        made = await reset_admin_key(db, settings.data_dir, email or settings.admin_email,
                                     named=email is not None)  # fmt: skip
    finally:
        await db.aclose()
    print(f"New admin API key for {made.email} (team {made.team_id}), also in {made.key_file} "
          "(mode 0600):")  # fmt: skip
    print(f"  {made.api_key}")
    sys.stdout.flush()


def _greet(settings: CPSettings, first: Bootstrapped | None) -> None:
    print(f"Nestbox control plane on {settings.base_url} (API docs: {settings.base_url}/docs)")
    if first is not None:
        print(f"First start: admin {first.email}, team {first.team_id}")
        print(f"Admin API key (also in {first.key_file}, mode 0600):")
        print(f"  {first.api_key}")
    elif (settings.data_dir / ADMIN_KEY_FILE).exists():
        print(f"Admin API key: {settings.data_dir / ADMIN_KEY_FILE}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
