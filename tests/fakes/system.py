"""`FakeSystem`: records the privileged commands the host agent would run, runs none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestbox.hostagent.system import System, SystemCommandError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping


@dataclass(frozen=True)
class Call:
    argv: tuple[str, ...]
    check: bool
    input: bytes | None


class FakeSystem(System):
    """Implements `System` by recording each command.

    - `responses`: stdout for commands starting with a given argv prefix (longest prefix
      wins); everything else prints nothing.
    - `fail_at`: the index of the command that fails (SystemCommandError if `check`).
    - `before_run(index, argv)`: awaited before each command, e.g. to cancel a scope.
    """

    def __init__(
        self,
        responses: Mapping[tuple[str, ...], str] | None = None,
        *,
        fail_at: int | None = None,
        before_run: Callable[[int, tuple[str, ...]], Awaitable[None]] | None = None,
    ) -> None:
        self.responses = dict(responses or {})
        self.fail_at = fail_at
        self.before_run = before_run
        self.calls: list[Call] = []

    @property
    def commands(self) -> list[tuple[str, ...]]:
        return [c.argv for c in self.calls]

    async def run(self, *argv: str, check: bool = True, input: bytes | None = None) -> str:
        index = len(self.calls)
        self.calls.append(Call(argv, check, input))
        if self.before_run is not None:
            await self.before_run(index, argv)
        if index == self.fail_at:
            if check:
                raise SystemCommandError(argv, 1, "injected failure")
            return ""
        best = max((p for p in self.responses if argv[: len(p)] == p), key=len, default=None)
        return "" if best is None else self.responses[best]
