"""The job spec (contract §2) and every method's parameters, as pydantic models.

Torch-free on purpose: the API validates a spec at submission and the engine runs the same object.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.errors import InvalidInput

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
URI_SCHEMES = ("file://", "s3://", "http://", "https://")

Family = Literal["open_clip", "hf", "state_dict"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_uri(v: str | None) -> str | None:
    if v is None:
        return v
    if not v.startswith(URI_SCHEMES):
        raise ValueError(f"unsupported URI {v!r}: use file://, s3:// or http(s)://")
    if v.startswith("s3://") and len(v[5:].split("/", 1)) < 2:
        raise ValueError(f"s3 URI {v!r} needs a bucket and a key")
    return v


Uri = Annotated[str, Field(min_length=8, max_length=4096)]


# --- method parameters ---------------------------------------------------------------------------------------
class CommonParams(Strict):
    seed: int = Field(0, ge=0, le=2**31 - 1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str | None = Field(None, description="overrides MERGELINE_DEVICE: auto, cpu, cuda, cuda:N")
    head_steps: int = Field(100, ge=1, le=100_000, description="Adam steps of head tuning (tasks with head_data)")
    head_lr: float = Field(0.01, gt=0.0, le=10.0, description="learning rate of head tuning")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is None or v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")


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


METHOD_PARAMS: dict[str, type[CommonParams]] = {
    "otmf": OTMFParams,
    "task_arithmetic": TaskArithmeticParams,
    "ties": TiesParams,
    "opcm": OPCMParams,
    "weight_average": WeightAverageParams,
}
DATA_DRIVEN_METHODS = frozenset({"otmf"})


# --- the spec ------------------------------------------------------------------------------------------------
class BaseModelSpec(Strict):
    family: Family
    arch: str | dict[str, Any] | None = None
    uri: Uri

    _uri = field_validator("uri")(classmethod(lambda cls, v: _check_uri(v)))

    @model_validator(mode="after")
    def _arch(self) -> BaseModelSpec:
        if self.family == "open_clip":
            if self.arch is None:
                raise ValueError("open_clip needs `arch`: a registered model name or an inline model config")
            if isinstance(self.arch, dict) and not {"embed_dim", "vision_cfg"} <= self.arch.keys():
                raise ValueError("an inline open_clip config needs `embed_dim` and `vision_cfg`")
        elif self.arch is not None:
            raise ValueError(f"`arch` is not used by the {self.family} family: leave it out")
        return self

    def identity(self) -> dict[str, Any]:
        """What must match between a lineage's base and a later job's base."""
        return {"family": self.family, "arch": self.arch, "uri": self.uri}


class TaskSpec(Strict):
    name: str = Field(pattern=TASK_NAME_PATTERN)
    checkpoint: Uri
    calibration: Uri | None = None
    eval: Uri | None = None
    head: Uri | None = None
    head_data: Uri | None = Field(None, description="labelled inputs to re-fit `head` on the merged tower")
    replace: bool = False

    _uris = field_validator("checkpoint", "calibration", "eval", "head", "head_data")(
        classmethod(lambda cls, v: _check_uri(v))
    )

    @model_validator(mode="after")
    def _eval_needs_head(self) -> TaskSpec:
        if (self.eval is None) != (self.head is None):
            raise ValueError("`eval` and `head` go together: accuracy needs both the labelled set and the head")
        if self.head_data is not None and self.head is None:
            raise ValueError("`head_data` tunes the task's `head`: give `head` and `eval` with it")
        return self


class WebhookSpec(Strict):
    url: str = Field(pattern=r"^https?://", max_length=2048)
    secret: str = Field(min_length=1, max_length=512)


class JobSpec(Strict):
    lineage: str = Field(pattern=NAME_PATTERN)
    base: BaseModelSpec | None = None
    tasks: list[TaskSpec] = Field(min_length=1, max_length=64)
    method: str = "otmf"
    params: dict[str, Any] = Field(default_factory=dict)
    parent_version: int | None = Field(None, ge=0)
    webhook: WebhookSpec | None = None

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHOD_PARAMS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(METHOD_PARAMS)}")
        return v

    @model_validator(mode="after")
    def _rules(self) -> JobSpec:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique within a job: {', '.join(dupes)}")
        # Normalise params into the method's validated model (unknown keys are errors, not ignored).
        try:
            self.params = METHOD_PARAMS[self.method].model_validate(self.params).model_dump()
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(["params", *map(str, first["loc"])])
            unknown = first["type"] == "extra_forbidden"
            message = f"unknown parameter for method {self.method}" if unknown else first["msg"]
            raise _FieldError(field, message) from None
        if self.method in DATA_DRIVEN_METHODS:
            if self.base is not None and self.base.family == "state_dict":
                raise ValueError(f"{self.method} needs a feature function; the state_dict family has none")
            for i, task in enumerate(self.tasks):
                if task.calibration is None:
                    raise _FieldError(f"tasks.{i}.calibration", f"{self.method} needs calibration data")
        return self

    def method_params(self) -> CommonParams:
        return METHOD_PARAMS[self.method].model_validate(self.params)


class _FieldError(ValueError):
    """A model-level rule that still names one field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def validation_error(exc: ValidationError) -> InvalidInput:
    """Turn pydantic's error list into one InvalidInput naming the first bad field."""
    first = exc.errors()[0]
    inner = (first.get("ctx") or {}).get("error")
    if isinstance(inner, _FieldError):
        param = inner.param
    else:
        # Union members add their type name to the location ("arch.str"); the user's field is what precedes it.
        param = ".".join(str(p) for p in first["loc"] if p not in ("str", "dict[str,any]", "function-after[_arch()]"))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return InvalidInput(f"{param}: {message}" if param else message, param=param or None)


def parse_job_spec(data: dict | str | bytes) -> JobSpec:
    """Validate a job spec from JSON text or a decoded object; raises InvalidInput naming the field."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"the job spec is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput("the job spec must be a JSON object")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
