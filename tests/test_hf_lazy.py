"""The hf family builds its module on the meta device: a data-free job never builds (nor randomly initialises) a
real transformers model; the first features, and so accuracy, build one, which computes what transformers' own
loading computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_models import copy_minilm, fetched, write_head, write_hf_task, write_text_jsonl
from safetensors.torch import load_file

from core.settings import Settings
from core.spec import parse_job_spec
from core.store import LineageStore
from engine.families import get_family
from engine.families import hf as hf_family
from engine.job import run_job


@pytest.fixture
def builds(monkeypatch) -> list[bool]:
    """The `meta` flag of every model build the hf family makes."""
    calls: list[bool] = []
    original = hf_family._build_model

    def spy(config, field, *, meta=False):
        calls.append(meta)
        return original(config, field, meta=meta)

    monkeypatch.setattr(hf_family, "_build_model", spy)
    return calls


def pooled(model, tensors) -> torch.Tensor:
    hidden = model(**tensors).last_hidden_state
    mask = tensors["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_base_stays_on_meta_until_features(tmp_path, builds):
    from transformers import AutoModel

    family = get_family("hf")
    folder = copy_minilm(tmp_path / "base")
    loaded = family.load_base(fetched(folder), None)
    assert builds == [True]
    assert all(t.is_meta for t in [*loaded.module.parameters(), *loaded.module.buffers()])
    # θ0 is the file's tensors, keyed and ordered like the module's parameters.
    file = load_file(folder / "model.safetensors")
    assert list(loaded.tower) == [k for k, _ in loaded.module.named_parameters()]
    assert all(v.dtype == torch.float32 and torch.equal(v, file[k]) for k, v in loaded.tower.items())
    assert "encoder.layer.5.output.dense.weight" in family.linear_weight_keys(loaded)
    write_text_jsonl(tmp_path / "e.jsonl", n=6)
    data = family.load_inputs(fetched(tmp_path / "e.jsonl"), loaded, labelled=True, field="e")
    assert builds == [True] and next(loaded.module.parameters()).is_meta  # tokenizing needs no module

    with torch.no_grad():
        ours = family.features(loaded, loaded.tower, data.tensors)
        again = family.features(loaded, loaded.tower, data.tensors)
    assert builds == [True, False]  # built once, on first use
    module = loaded.module
    assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    # Its parameters are θ0's storage, not a copy.
    assert all(p.data_ptr() == loaded.tower[k].data_ptr() for k, p in module.named_parameters())
    reference = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    expected_buffers = dict(reference.named_buffers())
    assert all(torch.equal(b, expected_buffers[k]) for k, b in module.named_buffers())  # e.g. position_ids
    with torch.no_grad():
        theirs = pooled(reference, data.tensors)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(ours, again)


def test_data_free_job_builds_no_real_model_and_eval_builds_one(tmp_path, builds):
    from transformers import AutoModel

    base = copy_minilm(tmp_path / "base")
    for i in (1, 2):
        write_hf_task(base, tmp_path / f"task{i}", seed=i)
    write_text_jsonl(tmp_path / "eval.jsonl", n=12, seed=1)
    write_head(tmp_path / "head.safetensors", classes=2, embed_dim=384, seed=0)
    settings = Settings(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path))
    store = LineageStore(settings.store)

    def spec(lineage: str, method: str, with_eval: bool):
        tasks = [{"name": f"t{i}", "checkpoint": (tmp_path / f"task{i}").as_uri() + "/"} for i in (1, 2)]
        if with_eval:
            tasks[0] |= {"eval": (tmp_path / "eval.jsonl").as_uri(), "head": (tmp_path / "head.safetensors").as_uri()}
        return parse_job_spec(
            {"lineage": lineage, "base": {"family": "hf", "uri": base.as_uri() + "/"}, "tasks": tasks, "method": method}
        )

    for lineage, method in [("ta", "task_arithmetic"), ("opcm", "opcm")]:  # opcm reads linear_weight_keys
        run_job(spec(lineage, method, with_eval=False), store, settings=settings)
    assert builds == [True, True]

    builds.clear()
    result = run_job(spec("evaluated", "task_arithmetic", with_eval=True), store, settings=settings)
    assert builds == [True, False]
    # The same weights as the data-free job, and the accuracy transformers' own model gives.
    store.download_version("default", "ta", 1, tmp_path / "ta")
    store.download_version("default", "evaluated", 1, tmp_path / "evaluated")
    assert (tmp_path / "ta/model.safetensors").read_bytes() == (tmp_path / "evaluated/model.safetensors").read_bytes()
    model = AutoModel.from_pretrained(tmp_path / "evaluated", local_files_only=True).eval()
    family = get_family("hf")
    loaded = family.load_base(fetched(base), None)
    data = family.load_inputs(fetched(tmp_path / "eval.jsonl"), loaded, labelled=True, field="e")
    head = load_file(tmp_path / "head.safetensors")
    with torch.no_grad():
        logits = F.linear(pooled(model, data.tensors), head["weight"], head["bias"])
    expected = (logits.argmax(1) == data.labels).float().mean().item()
    assert result["metrics"]["tasks"]["t1"]["accuracy"] == pytest.approx(expected)


def test_tied_parameters_stay_tied_when_the_module_is_built(tmp_path, builds):
    """T5's embeddings are one parameter under three names: θ0 holds it once, and the real module built for
    features keeps the three names on θ0's storage."""
    from transformers import AutoModel, T5Config, T5Model

    config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5Model(config).save_pretrained(tmp_path / "t5")
    family = get_family("hf")
    loaded = family.load_base(fetched(tmp_path / "t5"), None)
    assert "shared.weight" in loaded.tower and "encoder.embed_tokens.weight" not in loaded.tower
    family.save_version(loaded, loaded.tower, tmp_path / "v1")
    state = AutoModel.from_pretrained(tmp_path / "v1", local_files_only=True).state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.tower.items())

    module = hf_family._runnable_module(loaded)
    assert builds == [True, False] and loaded.module is module
    shared = loaded.tower["shared.weight"].data_ptr()
    assert module.encoder.embed_tokens.weight is module.shared.weight is module.decoder.embed_tokens.weight
    assert module.shared.weight.data_ptr() == shared
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
