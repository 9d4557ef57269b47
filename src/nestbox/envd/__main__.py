"""`python -m nestbox.envd`: parse arguments, load settings once, build the runtime, serve."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from nestbox.common.logging import configure
from nestbox.envd.settings import EnvdSettings, in_vm

log = logging.getLogger("nestbox.envd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nestbox-envd", description=__doc__)
    parser.add_argument("--port", type=int, help="TCP port (default 49983)")
    parser.add_argument("--host", help="listen address (default '::', IPv4 and IPv6)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--outside-vm",
        action="store_const",
        const="local",
        dest="mode",
        help="never touch the machine (clock, RNG, caches)",
    )
    mode.add_argument(
        "--in-vm",
        action="store_const",
        const="vm",
        dest="mode",
        help="act as the daemon of a capsule VM",
    )
    parser.add_argument("--forward-address", help="address to re-expose loopback servers on")
    parser.add_argument("--print-config", action="store_true", help="print settings and exit")
    return parser.parse_args(argv)


def load_settings(args: argparse.Namespace) -> EnvdSettings:
    overrides = {
        k: v
        for k, v in {
            "port": args.port,
            "host": args.host,
            "mode": args.mode,
            "forward_address": args.forward_address,
        }.items()
        if v is not None
    }
    return EnvdSettings(**overrides)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_settings(args)
    if args.print_config:
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
        return
    configure(settings.log_level)
    from nestbox.envd.server import build_runtime, serve

    runtime = build_runtime(settings, in_vm=in_vm(settings))
    log.info("envd starting on [%s]:%d (in_vm=%s)", settings.host, settings.port, runtime.in_vm)
    asyncio.run(serve(runtime))


if __name__ == "__main__":
    main()
