"""LoRA adapters (PEFT folders) as task checkpoints, with the `peft` library as the reference: a base plus an adapter
through Mergeline gives `merge_and_unload()`'s weights. Adapters of another base, and adapters that are not plain
LoRA, are refused with typed errors before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_models import fetched, write_tiny_hf
from safetensors.torch import load_file, save_file

from core.errors import IncompatibleCheckpoint, InvalidInput
from core.settings import Settings
from core.spec import parse_job_spec
from core.store import LineageStore
from engine.families import get_family
from engine.job import run_job

ADAPTERS = {  # kind of tiny base -> LoraConfig arguments
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "qwen2": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "embed_tokens",
                                                                      "lm_head"],
                  rank_pattern={"o_proj": 2}, alpha_pattern={"k_proj": 3}),
    "gpt2": dict(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]),
    "bert_cls": dict(r=4, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
}


def base_model(folder):
    import transformers

    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(folder, local_files_only=True).eval()


def write_adapter(base_dir, dest, *, seed: int = 0, **lora) -> None:
    """A PEFT LoRA adapter of the model in `base_dir` with random factors (B ≠ 0, so it changes the weights)."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base_model(base_dir), LoraConfig(init_lora_weights=False, **lora))
        with torch.no_grad():  # a trained classifier differs from the base's
            for name, param in model.named_parameters():
                if "modules_to_save" in name:
                    param.add_(torch.randn_like(param))
    model.save_pretrained(dest)


def peft_merged(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base_model(base_dir), adapter_dir).merge_and_unload()
    return merged.state_dict()


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_adapter_task_weights_equal_peft_merge_and_unload(tmp_path, kind):
    base = write_tiny_hf(tmp_path / "base", kind)
    write_adapter(base, tmp_path / "adapter", **ADAPTERS[kind])
    family = get_family("hf")
    loaded = family.load_base(fetched(base), None)
    task = family.load_checkpoint(fetched(tmp_path / "adapter"), loaded, field="tasks.0.checkpoint")
    reference = peft_merged(base, tmp_path / "adapter")
    assert task.keys() == loaded.tower.keys()
    changed = [k for k in task if not torch.equal(task[k], loaded.tower[k])]
    assert changed
    for key, value in task.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-6, msg=key)
    if kind == "bert_cls":
        assert "classifier.weight" in changed
    if kind == "qwen2":
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.o_proj.weight"} <= set(changed)


def test_adapter_job_equals_merge_and_unload_and_generates(tmp_path):
    """task_arithmetic with scaling 1 on one adapter: the version is merge_and_unload()'s model."""
    from transformers import AutoModelForCausalLM

    base = write_tiny_hf(tmp_path / "base", "llama")
    write_adapter(base, tmp_path / "adapter", **ADAPTERS["llama"])
    settings = Settings(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path))
    store = LineageStore(settings.store)
    spec = parse_job_spec({"lineage": "lora", "base": {"family": "hf", "uri": base.as_uri() + "/"},
                           "tasks": [{"name": "chat", "checkpoint": (tmp_path / "adapter").as_uri() + "/"}],
                           "method": "task_arithmetic", "params": {"scaling_factor": 1.0}})
    result = run_job(spec, store, settings=settings)
    assert result["manifest"]["tasks"][0]["sha256"]
    store.download_version("default", "lora", 1, tmp_path / "v1")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "v1", local_files_only=True).eval()
    reference = peft_merged(base, tmp_path / "adapter")
    state = model.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    with torch.no_grad():
        assert model.generate(torch.tensor([[1, 4, 9]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("method", ["ties", "opcm", "weight_average", "otmf"])
def test_every_method_takes_adapters(tmp_path, method):
    """Two adapters merged by each method give what the method gives on merge_and_unload()'s full checkpoints."""
    base = write_tiny_hf(tmp_path / "base", "llama")
    calibration = np.random.default_rng(0).integers(3, 96, size=(8, 6))
    np.savez(tmp_path / "calib.npz", input_ids=calibration)
    extra = ({"calibration": (tmp_path / "calib.npz").as_uri()} if method == "otmf" else {})
    params = {"steps": 3, "batch_size": 4} if method == "otmf" else {}
    settings = Settings(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path))
    store = LineageStore(settings.store)
    for i in (1, 2):
        write_adapter(base, tmp_path / f"adapter{i}", seed=i, **ADAPTERS["llama"])
        model = base_model(base)
        model.load_state_dict(peft_merged(base, tmp_path / f"adapter{i}"))
        model.save_pretrained(tmp_path / f"full{i}")
    for lineage, kind in (("adapters", "adapter"), ("full", "full")):
        spec = parse_job_spec({"lineage": lineage, "base": {"family": "hf", "uri": base.as_uri() + "/"},
                               "tasks": [{"name": f"t{i}", "checkpoint": (tmp_path / f"{kind}{i}").as_uri() + "/",
                                          **extra} for i in (1, 2)], "method": method, "params": params})
        run_job(spec, store, settings=settings)
        store.download_version("default", lineage, 1, tmp_path / lineage)
    ours, full = load_file(tmp_path / "adapters/model.safetensors"), load_file(tmp_path / "full/model.safetensors")
    for key, value in full.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_adapter_of_another_base_is_incompatible_and_writes_nothing(tmp_path):
    base = write_tiny_hf(tmp_path / "base", "llama")
    family = get_family("hf")
    loaded = family.load_base(fetched(base), None)
    # Other module names (a BERT adapter), or the same names with other shapes (a wider Llama).
    write_adapter(write_tiny_hf(tmp_path / "bert", "bert_cls"), tmp_path / "names", **ADAPTERS["bert_cls"])
    with pytest.raises(IncompatibleCheckpoint, match="which the base does not have"):
        family.load_checkpoint(fetched(tmp_path / "names"), loaded, field="tasks.0.checkpoint")
    wide = write_tiny_hf(tmp_path / "wide", "llama")
    config = json.loads((wide / "config.json").read_text())
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**config, "hidden_size": 32})).save_pretrained(wide)
    write_adapter(wide, tmp_path / "shapes", **ADAPTERS["llama"])
    with pytest.raises(IncompatibleCheckpoint, match=r"as shape \[16, 32\], the base's is \[16, 16\]"):
        family.load_checkpoint(fetched(tmp_path / "shapes"), loaded, field="tasks.0.checkpoint")

    settings = Settings(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path))
    spec = parse_job_spec({"lineage": "bad", "base": {"family": "hf", "uri": base.as_uri() + "/"},
                           "tasks": [{"name": "t", "checkpoint": (tmp_path / "shapes").as_uri() + "/"}],
                           "method": "task_arithmetic"})
    with pytest.raises(IncompatibleCheckpoint) as caught:
        run_job(spec, LineageStore(settings.store), settings=settings)
    assert caught.value.param == "tasks.0.checkpoint"
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))


