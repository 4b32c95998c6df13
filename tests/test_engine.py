"""run_job and `mergeline merge` end to end: a small real OpenCLIP model, real files, a real S3 endpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from bench.suite.build import task_entry
from core.errors import Conflict, FetchFailed, IncompatibleCheckpoint, InvalidInput
from core.settings import Settings
from core.spec import parse_job_spec
from core.store import LineageStore
from engine.job import run_job
from mergeline.cli import app
from tests.conftest import DEMO_TASKS as TASKS


def job(data, names, method="otmf", params=None, lineage="vision", base=True, **extra):
    spec = {"lineage": lineage, "tasks": [task_entry(data, n) for n in names], "method": method,
            "params": params if params is not None else {"steps": 6, "batch_size": 8, "eval_every": 2}, **extra}
    if base:
        spec["base"] = data["base"]
    return parse_job_spec(spec)


class Recorder:
    def __init__(self):
        self.updates, self.events = [], []

    def update(self, **kw):
        self.updates.append(kw)

    def event(self, type, message, data=None):
        self.events.append(type)


def test_two_jobs_make_v1_and_v2_with_accuracy_for_every_task(env):
    data, _, settings, store = env
    progress = Recorder()
    r1 = run_job(job(data, ["mnist"]), store, progress, settings=settings)
    r2 = run_job(job(data, ["shapes", "gratings"], base=False), store, progress, settings=settings)
    assert (r1["version"], r2["version"], r2["manifest"]["parent"]) == (1, 2, 1)
    assert set(r2["metrics"]["tasks"]) == set(TASKS)
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in r2["metrics"]["tasks"].values())
    assert [m["step"] for m in r2["metrics"]["tasks"].values()] == [1, 2, 3]
    manifest = store.manifest("default", "vision", 2)
    assert [t["name"] for t in manifest["tasks"]] == ["shapes", "gratings"]
    assert len(manifest["base"]["sha256"]) == 64 and all(len(t["sha256"]) == 64 for t in manifest["tasks"])
    assert {f["path"] for f in manifest["files"]} >= {"model.safetensors", "state.safetensors"}
    steps = [u for u in progress.updates if u["task_index"] == 1]
    assert steps[-1]["step"] == steps[-1]["steps_total"] == 6 and steps[-1]["tasks_total"] == 2
    assert progress.events[-1] == "committed"


def test_redelivered_job_does_not_merge_twice(env):
    data, _, settings, store = env
    first = run_job(job(data, ["mnist"], method="task_arithmetic", params={}), store, settings=settings, job_id="job_A")
    again = run_job(job(data, ["mnist"], method="task_arithmetic", params={}, base=False), store, settings=settings,
                    job_id="job_A")
    assert again["version"] == first["version"] == 1
    assert store.get_lineage("default", "vision")["head"] == 1


def test_same_seed_gives_bit_identical_versions(env, tmp_path):
    data, _, settings, _ = env
    files = []
    for i in range(2):
        store = LineageStore((tmp_path / f"s{i}").as_uri())
        run_job(job(data, ["mnist", "shapes"]), store, settings=settings)
        store.download_version("default", "vision", 1, tmp_path / f"out{i}")
        files.append(load_file(tmp_path / f"out{i}" / "model.safetensors"))
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    # Byte for byte, every file of the version (model, method state, eval copies): the same sha256.
    digests = [{f["path"]: f["sha256"] for f in LineageStore((tmp_path / f"s{i}").as_uri())
                .manifest("default", "vision", 1)["files"]} for i in range(2)]
    assert digests[0] == digests[1]


def test_cli_merge_says_when_a_step_kept_the_all_ones_masks(env, tmp_path, monkeypatch):
    data, root, _, _ = env
    monkeypatch.setenv("MERGELINE_ALLOWED_ROOTS", f"{root},{tmp_path}")
    from core.settings import get_settings

    get_settings.cache_clear()
    folder, runner = str(tmp_path / "store"), CliRunner()
    # The same checkpoint merged onto itself in the paper's convex blend: the all-ones masks already match both
    # teachers, training cannot win.
    again = {**task_entry(data, "mnist"), "name": "mnist-again"}
    convex = {"steps": 6, "batch_size": 8, "eval_every": 2, "composition": "convex"}
    for i, spec in enumerate((job(data, ["mnist"], params=convex).model_dump(),
                              {**job(data, ["mnist"], params=convex, base=False).model_dump(), "tasks": [again]})):
        (tmp_path / f"job{i}.json").write_text(json.dumps(spec))
        out = runner.invoke(app, ["merge", str(tmp_path / f"job{i}.json"), "--store", folder])
        assert out.exit_code == 0, out.output
    assert "warning mnist-again: the masks never beat the all-ones start" in " ".join(out.output.split())
    step = LineageStore((tmp_path / "store").as_uri()).manifest("default", "vision", 2)["metrics"]["steps"][0]
    assert step["masks_kept_all_ones"] is True and step["best_iteration"] == 0
    get_settings.cache_clear()


def test_cli_rebuild_reports_every_file_matching_and_a_tampered_input_as_a_mismatch(env, tmp_path, monkeypatch):
    data, root, _, _ = env
    monkeypatch.setenv("MERGELINE_ALLOWED_ROOTS", f"{root},{tmp_path}")
    from core.settings import get_settings

    get_settings.cache_clear()
    copy = tmp_path / "shapes"  # the second task's files, copied so that the test may tamper with them
    shutil.copytree(root / "tasks" / "shapes", copy)
    shapes = {**task_entry(data, "shapes"), **{k: (copy / f).as_uri() for k, f in (
        ("checkpoint", "checkpoint.safetensors"), ("calibration", "calibration.npz"))}}
    folder = str(tmp_path / "store")
    runner = CliRunner()
    # The head as the replayed inputs' teacher: the state then holds inputs only, and a changed checkpoint changes
    # the model alone (stored task features would change with it).
    params = {"steps": 6, "batch_size": 8, "eval_every": 2, "replay_targets": "head"}
    for i, spec in enumerate((job(data, ["mnist"], params=params).model_dump(),
                              {**job(data, ["mnist"], params=params, base=False).model_dump(), "tasks": [shapes]})):
        (tmp_path / f"job{i}.json").write_text(json.dumps(spec))
        out = runner.invoke(app, ["merge", str(tmp_path / f"job{i}.json"), "--store", folder, "--json"])
        assert out.exit_code == 0, out.output

    out = runner.invoke(app, ["rebuild", "vision@2", "--store", folder, "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["match"] and report["inputs_changed"] == []
    assert {f["path"] for f in report["files"]} >= {"model.safetensors", "state.safetensors"}
    assert all(f["match"] and f["sha256"] == f["rebuilt_sha256"] for f in report["files"])

    tensors = load_file(copy / "checkpoint.safetensors")
    key = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[key][0, 0] += 0.5
    save_file(tensors, copy / "checkpoint.safetensors")
    out = runner.invoke(app, ["rebuild", "vision@2", "--store", folder])
    assert out.exit_code == 1, out.output
    assert "tasks.0.checkpoint" in out.output and "differ" in out.output
    out = runner.invoke(app, ["rebuild", "vision@2", "--store", folder, "--json"])
    mismatched = {f["path"] for f in json.loads(out.output)["files"] if not f["match"]}
    assert "model.safetensors" in mismatched and "state.safetensors" not in mismatched
    assert runner.invoke(app, ["rebuild", "vision", "--store", folder]).exit_code == 1
    get_settings.cache_clear()


def test_conflicts_task_names_and_base(env):
    data, _, settings, store = env
    run_job(job(data, ["mnist"], method="task_arithmetic", params={}), store, settings=settings)
    with pytest.raises(Conflict):
        run_job(job(data, ["shapes"], parent_version=0), store, settings=settings)
    with pytest.raises(InvalidInput, match="already in lineage"):
        run_job(job(data, ["mnist"], base=False), store, settings=settings)
    replaced = parse_job_spec({**job(data, ["mnist"], base=False).model_dump(),
                               "tasks": [{**task_entry(data, "mnist"), "replace": True}]})
    assert run_job(replaced, store, settings=settings)["version"] == 2
    other_base = {**data["base"], "uri": data["tasks"]["mnist"]["checkpoint"]}
    with pytest.raises(Conflict, match="base"):
        run_job(parse_job_spec({**job(data, ["shapes"], base=False).model_dump(), "base": other_base}), store,
                settings=settings)
    with pytest.raises(InvalidInput, match="needs `base`"):
        run_job(job(data, ["shapes"], lineage="fresh", base=False), store, settings=settings)


def _bad(env, tmp_path, *, mutate):
    """Run a job whose inputs `mutate` broke; assert nothing was written."""
    data, root, settings, store = env
    spec = job(data, ["mnist"]).model_dump()
    mutate(spec, tmp_path)
    with pytest.raises((InvalidInput, FetchFailed)) as info:
        run_job(parse_job_spec(spec), store, settings=settings)
    assert store.get_lineage("default", "vision") is None
    return info.value


def test_bad_inputs_fail_typed_before_anything_is_written(env, tmp_path):
    data, root, settings, store = env
    ckpt = root / "tasks" / "mnist" / "checkpoint.safetensors"

    def write(name, content):
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else save_file(content, path)
        return path.as_uri()

    def missing(spec, _):
        spec["tasks"][0]["checkpoint"] = (tmp_path / "nope.safetensors").as_uri()

    def outside(spec, _):
        spec["tasks"][0]["checkpoint"] = "file:///etc/hostname"

    def truncated(spec, _):
        spec["tasks"][0]["checkpoint"] = write("cut.safetensors", ckpt.read_bytes()[:1000])

    def nan_weights(spec, _):
        tensors = load_file(ckpt)
        key = next(iter(tensors))
        tensors[key][0] = float("nan")
        spec["tasks"][0]["checkpoint"] = write("nan.safetensors", tensors)

    def other_arch(spec, _):
        tensors = load_file(ckpt)
        key = next(k for k, v in tensors.items() if v.ndim == 2)
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
        spec["tasks"][0]["checkpoint"] = write("arch.safetensors", tensors)

    def pickle_code(spec, tmp):
        path = tmp / "evil.pt"
        torch.save({"w": torch.zeros(2), "obj": Recorder()}, path)
        spec["tasks"][0]["checkpoint"] = path.as_uri()

    def bad_calibration(spec, tmp):
        path = tmp / "calib.npz"
        np.savez(path, x=np.zeros((4, 5), np.float64))
        spec["tasks"][0]["calibration"] = path.as_uri()

    assert _bad(env, tmp_path, mutate=missing).type == "fetch_failed"
    assert _bad(env, tmp_path, mutate=outside).type == "access_denied"
    assert _bad(env, tmp_path, mutate=truncated).type == "invalid_input"
    assert "nan" in _bad(env, tmp_path, mutate=nan_weights).message.lower()
    err = _bad(env, tmp_path, mutate=other_arch)
    assert isinstance(err, IncompatibleCheckpoint) and err.type == "incompatible_checkpoint"
    assert "weights-only" in _bad(env, tmp_path, mutate=pickle_code).message
    assert _bad(env, tmp_path, mutate=bad_calibration).param == "tasks.0.calibration"


def test_cli_merge_file_and_s3_then_pull_and_load_in_open_clip(env, tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    import boto3
    import open_clip

    data, root, settings, _ = env
    monkeypatch.setenv("MERGELINE_ALLOWED_ROOTS", f"{root},{tmp_path}")
    from core.settings import get_settings

    get_settings.cache_clear()
    runner = CliRunner()
    # file:// inputs into an s3:// store
    spec = job(data, ["mnist"], method="task_arithmetic", params={}).model_dump()
    (tmp_path / "job1.json").write_text(json.dumps(spec))
    store = f"s3://{s3_bucket}/lineages"
    out = runner.invoke(app, ["merge", str(tmp_path / "job1.json"), "--store", store, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["version"] == 1

    # s3:// inputs: upload the task's files and name them by s3 URI
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    entry = task_entry(data, "shapes")
    for key in ("checkpoint", "calibration", "eval", "head"):
        path = entry[key].removeprefix("file://")
        s3.upload_file(path, s3_bucket, f"inputs/{key}-{path.rsplit('/', 1)[-1]}")
        entry[key] = f"s3://{s3_bucket}/inputs/{key}-{path.rsplit('/', 1)[-1]}"
    spec2 = {"lineage": "vision", "tasks": [entry], "method": "otmf", "params": {"steps": 4, "batch_size": 8}}
    (tmp_path / "job2.json").write_text(json.dumps(spec2))
    out = runner.invoke(app, ["merge", str(tmp_path / "job2.json"), "--store", store])
    assert out.exit_code == 0, out.output
    assert "v2" in out.output and "shapes" in out.output

    out = runner.invoke(app, ["lineage", "show", "vision", "--store", store, "--json"])
    shown = json.loads(out.output)
    assert shown["head"] == 2 and [v["parent"] for v in shown["versions"]] == [0, 1]

    out = runner.invoke(app, ["pull", "vision@2", str(tmp_path / "pulled"), "--store", store])
    assert out.exit_code == 0, out.output
    model = open_clip.CLIP(**data["base"]["arch"])
    model.load_state_dict(load_file(tmp_path / "pulled" / "model.safetensors"))
    with torch.no_grad():
        assert model.encode_image(torch.zeros(2, 3, 28, 28)).shape == (2, data["base"]["arch"]["embed_dim"])

    out = runner.invoke(app, ["merge", str(tmp_path / "missing.json"), "--store", store])
    assert out.exit_code == 1 and "cannot read" in out.output
    get_settings.cache_clear()


def test_cli_store_is_a_plain_folder_and_an_exported_url_never_switches_to_the_api(env, tmp_path, monkeypatch):
    data, root, settings, _ = env
    monkeypatch.setenv("MERGELINE_ALLOWED_ROOTS", f"{root},{tmp_path}")
    monkeypatch.setenv("MERGELINE_URL", "http://127.0.0.1:1")  # no API there: the local store must be read
    from core.settings import get_settings

    get_settings.cache_clear()
    (tmp_path / "job.json").write_text(json.dumps(job(data, ["mnist"], method="task_arithmetic", params={})
                                                  .model_dump()))
    folder = str(tmp_path / "plain-store")
    runner = CliRunner()
    out = runner.invoke(app, ["merge", str(tmp_path / "job.json"), "--store", folder, "--json"])
    assert out.exit_code == 0, out.output
    monkeypatch.setenv("MERGELINE_STORE", folder)
    get_settings.cache_clear()
    out = runner.invoke(app, ["lineage", "show", "vision", "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["head"] == 1, out.output
    get_settings.cache_clear()


def test_cli_lineage_list_reads_the_local_store(env, tmp_path):
    data, root, settings, _ = env
    folder = tmp_path / "plain-store"
    runner = CliRunner()
    assert runner.invoke(app, ["lineage", "list", "--store", str(folder)]).output.strip() == "no lineages yet"
    store = LineageStore(folder.as_uri())
    for lineage, names in (("vision", ["mnist", "shapes"]), ("audio", ["gratings"])):
        run_job(job(data, names[:1], method="task_arithmetic", params={}, lineage=lineage), store, settings=settings)
        for name in names[1:]:
            run_job(job(data, [name], method="task_arithmetic", params={}, lineage=lineage, base=False), store,
                    settings=settings)
    (folder / "default" / "starting").mkdir()  # a first commit under way: no lineage.json yet
    out = runner.invoke(app, ["lineage", "list", "--store", str(folder), "--json"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output)["data"]
    assert [(d["name"], d["head"]) for d in listed] == [("audio", 1), ("vision", 2)]
    assert listed[1] == store.describe("default", "vision")
    out = runner.invoke(app, ["lineage", "list", "--store", str(folder)])
    assert out.exit_code == 0 and "vision" in out.output and "task_arithmetic" in out.output, out.output
    assert "starting" not in out.output


def test_lineage_store_copy_is_independent_of_input_files(env, tmp_path):
    """Later versions still measure earlier tasks after their original eval files are gone."""
    data, root, settings, store = env
    copy = tmp_path / "copy"
    shutil.copytree(root / "tasks" / "mnist", copy)
    entry = {"name": "mnist", **{k: (copy / f).as_uri() for k, f in (
        ("checkpoint", "checkpoint.safetensors"), ("calibration", "calibration.npz"), ("eval", "eval.npz"),
        ("head", "head.safetensors"))}}
    run_job(parse_job_spec({"lineage": "vision", "base": data["base"], "tasks": [entry],
                            "method": "task_arithmetic"}), store, settings=settings)
    shutil.rmtree(copy)
    result = run_job(job(data, ["shapes"], method="task_arithmetic", params={}, base=False), store, settings=settings)
    assert set(result["metrics"]["tasks"]) == {"mnist", "shapes"}


def test_hf_job_merges_two_minilm_finetunes_with_jsonl_calibration(tmp_path):
    """Two fine-tuned copies of the real all-MiniLM-L6-v2, merged with OTMF on .jsonl text; the version loads
    with AutoModel.from_pretrained and differs from both inputs."""
    from helpers_models import copy_minilm, write_hf_task, write_text_jsonl
    from transformers import AutoModel

    base = copy_minilm(tmp_path / "base")
    for i in (1, 2):
        write_hf_task(base, tmp_path / f"task{i}", seed=i)
        write_text_jsonl(tmp_path / f"calib{i}.jsonl", n=16, seed=i)
    settings = Settings(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path))
    store = LineageStore(settings.store)
    spec = parse_job_spec({
        "lineage": "text", "base": {"family": "hf", "uri": base.as_uri() + "/"},
        "tasks": [{"name": f"t{i}", "checkpoint": (tmp_path / f"task{i}").as_uri() + "/",
                   "calibration": (tmp_path / f"calib{i}.jsonl").as_uri()} for i in (1, 2)],
        "method": "otmf", "params": {"steps": 4, "batch_size": 4, "eval_every": 2},
    })
    result = run_job(spec, store, settings=settings)
    assert result["version"] == 1
    store.download_version("default", "text", 1, tmp_path / "pulled")
    merged = AutoModel.from_pretrained(tmp_path / "pulled")
    task2 = AutoModel.from_pretrained(tmp_path / "task2")
    key = "encoder.layer.0.attention.self.query.weight"
    merged_w, task_w = merged.state_dict()[key], task2.state_dict()[key]
    assert merged_w.shape == task_w.shape and not torch.equal(merged_w, task_w)
    assert torch.isfinite(merged_w).all()
