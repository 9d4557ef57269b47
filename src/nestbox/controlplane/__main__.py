"""`nestbox-cp` (`python -m nestbox.controlplane`): load settings once, then serve with uvicorn.
The app's lifespan migrates the database; right after, on the very first start, this makes the
admin and their API key and prints the key, all before the first request is answered."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

import uvicorn

from nestbox.common.logging import configure
from nestbox.controlplane.app import create_app
from nestbox.controlplane.services.bootstrap import bootstrap_admin
from nestbox.controlplane.settings import ADMIN_KEY_FILE, CPSettings, split_listen

if TYPE_CHECKING:
    from nestbox.controlplane.db import Database
    from nestbox.controlplane.services.bootstrap import Bootstrapped

KEEPALIVE_IDLE_S = 620
"""Longer than common load balancers' 600 s idle timeout, as Wrenn's servers do."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestbox-cp", description=__doc__)
    parser.add_argument("--print-config", action="store_true", help="print settings and exit")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = CPSettings()
    if args.print_config:
        print(json.dumps(settings.redacted(), indent=2))
        return
    configure(settings.log_level, json_lines=settings.log_json)

    async def first_start(db: Database) -> None:
        """In the lifespan, once migrated: make the first admin if there is none; greet."""
        _greet(settings, await bootstrap_admin(db, settings.data_dir, settings.admin_email))

    host, port = split_listen(settings.listen)
    uvicorn.run(
        create_app(settings, prepare=first_start),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_keep_alive=KEEPALIVE_IDLE_S,
        server_header=False,
    )


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
