"""LoRA adapters (PEFT folders: `adapter_config.json` + `adapter_model.safetensors`) as task checkpoints.

An adapter stands for the task weights θ_t = θ0 + scaling·B@A on each module it targets (transposed for
`fan_in_fan_out` layers and for embeddings, as PEFT does), the adapter's own tensors for its `modules_to_save` (and
for base layers it saved, as PEFT does for adapted embeddings), and θ0 everywhere else. scaling is lora_alpha / r,
or lora_alpha / √r with `use_rslora`, per module where `rank_pattern` / `alpha_pattern` name it. So every method
merges an adapter as it would merge `merge_and_unload()`'s model, without that model ever being written.

`LoraAdapter.task_tensor(key, base_tensor)` gives θ_t one tensor at a time from θ0's tensor, so a caller may hold the
whole tower or stream it: `task_tower` is a lazy mapping that computes each tensor (or block of rows) when read.
Variants whose task weights are not scaling·B@A (DoRA, LoRA biases, layer replication, trainable tokens, ...) and
other PEFT types are refused with a typed error rather than merged wrongly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import IncompatibleCheckpoint, InvalidInput
from engine.tensorfiles import read_rows, shape_of
from engine.tensors import check_finite, load_state_dict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper around the model the adapter was trained on
# Options whose task weights are not scaling·B@A on a module's weight.
UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
               "alora_invocation_tokens")
FACTOR_SUFFIXES = {  # key suffix -> (factor, layer kind)
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}

Tensors = dict[str, torch.Tensor]
# A name in the adapter's model (e.g. "model.layers.0.self_attn.q_proj.weight") -> the base's tower key, or None.
KeyResolver = Callable[[str], str | None]
# Every parameter name an adapter changes -> its KeyResolver.
ResolverFor = Callable[[list[str]], KeyResolver]


class LoraConfig(BaseModel):
    """The fields of PEFT's LoraConfig that decide the task weights; the others (dropout, init, ...) do not."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str
    r: int = Field(gt=0)
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def scaling(self, module: str) -> tuple[int, float]:
        """(rank, scaling) of one module, named as in the adapter's model."""
        rank = self.rank_pattern[key] if (key := _pattern_key(self.rank_pattern, module)) else self.r
        alpha = self.alpha_pattern[key] if (key := _pattern_key(self.alpha_pattern, module)) else self.lora_alpha
        return rank, alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    """The first pattern that names `module` (in full, or as its trailing dotted part), as PEFT matches them."""
    for pattern in patterns:
        if pattern == module or re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None


