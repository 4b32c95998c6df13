"""Rich progress bars for long steps (training, each merge), shared by `mergeline merge` and `mergeline demo`."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def step_bars(**kwargs: Any) -> Progress:
    """Bars with the step count, a note (losses, accuracy), the elapsed time and the time left."""
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    return Progress(*columns, **kwargs)


def losses_text(losses: dict[str | None, float]) -> str:
    """`loss 0.31`, or one loss per named objective: `pre 0.0061  post 0.612`."""
    return "  ".join(f"{name or 'loss'} {value:.4g}" for name, value in losses.items())


class StepRow:
    """The engine's Progress on one bar row: the current task's steps and the latest loss of each objective (OTMF
    alternates two objectives whose losses differ by orders of magnitude, so one number would swing)."""

    def __init__(self, bars: Progress, description: str | None = None):
        self.bars, self.description = bars, description
        self.row = bars.add_task(description or "starting", total=None, note="")
        self.losses: dict[str | None, float] = {}

    def update(self, *, task_index: int, tasks_total: int, step: int, steps_total: int, loss: float | None,
               objective: str | None = None, losses: dict[str, float] | None = None) -> None:
        if step == 1:
            self.losses.clear()
        if losses:
            self.losses.update(losses)
        elif loss is not None:
            self.losses[objective] = loss
        self.bars.update(self.row, completed=step, total=steps_total, note=losses_text(self.losses),
                         description=self.description or f"task {task_index + 1}/{tasks_total}")

    def event(self, type: str, message: str, data: dict | None = None) -> None:
        if type == "task_merged" and data and "accuracy" in data:
            self.bars.update(self.row, note=f"accuracy {100 * data['accuracy']:.1f}%")
