"""The job spec (contract §2) as pydantic models; each method's params model is its entry in core.methods.

Torch-free on purpose: the API validates a spec at submission and the engine runs the same object.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from core.errors import BadRequest, InvalidInput
from core.families import FAMILIES, FamilyName
from core.hub import SCHEME as HF_SCHEME
from core.hub import parse_hf_uri
from core.methods import METHODS, CommonParams
from core.names import LINEAGE_PATTERN, TASK_PATTERN

URI_SCHEMES = ("file://", "s3://", "http://", "https://", HF_SCHEME)
MAX_BODY_DEPTH = 32  # a job spec nests about 6 levels deep; an inline arch a few more
MAX_ARCH_DEPTH = 8
MAX_ARCH_BYTES = 64 * 1024
LINEAGE_URI = re.compile(r"lineage://([a-z0-9][a-z0-9._-]{0,62})@([0-9]{1,9})", re.ASCII)
METADATA_KEY = re.compile(r"[a-z0-9_.-]{1,64}", re.ASCII)
MAX_METADATA_KEYS = 16
MAX_METADATA_VALUE = 512
WEBHOOK_EVENTS = ("job.succeeded", "job.failed", "job.cancelled", "job.running")
DEFAULT_WEBHOOK_EVENTS = WEBHOOK_EVENTS[:3]
WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled", "job.running"]


class Strict(BaseModel):
    """Unknown keys are errors, and no value is coerced into another type ("10" or true is not an integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def json_depth(value: Any) -> int:
    """How deeply a decoded JSON value nests (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            stack += [(v, depth) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def parse_body(raw: bytes) -> Any:
    """A request body as JSON, refused (BadRequest) when malformed or nested deeper than any job spec is."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        body = None
    if body is None or json_depth(body) > MAX_BODY_DEPTH:
        raise BadRequest(f"the request body nests deeper than {MAX_BODY_DEPTH} levels")
    return body


def _check_arch(v: Any) -> Any:
    """Inline configs are bounded before anything builds a model from them."""
    if isinstance(v, dict):
        if json_depth(v) > MAX_ARCH_DEPTH:
            raise ValueError(f"an inline config nests at most {MAX_ARCH_DEPTH} levels deep")
        if len(json.dumps(v)) > MAX_ARCH_BYTES:
            raise ValueError(f"an inline config is at most {MAX_ARCH_BYTES} bytes of JSON")
    return v


def parse_lineage_uri(uri: str) -> tuple[str, int] | None:
    """`lineage://NAME@K` as (NAME, K); None for any other URI."""
    match = LINEAGE_URI.fullmatch(uri)
    return (match[1], int(match[2])) if match else None


def webhook_key(secret: str) -> bytes:
    """The signing key (Standard Webhooks): `whsec_<base64>` is the decoded key, any other secret its UTF-8 bytes."""
    if not secret.startswith("whsec_"):
        return secret.encode()
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    if not key:
        raise ValueError("a whsec_ secret needs a key after the prefix")
    return key


def _check_uri(v: str | None, *, lineage_ok: bool = False) -> str | None:
    if v is None:
        return v
    if lineage_ok and v.startswith("lineage://"):
        if parse_lineage_uri(v) is None:
            raise ValueError(f"bad lineage URI {v!r}: use lineage://NAME@VERSION")
        return v
    if not v.startswith(URI_SCHEMES):
        raise ValueError(f"unsupported URI {v!r}: use file://, s3://, http(s):// or hf://"
                         + (", or lineage://NAME@VERSION" if lineage_ok else ""))
    if v.startswith("s3://") and len(v[5:].split("/", 1)) < 2:
        raise ValueError(f"s3 URI {v!r} needs a bucket and a key")
    if v.startswith(HF_SCHEME):
        parse_hf_uri(v)
    return v


Uri = Annotated[str, Field(min_length=8, max_length=4096)]


# --- the spec ------------------------------------------------------------------------------------------------
class BaseModelSpec(Strict):
    family: FamilyName
    arch: str | dict[str, Any] | None = None
    uri: Uri

    _uri = field_validator("uri")(classmethod(lambda cls, v: _check_uri(v, lineage_ok=True)))
    _arch_bounds = field_validator("arch")(classmethod(lambda cls, v: _check_arch(v)))

    @model_validator(mode="after")
    def _arch(self) -> BaseModelSpec:
        if FAMILIES[self.family].needs_arch:
            if self.arch is None:
                raise ValueError(f"{self.family} needs `arch`: a registered model name or an inline model config")
            if isinstance(self.arch, dict) and not {"embed_dim", "vision_cfg"} <= self.arch.keys():
                raise ValueError("an inline open_clip config needs `embed_dim` and `vision_cfg`")
        elif self.arch is not None:
            raise ValueError(f"`arch` is not used by the {self.family} family: leave it out")
        return self

    def identity(self) -> dict[str, Any]:
        """What must match between a lineage's base and a later job's base."""
        return {"family": self.family, "arch": self.arch, "uri": self.uri}


class TaskSpec(Strict):
    name: str = Field(pattern=TASK_PATTERN)
    checkpoint: Uri
    calibration: Uri | None = None
    eval: Uri | None = None
    head: Uri | None = None
    head_data: Uri | None = Field(None, description="labelled inputs to re-fit `head` on the merged tower")
    replace: bool = False

    URI_FIELDS: ClassVar[tuple[str, ...]] = ("checkpoint", "calibration", "eval", "head", "head_data")
    _uris = field_validator(*URI_FIELDS[1:])(
        classmethod(lambda cls, v: _check_uri(v))
    )
    _checkpoint = field_validator("checkpoint")(classmethod(lambda cls, v: _check_uri(v, lineage_ok=True)))

    @model_validator(mode="after")
    def _eval_needs_head(self) -> TaskSpec:
        if (self.eval is None) != (self.head is None):
            raise ValueError("`eval` and `head` go together: accuracy needs both the labelled set and the head")
        if self.head_data is not None and self.head is None:
            raise ValueError("`head_data` tunes the task's `head`: give `head` and `eval` with it")
        return self


class WebhookSpec(Strict):
    url: str = Field(pattern=r"^https?://", max_length=2048)
    secret: str = Field(min_length=1, max_length=512, description="`whsec_<base64>` or any string (its UTF-8 bytes)")
    events: list[WebhookEvent] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS), min_length=1,
                                       max_length=len(WEBHOOK_EVENTS))

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: str) -> str:
        webhook_key(v)
        return v

    @field_validator("events")
    @classmethod
    def _events(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("events must not repeat")
        return v


def _check_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is None:
        return v
    if len(v) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys")
    for key, value in v.items():
        if not METADATA_KEY.fullmatch(key):
            raise _FieldError(f"metadata.{key}", "metadata keys match ^[a-z0-9_.-]{1,64}$")
        if len(value) > MAX_METADATA_VALUE:
            raise _FieldError(f"metadata.{key}", f"metadata values are at most {MAX_METADATA_VALUE} characters")
    return v


class JobSpec(Strict):
    lineage: str = Field(pattern=LINEAGE_PATTERN)
    base: BaseModelSpec | None = None
    tasks: list[TaskSpec] = Field(min_length=1, max_length=64)
    method: str = "otmf"
    # Validated once, into the method's own params model (the schema shows a JSON object of that method's params).
    params: Annotated[SerializeAsAny[CommonParams], WithJsonSchema({"type": "object", "additionalProperties": True,
                                                                    "title": "Params"})] = Field(
        default_factory=CommonParams)
    parent_version: int | None = Field(None, ge=0)
    webhook: WebhookSpec | None = None
    metadata: dict[str, str] | None = Field(None, description="at most 16 keys (^[a-z0-9_.-]{1,64}$), values at "
                                            "most 512 characters; returned in the Job and the manifest")

    _metadata = field_validator("metadata")(classmethod(lambda cls, v: _check_metadata(v)))

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(METHODS)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _typed_params(cls, data: Any) -> Any:
        """Params become the method's own model here, once (unknown keys are errors, not ignored)."""
        if not isinstance(data, dict):
            return data
        method, params = data.get("method", "otmf"), data.get("params", {})
        if not isinstance(method, str) or method not in METHODS or not isinstance(params, dict):
            return data  # the field validators report it
        entry = METHODS[method]
        try:
            return {**data, "params": entry.params.model_validate(params)}
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(["params", *map(str, first["loc"])])
            unknown = first["type"] == "extra_forbidden"
            message = f"unknown parameter for method {method}" if unknown else first["msg"]
            raise _FieldError(field, message) from None

    @model_validator(mode="after")
    def _rules(self) -> JobSpec:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique within a job: {', '.join(dupes)}")
        if METHODS[self.method].data_driven:
            if self.base is not None and not FAMILIES[self.base.family].has_features:
                raise ValueError(f"{self.method} needs a feature function; the {self.base.family} family has none")
            for i, task in enumerate(self.tasks):
                if task.calibration is None:
                    raise _FieldError(f"tasks.{i}.calibration", f"{self.method} needs calibration data")
        if getattr(self.params, "head_alignment", 0.0) > 0:
            for i, task in enumerate(self.tasks):
                if task.head is None:
                    raise _FieldError(f"tasks.{i}.head", "head_alignment aligns through each task's head: give "
                                                         "the task's `head` and `eval`")
        return self


    def input_uris(self) -> list[tuple[str, str]]:
        """Every URI the job reads, with its field: ("base.uri", ...), ("tasks.0.checkpoint", ...), ..."""
        found = [("base.uri", self.base.uri)] if self.base else []
        for i, task in enumerate(self.tasks):
            found += [(f"tasks.{i}.{kind}", uri) for kind in TaskSpec.URI_FIELDS if (uri := getattr(task, kind))]
        return found


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
