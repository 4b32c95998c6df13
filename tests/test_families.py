"""Model families and tensor I/O on real files and real small models: layouts, round trips through OpenCLIP and
transformers, differentiable features, and a typed error for every kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_models import (
    CLIP_LAYOUTS,
    clip_state_dict,
    copy_minilm,
    fetched,
    in_layout,
    tiny_clip_config,
    write_clip_base,
    write_clip_task,
    write_hf_task,
    write_image_npz,
    write_text_jsonl,
    write_token_npz,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.errors import IncompatibleCheckpoint, InvalidInput
from core.families import FAMILIES
from engine.families import get_family
from engine.tensors import (
    check_finite,
    load_state_dict,
    resolve_device,
    save_safetensors,
)


class NotATensor:
    """A custom class: a pickle holding it is not weights-only."""


# -- tensor I/O --------------------------------------------------------------------------------------------------
def test_load_state_dict_formats(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.save(tensors, tmp_path / "w.pt")
    torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "wrapped.bin")
    for name in ("w.safetensors", "w.pt", "wrapped.bin"):
        loaded = load_state_dict(tmp_path / name, field="f")
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_load_state_dict_refuses_bad_files(tmp_path):
    save_file({"a": torch.ones(100)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    torch.save({"a": torch.ones(2), "evil": NotATensor()}, tmp_path / "obj.pt")
    torch.save(torch.ones(3), tmp_path / "bare.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "bare.pt").read_bytes()[:50])
    (tmp_path / "w.txt").write_text("x")
    cases = {
        "cut.safetensors": "not a readable safetensors",
        "junk.safetensors": "not a readable safetensors",
        "obj.pt": "not a weights-only pickle",
        "bare.pt": "dict of named tensors",
        "cut.pt": "not a readable torch file",
        "w.txt": "unsupported checkpoint format",
    }
    for name, message in cases.items():
        with pytest.raises(InvalidInput, match=message) as info:
            load_state_dict(tmp_path / name, field="tasks.0.checkpoint")
        assert info.value.param == "tasks.0.checkpoint" and "tasks.0.checkpoint" in info.value.message


def test_check_finite_names_the_key():
    check_finite({"a": torch.ones(2), "i": torch.tensor([1])}, field="f")
    with pytest.raises(InvalidInput, match="'b'"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, field="f")


def test_save_safetensors_handles_views_and_shared_storage(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.t(), "same": base, "alias": base, "row": base[1]}
    path = save_safetensors(tensors, tmp_path / "sub" / "x.safetensors", metadata={"k": "v"})
    back = load_file(path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert not (tmp_path / "sub" / "x.safetensors.part").exists()


def test_save_safetensors_writes_the_same_bytes_for_the_same_tensors_and_metadata(tmp_path):
    # The writer orders metadata as a hash map: a version's sha256 would differ from run to run without sorting.
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    metadata = {key: f"value of {key} é" for key in ("method", "meta", "format", "family", "layout", "z", "a")}
    written = {save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata=metadata).read_bytes()
               for i in range(8)}
    assert len(written) == 1
    with safe_open(tmp_path / "0.safetensors", framework="pt") as f:
        assert f.metadata() == metadata
        assert torch.equal(f.get_tensor("w"), tensors["w"])


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("MERGELINE_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(InvalidInput):
        resolve_device("cuda:99")
    with pytest.raises(InvalidInput):
        resolve_device("tpu")
    monkeypatch.setenv("MERGELINE_DEVICE", "gpu")
    with pytest.raises(InvalidInput, match="MERGELINE_DEVICE"):
        resolve_device(None)


def test_family_registry():
    assert set(FAMILIES) == {"open_clip", "hf", "state_dict"}
    assert all(get_family(name).name == name for name in FAMILIES)
    with pytest.raises(InvalidInput, match="unknown model family"):
        get_family("keras")


# -- open_clip ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A whole-CLIP base and one task checkpoint (perturbed image tower), written once for the module."""
    root = tmp_path_factory.mktemp("clip")
    base = write_clip_base(root / "base.safetensors", seed=0)
    task_state = write_clip_task(base, root / "task.safetensors", seed=1)
    return root, base, task_state


@pytest.fixture(scope="module")
def clip_base(clip_files):
    return get_family("open_clip").load_base(fetched(clip_files[1]), tiny_clip_config())


