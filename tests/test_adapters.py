"""LoRA adapters (PEFT folders) as task checkpoints, with the `peft` library as the reference: a base plus an adapter
through Mergeline gives `merge_and_unload()`'s weights. Adapters of another base, and adapters that are not plain
LoRA, are refused with typed errors before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_models import fetched, tiny_clip_config, write_clip_base, write_tiny_hf
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


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "weight_average"])
def test_a_streamed_adapter_merge_reads_the_base_in_row_blocks(tmp_path, monkeypatch, method):
    """A data-free merge of an adapter streams like one of full checkpoints: each of θ0's big tensors is read in
    blocks of rows (the adapter's delta made for those rows only), never whole, and the version equals the streamed
    merge of merge_and_unload()'s checkpoint."""
    import engine.tensorfiles
    from core.methods import METHODS
    from engine.families.base import VersionFormat
    from engine.job import StepTask, merge_steps
    from engine.methods import get_method
    from engine.methods.base import MethodState
    from engine.streaming import Streaming

    base = write_tiny_hf(tmp_path / "base", "qwen2")
    write_adapter(base, tmp_path / "adapter", **ADAPTERS["qwen2"])
    keys = load_file(base / "model.safetensors").keys()
    full = tmp_path / "full.safetensors"
    save_file({k: v.clone() for k, v in peft_merged(base, tmp_path / "adapter").items() if k in keys}, full)
    family = get_family("state_dict")
    reads: list[tuple[str, tuple[int, ...]]] = []
    read_tensor = engine.tensorfiles.read_tensor
    monkeypatch.setattr(engine.tensorfiles, "read_tensor",
                        lambda info: reads.append((info.path.name, info.key, info.shape)) or read_tensor(info))

    def merged(task, name: str) -> dict[str, torch.Tensor]:
        loaded = family.load_base(fetched(base / "model.safetensors"), None)
        stream = Streaming(tmp_path / name / "work", loaded.tower, lambda pieces: family.open_version(
            loaded, tmp_path / name, VersionFormat(torch.float32, 10**9), pieces), elementwise=True, piece_numel=64)
        step = StepTask("t", lambda: family.load_checkpoint(fetched(task), loaded, field="tasks.0.checkpoint"))
        merge_steps(family, loaded, get_method(method), METHODS[method].params(), [step], merged=loaded.tower,
                    state=MethodState(), position=0, device=torch.device("cpu"), stream=stream)
        return load_file(tmp_path / name / "model.safetensors")

    ours = merged(tmp_path / "adapter", "adapter")
    shapes = {k: tuple(v.shape) for k, v in load_file(base / "model.safetensors").items()}
    big = {k for k, s in shapes.items() if len(s) == 2 and s[0] >= 2 and s[0] * s[1] > 64}
    base_reads = [(key, shape) for name, key, shape in reads if name == "model.safetensors" and key in big]
    assert len({key for key, _ in base_reads}) > 1  # θ0's big tensors were read, each in row blocks only
    assert all(shape[0] < shapes[key][0] for key, shape in base_reads)
    reference = merged(full, "full")
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5, msg=key)


def clip_adapter(base_path, dest, *, whole_clip: bool, target_modules, seed: int = 0) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter with random factors of the tiny CLIP at `base_path`, trained on the whole model or on its
    image tower alone; returns merge_and_unload()'s image tower, keyed as the tower."""
    import open_clip
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**tiny_clip_config())
        model.load_state_dict(load_file(base_path))
        config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=target_modules)
        peft = get_peft_model(model if whole_clip else model.visual, config)
    peft.save_pretrained(dest)
    merged = peft.merge_and_unload()
    return {k: v.detach().clone() for k, v in (merged.visual if whole_clip else merged).state_dict().items()}


@pytest.mark.parametrize("whole_clip", [False, True])
def test_open_clip_adapter_task_weights_equal_peft_merge_and_unload(tmp_path, whole_clip):
    base = write_clip_base(tmp_path / "base.safetensors")
    targets = r".*visual.*\.(c_fc|c_proj)" if whole_clip else ["c_fc", "c_proj"]
    reference = clip_adapter(base, tmp_path / "adapter", whole_clip=whole_clip, target_modules=targets)
    family = get_family("open_clip")
    loaded = family.load_base(fetched(base), tiny_clip_config())
    task = family.load_checkpoint(fetched(tmp_path / "adapter"), loaded, field="tasks.0.checkpoint")
    assert task.keys() == loaded.tower.keys()
    changed = {k for k in task if not torch.equal(task[k], loaded.tower[k])}
    assert changed and all(".mlp.c_fc." in k or ".mlp.c_proj." in k for k in changed)
    for key, value in task.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-6, msg=key)


def test_open_clip_adapter_that_changes_the_text_tower_is_incompatible(tmp_path):
    """A whole-CLIP adapter names the image tower under `visual.`; its other modules are the text tower's, which a
    version does not merge: refused rather than dropped."""
    base = write_clip_base(tmp_path / "base.safetensors")
    clip_adapter(base, tmp_path / "adapter", whole_clip=True, target_modules=["c_fc"])
    family = get_family("open_clip")
    loaded = family.load_base(fetched(base), tiny_clip_config())
    with pytest.raises(IncompatibleCheckpoint, match=r"'transformer\.resblocks\.0\.mlp\.c_fc\.weight'"):
        family.load_checkpoint(fetched(tmp_path / "adapter"), loaded, field="tasks.0.checkpoint")


def test_open_clip_adapter_job_equals_merge_and_unload(tmp_path):
    """task_arithmetic with scaling 1 on an image-tower adapter: the version's tower is merge_and_unload()'s."""
    base = write_clip_base(tmp_path / "base.safetensors")
    reference = clip_adapter(base, tmp_path / "adapter", whole_clip=False, target_modules=["c_fc", "c_proj"])
    settings = Settings(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path))
    store = LineageStore(settings.store)
    spec = parse_job_spec({"lineage": "clip-lora",
                           "base": {"family": "open_clip", "uri": base.as_uri(), "arch": tiny_clip_config()},
                           "tasks": [{"name": "t", "checkpoint": (tmp_path / "adapter").as_uri() + "/"}],
                           "method": "task_arithmetic", "params": {"scaling_factor": 1.0}})
    run_job(spec, store, settings=settings)
    store.download_version("default", "clip-lora", 1, tmp_path / "v1")
    version = load_file(tmp_path / "v1" / "model.safetensors")
    for key, value in reference.items():
        torch.testing.assert_close(version["visual." + key], value, rtol=1e-5, atol=1e-6, msg=key)
