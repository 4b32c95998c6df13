"""Model inputs as OTMF reads them, and the bounded reservoir of earlier tasks' calibration inputs it may keep.

The reservoir is classic reservoir sampling (Algorithm R) over a stream made of a fixed-size random sample of each
task's calibration set: after `seen` streamed inputs every one of them is held with probability capacity/seen, so
every task keeps a share proportional to what it contributed, and the buffer never exceeds `capacity`.

Stored in MethodState (and so in the version's state.safetensors):
  tensors: "reservoir.inputs.<name>" [R, ...] compact (floats as float16, int64 as int32 when the values fit),
           "reservoir.task_index" int32 [R]: the lineage step (MethodState's `index`) each input came from;
           "reservoir.targets" [R, D] (float16 when the values fit), only when a step stored them
           (`replay_targets` task or fine_tune): each input's features as its own task's head reads them, a row
           of NaN for an input stored without one;
  meta["reservoir"]: {"seen": int, "dtypes": {name: dtype the model expects}}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from core.errors import InvalidInput
from engine.inputs import Inputs
from engine.methods.base import MethodState

INPUT_PREFIX = "reservoir.inputs."
TASK_INDEX_KEY = "reservoir.task_index"
TARGETS_KEY = "reservoir.targets"
_FLOAT16_MAX = 65504.0
_INT32 = torch.iinfo(torch.int32)


@dataclass
class InputSource:
    """Model inputs by name, [N, ...] each on the CPU (possibly stored compactly), with the dtype the family
    expects for each; batches come out restored and on the compute device."""

    tensors: dict[str, torch.Tensor]
    dtypes: dict[str, torch.dtype]
    tasks: torch.Tensor | None = None  # [N] int32: each input's lineage position, where known (the reservoir's)

    @classmethod
    def from_inputs(cls, inputs: Inputs) -> InputSource:
        return cls(dict(inputs.tensors), {k: v.dtype for k, v in inputs.tensors.items()})

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    def batch(self, index: torch.Tensor, device: torch.device, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The inputs at `index` (int64 [B]), on `device`; floating inputs in the forward's dtype."""
        out = {}
        for k, v in self.tensors.items():
            dtype = float_dtype if self.dtypes[k].is_floating_point else self.dtypes[k]
            out[k] = v[index].to(device=device, dtype=dtype)
        return out


def _compact(t: torch.Tensor) -> torch.Tensor:
    """Half the bytes where that loses nothing that matters: pixel-like floats as float16 (normalised pixels need
    ~3 significant digits), token ids as int32. Values outside those ranges keep their dtype."""
    if t.is_floating_point() and t.dtype != torch.float16:
        if t.numel() == 0 or float(t.abs().max()) <= _FLOAT16_MAX:
            return t.to(torch.float16)
    elif t.dtype == torch.int64 and (t.numel() == 0 or (int(t.min()) >= _INT32.min and int(t.max()) <= _INT32.max)):
        return t.to(torch.int32)
    return t


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """t [n, *s] right-padded with zeros to [n, *shape] (token sequences of different lengths: pad ids are masked
    out by their zero attention mask)."""
    pad: list[int] = []
    for have, want in zip(reversed(t.shape[1:]), reversed(shape), strict=True):
        pad += [0, want - have]
    return F.pad(t, pad) if any(pad) else t


def _check_item_shapes(name: str, held: torch.Tensor, new: torch.Tensor) -> None:
    """Items of different shapes can share the buffer only as token sequences of different lengths."""
    if held.shape[1:] != new.shape[1:] and (
        held.ndim != new.ndim or held.is_floating_point() or new.is_floating_point()
    ):
        raise InvalidInput(
            f"calibration input {name!r} has shape {list(new.shape[1:])} per item, but the lineage's reservoir "
            f"holds {list(held.shape[1:])}: every task's calibration data must have the same item shape",
            param="tasks.calibration",
        )