def _visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_open_clip_base_in_every_layout(tmp_path, clip_files, layout):
    _, base_file, _ = clip_files
    full = load_file(base_file)
    path = tmp_path / "base.safetensors"
    save_file(in_layout(full, layout), path)
    loaded = get_family("open_clip").load_base(fetched(path), tiny_clip_config())
    visual = _visual(full)
    assert loaded.tower.keys() == visual.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, visual[k]) for k, v in loaded.tower.items())
    expected_carried = {k for k in full if not k.startswith("visual.")} if layout == "full" else set()
    assert set(loaded.carried) == expected_carried
    params = dict(loaded.module.visual.named_parameters())
    assert all(v.data_ptr() == params[k].data_ptr() for k, v in loaded.tower.items()), "θ0 is held once"
    if layout != "full":  # an image tower alone: the text tower, never used, takes no memory
        assert all(p.is_meta for n, p in loaded.module.named_parameters() if not n.startswith("visual."))


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_open_clip_task_checkpoint_in_every_layout(tmp_path, clip_base, clip_files, layout):
    _, _, task_state = clip_files
    path = tmp_path / "task.safetensors"
    save_file(in_layout(task_state, layout), path)
    tower = get_family("open_clip").load_checkpoint(fetched(path), clip_base, field="tasks.0.checkpoint")
    visual = _visual(task_state)
    assert tower.keys() == clip_base.tower.keys() and all(torch.equal(tower[k], visual[k]) for k in tower)


def test_open_clip_pt_checkpoint_with_state_dict_wrapper(tmp_path, clip_base, clip_files):
    _, _, task_state = clip_files
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in task_state.items()}}, tmp_path / "t.pt")
    tower = get_family("open_clip").load_checkpoint(fetched(tmp_path / "t.pt"), clip_base, field="f")
    assert torch.equal(tower["conv1.weight"], task_state["visual.conv1.weight"])


def test_open_clip_round_trip_through_open_clip(tmp_path, clip_base, clip_files):
    import open_clip

    family = get_family("open_clip")
    root, _, task_state = clip_files
    tower = family.load_checkpoint(fetched(root / "task.safetensors"), clip_base, field="f")
    files = family.save_version(clip_base, tower, tmp_path / "v1")
    assert [p.name for p in files] == ["model.safetensors", "open_clip_config.json"]
    assert family.load_version(tmp_path / "v1", clip_base).keys() == tower.keys()
    assert all(torch.equal(family.load_version(tmp_path / "v1", clip_base)[k], v) for k, v in tower.items())

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path / "v1"))
    model.eval()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in task_state.items())  # tower merged in, text tower carried
    config = json.loads((tmp_path / "v1" / "open_clip_config.json").read_text())
    again = open_clip.CLIP(**config["model_cfg"])
    again.load_state_dict(load_file(tmp_path / "v1" / "model.safetensors"))

    x = write_image_npz(tmp_path / "x.npz", n=6, labelled=False)
    pixels = family.load_inputs(fetched(x), clip_base, labelled=False, field="c").tensors["pixels"]
    with torch.no_grad():
        ours = family.features(clip_base, tower, {"pixels": pixels})
        theirs = model.encode_image(pixels, normalize=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert ours.shape == (6, 16)


@pytest.mark.parametrize("layout", ["visual", "tower"])
def test_open_clip_tower_only_base_saves_tower_only(tmp_path, clip_files, layout):
    import open_clip

    family = get_family("open_clip")
    _, base_file, task_state = clip_files
    save_file(in_layout(load_file(base_file), layout), tmp_path / "base.safetensors")
    base = family.load_base(fetched(tmp_path / "base.safetensors"), tiny_clip_config())
    save_file(in_layout(task_state, "full"), tmp_path / "task.safetensors")
    tower = family.load_checkpoint(fetched(tmp_path / "task.safetensors"), base, field="f")
    family.save_version(base, tower, tmp_path / "v1")
    saved = load_file(tmp_path / "v1" / "model.safetensors")
    assert saved.keys() == in_layout(task_state, layout).keys()  # the base's prefix convention is kept
    model = open_clip.create_model("local-dir:" + str(tmp_path / "v1"), load_weights=False)
    model.visual.load_state_dict({k.removeprefix("visual."): v for k, v in saved.items()})
    assert all(torch.equal(model.visual.state_dict()[k], v) for k, v in tower.items())


def test_open_clip_registered_arch_name(tmp_path):
    import open_clip

    family = get_family("open_clip")
    with pytest.raises(InvalidInput, match="not a registered"):
        family.load_base(fetched(write_clip_base(tmp_path / "b.safetensors")), "ViT-Nope-1")
    with pytest.raises(InvalidInput, match="not a path"):
        family.load_base(fetched(tmp_path / "b.safetensors"), "local-dir:/etc")
    # A registered config is resolved by name; a tiny base is of course not a ViT-B-32.
    assert "ViT-B-32" in open_clip.list_models()
    with pytest.raises(
        IncompatibleCheckpoint, match=r"'positional_embedding' has shape \[16, 32\], expected \[77, 512\]"
    ):
        family.load_base(fetched(tmp_path / "b.safetensors"), "ViT-B-32")


def test_open_clip_features_are_differentiable_in_non_leaf_towers(clip_base, tmp_path):
    family = get_family("open_clip")
    x = write_image_npz(tmp_path / "x.npz", n=4, labelled=False)
    pixels = family.load_inputs(fetched(x), clip_base, labelled=False, field="c").tensors["pixels"]
    masks = {k: torch.ones_like(v, requires_grad=True) for k, v in clip_base.tower.items()}
    tower = {k: clip_base.tower[k] * masks[k] for k in masks}  # non-leaf, as in OTMF's masked merge
    features = family.features(clip_base, tower, {"pixels": pixels})
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(4))
    (features @ torch.arange(16.0)).sum().backward()  # a projection: the norm itself is constant
    assert all(m.grad is not None for m in masks.values())
    assert masks["conv1.weight"].grad.abs().sum() > 0 and masks["ln_post.weight"].grad.abs().sum() > 0
    keys = family.linear_weight_keys(clip_base)
    assert "transformer.resblocks.0.attn.in_proj_weight" in keys and "transformer.resblocks.1.mlp.c_fc.weight" in keys
    assert all(clip_base.tower[k].ndim == 2 for k in keys) and "conv1.weight" not in keys


