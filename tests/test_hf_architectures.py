"""The hf family merges and saves each checkpoint's own architecture (config.architectures): causal LMs with their
`lm_head` (tied or not), seq2seq models, encoders with task heads. Every model is a tiny random one built from a
transformers config; a merged version loads with its own AutoModelFor… class and generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_models import fetched, write_hf_task, write_tiny_hf
from safetensors.torch import load_file

from core.errors import IncompatibleCheckpoint, InvalidInput
from core.settings import Settings
from core.spec import parse_job_spec
from core.store import LineageStore
from engine.families import get_family
from engine.job import run_job


def merge_two_tasks(tmp_path, kind: str, scaling: float = 0.5) -> tuple[dict, dict, object]:
    """Task arithmetic of two perturbed fine-tunes of a tiny `kind` base, committed and pulled to tmp_path/"v1".
    Returns the base's and the expected merged state dicts (as the base's class names them) and the folder."""
    import transformers

    base = write_tiny_hf(tmp_path / "base", kind)
    tasks = [write_hf_task(base, tmp_path / f"task{i}", seed=i, scale=0.05) for i in (1, 2)]
    architecture = json.loads((base / "config.json").read_text())["architectures"][0]
    theta0 = getattr(transformers, architecture).from_pretrained(base).state_dict()
    expected = {k: v + scaling * sum(t[k] - v for t in tasks) for k, v in theta0.items()}
    settings = Settings(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path))
    spec = parse_job_spec({
        "lineage": kind.replace("_", "-"),
        "base": {"family": "hf", "uri": base.as_uri() + "/"},
        "tasks": [{"name": f"t{i}", "checkpoint": (tmp_path / f"task{i}").as_uri() + "/"} for i in (1, 2)],
        "method": "task_arithmetic", "params": {"scaling_factor": scaling},
    })
    store = LineageStore(settings.store)
    run_job(spec, store, settings=settings)
    store.download_version("default", spec.lineage, 1, tmp_path / "v1")
    return theta0, expected, tmp_path / "v1"


def load_checked(auto_class, folder):
    """`auto_class.from_pretrained(folder)` with no missing or unexpected key."""
    model, info = auto_class.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_weights(model, expected: dict) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_tied_llama_merges_loads_as_a_causal_lm_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    theta0, expected, folder = merge_two_tasks(tmp_path, "llama")
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")  # a tie is saved once, like transformers
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = load_checked(AutoModelForCausalLM, folder)
    assert isinstance(model, LlamaForCausalLM)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert not torch.equal(expected["model.embed_tokens.weight"], theta0["model.embed_tokens.weight"])
    assert_weights(model, expected)

    reference = LlamaForCausalLM(model.config).eval()
    reference.load_state_dict(expected)
    prompt = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, reference(prompt).logits, rtol=1e-5, atol=1e-5)
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 10)
        assert torch.equal(out, reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_untied_qwen2_merges_its_lm_head(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    theta0, expected, folder = merge_two_tasks(tmp_path, "qwen2")
    model = load_checked(AutoModelForCausalLM, folder)
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(expected["lm_head.weight"], theta0["lm_head.weight"])  # the head is merged, not carried
    assert_weights(model, expected)
    with torch.no_grad():
        assert model.generate(torch.tensor([[1, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


def test_t5_merges_as_seq2seq_with_its_shared_embeddings_tied(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    _, expected, folder = merge_two_tasks(tmp_path, "t5")
    model = load_checked(AutoModelForSeq2SeqLM, folder)
    assert isinstance(model, T5ForConditionalGeneration)
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    assert_weights(model, expected)
    with torch.no_grad():
        assert model.generate(torch.tensor([[4, 5, 6, 1]]), max_new_tokens=3, do_sample=False).shape[0] == 1


def test_encoder_with_a_classification_head_merges_the_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    theta0, expected, folder = merge_two_tasks(tmp_path, "bert_cls")
    model = load_checked(AutoModelForSequenceClassification, folder)
    assert not torch.equal(expected["classifier.weight"], theta0["classifier.weight"])
    assert_weights(model, expected)
    family = get_family("hf")
    loaded = family.load_base(fetched(tmp_path / "base"), None)
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= loaded.tower.keys()
    # Features are the encoder's pooled hidden state, whatever head the class carries.
    np.savez(tmp_path / "x.npz", input_ids=np.array([[3, 4, 5, 6]]))
    data = family.load_inputs(fetched(tmp_path / "x.npz"), loaded, labelled=False, field="c")
    with torch.no_grad():
        ours = family.features(loaded, loaded.tower, data.tensors)
        hidden = model.bert(input_ids=data.tensors["input_ids"]).last_hidden_state
    assert ours.shape == (1, 16)
    base_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        hidden = base_model.bert(input_ids=data.tensors["input_ids"]).last_hidden_state
    torch.testing.assert_close(ours, torch.nn.functional.normalize(hidden.mean(1), dim=-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_features_exclude_padding_on_either_side(tmp_path, kind):
    """A padded batch gives each row the features of its unpadded text, with right or left padding."""
    family = get_family("hf")
    loaded = family.load_base(fetched(write_tiny_hf(tmp_path / "base", kind)), None)
    texts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    right = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    right_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    left = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    left_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        alone = torch.cat([family.features(loaded, loaded.tower, {"input_ids": torch.tensor([t])}) for t in texts])
        padded_right = family.features(loaded, loaded.tower, {"input_ids": right, "attention_mask": right_mask})
        padded_left = family.features(loaded, loaded.tower, {"input_ids": left, "attention_mask": left_mask})
    torch.testing.assert_close(padded_right, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded_left, alone, rtol=0, atol=1e-5)


def test_architecture_errors(tmp_path):
    family = get_family("hf")
    base = write_tiny_hf(tmp_path / "base", "llama")
    loaded = family.load_base(fetched(base), None)
    # A fine-tune saved as the bare base model is another architecture than the causal LM base.
    from transformers import LlamaModel

    LlamaModel.from_pretrained(base).save_pretrained(tmp_path / "bare")
    with pytest.raises(IncompatibleCheckpoint, match="missing key 'lm_head.weight'|missing key 'model."):
        family.load_checkpoint(fetched(tmp_path / "bare"), loaded, field="tasks.0.checkpoint")
    # Architectures transformers does not provide, or that do not take the config, are refused, never imported.
    for name, message in [("EvilForCausalLM", "does not provide"), ("BertModel", "does not take a llama config")]:
        config = json.loads((base / "config.json").read_text())
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "architectures": [name]}))
        (tmp_path / name / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
        with pytest.raises(InvalidInput, match=message):
            family.load_base(fetched(tmp_path / name), None)
