"""The line between choosing and reporting: every choice (a default, a sweep, the suite's regime) is made on each
task's validation set; only the report reads eval, and the report-only suites are read by nothing else.

`validation_view` gives tuning code a suite whose `eval` entries name the validation sets, and seals the report
data for the rest of the process: an audit hook refuses to open any eval file or anything under a report-only
suite, so a sweep cannot score on the report's inputs even by a path it builds itself."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from core.uris import file_uri_path

_sealed: list[str] = []


class ReportDataSealed(PermissionError):
    """Raised when a process that chose the validation split opens data kept for the report."""


def validation_view(suite: dict, *, report_only: Iterable[Path] = ()) -> dict:
    """The suite as tuning sees it: each task's `eval` is its validation set, accuracies are the validation ones,
    and the eval files (and every `report_only` folder) can no longer be opened by this process."""
    view = copy.deepcopy(suite)
    sealed = [file_uri_path(t["eval"]) for t in suite["tasks"].values()]
    for task in view["tasks"].values():
        task["eval"] = task.pop("validation")
        task["individual_accuracy"] = task.pop("individual_validation_accuracy")
    view["base_accuracy"] = view.pop("base_validation_accuracy")
    view["split"] = "validation"
    seal([*sealed, *report_only])
    return view


def seal(paths: Iterable[Path]) -> None:
    """Refuse, from now on in this process, to open `paths` or anything under them."""
    if not _sealed:
        sys.addaudithook(_refuse_sealed)
    _sealed.extend(os.path.realpath(p) for p in paths)


def _refuse_sealed(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    if any(path == s or path.startswith(s + os.sep) for s in _sealed):
        raise ReportDataSealed(f"{path} is kept for the report: tuning reads validation data only")