def test_open_clip_bad_checkpoints(tmp_path, clip_base, clip_files):
    family = get_family("open_clip")
    _, base_file, task_state = clip_files

    nan_base = load_file(base_file)
    nan_base["visual.proj"][0, 0] = float("nan")
    save_file(nan_base, tmp_path / "nan_base.safetensors")
    with pytest.raises(InvalidInput, match="visual.proj"):
        family.load_base(fetched(tmp_path / "nan_base.safetensors"), tiny_clip_config())

    nan_task = dict(task_state)
    nan_task["visual.ln_pre.weight"] = task_state["visual.ln_pre.weight"].clone()
    nan_task["visual.ln_pre.weight"][3] = float("inf")
    save_file(nan_task, tmp_path / "nan_task.safetensors")
    with pytest.raises(InvalidInput, match="ln_pre.weight"):
        family.load_checkpoint(fetched(tmp_path / "nan_task.safetensors"), clip_base, field="tasks.0.checkpoint")

    wider = tiny_clip_config()
    wider["vision_cfg"]["width"] = 48
    save_file(clip_state_dict(cfg=wider), tmp_path / "other.safetensors")
    with pytest.raises(IncompatibleCheckpoint, match=r"'visual.class_embedding' has shape \[48\], expected \[32\]"):
        family.load_checkpoint(fetched(tmp_path / "other.safetensors"), clip_base, field="tasks.0.checkpoint")

    missing = {k: v for k, v in in_layout(task_state, "tower").items() if k != "ln_post.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(IncompatibleCheckpoint, match="missing key 'ln_post.bias'"):
        family.load_checkpoint(fetched(tmp_path / "missing.safetensors"), clip_base, field="f")

    extra = {**in_layout(task_state, "visual"), "visual.adapter.weight": torch.ones(2)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(IncompatibleCheckpoint, match="unexpected key 'visual.adapter.weight'") as info:
        family.load_checkpoint(fetched(tmp_path / "extra.safetensors"), clip_base, field="tasks.2.checkpoint")
    assert info.value.param == "tasks.2.checkpoint" and info.value.type == "incompatible_checkpoint"

    save_file({"embeddings.word_embeddings.weight": torch.ones(4, 4)}, tmp_path / "bert.safetensors")
    with pytest.raises(IncompatibleCheckpoint):
        family.load_checkpoint(fetched(tmp_path / "bert.safetensors"), clip_base, field="f")

    (tmp_path / "cut.safetensors").write_bytes(base_file.read_bytes()[:-100])
    with pytest.raises(InvalidInput, match="safetensors"):
        family.load_checkpoint(fetched(tmp_path / "cut.safetensors"), clip_base, field="f")


def test_open_clip_image_inputs(tmp_path, clip_base):
    family = get_family("open_clip")
    gray = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    y = np.arange(5)
    variants = {"hw": gray, "hw1": gray[..., None], "hw3": np.repeat(gray[..., None], 3, axis=3)}
    out = {}
    for name, x in variants.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        data = family.load_inputs(fetched(tmp_path / f"{name}.npz"), clip_base, labelled=True, field="e")
        out[name] = data.tensors["pixels"]
        assert out[name].shape == (5, 3, 32, 32) and out[name].dtype == torch.float32
        assert torch.equal(data.labels, torch.arange(5))
    assert torch.equal(out["hw"], out["hw1"]) and torch.equal(out["hw"], out["hw3"])

    # At the model's own size there is no resize: exactly (x / 255 - mean) / std.
    rgb = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=rgb)
    pixels = family.load_inputs(fetched(tmp_path / "rgb.npz"), clip_base, labelled=False, field="c").tensors["pixels"]
    mean = torch.tensor(clip_base.info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(clip_base.info["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, (torch.from_numpy(rgb).permute(0, 3, 1, 2) / 255.0 - mean) / std)

    ready = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "ready.npz", x=ready)
    data = family.load_inputs(fetched(tmp_path / "ready.npz"), clip_base, labelled=False, field="c")
    assert torch.equal(data.tensors["pixels"], torch.from_numpy(ready)) and data.labels is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 3, 28, 28), np.float32)}, "the model takes 32×32"),
        ({"x": np.zeros((2, 28, 28), np.int32)}, "dtype int32"),
        ({"x": np.zeros((2, 28, 28, 2), np.uint8)}, "N×H×W×3"),
        ({"x": np.zeros((2, 28), np.float32)}, "N×3×H×W"),
        ({"x": np.zeros((0, 28, 28), np.uint8)}, "no images"),
        ({"x": np.full((1, 3, 32, 32), np.nan, np.float32)}, "NaN"),
        ({"images": np.zeros((2, 28, 28), np.uint8)}, "no array `x`"),
        ({"x": np.zeros((2, 28, 28), np.uint8)}, "labels `y`"),
        ({"x": np.zeros((2, 28, 28), np.uint8), "y": np.zeros(2, np.float32)}, "must be integers"),
        ({"x": np.zeros((2, 28, 28), np.uint8), "y": np.zeros(3, np.int64)}, r"shape \[2\]"),
        ({"x": np.zeros((2, 28, 28), np.uint8), "y": np.array([0, -1])}, "non-negative"),
    ],
)
def test_open_clip_bad_inputs(tmp_path, clip_base, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InvalidInput, match=message) as info:
        get_family("open_clip").load_inputs(
            fetched(tmp_path / "bad.npz"), clip_base, labelled=True, field="tasks.0.eval"
        )
    assert info.value.param == "tasks.0.eval"


