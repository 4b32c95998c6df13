"""The `hf` family: a transformers model folder (`save_pretrained` layout), merged in its own architecture.

The model class is the checkpoint's own, `config.architectures[0]` (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
`T5ForConditionalGeneration`, `BertForSequenceClassification`, ...), looked up in transformers itself (never remote
code; `AutoModel` when the config names none), and the weights are read by our own loader, so a folder cannot run
code. What is merged and what is carried:
- the tower (merged): every parameter of that class, as `named_parameters()` names them: the encoder/decoder body,
  an untied `lm_head`, a task head (`classifier.*`, `score.*`, ...). A tied parameter (input and output
  embeddings, T5's shared embeddings) enters the tower once, under its first name; the version omits its aliases,
  as `save_pretrained` does, and keeps the config's tie, so transformers ties them again on load;
- carried (the base's, unchanged): persistent buffers, and tensors of the file outside the class (e.g. a head
  saved with a base-model-only architecture); task checkpoints' tensors outside the class are ignored.
Checkpoints whose keys carry the base model's prefix around a bare base model (`bert.*` plus `classifier.*` for a
`BertModel` base) are accepted: the prefixed keys are the tower.

Features run the base model inside the class (`model.base_model`, e.g. `LlamaModel` in `LlamaForCausalLM`): the
mean of the last hidden state over the attention mask, so padding never counts; decoder-only models get position ids
counted from the mask, so left padding gives the features of the unpadded text.

The module is built on the `meta` device: data-free jobs only need its layout (names, shapes, ties, buffers,
linear layers), and random initialisation costs as much as the model is large. A real module is built once, the
first time `features` runs.

A version folder loads with its own class, e.g. `transformers.AutoModelForCausalLM.from_pretrained(folder)`, and
generates; its tokenizer and generation config are the base's.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import shutil
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import InvalidInput
from core.uris import Fetched
from engine.adapters import by_name_only, is_adapter, read_adapter
from engine.families.base import Family, LoadedBase, VersionPlan
from engine.inputs import Inputs
from engine.tensorfiles import (
    INDEX_FILE,
    LazyTensors,
    float_dtype,
    materialize,
    read_sharded,
    rekey,
    shape_of,
    shard_names,
)
from engine.tensors import (
    as_tower,
    buffers_to,
    check_compatible,
    labels_tensor,
    load_npz,
    load_state_dict,
    open_state_dict,
)

Tensors = Mapping[str, torch.Tensor]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MAX_TOKENS = 128
# (single file, shard index) in transformers' order of preference.
WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)


class HFFamily(Family):

    # -- weights ------------------------------------------------------------------------------------------------
    def load_base(self, base: Fetched, arch: str | dict | None) -> LoadedBase:
        field = "base.uri"
        folder = Path(base.path)
        if not folder.is_dir():
            raise InvalidInput(
                f"{field}: the hf family needs a save_pretrained folder (a URI ending in /)", param=field
            )
        config = _load_config(folder, field)
        module = _build_model(config, field, meta=True)
        layout = _Layout(module)
        state = _read_weights(folder, field)
        inside, prefix, outside = layout.split(state, field=field, what="base checkpoint (for its config.json)")
        module.eval().requires_grad_(False)
        # The file's tensors in the parameters' dtype (float32), as loading them into a real module would give.
        tower = as_tower(rekey(inside, {k: k for k, _ in module.named_parameters()}), field=field)
        carried = rekey(state, {prefix + k: prefix + k for k in layout.persistent_buffers} | {k: k for k in outside})
        info: dict[str, Any] = {
            "folder": str(folder),
            "architecture": type(module).__name__,
            "decoder_only": _decoder_only(config),
            "prefix": prefix,
            "config": config,
            "model_type": config.model_type,
            "is_encoder_decoder": bool(getattr(config, "is_encoder_decoder", False)),
            "vocab_size": module.get_input_embeddings().num_embeddings,
            "max_positions": getattr(config, "max_position_embeddings", None),
            "has_tokenizer": any((folder / name).is_file() for name in TOKENIZER_FILES),
            "layout": layout,
        }
        return LoadedBase(tower=tower, carried=carried, module=module, info=info, dtype=float_dtype(inside))

    def load_checkpoint(self, checkpoint: Fetched, base: LoadedBase, *, field: str) -> Tensors:
        path = Path(checkpoint.path)
        if is_adapter(path):  # θ_t computed tensor by tensor from θ0 as the merge reads it
            resolver_for = by_name_only(partial(_adapter_key, base))
            return read_adapter(path, _shapes(base.tower), resolver_for, field=field).task_tower(base.tower)
        state = _read_weights(path, field) if path.is_dir() else open_state_dict(path, field=field)
        return self._tower_of(state, base, field=field, what="checkpoint")

    def load_version(self, folder: Path, base: LoadedBase) -> Tensors:
        field = f"version {Path(folder).name}"
        return self._tower_of(_read_weights(Path(folder), field), base, field=field, what="version")

    def _tower_of(self, state: Tensors, base: LoadedBase, *, field: str, what: str) -> Tensors:
        inside, _, _ = base.info["layout"].split(state, field=field, what=what)
        return as_tower(rekey(inside, {k: k for k in base.tower}), field=field)

    def version_plan(self, base: LoadedBase) -> VersionPlan:
        """config.json (its dtype the version's), the weights in the base's key layout (`model.safetensors`, or
        shards with `model.safetensors.index.json`, as `save_pretrained` writes them), and every non-weight file
        of the base folder (tokenizer, generation config, ...)."""
        prefix = base.info["prefix"]

        def extra(folder: Path, dtype: torch.dtype) -> list[Path]:
            config = copy.deepcopy(base.info["config"])
            config.dtype = dtype
            config.save_pretrained(folder)
            return [folder / CONFIG_FILE, *_copy_aux_files(Path(base.info["folder"]), folder)]

        return VersionPlan({k: prefix + k for k in base.tower}, base.carried, {"format": "pt"}, extra)

    def linear_weight_keys(self, base: LoadedBase) -> set[str]:
        """Weights of nn.Linear layers and of transformers' Conv1D (GPT-2 style linear layers)."""
        assert base.module is not None
        keys = set()
        for name, sub in base.module.named_modules():
            if isinstance(sub, torch.nn.Linear) or type(sub).__name__ == "Conv1D":
                keys.add(f"{name}.weight" if name else "weight")
        return keys & base.tower.keys()

    # -- features -----------------------------------------------------------------------------------------------
    def features(self, base: LoadedBase, tower: Tensors, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the base model's last hidden state over the attention mask, L2-normalised in float32."""
        module = _runnable_module(base)
        body, body_tower = _base_model(module, materialize(tower))
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        buffers_to(module, ids.device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        accepted = inspect.signature(body.forward).parameters
        if "use_cache" in accepted:
            kwargs["use_cache"] = False
        if base.info["decoder_only"] and "position_ids" in accepted:
            kwargs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp_min(0)  # left padding shifts no position
        out = torch.func.functional_call(body, body_tower, args=(), kwargs=kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return F.normalize(pooled.float(), dim=-1)

    def load_inputs(self, data: Fetched, base: LoadedBase, *, labelled: bool, field: str) -> Inputs:
        """`.jsonl` of {"text": ...} (plus integer "y" or "label" for eval sets), tokenized with the base's tokenizer,
        or `.npz` with integer `input_ids` [N, L], optional `attention_mask` [N, L] and, for eval sets, `y` [N]."""
        if base.info["is_encoder_decoder"]:
            raise InvalidInput(
                f"{field}: {base.info['model_type']} is an encoder-decoder model; the hf feature function needs an "
                "encoder or decoder-only model (use a data-free method)",
                param=field,
            )
        path = Path(data.path)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            tensors, labels = self._from_jsonl(path, base, labelled=labelled, field=field)
        elif suffix == ".npz":
            tensors, labels = self._from_npz(path, base, labelled=labelled, field=field)
        else:
            raise InvalidInput(f"{field}: {path.name}: hf inputs are .jsonl text or .npz token ids", param=field)
        return Inputs(tensors=tensors, labels=labels, meta={"source": data.uri})

    def _from_jsonl(
        self, path: Path, base: LoadedBase, *, labelled: bool, field: str
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        texts, labels = [], []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{field}: {path.name} is not readable UTF-8 text ({exc})", param=field) from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise InvalidInput(f"{field}: line {number} is not JSON", param=field) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InvalidInput(f"{field}: line {number} needs a string `text`", param=field)
            texts.append(record["text"])
            if labelled:
                label = record.get("y", record.get("label"))
                if isinstance(label, bool) or not isinstance(label, int):
                    raise InvalidInput(f"{field}: line {number} needs an integer label `y` (or `label`)", param=field)
                labels.append(label)
        if not texts:
            raise InvalidInput(f"{field}: {path.name} holds no texts", param=field)
        tokenizer = _tokenizer(base, field)
        limits = [MAX_TOKENS, base.info["max_positions"], getattr(tokenizer, "model_max_length", None)]
        max_length = min(int(n) for n in limits if isinstance(n, int) and n > 0)
        encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        tensors = {
            "input_ids": encoded["input_ids"].to(torch.int64),
            "attention_mask": encoded["attention_mask"].to(torch.int64),
        }
        y = labels_tensor(np.asarray(labels, dtype=np.int64), len(texts), field=field) if labelled else None
        return tensors, y

    def _from_npz(
        self, path: Path, base: LoadedBase, *, labelled: bool, field: str
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        arrays = load_npz(path, field=field)
        ids = arrays.get("input_ids")
        if ids is None:
            raise InvalidInput(f"{field}: {path.name} has no array `input_ids`", param=field)
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2 or 0 in ids.shape:
            raise InvalidInput(
                f"{field}: `input_ids` must be a non-empty integer array [N, L], got {ids.dtype} {list(ids.shape)}",
                param=field,
            )
        if ids.min() < 0 or ids.max() >= base.info["vocab_size"]:
            raise InvalidInput(
                f"{field}: `input_ids` outside the vocabulary [0, {base.info['vocab_size']})", param=field
            )
        mask = arrays.get("attention_mask")
        if mask is None:
            mask = np.ones_like(ids)
        elif mask.shape != ids.shape or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise InvalidInput(
                f"{field}: `attention_mask` must be integers shaped like `input_ids` {list(ids.shape)}", param=field
            )
        elif not np.isin(mask, (0, 1)).all() or not mask.any(axis=1).all():
            raise InvalidInput(f"{field}: `attention_mask` must be 0/1 with at least one 1 per row", param=field)
        tensors = {
            "input_ids": torch.from_numpy(ids.astype(np.int64)),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        }
        labels = None
        if labelled:
            if "y" not in arrays:
                raise InvalidInput(f"{field}: an eval set needs integer labels `y` [N]", param=field)
            labels = labels_tensor(arrays["y"], len(ids), field=field)
        return tensors, labels


class _Layout:
    """How a checkpoint's keys map onto the module's: the base-model prefix, tied aliases, and buffers."""

    def __init__(self, module: torch.nn.Module):
        self.expected = {k: v.shape for k, v in module.state_dict().items()}
        canonical = {id(p): n for n, p in module.named_parameters()}
        self.aliases = {
            n: canonical[id(p)] for n, p in module.named_parameters(remove_duplicate=False) if canonical[id(p)] != n
        }
        self.persistent_buffers = [n for n, _ in module.named_buffers() if n in self.expected]
        self.transient_buffers = {n for n, _ in module.named_buffers() if n not in self.expected}
        prefix = getattr(module, "base_model_prefix", "") or ""
        self.prefix = f"{prefix}." if prefix and not any(k.startswith(f"{prefix}.") for k in self.expected) else ""

    def split(self, state: Tensors, *, field: str, what: str) -> tuple[Tensors, str, list[str]]:
        """(the module's tensors keyed as in the module, the key prefix the file used, the file's other keys).
        Lazy tensors stay lazy: only names and shapes are looked at.

        Raises IncompatibleCheckpoint on the first missing, differently shaped or unexpected module key.
        """
        prefix = self.prefix
        if prefix and sum(k[len(prefix) :] in self.expected for k in state if k.startswith(prefix)) > sum(
            k in self.expected for k in state
        ):
            names = {k[len(prefix) :]: k for k in state if k.startswith(prefix)}
            outside = [k for k in state if not k.startswith(prefix)]
        else:
            prefix, names, outside = "", {k: k for k in state}, []
        for alias, name in self.aliases.items():  # a tie saved under either of its names counts for both
            if name not in names and alias in names:
                names[name] = names[alias]
        check_compatible(
            self.expected,
            rekey(state, names),
            field=field,
            what=what,
            ignore=self.transient_buffers,
            optional=self.aliases.keys(),
            shown=prefix,
        )
        inside = rekey(state, {k: v for k, v in names.items() if k in self.expected and k not in self.aliases})
        return inside, prefix, outside


def _shapes(tower: Tensors) -> dict[str, tuple[int, ...]]:
    return {k: shape_of(tower, k) for k in tower}


def _adapter_key(base: LoadedBase, name: str) -> str | None:
    """The tower key of a parameter an adapter names: as in the base's class, or in its bare base model (an adapter
    trained on `LlamaModel` for a `LlamaForCausalLM` base, and the reverse); tied aliases lead to their tower key."""
    layout: _Layout = base.info["layout"]
    prefix = f"{base.module.base_model_prefix}." if base.module is not None else ""
    for candidate in (name, prefix + name, name.removeprefix(prefix) if prefix else name):
        candidate = layout.aliases.get(candidate, candidate)
        if candidate in base.tower:
            return candidate
    return None


def _load_config(folder: Path, field: str):
    from transformers import AutoConfig

    if not (folder / CONFIG_FILE).is_file():
        raise InvalidInput(f"{field}: the folder has no config.json (not a save_pretrained folder)", param=field)
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInput(f"{field}: config.json cannot be used: {message}", param=field) from None


def _model_class(config, field: str) -> type:
    """The checkpoint's own architecture, `config.architectures[0]`, as transformers provides it (never remote code);
    AutoModel's class for the config when it names none."""
    import transformers

    names = getattr(config, "architectures", None) or []
    if not names:
        return transformers.AutoModel
    cls = getattr(transformers, str(names[0]), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise InvalidInput(f"{field}: config.json names architecture {names[0]!r}, which transformers does not "
                           "provide (remote code is never run)", param=field)
    if not isinstance(config, cls.config_class):
        raise InvalidInput(f"{field}: config.json names architecture {names[0]!r}, which does not take a "
                           f"{config.model_type} config", param=field)
    return cls


def _decoder_only(config) -> bool:
    """A model type that transformers knows as a causal LM and not as a masked LM (Llama, Qwen2, GPT-2, ...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _build_model(config, field: str, *, meta: bool = False) -> torch.nn.Module:
    """A float32 model of the checkpoint's own class for `config`: randomly initialised, or on the `meta` device
    (shapes only, no memory); the global RNG is left as it was."""
    cls = _model_class(config, field)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta") if meta else contextlib.nullcontext():
            if cls.__name__ == "AutoModel":
                return cls.from_config(copy.deepcopy(config), trust_remote_code=False, dtype=torch.float32)
            return cls._from_config(copy.deepcopy(config), dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInput(f"{field}: transformers cannot build this model: {message}", param=field) from None


def _base_model(module: torch.nn.Module, tower: Tensors) -> tuple[torch.nn.Module, Tensors]:
    """The base model inside the class (itself for a bare base model) and its part of the tower, keyed as in it."""
    body = module.base_model
    if body is module:
        return module, tower
    prefix = f"{module.base_model_prefix}."
    return body, {k[len(prefix) :]: v for k, v in tower.items() if k.startswith(prefix)}


def _runnable_module(base: LoadedBase) -> torch.nn.Module:
    """The module `features` runs: the meta module of `load_base` is replaced, on first use, by a real one.

    Built with from_config rather than materialised from the meta module, so that non-persistent buffers
    (position ids, rotary frequencies) get the values the model's own code computes. θ0 is read into memory here
    (if it was lazy) and its parameters share θ0's storage, so θ0 is held once (`features` substitutes the tower it
    is given anyway); `.data` keeps tied parameters tied. Persistent buffers are loaded from the base checkpoint.
    """
    module = base.module
    assert module is not None
    if not any(p.is_meta for p in module.parameters()):
        return module
    module = _build_model(base.info["config"], "base.uri")
    base.tower = materialize(base.tower)  # a model that runs needs θ0 in memory: read it once, shared with it
    for name, param in module.named_parameters():
        param.data = base.tower[name]
    prefix = base.info["prefix"]
    module.load_state_dict({k: base.carried[prefix + k] for k in base.info["layout"].persistent_buffers}, strict=False)
    base.module = module.eval().requires_grad_(False)
    return module


def _read_weights(folder: Path, field: str) -> Tensors:
    """The weights of a save_pretrained folder: one file or the shards an index names, safetensors first (read
    lazily), else pickles (read whole, weights only)."""
    if not folder.is_dir():
        raise InvalidInput(f"{field}: expected a save_pretrained folder", param=field)
    for single, index in WEIGHT_FILES:
        if (folder / single).is_file():
            return open_state_dict(folder / single, field=field)
        if (folder / index).is_file():
            if index == INDEX_FILE:
                return LazyTensors(read_sharded(folder, index, field=field), dtype=None, field=field,
                                   check_finite=True)
            _, shards = shard_names(folder, index, field=field)
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_state_dict(folder / shard, field=field))
            return state
    raise InvalidInput(f"{field}: the folder has no model.safetensors or pytorch_model.bin", param=field)


def _tokenizer(base: LoadedBase, field: str):
    """The base folder's tokenizer, loaded once per base (never remote code); pads with EOS when it has no pad."""
    cached = base.info.get("_tokenizer")
    if cached is not None:
        return cached
    if not base.info["has_tokenizer"]:
        raise InvalidInput(
            f"{field}: the base folder has no tokenizer files, so text cannot be tokenized; "
            "give an .npz with `input_ids` instead",
            param=field,
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base.info["folder"], local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInput(f"{field}: the base folder's tokenizer cannot be loaded: {message}", param=field) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidInput(f"{field}: the tokenizer has neither a pad nor an EOS token", param=field)
        tokenizer.pad_token = tokenizer.eos_token
    base.info["_tokenizer"] = tokenizer
    return tokenizer


def _copy_aux_files(source: Path, dest: Path) -> list[Path]:
    """Copy the base folder's non-weight files (tokenizer, generation config, sentence-transformers metadata).
    Weight files of any format are left out: the base's would be stale next to the merged weights."""
    copied = []
    for item in sorted(source.rglob("*")):
        rel = item.relative_to(source)
        if not item.is_file() or rel.as_posix() == CONFIG_FILE or any(p.startswith(".") for p in rel.parts):
            continue
        if item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".index.json"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, target)
        copied.append(target)
    return copied
