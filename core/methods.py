"""The fusion methods: one registry entry each (its params model, whether it needs data, where its engine code is).

Torch-free: the spec validates params with these models, the API documents them, and the engine imports the entry's
class on first use. Adding a method is one engine module plus one params model and one entry here (see
docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import InvalidInput
from core.names import check_device


class CommonParams(BaseModel):
    """Every method's params; unknown keys are errors, not ignored, and no value is coerced ("10" is no integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seed: int = Field(0, ge=0, le=2**31 - 1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str | None = Field(None, description="overrides MERGELINE_DEVICE: auto, cpu, cuda, cuda:N")
    head_steps: int = Field(100, ge=1, le=100_000, description="Adam steps of head tuning (tasks with head_data)")
    head_lr: float = Field(0.01, gt=0.0, le=10.0, description="learning rate of head tuning")

    _device = field_validator("device")(classmethod(lambda cls, v: check_device(v)))


class OTMFParams(CommonParams):
    """lr and blur differ from the paper's (0.01, 0.05): with those, the masks move too little in 100 steps and OTMF
    fell to a moving average of the task vectors. α 0.7 (paper 0.8) was best with a strong base and small task
    vectors; far-moved fine-tunes of a weak base want α 0.5 (docs/benchmarks.md has both measurements)."""

    alpha: float = Field(0.7, gt=0.0, lt=1.0, description="weight of the previous head's masked task vector")
    steps: int = Field(100, ge=1, le=100_000)
    lr: float = Field(0.1, gt=0.0, le=10.0)
    batch_size: int = Field(16, ge=2, le=4096)
    blur: float = Field(0.01, gt=0.0, le=10.0, description="entropic regularisation on normalised features")
    pre_data: Literal["current", "reservoir"] = "reservoir"
    reservoir_per_task: int = Field(64, ge=1, le=100_000)
    reservoir_size: int = Field(512, ge=1, le=1_000_000)
    eval_every: int = Field(10, ge=1, le=100_000, description="iterations between held-out checks of the masks")


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
