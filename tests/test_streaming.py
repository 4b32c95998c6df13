"""The streaming engine: data-free merges that read their inputs tensor by tensor and write the version as they go
give exactly the in-memory results; versions in the base's dtype and in shards that transformers loads; bad shard
indexes and truncated or lying files are typed errors that write nothing; the same job writes the same bytes."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import InvalidInput
from core.methods import METHODS
from core.settings import Settings
from core.spec import parse_job_spec
from core.store import LineageStore
from core.uris import Fetched
from engine.families import get_family
from engine.families.base import VersionFormat
from engine.job import StepTask, merge_steps, run_job
from engine.methods import get_method
from engine.methods.base import MethodState
from engine.streaming import Streaming
from engine.streaming import scratch_sink as _scratch_sink
from engine.tensorfiles import materialize, read_weights
from engine.tensors import open_state_dict

CPU = torch.device("cpu")
DATA_FREE = sorted(name for name, entry in METHODS.items() if not entry.data_driven)
PARAMS = {"ties": {"top_k": 30.0}, "opcm": {"alpha": 0.6}}


def state(seed: int, dtype: torch.dtype = torch.float32, base: dict | None = None) -> dict[str, torch.Tensor]:
    """A small model's tensors: linear weights (one big enough to be cut into row blocks), a bias, an int buffer;
    a task is the base plus noise."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (40, 12), "layer.0.proj.weight": (24, 12), "layer.0.proj.bias": (24,),
              "layer.1.proj.weight": (12, 24), "norm.weight": (12,)}
    out = {k: torch.randn(s, generator=g) * (0.1 if base else 1.0) + (base[k].float() if base else 0.0)
           for k, s in shapes.items()}
    out = {k: v.to(dtype) for k, v in out.items()}
    out["steps"] = torch.tensor([7], dtype=torch.int64)
    return out


def write_world(root: Path, dtype: torch.dtype = torch.float32, n_tasks: int = 3) -> tuple[Path, list[Path]]:
    root.mkdir(parents=True, exist_ok=True)
    base = state(0, dtype)
    save_file(base, root / "base.safetensors")
    tasks = []
    for i in range(n_tasks):
        save_file(state(i + 1, dtype, base), root / f"task{i}.safetensors")
        tasks.append(root / f"task{i}.safetensors")
    return root / "base.safetensors", tasks


def local(path: Path) -> Fetched:
    return Fetched(path.as_uri(), path, "", 0)


def merge(method: str, base: Path, tasks: list[Path], tmp: Path, *, streamed: bool, piece_numel: int = 64):
    """Every step's head (float32) and the final tower, merged in memory or streamed into `tmp`."""
    family = get_family("state_dict")
    loaded = family.load_base(local(base), None)
    params = METHODS[method].params(**PARAMS.get(method, {}))
    if not streamed:
        loaded.tower = materialize(loaded.tower)
    read = (lambda p: family.load_checkpoint(local(p), loaded, field="t")) if streamed else (
        lambda p: materialize(family.load_checkpoint(local(p), loaded, field="t")))
    steps = [StepTask(p.stem, lambda p=p: read(p)) for p in tasks]
    heads: list[dict] = []
    stream = None
    if streamed:
        fmt = VersionFormat(torch.float32, 10**9)
        stream = Streaming(tmp / "work", loaded.tower, lambda pieces: family.open_version(
            loaded, tmp / "version", fmt, pieces), elementwise=get_method(method).elementwise, piece_numel=piece_numel)
    result = merge_steps(family, loaded, get_method(method), params, steps, merged=loaded.tower, state=MethodState(),
                         position=0, device=CPU, stream=stream,
                         on_step=lambda i, out: heads.append((materialize(out.merged), out.state.meta)))
    return heads, result


