"""How the pipeline reports progress: a small interface the CLI implements with rich,
and a silent default for tests and library callers."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def stage(self, name: str, total: float | None = None) -> None:
        """A new stage starts (the previous one is over); ``total`` units if known."""

    def advance(self, amount: float = 1) -> None:
        """``amount`` more units of the current stage are done."""

    def note(self, message: str) -> None:
        """A line worth telling the operator (a cache hit, a created key)."""

    def close(self) -> None:
        """The pipeline is over."""


class NullReporter:
    def stage(self, name: str, total: float | None = None) -> None:
        pass

    def advance(self, amount: float = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
