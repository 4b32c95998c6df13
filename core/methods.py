"""The fusion methods: one registry entry each (its params model, whether it needs data, where its engine code is).

Torch-free: the spec validates params with these models, the API documents them, and the engine imports the entry's
class on first use. Adding a method is one engine module plus one params model and one entry here (see
docs/architecture.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import InvalidInput
from core.names import check_device

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default "5GB"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: object) -> int:
    """Bytes from an int or a "5GB" / "500MB" / "2GiB" string (decimal units as transformers reads them)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like '5GB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)) \
            and m.group(2).upper() in _SIZE_UNITS:
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    else:
        raise ValueError(f"{value!r} is not a size: give bytes or a string like '5GB', '500MB', '2GiB'")
    if size < 1:
        raise ValueError("the maximum shard size must be at least 1 byte")
    return size


class CommonParams(BaseModel):
    """Every method's params; unknown keys are errors, not ignored, and no value is coerced ("10" is no integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seed: int = Field(0, ge=0, le=2**31 - 1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str | None = Field(None, description="overrides MERGELINE_DEVICE: auto, cpu, cuda, cuda:N")
    head_steps: int = Field(100, ge=1, le=100_000, description="Adam steps of head tuning (tasks with head_data)")
    head_lr: float = Field(0.01, gt=0.0, le=10.0, description="learning rate of head tuning")
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the version's merged weights (arithmetic is float32); default: the base's")
    max_shard_size: int = Field(DEFAULT_MAX_SHARD_BYTES, description="bytes, or a string like '5GB': a bigger "
                                "version is sharded with model.safetensors.index.json")

    _device = field_validator("device")(classmethod(lambda cls, v: check_device(v)))
    _size = field_validator("max_shard_size", mode="before")(classmethod(lambda cls, v: parse_size(v)))


class OTMFParams(CommonParams):
    """lr and blur differ from the paper's (0.01, 0.05): with those, the masks move too little in 100 steps and OTMF
    fell to a moving average of the task vectors. α 0.7 (paper 0.8) was best with a strong base and small task
    vectors; far-moved fine-tunes of a weak base want α 0.5 (docs/benchmarks.md has both measurements).
    docs/otmf.md lists every way the method departs from the paper."""

    DEFAULT_STEPS: ClassVar[int] = 100

    ALPHA_CANDIDATES: ClassVar[tuple[float, ...]] = (0.5, 0.6, 0.7, 0.8, 0.9)

    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] | Literal["auto"] = Field(
        0.7, description="weight of the previous head's masked task vector; \"auto\": chosen per step, without "
                         "labels, as the candidate (0.5 to 0.9) whose α-blend has the lowest held-out Sinkhorn loss "
                         "against both teachers (an extension of the paper)")
    composition: Literal["convex", "additive"] | None = Field(
        None, description="how the masked task vectors make θ_M. convex: θ0 + α·M_pre⊙τ_pre + "
                          "(1 − α)·M_post⊙τ_post (the paper's); additive: θ0 + M_pre⊙τ_pre + λ·M_post⊙τ_post, task "
                          "arithmetic's sum at all-ones masks, the first task's version θ0 + λ·τ_1 (an extension). "
                          "Default: additive, unless `alpha` (the convex blend's weight) is given")
    scaling_factor: float = Field(0.3, gt=0.0, le=10.0, description="λ of the additive composition")
    steps: int | None = Field(None, ge=1, le=100_000, description="mask-training iterations (100 unless `epochs` "
                              "is given), alternating M_pre and M_post")
    epochs: int | None = Field(None, ge=1, le=10_000, description="instead of `steps`: passes over the task's "
                               "calibration inputs (the paper trains 100 epochs); a pass takes each training batch "
                               "of D_t once, with as many D_pre batches")
    mask_bound: Literal["none", "clamp", "sigmoid"] = Field(
        "none", description="none: real-valued masks; clamp: kept in [0, 1] after every update; sigmoid: "
                            "sigmoid of a learnt logit (masks that select components, as the paper describes them)")
    mask_update: Literal["alternate", "joint"] = Field(
        "joint", description="alternate: the paper's scheme, M_pre on D_pre against the head and M_post on D_t "
                                 "against θ_t on alternate iterations; joint: both masks every iteration on the sum "
                                 "of both losses, the objective the held-out check scores")
    mask_granularity: Literal["element", "row", "tensor"] = Field(
        "element", description="one learnable mask value per weight (the paper's), per output row of every 2-D "
                               "weight (and per tensor otherwise), or per tensor: less memory")
    lr: float | None = Field(None, gt=0.0, le=10.0, description="the masks' learning rate. Default: 0.03 with the "
                             "additive composition without replay, 0.1 otherwise")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the masks' learning rate over a step's iterations: constant (the paper's), or "
                                "decayed from `lr` to 0 along a cosine (an extension)")
    batch_size: int | None = Field(None, ge=2, le=4096, description="inputs per side of an iteration, and the "
                                   "held-out batch's size. Default: 32 with replay, 16 without")
    forward_chunk: int | None = Field(
        None, ge=1, le=4096, description="inputs per forward+backward pass when fewer than `batch_size`: the "
                                         "batch's features are computed first without a graph, then each chunk runs "
                                         "forward and backward on its share of the loss's gradient (the activation "
                                         "memory of one chunk, for one more forward per batch)")
    blur: float = Field(0.01, gt=0.0, le=10.0, description="entropic regularisation on normalised features")
    head_alignment: float = Field(
        0.0, ge=0.0, le=100.0, description="weight of a label-free term beside the Sinkhorn loss: the KL divergence "
                                           "from each teacher's class distribution to θ_M's through the tasks' heads "
                                           "(the new task's head on D_t, the lineage's earlier heads on D_pre); 0: "
                                           "features only (the paper's). An extension; every task needs its `head`")
    replay_heads: Literal["all", "own"] = Field(
        "all", description="with `head_alignment` and replay, the heads the term reads on replayed inputs: all: "
                           "every earlier task's head on every input; own: each input through its own task's head "
                           "only (an extension; the reservoir records each input's task)")
    pre_data: Literal["current", "reservoir"] = "reservoir"
    replay_targets: Literal["head", "task", "fine_tune"] = Field(
        "task", description="what replayed inputs (`pre_data: reservoir`) are matched against. task: the features "
                            "their own task's head reads, stored in the reservoir beside them (one float16 feature "
                            "vector per input): the fine-tune's, or the merged tower's of the step that merged the "
                            "task when the job re-fits that head on it (`head_data`), so earlier tasks stay "
                            "anchored to what their heads expect instead of to the merged versions that followed "
                            "(an extension; inputs stored without one fall back to the head's); fine_tune: always "
                            "the fine-tune's features; head: the lineage head's features of them")
    reservoir_per_task: int = Field(128, ge=1, le=100_000, description="calibration inputs of each task stored "
                                    "for replay (reservoir-sampled)")
    reservoir_size: int = Field(1024, ge=1, le=1_000_000, description="stored inputs in all; when full, new tasks' "
                                "inputs replace random earlier ones")
    eval_every: int = Field(10, ge=1, le=100_000, description="iterations between held-out checks of the masks")

    @model_validator(mode="after")
    def _mode_defaults(self) -> OTMFParams:
        """Chosen on the validation split (docs/otmf.md). The additive composition: without replay, at lr 0.03, it led
        the paper's convex blend by 3 to 3.6 points on two image suite builds; with replay against stored task
        features, at lr 0.1, by 1.5. A given `alpha` is the convex blend's weight: it keeps that blend. Batches of
        32 with replay: with 1024 stored inputs they led batches of 16 by 1.2 points."""
        if self.composition is None:
            self.composition = "convex" if "alpha" in self.model_fields_set else "additive"
        if self.lr is None:
            self.lr = 0.03 if self.pre_data == "current" and self.composition == "additive" else 0.1
        if self.batch_size is None:
            self.batch_size = 32 if self.pre_data == "reservoir" else 16
        return self

    @model_validator(mode="after")
    def _one_length(self) -> OTMFParams:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give `steps` or `epochs`, not both: exactly one of them sets how long the masks train")
        if self.composition == "additive" and self.alpha == "auto":
            raise ValueError("`alpha: auto` chooses a convex blend; the additive composition has no α")
        # The default ("task") is in every manifest's params, which a rebuild validates again: only another choice
        # that stores targets is an error without replay.
        if self.pre_data != "reservoir" and self.replay_targets == "fine_tune":
            raise ValueError(f"`replay_targets: {self.replay_targets}` stores targets beside replayed inputs: it "
                             "needs `pre_data: reservoir`")
        if self.replay_heads == "own" and (self.pre_data != "reservoir" or self.head_alignment == 0):
            raise ValueError("`replay_heads: own` picks each replayed input's head: it needs `pre_data: reservoir` "
                             "and `head_alignment` > 0")
        return self

    @property
    def stores_targets(self) -> bool:
        """Whether replayed inputs keep their own targets in the reservoir instead of reading the lineage head's."""
        return self.replay_targets != "head"

    def scales(self, alpha: float) -> tuple[float, float]:
        """What τ_pre and τ_post are multiplied by, besides their masks, at `alpha`."""
        return (1.0, self.scaling_factor) if self.composition == "additive" else (alpha, 1.0 - alpha)


