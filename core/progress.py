"""How a running job reports: the engine calls these; the CLI draws a bar, the worker updates the job record.

Both calls may raise `JobCancelled`: that is how cancellation reaches the engine at a step boundary."""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def update(self, *, task_index: int, tasks_total: int, step: int, steps_total: int, loss: float | None,
               objective: str | None = None, losses: dict[str, float] | None = None) -> None:
        """After every optimisation step (data-free methods: once per task). task_index counts from 0; `objective`
        names which of a method's alternating objectives `loss` measures (OTMF: "pre", "post"); `losses` gives each
        objective's loss when one step measures several (OTMF's joint updates; `loss` is then their sum)."""

    def event(self, type: str, message: str, data: dict[str, Any] | None = None) -> None:
        """A milestone: inputs fetched, task started/finished, evaluated, committed."""


class NullProgress:
    def update(self, **_: Any) -> None:
        pass

    def event(self, type: str, message: str, data: dict[str, Any] | None = None) -> None:
        pass
