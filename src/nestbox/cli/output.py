"""How the CLI prints: JSON for scripts (`--json`, the API's own field names), Rich tables for
people, and errors as one red line `error: <code>: <message>` on stderr."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from pydantic import BaseModel

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def as_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    """Print a model (or a list of them) as JSON on stdout, with nothing else."""
    if isinstance(value, dict):
        doc: Any = value
    elif isinstance(value, (list, tuple)):
        doc = [item.model_dump(mode="json") for item in value]
    else:
        doc = value.model_dump(mode="json")  # type: ignore[union-attr]
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def error(code: str, message: str) -> None:
    err.print(f"[bold red]error:[/] [red]{code}: {_escape(message)}[/]")


def note(message: str) -> None:
    err.print(f"[dim]{_escape(message)}[/]")


def table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    grid = Table(box=None, header_style="bold", pad_edge=False)
    cells = [[cell(v) for v in row] for row in rows]
    widest = max((len(row[0]) for row in cells), default=0)
    for i, column in enumerate(columns):  # the first (an id) whole; the last may wrap
        grid.add_column(column, no_wrap=i < len(columns) - 1, min_width=widest if i == 0 else None)
    for row in cells:
        grid.add_row(*row)
    out.print(grid)


def fields(pairs: Sequence[tuple[str, object]]) -> None:
    grid = Table(box=None, show_header=False, pad_edge=False)
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in pairs:
        grid.add_row(name, cell(value))
    out.print(grid)


def cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return _escape(str(value))


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _escape(text: str) -> str:
    return text.replace("[", r"\[")