class TaskArithmeticParams(CommonParams):
    scaling_factor: float = Field(0.3, gt=0.0, le=10.0)


class TiesParams(CommonParams):
    scaling_factor: float = Field(0.3, gt=0.0, le=10.0)
    top_k: float = Field(20.0, gt=0.0, le=100.0, description="percent of each task vector's magnitudes kept")


class OPCMParams(CommonParams):
    alpha: float = Field(0.5, gt=0.0, lt=1.0, description="share of the spectrum treated as the merged subspace")


class WeightAverageParams(CommonParams):
    pass


@dataclass(frozen=True)
class MethodEntry:
    params: type[CommonParams]
    engine: str  # "module:Class" of the engine's implementation
    data_driven: bool = False  # needs calibration inputs and a family with a feature function


METHODS: dict[str, MethodEntry] = {
    "otmf": MethodEntry(OTMFParams, "engine.methods.otmf:OTMF", data_driven=True),
    "task_arithmetic": MethodEntry(TaskArithmeticParams, "engine.methods.task_arithmetic:TaskArithmetic"),
    "ties": MethodEntry(TiesParams, "engine.methods.ties:Ties"),
    "opcm": MethodEntry(OPCMParams, "engine.methods.opcm:OPCM"),
    "weight_average": MethodEntry(WeightAverageParams, "engine.methods.weight_average:WeightAverage"),
}


def method_entry(name: str) -> MethodEntry:
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidInput(f"unknown method {name!r}; choose one of {', '.join(METHODS)}", param="method") from None