def malformed(folder, config: dict) -> None:
    raw = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**raw, **config}))


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: (f / "adapter_config.json").write_text("{not json"), "not readable JSON"),
    (lambda f: malformed(f, {"peft_type": "IA3"}), "adapter type 'IA3' is not supported"),
    (lambda f: malformed(f, {"use_dora": True}), "with use_dora are not supported"),
    (lambda f: malformed(f, {"r": 0}), "adapter_config.json: r: Input should be greater than 0"),
    (lambda f: malformed(f, {"r": 8}), "2-D factors of rank 8"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    (lambda f: save_file({**load_file(f / "adapter_model.safetensors"),
                          "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                              torch.ones(16)}, f / "adapter_model.safetensors"), "not a plain LoRA factor"),
    (lambda f: save_file({k: v for k, v in load_file(f / "adapter_model.safetensors").items() if "lora_B" not in k},
                         f / "adapter_model.safetensors"), "lacks lora_A or lora_B"),
])
def test_malformed_adapters_are_invalid_input(tmp_path, change, message):
    base = write_tiny_hf(tmp_path / "base", "llama")
    write_adapter(base, tmp_path / "adapter", **ADAPTERS["llama"])
    change(tmp_path / "adapter")
    family = get_family("hf")
    loaded = family.load_base(fetched(base), None)
    with pytest.raises(InvalidInput, match=message) as caught:
        family.load_checkpoint(fetched(tmp_path / "adapter"), loaded, field="tasks.0.checkpoint")
    assert type(caught.value) is InvalidInput and caught.value.param == "tasks.0.checkpoint"


def test_state_dict_family_takes_adapters_keyed_like_its_file(tmp_path):
    base = write_tiny_hf(tmp_path / "base", "qwen2")
    write_adapter(base, tmp_path / "adapter", **ADAPTERS["qwen2"])
    family = get_family("state_dict")
    loaded = family.load_base(fetched(base / "model.safetensors"), None)
    task = family.load_checkpoint(fetched(tmp_path / "adapter"), loaded, field="tasks.0.checkpoint")
    reference = peft_merged(base, tmp_path / "adapter")
    for key, value in task.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-6, msg=key)
    assert not torch.equal(task["lm_head.weight"], loaded.tower["lm_head.weight"])


def test_a_tied_weight_adapted_under_both_names_gets_both_deltas(tmp_path):
    """Llama's tied embeddings adapted as `embed_tokens` and as `lm_head`: one tower tensor, both deltas, like PEFT."""
    base = write_tiny_hf(tmp_path / "base", "llama")
    write_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q_proj"])
    family = get_family("hf")
    loaded = family.load_base(fetched(base), None)
    adapter_task = family.load_checkpoint(fetched(tmp_path / "adapter"), loaded, field="tasks.0.checkpoint")
    reference = peft_merged(base, tmp_path / "adapter")
    assert torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])
    for key, value in adapter_task.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-6, msg=key)