@pytest.mark.parametrize("method", DATA_FREE)
def test_streamed_merge_equals_the_in_memory_merge(method, tmp_path):
    base, tasks = write_world(tmp_path / "in")
    memory, _ = merge(method, base, tasks, tmp_path / "m", streamed=False)
    streamed, result = merge(method, base, tasks, tmp_path / "s", streamed=True)
    for (a, meta_a), (b, meta_b) in zip(memory, streamed, strict=True):
        assert meta_a == meta_b  # OPCM's norms and λ carried identically
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method
    assert [f.name for f in result.files] == ["model.safetensors"]
    written = load_file(tmp_path / "s" / "version" / "model.safetensors")
    assert all(torch.equal(written[k], memory[-1][0][k]) for k in memory[-1][0])
    assert torch.equal(written["steps"], torch.tensor([7]))  # carried unchanged
    assert not list((tmp_path / "s" / "work").glob("*/tower-*/*.part"))


@pytest.mark.parametrize(("method", "n_tasks", "written"), [("task_arithmetic", 2, 0), ("task_arithmetic", 6, 1),
                                                         ("ties", 2, 0), ("ties", 4, 1)])
def test_heads_between_steps_are_recomputed_unless_that_costs_more(method, n_tasks, written, tmp_path, monkeypatch):
    """A head between two steps is written to scratch only when it stands on MAX_RECOMPUTED unwritten steps or on
    more than one when the next step reads it several times; either way every step gives the in-memory result."""
    import engine.streaming

    calls = []
    monkeypatch.setattr(engine.streaming, "scratch_sink", lambda *a: calls.append(a) or _scratch_sink(*a))
    base, tasks = write_world(tmp_path / "in", n_tasks=n_tasks)
    memory, _ = merge(method, base, tasks, tmp_path / "m", streamed=False)
    streamed, _ = merge(method, base, tasks, tmp_path / "s", streamed=True)
    assert len(calls) == written
    for (a, _), (b, _) in zip(memory, streamed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a), method


def test_ties_threshold_is_exact_over_row_blocks(tmp_path):
    """The global top-k threshold found in two streamed passes over row blocks is the one of the whole vector."""
    base, tasks = write_world(tmp_path / "in", n_tasks=2)
    memory, _ = merge("ties", base, tasks, tmp_path / "m", streamed=False)
    streamed, result = merge("ties", base, tasks, tmp_path / "s", streamed=True, piece_numel=7)
    steps = result.steps[1]
    b, t0 = load_file(base), load_file(tasks[0])
    head = torch.cat([((t0[k] - b[k]) * 0.3).flatten() for k in b if b[k].is_floating_point()])
    k_keep = steps["kept_per_vector"]
    assert steps["head_threshold"] == pytest.approx(head.abs().kthvalue(head.numel() - k_keep + 1).values.item(),
                                                    rel=1e-6)
    assert all(torch.equal(memory[-1][0][k], streamed[-1][0][k]) for k in memory[-1][0])


# -- through the job ----------------------------------------------------------------------------------------------
def run(tmp_path: Path, base: Path, tasks: list[Path], *, store: str = "store", family: str = "state_dict",
        method: str = "task_arithmetic", params: dict | None = None, first: int = 0):
    settings = Settings(store=(tmp_path / store).as_uri(), allowed_roots=str(tmp_path))
    uri = base.as_uri() + ("/" if base.is_dir() else "")
    spec = parse_job_spec({
        "lineage": "big", "base": {"family": family, "uri": uri}, "method": method, "params": params or {},
        "tasks": [{"name": f"t{first + i}", "checkpoint": p.as_uri() + ("/" if p.is_dir() else "")}
                  for i, p in enumerate(tasks)]})
    store_obj = LineageStore(settings.store)
    return run_job(spec, store_obj, settings=settings), store_obj


def test_bf16_base_gives_a_bf16_version_and_the_manifest_says_so(tmp_path):
    base, tasks = write_world(tmp_path / "in", torch.bfloat16, n_tasks=2)
    result, store = run(tmp_path, base, tasks, method="ties", params=PARAMS["ties"])
    store.download_version("default", "big", 1, tmp_path / "v1")
    written = load_file(tmp_path / "v1" / "model.safetensors")
    memory, _ = merge("ties", base, tasks, tmp_path / "m", streamed=False)
    ties = {k: v.to(torch.bfloat16) for k, v in memory[-1][0].items()}
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], ties[k]) for k in ties)
    entry = next(f for f in result["manifest"]["files"] if f["path"] == "model.safetensors")
    assert entry["dtype"] == "bfloat16" and len(entry["sha256"]) == 64
    again, _ = run(tmp_path, base, tasks, store="store2", method="ties", params={"out_dtype": "float32"})
    entry = next(f for f in again["manifest"]["files"] if f["path"] == "model.safetensors")
    assert entry["dtype"] == "float32"


