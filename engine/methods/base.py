"""What every fusion method provides. A method turns the lineage head plus one task checkpoint into the next
head, carrying whatever state it needs between steps (stored as `state.safetensors` in each version)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from core.methods import CommonParams
from engine.families.base import Family, LoadedBase, Tensors
from engine.inputs import Inputs
from engine.streaming import Sinks


class StepProgress(Protocol):
    def __call__(self, step: int, steps_total: int, loss: float | None, objective: str | None = None,
                 losses: dict[str, float] | None = None) -> None:
        """After every optimisation step; `objective` names which of alternating objectives `loss` measures, `losses`
        each objective's loss when the step measured several. Raises JobCancelled to stop."""


@dataclass
class MethodState:
    """State carried from one step to the next: tensors plus JSON-able scalars (`meta`).
    Only the method that wrote it reads it: a head written by another method starts a method fresh."""

    tensors: Tensors = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepHeads:
    """The tasks' linear heads (weight [C, D], optional bias [C]) a step may align through: the new task's, when the
    job gives one, and those of the lineage's earlier tasks that have one."""

    task: Tensors | None = None
    earlier: dict[int, Tensors] = field(default_factory=dict)  # by lineage position, 0-based (a step's `index`)
    task_refit: bool = False  # the job re-fits the task's head on the new tower once the step is done (head_data)


@dataclass
class StepInput:
    # θ0, the lineage head θ (θ0 when nothing has been merged yet) and θ_t: float32 on the CPU when read. A streamed
    # merge gives lazy mappings that read each tensor when asked (its keys may be row blocks of big tensors, for
    # `elementwise` methods), so a method reads each key when it needs it and writes results into `sinks`.
    base: Mapping[str, torch.Tensor]
    merged: Mapping[str, torch.Tensor]
    task: Mapping[str, torch.Tensor]
    index: int  # how many tasks the lineage had merged before this one (0: this is the first)
    state: MethodState  # what this method carried from the previous step (empty at first or after another method)
    params: CommonParams
    device: torch.device
    family: Family
    loaded: LoadedBase
    calibration: Inputs | None = None  # required by data-driven methods
    progress: StepProgress = lambda step, steps_total, loss, objective=None, losses=None: None
    sinks: Sinks = field(default_factory=Sinks)
    heads: StepHeads = field(default_factory=StepHeads)


@dataclass
class StepOutput:
    merged: Mapping[str, torch.Tensor]  # the new head θ, float32, CPU (what `sinks.output` gave back)
    state: MethodState
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. OTMF's losses


class Method(ABC):
    """A fusion rule. Its name, params model and data needs are its registry entry's (core.methods)."""

    # True when every output entry depends only on the same entry of the inputs (plus global scalars), so a streamed
    # merge may hand the method big tensors as blocks of rows.
    elementwise = False

    def __init__(self, name: str, *, data_driven: bool):
        self.name, self.data_driven = name, data_driven

    @abstractmethod
    def step(self, inp: StepInput) -> StepOutput: ...

    def head_reads(self, index: int) -> int:
        """How many times a step reads each tensor of its head (`merged`) when the lineage holds `index` tasks."""
        return 1


@dataclass
class Prepared:
    """An elementwise step once its global scalars are known: `merge(key)` computes the new head's tensor `key`
    (float32, CPU) from the step's inputs alone."""

    merge: Callable[[str], torch.Tensor]
    state: MethodState
    metrics: dict[str, Any] = field(default_factory=dict)


class ElementwiseMethod(Method):
    """A method whose step is `prepare` (any passes over the inputs for global scalars) then one independent
    `merge(key)` per key. A streamed merge may keep such a step's head unwritten (`sinks.recompute`) and compute
    each of its tensors again when the next step reads it: exactly the values a stored head would hold."""

    elementwise = True

    @abstractmethod
    def prepare(self, inp: StepInput) -> Prepared: ...

    def step(self, inp: StepInput) -> StepOutput:
        prepared = self.prepare(inp)
        if inp.sinks.recompute is not None:
            merged = inp.sinks.recompute(prepared.merge)
        else:
            sink = inp.sinks.output()
            for k in inp.base:
                sink[k] = prepared.merge(k)
            merged = sink.done()
        inp.progress(1, 1, None)
        return StepOutput(merged=merged, state=prepared.state, metrics=prepared.metrics)