def _concat(name: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """old [R, ...] and new [n, ...] as one [R + n, ...] tensor in a common dtype and trailing shape."""
    _check_item_shapes(name, old, new)
    if old.shape[1:] != new.shape[1:]:
        shape = tuple(max(a, b) for a, b in zip(old.shape[1:], new.shape[1:], strict=True))
        old, new = _pad_to(old, shape), _pad_to(new, shape)
    dtype = torch.promote_types(old.dtype, new.dtype)
    return torch.cat([old.to(dtype), new.to(dtype)])


@dataclass
class Reservoir:
    capacity: int
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # compact [R, ...] each
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    task_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))  # [R]
    seen: int = 0
    targets: torch.Tensor | None = None  # [R, D], NaN rows where an input has none; None when none has one

    def __len__(self) -> int:
        return int(self.task_index.shape[0])

    @classmethod
    def from_state(cls, state: MethodState | None, capacity: int, gen: torch.Generator) -> Reservoir:
        """The reservoir carried in `state` (empty when there is none). If the lineage's capacity was lowered since,
        a uniform random subset of the held inputs is kept, which is still a uniform sample of the stream."""
        meta = (state.meta.get("reservoir") if state is not None else None) or {}
        if state is None or TASK_INDEX_KEY not in state.tensors or not meta:
            return cls(capacity)
        inputs = {k.removeprefix(INPUT_PREFIX): v for k, v in state.tensors.items() if k.startswith(INPUT_PREFIX)}
        dtypes = {k: getattr(torch, meta["dtypes"][k].removeprefix("torch.")) for k in inputs}
        targets = state.tensors.get(TARGETS_KEY)
        task_index = state.tensors[TASK_INDEX_KEY].to(torch.int32)
        if targets is not None and (targets.ndim != 2 or targets.shape[0] != task_index.shape[0]):
            targets = None  # not one per held input: those inputs fall back to the head as their teacher
        res = cls(capacity, inputs, dtypes, task_index, int(meta["seen"]), targets)
        if len(res) > capacity:
            keep = torch.randperm(len(res), generator=gen)[:capacity].sort().values
            res.inputs = {k: v[keep] for k, v in res.inputs.items()}
            res.task_index = res.task_index[keep]
            res.targets = None if res.targets is None else res.targets[keep]
        return res

    def source(self) -> InputSource:
        return InputSource(self.inputs, self.dtypes, self.task_index)

    def check(self, inputs: Inputs) -> None:
        """Raise InvalidInput if `inputs` cannot join the reservoir (called before a step's work, not after)."""
        if not self.inputs:
            return
        if set(self.inputs) != set(inputs.tensors):
            raise InvalidInput(
                f"calibration inputs {sorted(inputs.tensors)} do not match the reservoir's {sorted(self.inputs)}",
                param="tasks.calibration",
            )
        for k, v in inputs.tensors.items():
            _check_item_shapes(k, self.inputs[k], v)

    def add(self, inputs: Inputs, task_index: int, per_task: int, gen: torch.Generator,
            target_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Stream a random sample of `per_task` of `inputs` (all of them if fewer) into the reservoir, with each
        input's target when `target_of` (the inputs' positions in `inputs` → their targets [n, D]) is given."""
        self.check(inputs)
        before = len(self)
        n = len(inputs)
        sample = torch.randperm(n, generator=gen)[:per_task]  # [S] the task's sample, in random order
        count = sample.shape[0]
        n_app = min(max(self.capacity - len(self), 0), count)  # the first ones fill free slots
        # Algorithm R for the rest: the sample's i-th input is the stream's (seen + i)-th and takes slot
        # j ~ U{0, ..., seen + i} if j < capacity; a later input overwrites an earlier one in the same slot.
        later = torch.arange(n_app, count)
        drawn = (torch.rand(later.shape[0], generator=gen, dtype=torch.float64) * (self.seen + later + 1)).long()
        hit = drawn < self.capacity
        replaced: dict[int, int] = {}  # slot → position in `sample`
        for i, j in zip(later[hit].tolist(), drawn[hit].tolist(), strict=True):
            replaced[j] = i
        self.seen += count
        take = sample[torch.tensor([*range(n_app), *replaced.values()], dtype=torch.int64)]
        items = {k: _compact(v[take]) for k, v in inputs.tensors.items()}  # [A + P, ...]
        slots = torch.tensor(list(replaced), dtype=torch.int64)
        for k, v in items.items():
            held = self.inputs.get(k, v[:0])
            merged = _concat(k, held, v[:n_app])
            if slots.numel():
                merged[slots] = _concat(k, merged[:0], v[n_app:])
            self.inputs[k] = merged
            self.dtypes[k] = inputs.tensors[k].dtype
        new_tasks = torch.full((len(take),), task_index, dtype=torch.int32)
        self.task_index = torch.cat([self.task_index, new_tasks[:n_app]])
        if slots.numel():
            self.task_index[slots] = new_tasks[n_app:]
        self._add_targets(None if target_of is None or not len(take) else target_of(take), before, n_app, slots)

    def _add_targets(self, new: torch.Tensor | None, before: int, n_app: int, slots: torch.Tensor) -> None:
        """Place the added inputs' targets (None: they have none) as `add` placed the inputs: the first `n_app`
        appended after the `before` held ones, the rest into `slots`."""
        if new is None and self.targets is None:
            return
        dim = (new if new is not None else self.targets).shape[1]  # type: ignore[union-attr]
        if new is not None and self.targets is not None and self.targets.shape[1] != dim:
            raise InvalidInput(f"the reservoir holds targets of {self.targets.shape[1]} features, this step's model "
                               f"gives {dim}: the lineage's base has changed", param="params.replay_targets")
        count = n_app + slots.numel()
        old = self.targets if self.targets is not None else torch.full((before, dim), float("nan"), dtype=torch.float16)
        new = _compact(new.float().cpu()) if new is not None else torch.full((count, dim), float("nan"),
                                                                              dtype=torch.float16)
        targets = _concat("targets", old, new[:n_app])
        if slots.numel():
            targets[slots] = new[n_app:].to(targets.dtype)
        self.targets = targets

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) for MethodState."""
        tensors = {INPUT_PREFIX + k: v.contiguous() for k, v in self.inputs.items()}
        tensors[TASK_INDEX_KEY] = self.task_index.contiguous()
        if self.targets is not None:
            tensors[TARGETS_KEY] = self.targets.contiguous()
        meta = {"seen": self.seen, "dtypes": {k: str(v) for k, v in self.dtypes.items()}}
        return tensors, meta