def test_the_same_job_writes_the_same_bytes(tmp_path):
    base, tasks = write_world(tmp_path / "in", torch.bfloat16, n_tasks=2)
    params = {"max_shard_size": 900}
    one, _ = run(tmp_path, base, tasks, store="a", method="ties", params=params)
    two, _ = run(tmp_path, base, tasks, store="b", method="ties", params=params)
    files = [(f["path"], f["sha256"]) for f in one["manifest"]["files"]]
    assert len([p for p, _ in files if p.endswith(".safetensors")]) > 2  # sharded
    assert files == [(f["path"], f["sha256"]) for f in two["manifest"]["files"]]


def tiny_llama(folder: Path, seed: int, base: Path | None = None) -> Path:
    """A tiny Llama causal LM saved with save_pretrained (its `model.` prefix and `lm_head` as transformers writes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    if base is not None:
        model = LlamaForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def test_a_sharded_hf_version_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base", 0)
    tasks = [tiny_llama(tmp_path / f"task{i}", i + 1, base) for i in range(2)]
    result, store = run(tmp_path, base, tasks, family="hf", params={"max_shard_size": 4000, "scaling_factor": 0.5})
    store.download_version("default", "big", 1, tmp_path / "v1")
    names = {f["path"] for f in result["manifest"]["files"]}
    assert "model.safetensors.index.json" in names and "model-00001-of-" in " ".join(names)
    assert "model.safetensors" not in names
    # The checkpoint's own architecture (LlamaForCausalLM) is merged: its untied lm_head too.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "v1")
    b, t0, t1 = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (base, *tasks))
    assert "lm_head.weight" in merged.state_dict()
    for k, v in merged.state_dict().items():
        expected = b[k] + 0.5 * (t0[k] - b[k]) + 0.5 * (t1[k] - b[k])
        assert torch.allclose(v, expected, atol=1e-6), k
    # A sharded version is a sharded input: the next job reads it back as the head.
    second, _ = run(tmp_path, base, [tasks[0]], family="hf", params={"max_shard_size": 4000}, first=2)
    assert second["version"] == 2


def shard(tmp_path: Path) -> Path:
    """A base folder of two safetensors shards and their index."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    base = state(0)
    keys = sorted(base)
    save_file({k: base[k] for k in keys[:3]}, folder / "a.safetensors")
    save_file({k: base[k] for k in keys[3:]}, folder / "b.safetensors")
    weight_map = {k: "a.safetensors" if k in keys[:3] else "b.safetensors" for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_a_sharded_input_merges_like_the_single_file(tmp_path):
    folder = shard(tmp_path)
    base, tasks = write_world(tmp_path / "in", n_tasks=1)
    result, store = run(tmp_path, folder, tasks)
    single, _ = run(tmp_path, base, tasks, store="single")
    sha = [f["sha256"] for f in result["manifest"]["files"] if f["path"] == "model.safetensors"]
    assert sha == [f["sha256"] for f in single["manifest"]["files"] if f["path"] == "model.safetensors"]


@pytest.mark.parametrize(("bad", "why"), [("../b.safetensors", "outside its folder"), ("{abs}", "outside its folder"),
                                         ("sub/b.safetensors", "outside its folder"),
                                         ("missing.safetensors", "missing shard")])
def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path, bad, why):
    folder = shard(tmp_path)
    (folder / "sub").mkdir()
    for outside in (tmp_path / "b.safetensors", folder / "sub" / "b.safetensors"):  # real files, outside the folder
        outside.write_bytes((folder / "b.safetensors").read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for key, name in index["weight_map"].items():
        if name == "b.safetensors":
            index["weight_map"][key] = bad.format(abs=tmp_path / "b.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, tasks = write_world(tmp_path / "in", n_tasks=1)
    with pytest.raises(InvalidInput, match=why):
        run(tmp_path, folder, tasks)
    assert LineageStore((tmp_path / "store").as_uri()).get_lineage("default", "big") is None


def test_truncated_or_lying_files_are_refused_before_reading(tmp_path):
    base, tasks = write_world(tmp_path / "in", n_tasks=1)
    data = tasks[0].read_bytes()
    cut = tmp_path / "in" / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(InvalidInput, match="outside the file"):
        run(tmp_path, base, [cut])
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["embed.weight"]["shape"] = [4000, 12]  # a header that claims more than its byte range
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    lying = tmp_path / "in" / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(InvalidInput, match="do not match its byte range"):
        read_weights(lying, field="t")
    with pytest.raises(InvalidInput, match="do not match"):
        run(tmp_path, base, [lying])
    huge = tmp_path / "in" / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(InvalidInput, match="header length"):
        run(tmp_path, base, [huge])
    assert LineageStore((tmp_path / "store").as_uri()).get_lineage("default", "big") is None


def test_max_shard_size_takes_bytes_or_units():
    from core.methods import CommonParams

    assert CommonParams(max_shard_size="5GB").max_shard_size == 5 * 10**9
    assert CommonParams(max_shard_size="2GiB").max_shard_size == 2 * 2**30
    assert CommonParams().max_shard_size == 5 * 10**9
    with pytest.raises(ValueError):
        CommonParams(max_shard_size="5 parsecs")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_sharded_version_rebuilds_rolls_back_forks_and_is_a_lineage_input(tmp_path):
    """A sharded bf16 version: `rebuild` writes the same bytes; a rollback and a fork copy its shards, index and
    dtypes; `lineage://` reads it (a folder of shards) as another job's task."""
    from engine.job import rebuild_version

    base, tasks = write_world(tmp_path / "in", torch.bfloat16, n_tasks=2)
    params = {"max_shard_size": 900}
    run(tmp_path, base, tasks[:1], method="ties", params=params)
    two, store = run(tmp_path, base, tasks[1:], method="ties", params=params, first=1)
    files = [(f["path"], f["sha256"], f.get("dtype")) for f in two["manifest"]["files"]]
    shards = [p for p, _, dtype in files if p.startswith("model-") and dtype == "bfloat16"]
    assert len(shards) > 2 and "model.safetensors.index.json" in {p for p, _, _ in files}
    settings = Settings(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path))
    report = rebuild_version(store, "default", "big", 2, settings=settings)
    assert report["match"] and {f["path"] for f in report["files"]} >= set(shards)

    rolled = store.rollback("default", "big", 2, job_id="rollback")
    store.fork("default", "big", 2, "forked", job_id="fork")
    for manifest in (rolled, store.manifest("default", "forked", 1)):
        assert [(f["path"], f["sha256"], f.get("dtype")) for f in manifest["files"]] == files
    store.download_version("default", "forked", 1, tmp_path / "fork")
    assert read_weights(tmp_path / "fork", field="v").keys() == load_file(base).keys()

    spec = parse_job_spec({"lineage": "reuse", "base": {"family": "state_dict", "uri": base.as_uri()},
                           "method": "task_arithmetic", "params": {"scaling_factor": 1.0},
                           "tasks": [{"name": "big", "checkpoint": "lineage://big@2"}]})
    reused = run_job(spec, store, settings=settings)
    assert reused["manifest"]["tasks"][0]["checkpoint"] == "lineage://big@2"
    store.download_version("default", "reuse", 1, tmp_path / "reuse")
    version = materialize(open_state_dict(tmp_path / "fork", field="v"))  # θ0 + 1·(v2 − θ0) is v2, exactly
    assert all(torch.equal(value, version[key])
               for key, value in load_file(tmp_path / "reuse" / "model.safetensors").items())
