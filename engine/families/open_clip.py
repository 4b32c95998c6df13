"""The `open_clip` family: the image tower of an OpenCLIP model is merged; everything else is carried.

Checkpoint layouts accepted (for the base and for task checkpoints alike), detected from the keys:
  - "full":    a whole CLIP state dict (`visual.*` plus text tower, `logit_scale`, ...);
  - "visual.": only the image tower, keys prefixed with `visual.`;
  - "":        only the image tower, keys as in `model.visual.state_dict()`.
A version is written in the base's layout, so that whatever loaded the base loads the version the same way.

Loading a saved version back (tested in tests/test_families.py):
    # base given as a whole CLIP state dict: the folder is a complete OpenCLIP "local-dir" model
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(folder))
    # or, equivalently, from the written config
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.CLIP(**cfg)  # open_clip.CustomTextCLIP when cfg has "custom_text" or an hf text tower
    model.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"))
    # base given as an image tower only: load the tower into a model built from the same config
    model = open_clip.create_model("local-dir:" + str(folder), load_weights=False)
    model.visual.load_state_dict({k.removeprefix("visual."): v for k, v in load_file(...).items()})
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from core.errors import InvalidInput
from core.uris import Fetched
from engine.adapters import KeyResolver, is_adapter, read_adapter
from engine.families.base import Family, LoadedBase, Tensors, VersionPlan
from engine.inputs import Inputs
from engine.tensorfiles import float_dtype, materialize
from engine.tensors import (
    buffers_to,
    check_compatible,
    check_finite,
    labels_tensor,
    load_npz,
    load_state_dict,
    open_state_dict,
)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "open_clip_config.json"
VISUAL = "visual."
FULL = "full"
CONVERT_CHUNK = 256  # images converted at a time, to bound the float32 intermediates of uint8 inputs


def _adapter_key_resolver(base: LoadedBase, names: list[str]) -> KeyResolver:
    """Tower keys of the parameters an adapter names. An adapter of the whole CLIP names the image tower's under
    `visual.`; any other name of such an adapter is the text tower's, which a version does not merge, so it resolves
    to nothing (IncompatibleCheckpoint: a text-tower LoRA would be dropped silently otherwise). An adapter with no
    `visual.` name was trained on the image tower alone and names its keys directly."""
    whole_clip = any(n.startswith(VISUAL) for n in names)

    def resolve(name: str) -> str | None:
        if whole_clip and not name.startswith(VISUAL):
            return None  # the text tower's
        key = name.removeprefix(VISUAL)
        return key if key in base.tower else None

    return resolve


class OpenClipFamily(Family):

    # -- weights ------------------------------------------------------------------------------------------------
    def load_base(self, base: Fetched, arch: str | dict | None) -> LoadedBase:
        field = "base.uri"
        model_cfg, preprocess_overrides = _resolve_arch(arch)
        state = _strip_ddp(_read(base.path, field))
        check_finite(state, field=field)
        # Shapes are checked on a model without storage first: a file that cannot fill the arch never costs
        # the memory of building it.
        module = _build_model(model_cfg, preprocess_overrides, device="meta")
        layout = _check_base(module, state, field)
        if layout == FULL:
            module = _build_model(model_cfg, preprocess_overrides)
            module.load_state_dict(state, strict=True)
        else:
            # An image tower alone: it takes the file's tensors as its own (never a second copy), and the text
            # tower, which nothing uses, stays without storage on the meta device.
            visual = {k: v.float() for k, v in _unprefixed(state, layout).items()}
            module.visual.load_state_dict(visual, strict=True, assign=True)
        module.eval().requires_grad_(False)
        # The tower shares storage with the module's parameters: θ0 is held once. `features` always substitutes
        # the tower it is given, so the module's own parameters are never read after this point.
        tower = {k: p.detach() for k, p in module.visual.named_parameters()}
        prefix = VISUAL if layout == FULL else layout
        carried = {k: v for k, v in state.items() if not (k.startswith(prefix) and k[len(prefix) :] in tower)}
        # Carried tensors that the module now holds in the same dtype are shared with it rather than kept twice.
        held = module.state_dict() if layout == FULL else {prefix + k: v for k, v in module.visual.state_dict().items()}
        carried = {k: held[k] if k in held and held[k].dtype == v.dtype else v for k, v in carried.items()}
        preprocess = open_clip.get_model_preprocess_cfg(module)
        info: dict[str, Any] = {
            "layout": layout,
            "prefix": prefix,
            "model_cfg": model_cfg,
            "preprocess_cfg": _jsonable(preprocess),
            "image_size": _pair(preprocess["size"]),
            "mean": tuple(float(m) for m in preprocess["mean"]),
            "std": tuple(float(s) for s in preprocess["std"]),
        }
        return LoadedBase(tower=tower, carried=carried, module=module, info=info, dtype=float_dtype(state))

    def load_checkpoint(self, checkpoint: Fetched, base: LoadedBase, *, field: str) -> Tensors:
        path = Path(checkpoint.path)
        if is_adapter(path):  # θ_t = θ0 + scaling·B@A on the modules the adapter targets (engine.adapters)
            shapes = {k: tuple(v.shape) for k, v in base.tower.items()}
            resolver_for = partial(_adapter_key_resolver, base)
            return dict(read_adapter(path, shapes, resolver_for, field=field).task_tower(base.tower))
        return self._tower_of(_strip_ddp(_read(path, field)), base, field=field, what="checkpoint")

    def load_version(self, folder: Path, base: LoadedBase) -> Tensors:
        field = f"version {Path(folder).name}"
        return self._tower_of(
            materialize(open_state_dict(Path(folder), field=field)), base, field=field, what=MODEL_FILE
        )

    def _tower_of(self, state: Tensors, base: LoadedBase, *, field: str, what: str) -> Tensors:
        """The image tower of any accepted layout, checked key by key against the base's tower.

        Only the tower matters: the other tensors of a whole-CLIP task checkpoint are not merged, so not checked.
        """
        layout = _layout(state)
        prefix = VISUAL if layout == FULL else layout
        tower_state = _unprefixed(state, prefix)
        module = base.module
        assert module is not None
        expected = _shapes(module.visual.state_dict())
        check_compatible(expected, tower_state, field=field, what=what, shown=prefix)
        tower = {k: tower_state[k] for k in base.tower}
        check_finite(tower, field=field)
        return {k: v.to(torch.float32) for k, v in tower.items()}

    def version_plan(self, base: LoadedBase) -> VersionPlan:
        """`model.safetensors` (or its shards) in the base's layout, carried tensors unchanged, and
        `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}), the file OpenCLIP's `local-dir:` schema reads."""

        def extra(folder: Path, dtype: torch.dtype) -> list[Path]:
            config_path = folder / CONFIG_FILE
            config = {"model_cfg": base.info["model_cfg"], "preprocess_cfg": base.info["preprocess_cfg"]}
            config_path.write_text(json.dumps(config, indent=2))
            return [config_path]

        prefix = base.info["prefix"]
        metadata = {"format": "pt", "family": self.name, "layout": base.info["layout"]}
        return VersionPlan({k: prefix + k for k in base.tower}, base.carried, metadata, extra)

    def linear_weight_keys(self, base: LoadedBase) -> set[str]:
        """Weights of the tower's linear maps: nn.Linear (incl. attention out_proj) and attention in_proj."""
        assert base.module is not None
        keys = set()
        for name, sub in base.module.visual.named_modules():
            dot = f"{name}." if name else ""
            if isinstance(sub, torch.nn.Linear):
                keys.add(f"{dot}weight")
            elif isinstance(sub, torch.nn.MultiheadAttention) and sub.in_proj_weight is not None:
                keys.add(f"{dot}in_proj_weight")
        return keys & base.tower.keys()

    # -- features -----------------------------------------------------------------------------------------------
    def features(self, base: LoadedBase, tower: Tensors, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`encode_image` under `tower`, L2-normalised in float32. Buffers are the module's own, moved to the
        batch's device on first use; the module's parameters are never used (every one is in `tower`)."""
        assert base.module is not None
        visual = base.module.visual
        pixels = batch["pixels"]
        buffers_to(visual, pixels.device)
        dtype = next(iter(tower.values())).dtype
        out = torch.func.functional_call(visual, tower, (pixels.to(dtype),))
        if isinstance(out, tuple):  # towers configured with output_tokens return (pooled, tokens)
            out = out[0]
        return F.normalize(out.float(), dim=-1)

    def load_inputs(self, data: Fetched, base: LoadedBase, *, labelled: bool, field: str) -> Inputs:
        """`.npz` with `x` (float32 N×3×H×W as is, or uint8 N×H×W / N×H×W×1 / N×H×W×3 images converted with the
        model's preprocessing) and, for eval sets, integer `y` [N]."""
        arrays = load_npz(data.path, field=field)
        if "x" not in arrays:
            raise InvalidInput(f"{field}: {data.path.name} has no array `x` (the images)", param=field)
        x = arrays["x"]
        if x.ndim == 0 or x.shape[0] == 0:
            raise InvalidInput(f"{field}: `x` holds no images", param=field)
        size = base.info["image_size"]
        if np.issubdtype(x.dtype, np.floating):
            if x.ndim != 4 or x.shape[1] != 3:
                raise InvalidInput(
                    f"{field}: float `x` must be preprocessed images N×3×H×W, got shape {list(x.shape)}", param=field
                )
            if tuple(x.shape[2:]) != size:
                raise InvalidInput(
                    f"{field}: float `x` has images of {x.shape[2]}×{x.shape[3]}, the model takes {size[0]}×{size[1]} "
                    "(give uint8 images to have them resized)",
                    param=field,
                )
            if not np.isfinite(x).all():
                raise InvalidInput(f"{field}: `x` contains NaN or Inf values", param=field)
            pixels = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        elif x.dtype == np.uint8:
            if not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] in (1, 3))):
                raise InvalidInput(
                    f"{field}: uint8 `x` must be images N×H×W, N×H×W×1 or N×H×W×3, got shape {list(x.shape)}",
                    param=field,
                )
            pixels = _convert_uint8(x, size, base.info["mean"], base.info["std"])
        else:
            raise InvalidInput(
                f"{field}: `x` has dtype {x.dtype}; use uint8 images or float32 preprocessed N×3×H×W", param=field
            )
        labels = None
        if labelled:
            if "y" not in arrays:
                raise InvalidInput(f"{field}: an eval set needs integer labels `y` [N]", param=field)
            labels = labels_tensor(arrays["y"], len(pixels), field=field)
        return Inputs(tensors={"pixels": pixels}, labels=labels, meta={"source": data.uri})


# -- helpers ---------------------------------------------------------------------------------------------------
def _resolve_arch(arch: str | dict | None) -> tuple[dict, dict]:
    """(model_cfg, preprocess overrides) from a registered model name or an inline config.

    An inline config may carry a `preprocess_cfg` ({"mean", "std", ...}) next to its model keys; it is kept out of
    the model config and used for converting uint8 images. Schemas (`hf-hub:`, `local-dir:`) are refused: they
    would read from places the URI policy does not govern.
    """
    if isinstance(arch, str):
        if ":" in arch:
            raise InvalidInput(
                f"base.arch {arch!r}: give a registered OpenCLIP model name, not a path", param="base.arch"
            )
        model_cfg = open_clip.get_model_config(arch.replace("/", "-"))
        if model_cfg is None:
            raise InvalidInput(
                f"base.arch {arch!r} is not a registered OpenCLIP model (see open_clip.list_models()) "
                "and not an inline config",
                param="base.arch",
            )
        return model_cfg, {}
    if isinstance(arch, dict):
        model_cfg = deepcopy(arch)
        preprocess = model_cfg.pop("preprocess_cfg", None) or {}
        if not isinstance(model_cfg.get("vision_cfg"), dict) or not isinstance(model_cfg.get("embed_dim"), int):
            raise InvalidInput(
                "base.arch: an inline config needs `embed_dim` and a `vision_cfg` object", param="base.arch"
            )
        model_cfg.setdefault("text_cfg", {})  # OpenCLIP's default text tower, so the saved config stays loadable
        if not isinstance(preprocess, dict):
            raise InvalidInput("base.arch.preprocess_cfg must be an object", param="base.arch")
        return model_cfg, preprocess
    raise InvalidInput("the open_clip family needs base.arch: a model name or an inline config", param="base.arch")


def _check_base(module: torch.nn.Module, state: Tensors, field: str) -> str:
    """The base checkpoint's layout, once its keys and shapes match `module` (IncompatibleCheckpoint if not)."""
    layout = _layout(state)
    if layout == FULL:
        _match_logit_shapes(state, module)
        check_compatible(_shapes(module.state_dict()), state, field=field, what="base checkpoint (for this arch)")
    else:
        check_compatible(_shapes(module.visual.state_dict()), _unprefixed(state, layout), field=field,
                         what="base image tower (for this arch)", shown=layout)
    return layout


def _build_model(model_cfg: dict, preprocess: dict, device: str = "cpu") -> torch.nn.Module:
    """A randomly initialised model through OpenCLIP's own factory (`local-dir:` on a temporary config), so inline
    configs are built exactly as a user's `create_model("local-dir:...")` will rebuild them. The global RNG is left
    untouched, and nothing is downloaded. On the `meta` device it has shapes and no storage."""
    with tempfile.TemporaryDirectory(prefix="mergeline-open-clip-") as tmp:
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
        try:
            with torch.random.fork_rng(devices=[]), _quiet_factory(), torch.device(device):
                model = open_clip.create_model(
                    "local-dir:" + tmp, load_weights=False, pretrained_image=False, pretrained_text=False, device=device
                )
        except (RuntimeError, ValueError, TypeError, KeyError, AssertionError, OSError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidInput(f"base.arch: OpenCLIP cannot build this model: {message}", param="base.arch") from None
    if not hasattr(model, "visual"):
        raise InvalidInput("base.arch: this OpenCLIP model has no image tower", param="base.arch")
    return model.float()


@contextlib.contextmanager
def _quiet_factory() -> Iterator[None]:
    """Drop OpenCLIP's "initialized randomly" warnings while building: the weights are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _read(path: Path, field: str) -> Tensors:
    if Path(path).is_dir():
        raise InvalidInput(f"{field}: an open_clip checkpoint is one file, not a folder", param=field)
    return load_state_dict(path, field=field)


def _strip_ddp(state: Tensors) -> Tensors:
    """Checkpoints saved from DistributedDataParallel prefix every key with `module.`."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _layout(state: Tensors) -> str:
    prefixed = sum(k.startswith(VISUAL) for k in state)
    if prefixed == 0:
        return ""
    return VISUAL if prefixed == len(state) else FULL


def _unprefixed(state: Tensors, prefix: str) -> Tensors:
    if prefix == FULL:
        prefix = VISUAL
    if not prefix:
        return state
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _match_logit_shapes(state: Tensors, module: torch.nn.Module) -> None:
    """OpenAI-converted checkpoints store `logit_scale` as a scalar where OpenCLIP has shape [] or [1]."""
    for key in ("logit_scale", "logit_bias"):
        target = getattr(module, key, None)
        if key in state and isinstance(target, torch.Tensor) and state[key].numel() == target.numel() == 1:
            state[key] = state[key].reshape(target.shape)


def _shapes(state: Tensors) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items()}


def _convert_uint8(x: np.ndarray, size: tuple[int, int], mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 images to normalised float32 N×3×H×W: gray to 3 channels, bilinear resize, [0, 1], model mean/std."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty((x.shape[0], 3, *size), dtype=torch.float32)
    for start in range(0, x.shape[0], CONVERT_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + CONVERT_CHUNK])).to(torch.float32)
        chunk = chunk.unsqueeze(1) if chunk.ndim == 3 else chunk.permute(0, 3, 1, 2)
        chunk = chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk
        if tuple(chunk.shape[2:]) != size:
            chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False, antialias=True)
        out[start : start + len(chunk)] = (chunk / 255.0 - mean_t) / std_t
    return out


def _pair(size: int | tuple | list) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
