"""The image build's one error type.

ImageBuildError          a stage of the guest-image build failed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


class ImageBuildError(Exception):
    """A stage of the guest-image build failed: a command exited non-zero, a tool or input is
    missing, or an artifact failed its check. `command`, `returncode` and `output_tail` are set
    when a command failed (the tail is the last lines of its stderr, else stdout)."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        returncode: int | None = None,
        output_tail: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.command = tuple(command)
        self.returncode = returncode
        self.output_tail = output_tail

    def __str__(self) -> str:
        if not self.output_tail:
            return self.message
        return f"{self.message}\n{self.output_tail}"