@dataclass
class LoraFactors:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    transpose: bool  # fan_in_fan_out layers and embeddings store the weight as (B @ A)ᵀ

    def delta(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """scaling·B@A (transposed where stored so), or only its rows [first, stop): a streamed merge reads a
        big weight in row blocks and never forms its whole delta."""
        a, b = self.a.to(torch.float32), self.b.to(torch.float32)
        if rows is None:
            product = b @ a
            return (product.T if self.transpose else product) * self.scaling
        first, stop = rows
        return ((b @ a[:, first:stop]).T if self.transpose else b[first:stop] @ a) * self.scaling


@dataclass
class LoraAdapter:
    """The task weights an adapter stands for, keyed like the base's tower."""

    # Per tower key; a tied weight adapted under both its names (embeddings and lm_head) gets both deltas.
    factors: dict[str, list[LoraFactors]] = field(default_factory=dict)
    replaced: Tensors = field(default_factory=dict)  # modules_to_save: the adapter's own tensors

    def task_tensor(self, key: str, base_tensor: torch.Tensor | None,
                    rows: tuple[int, int] | None = None) -> torch.Tensor:
        """θ_t[key] in float32 from θ0[key] (None where the adapter replaces the tensor); θ0's own tensor (not a
        copy) where the adapter leaves it. With `rows`, only rows [first, stop) of it, from those rows of θ0."""
        if key in self.replaced:
            out = self.replaced[key] if rows is None else self.replaced[key][rows[0] : rows[1]]
        else:
            out = base_tensor
        out = out.to(torch.float32)
        for factors in self.factors.get(key, ()):
            out = out + factors.delta(rows)
        return out

    def task_tower(self, base_tower: Mapping[str, torch.Tensor]) -> AdapterTower:
        """θ_t keyed like `base_tower`, computed tensor by tensor as it is read (θ0 may be lazy: it stays so)."""
        return AdapterTower(self, base_tower)


class AdapterTower(Mapping[str, torch.Tensor]):
    """An adapter's task weights, computed on each access from θ0's tensor (or from only the rows a streamed merge
    asks for, `rows`): nothing is held beyond the adapter's factors, so a lazy θ0 is never read as a whole."""

    def __init__(self, adapter: LoraAdapter, base: Mapping[str, torch.Tensor]):
        self.adapter, self.base = adapter, base

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.adapter.task_tensor(key, None if key in self.adapter.replaced else self.base[key])

    def rows(self, key: str, first: int, stop: int) -> torch.Tensor:
        base = None if key in self.adapter.replaced else read_rows(self.base, key, first, stop)
        return self.adapter.task_tensor(key, base, rows=(first, stop))

    def shape_of(self, key: str) -> tuple[int, ...]:
        return shape_of(self.base, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def is_adapter(path: Path) -> bool:
    """A PEFT adapter folder (it has `adapter_config.json`)."""
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def by_name_only(resolve: KeyResolver) -> ResolverFor:
    """For a family whose resolver looks at each name alone, not at the rest of the adapter's names."""
    return lambda _names: resolve


def read_adapter(folder: Path, shapes: Mapping[str, torch.Size], resolver_for: ResolverFor, *,
                 field: str) -> LoraAdapter:
    """The adapter in `folder`, checked against the base: `shapes` are the tower's, `resolver_for(names)` gives
    the function that maps the adapter's parameter names onto tower keys, knowing every name the adapter changes
    (a family may tell its layouts apart by them). InvalidInput for a malformed or unsupported adapter,
    IncompatibleCheckpoint for one trained on another base (a module or a shape the base does not have)."""
    folder = Path(folder)
    config = _read_config(folder, field)
    entries = [(*_split_name(name, field), tensor) for name, tensor in _read_tensors(folder, field).items()]
    resolve = resolver_for([f"{target}.weight" if factor else target for target, factor, _, _ in entries])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapter = LoraAdapter()
    for target, factor, kind, tensor in entries:
        if factor is not None:
            pairs.setdefault(target, {"kind": kind})[factor] = tensor
        else:  # a saved base layer (PEFT saves embeddings it adapts) or a module to save replaces θ0's tensor
            adapter.replaced[_tower_key(target, shapes, resolve, tuple(tensor.shape), field)] = tensor
    for module, pair in pairs.items():
        if "A" not in pair or "B" not in pair:
            raise InvalidInput(f"{field}: adapter module {module!r} lacks lora_A or lora_B", param=field)
        key, factors = _factors(module, pair, config, shapes, resolve, field)
        adapter.factors.setdefault(key, []).append(factors)
    if not adapter.factors and not adapter.replaced:
        raise InvalidInput(f"{field}: the adapter holds no LoRA weights", param=field)
    return adapter


def _split_name(name: str, field: str) -> tuple[str, str | None, str | None]:
    """An adapter tensor's name as (what it changes in the adapted model, its LoRA factor, the layer kind): a module
    for a factor, a parameter (factor and kind None) for a saved tensor."""
    if not name.startswith(PEFT_PREFIX):
        raise InvalidInput(f"{field}: adapter tensor {name!r} is not under {PEFT_PREFIX!r}", param=field)
    name = name[len(PEFT_PREFIX) :]
    suffix = next((s for s in FACTOR_SUFFIXES if name.endswith(s)), None)
    if suffix is not None:
        return name[: -len(suffix)], *FACTOR_SUFFIXES[suffix]
    if ".lora_" in name:  # lora_magnitude_vector (DoRA), lora_A.bias, ... would be merged wrongly
        raise InvalidInput(f"{field}: adapter tensor {name!r} is not a plain LoRA factor", param=field)
    return name.replace(".base_layer.", "."), None, None


def _factors(module: str, pair: dict, config: LoraConfig, shapes: Mapping[str, torch.Size], resolve: KeyResolver,
             field: str) -> tuple[str, LoraFactors]:
    a, b = pair["A"], pair["B"]
    rank, scaling = config.scaling(module)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise InvalidInput(
            f"{field}: adapter module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
            f"2-D factors of rank {rank} are needed (convolution LoRA is not supported)",
            param=field,
        )
    transpose = pair["kind"] == "embedding" or config.fan_in_fan_out
    shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
    return _tower_key(f"{module}.weight", shapes, resolve, shape, field), LoraFactors(a, b, scaling, transpose)


def _tower_key(name: str, shapes: Mapping[str, torch.Size], resolve: KeyResolver, shape: tuple[int, ...],
               field: str) -> str:
    key = resolve(name)
    if key is None:
        raise IncompatibleCheckpoint(
            f"{field}: the adapter changes {name!r}, which the base does not have among the weights it merges",
            param=field)
    if tuple(shapes[key]) != tuple(shape):
        raise IncompatibleCheckpoint(
            f"{field}: the adapter changes {name!r} as shape {list(shape)}, the base's is {list(shapes[key])}",
            param=field,
        )
    return key


def _read_config(folder: Path, field: str) -> LoraConfig:
    try:
        raw = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{field}: {ADAPTER_CONFIG} is not readable JSON ({exc})", param=field) from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"{field}: {ADAPTER_CONFIG} must be a JSON object", param=field)
    if raw.get("peft_type") != "LORA":
        raise InvalidInput(f"{field}: adapter type {raw.get('peft_type')!r} is not supported; only LoRA adapters "
                           "(peft_type LORA) are", param=field)
    try:
        config = LoraConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise InvalidInput(f"{field}: {ADAPTER_CONFIG}: {where}: {first['msg']}", param=field) from None
    unsupported = [name for name in UNSUPPORTED if raw.get(name)]
    if unsupported:
        raise InvalidInput(f"{field}: LoRA adapters with {', '.join(unsupported)} are not supported", param=field)
    return config


def _read_tensors(folder: Path, field: str) -> Tensors:
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            tensors = load_state_dict(folder / name, field=field)
            check_finite(tensors, field=field)
            return tensors
    raise InvalidInput(f"{field}: the adapter folder has no {' or '.join(ADAPTER_WEIGHTS)}", param=field)
