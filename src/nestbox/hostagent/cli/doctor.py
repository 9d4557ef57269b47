"""`nestbox-agent doctor [--json]`: check that this host can run capsules, and time a round trip."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from nestbox.hostagent.doctor import Report, run_doctor

if TYPE_CHECKING:
    import argparse

    from nestbox.hostagent.settings import AgentSettings


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = subparsers.add_parser(
        "doctor",
        help="check KVM/TCG, QEMU, the image, networking and slots; then create, exec, pause, "
        "resume and destroy a capsule, timing each step",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(func=run)


def run(args: argparse.Namespace, settings: AgentSettings) -> int:
    """Exit status 0 only if every check passed."""
    report = asyncio.run(run_doctor(settings))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_table(report)
    return 0 if report.ok else 1


def _print_table(report: Report) -> None:
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        took = f"{c.duration_ms:>7} ms" if c.duration_ms is not None else " " * 10
        print(f"{'ok ' if c.ok else 'FAIL'} {c.name:<{width}} {took}  {c.detail}")
    print(f"accel: {report.accel} ({report.accel_reason})")
    print("all checks passed" if report.ok else "some checks FAILED")