def test_open_clip_unreadable_inputs(tmp_path, clip_base):
    family = get_family("open_clip")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    for name in ("junk.npz", "plain.npy", "objects.npz"):
        with pytest.raises(InvalidInput):
            family.load_inputs(fetched(tmp_path / name), clip_base, labelled=False, field="c")


# -- hf ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """A MiniLM base folder and one save_pretrained "fine-tune" of it."""
    root = tmp_path_factory.mktemp("hf")
    base = copy_minilm(root / "base")
    task_state = write_hf_task(base, root / "task", seed=3)
    return root, base, task_state


@pytest.fixture(scope="module")
def hf_base(hf_files):
    return get_family("hf").load_base(fetched(hf_files[1]), None)


def test_hf_round_trip_through_transformers(tmp_path, hf_files, hf_base):
    from transformers import AutoModel, AutoTokenizer

    family = get_family("hf")
    root, _, task_state = hf_files
    assert hf_base.tower.keys() == {k for k, _ in hf_base.module.named_parameters()}
    tower = family.load_checkpoint(fetched(root / "task"), hf_base, field="tasks.0.checkpoint")
    assert all(torch.equal(tower[k], task_state[k]) for k in tower)
    family.save_version(hf_base, tower, tmp_path / "v1")
    back = family.load_version(tmp_path / "v1", hf_base)
    assert all(torch.equal(back[k], v) for k, v in tower.items())

    model = AutoModel.from_pretrained(tmp_path / "v1", local_files_only=True).eval()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tower.items())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "v1", local_files_only=True)

    write_text_jsonl(tmp_path / "c.jsonl", n=6, labelled=False)
    data = family.load_inputs(fetched(tmp_path / "c.jsonl"), hf_base, labelled=False, field="c")
    texts = [json.loads(line)["text"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    encoded = tokenizer(texts, padding="longest", return_tensors="pt")
    assert torch.equal(data.tensors["input_ids"], encoded["input_ids"])
    with torch.no_grad():
        ours = family.features(hf_base, tower, data.tensors)
        hidden = model(**data.tensors).last_hidden_state
    mask = data.tensors["attention_mask"].unsqueeze(-1).float()
    theirs = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_hf_features_are_differentiable(tmp_path, hf_base):
    family = get_family("hf")
    write_token_npz(tmp_path / "t.npz", n=3, labelled=False)
    data = family.load_inputs(fetched(tmp_path / "t.npz"), hf_base, labelled=False, field="c")
    masks = {k: torch.ones_like(v, requires_grad=True) for k, v in hf_base.tower.items()}
    tower = {k: hf_base.tower[k] * masks[k] for k in masks}
    features = family.features(hf_base, tower, data.tensors)
    assert features.shape == (3, 384)
    features.sum().backward()
    assert masks["encoder.layer.0.attention.self.query.weight"].grad.abs().sum() > 0
    keys = family.linear_weight_keys(hf_base)
    assert "encoder.layer.5.output.dense.weight" in keys and "embeddings.word_embeddings.weight" not in keys


def test_hf_prefixed_checkpoint_with_a_head(tmp_path, hf_files, hf_base):
    """A checkpoint saved from a model with a task head: `bert.*` keys are the tower, the head is ignored."""
    family = get_family("hf")
    _, _, task_state = hf_files
    state = {f"bert.{k}": v.contiguous() for k, v in task_state.items()}
    state |= {"classifier.weight": torch.zeros(2, 384), "classifier.bias": torch.zeros(2)}
    save_file(state, tmp_path / "with_head.safetensors")
    tower = family.load_checkpoint(fetched(tmp_path / "with_head.safetensors"), hf_base, field="f")
    assert all(torch.equal(tower[k], task_state[k]) for k in tower)

    bad = dict(state)
    bad["bert.pooler.dense.weight"] = torch.zeros(384, 10)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(IncompatibleCheckpoint, match=r"'bert.pooler.dense.weight' has shape \[384, 10\]"):
        family.load_checkpoint(fetched(tmp_path / "bad.safetensors"), hf_base, field="f")


def test_hf_inputs(tmp_path, hf_base):
    family = get_family("hf")
    records = write_text_jsonl(tmp_path / "e.jsonl", n=5, label_key="label")
    data = family.load_inputs(fetched(tmp_path / "e.jsonl"), hf_base, labelled=True, field="e")
    assert data.labels.tolist() == [r["label"] for r in records] and len(data) == 5
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "word " * 500, "y": 0}) + "\n")
    assert family.load_inputs(fetched(long), hf_base, labelled=True, field="e").tensors["input_ids"].shape == (1, 128)
    write_token_npz(tmp_path / "t.npz", n=4, length=6)
    data = family.load_inputs(fetched(tmp_path / "t.npz"), hf_base, labelled=True, field="e")
    assert data.tensors["input_ids"].shape == (4, 6) and data.tensors["attention_mask"][:, -1].sum() == 0


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.jsonl", '{"text": "no label"}\n', "integer label"),
        ("e.jsonl", '{"text": "x", "y": true}\n', "integer label"),
        ("e.jsonl", '{"txt": "x", "y": 1}\n', "string `text`"),
        ("e.jsonl", "not json\n", "line 1 is not JSON"),
        ("e.jsonl", "\n\n", "no texts"),
        ("e.csv", "text,y\n", ".jsonl text or .npz"),
        ("e.npz", {"input_ids": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int64)}, "integer array"),
        ("e.npz", {"input_ids": np.full((2, 3), 10**6), "y": np.zeros(2, np.int64)}, "outside the vocabulary"),
        ("e.npz", {"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((2, 4), np.int64)}, "shaped"),
        ("e.npz", {"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.zeros((2, 3), np.int64)}, "one 1"),
        ("e.npz", {"input_ids": np.ones((2, 3), np.int64)}, "labels `y`"),
    ],
)
def test_hf_bad_inputs(tmp_path, hf_base, name, content, message):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    else:
        path.write_text(content)
    with pytest.raises(InvalidInput, match=message):
        get_family("hf").load_inputs(fetched(path), hf_base, labelled=True, field="tasks.0.eval")


def test_hf_base_without_tokenizer(tmp_path):
    family = get_family("hf")
    base = family.load_base(fetched(copy_minilm(tmp_path / "bare", tokenizer=False)), None)
    write_text_jsonl(tmp_path / "c.jsonl", n=2, labelled=False)
    with pytest.raises(InvalidInput, match="no tokenizer"):
        family.load_inputs(fetched(tmp_path / "c.jsonl"), base, labelled=False, field="c")
    write_token_npz(tmp_path / "t.npz", n=2, labelled=False)
    assert len(family.load_inputs(fetched(tmp_path / "t.npz"), base, labelled=False, field="c")) == 2
    written = family.save_version(base, base.tower, tmp_path / "v")
    assert {p.name for p in written} == {"model.safetensors", "config.json"}


def test_hf_bad_folders(tmp_path, hf_files, hf_base):
    family = get_family("hf")
    _, base_dir, _ = hf_files
    with pytest.raises(InvalidInput, match="save_pretrained folder"):
        family.load_base(fetched(base_dir / "model.safetensors"), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="config.json"):
        family.load_base(fetched(tmp_path / "empty"), None)
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(InvalidInput, match="config.json cannot be used"):
        family.load_base(fetched(tmp_path / "empty"), None)
    with pytest.raises(InvalidInput, match="no model.safetensors"):
        family.load_checkpoint(fetched(tmp_path / "empty"), hf_base, field="f")
    nan = load_file(base_dir / "model.safetensors")
    nan["encoder.layer.2.output.dense.bias"][0] = float("nan")
    folder = copy_minilm(tmp_path / "nan", tokenizer=False)
    save_file(nan, folder / "model.safetensors")
    with pytest.raises(InvalidInput, match="encoder.layer.2.output.dense.bias"):
        family.load_checkpoint(fetched(folder), hf_base, field="f")


# -- state_dict --------------------------------------------------------------------------------------------------
def test_state_dict_family_round_trip_and_errors(tmp_path):
    family = get_family("state_dict")
    assert family.has_features is False
    base = {"w": torch.randn(3, 4), "b": torch.randn(3).half(), "steps": torch.tensor([7])}
    save_file(base, tmp_path / "base.safetensors")
    loaded = family.load_base(fetched(tmp_path / "base.safetensors"), None)
    assert set(loaded.tower) == {"w", "b"} and set(loaded.carried) == {"steps"}
    assert all(v.dtype == torch.float32 for v in loaded.tower.values())

    task = {"w": base["w"] + 1, "b": base["b"], "steps": torch.tensor([9])}
    torch.save(task, tmp_path / "task.pt")
    tower = family.load_checkpoint(fetched(tmp_path / "task.pt"), loaded, field="f")
    assert torch.equal(tower["w"], task["w"])
    family.save_version(loaded, tower, tmp_path / "v1")
    saved = load_file(tmp_path / "v1" / "model.safetensors")
    assert torch.equal(saved["w"], task["w"]) and torch.equal(saved["steps"], base["steps"])
    assert all(torch.equal(v, tower[k]) for k, v in family.load_version(tmp_path / "v1", loaded).items())

    save_file({"w": torch.randn(4, 3), "b": base["b"], "steps": base["steps"]}, tmp_path / "shape.safetensors")
    with pytest.raises(IncompatibleCheckpoint, match=r"'w' has shape \[4, 3\], expected \[3, 4\]"):
        family.load_checkpoint(fetched(tmp_path / "shape.safetensors"), loaded, field="f")
    save_file(
        {"w": torch.ones(3, 4, dtype=torch.int64), "b": base["b"], "steps": base["steps"]}, tmp_path / "int.safetensors"
    )
    with pytest.raises(IncompatibleCheckpoint, match="floating point"):
        family.load_checkpoint(fetched(tmp_path / "int.safetensors"), loaded, field="f")
    with pytest.raises(NotImplementedError):
        family.load_inputs(fetched(tmp_path / "base.safetensors"), loaded, labelled=False, field="c")
    torch.save({"w": torch.ones(1), "x": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(InvalidInput, match="weights-only"):
        family.load_base(fetched(tmp_path / "evil.pt"), None)
