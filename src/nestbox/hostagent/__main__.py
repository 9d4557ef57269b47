"""`nestbox-agent` (`python -m nestbox.hostagent`): parse arguments, load settings once, run.

Subcommands are registered by `hostagent/cli/*` modules; with no subcommand (or `serve`) the
agent server runs (`cli/serve.py`).
"""

from __future__ import annotations

import argparse
import json
import sys

from nestbox.common.logging import configure
from nestbox.hostagent.cli import doctor, image, serve
from nestbox.hostagent.settings import AgentSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestbox-agent", description=__doc__)
    parser.add_argument("--print-config", action="store_true", help="print settings and exit")
    serve.add_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve.add_parser(subparsers)
    image.add_parser(subparsers)
    doctor.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = AgentSettings()
    if args.print_config:
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
        return
    configure(settings.log_level)
    if args.command is None:
        sys.exit(serve.run(args, settings))
    sys.exit(args.func(args, settings))


if __name__ == "__main__":
    main()
