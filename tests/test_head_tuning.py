"""Head tuning: a task's head re-fitted on the merged tower from labelled `head_data`, kept in the version and
used by later versions to measure the task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bench.suite.build import task_entry
from core.errors import InvalidInput
from core.spec import parse_job_spec
from core.store import LineageStore
from core.uris import Fetched
from engine.families import get_family
from engine.heads import features_of
from engine.job import run_job

# The paper's convex blend: a lineage's first version is the first fine-tune itself, so a lineage whose first head was
# tuned and one whose head was not differ in that head only (the additive first version θ0 + λ·τ_1 would also store
# other replay targets for the tuned head: the merged tower's features instead of the fine-tune's).
PARAMS = {"steps": 4, "batch_size": 8, "eval_every": 2, "head_steps": 60, "composition": "convex"}


def spec(data, names, *, base, tune=True, lineage="tuned"):
    body = {"lineage": lineage, "tasks": [task_entry(data, n, tune_head=tune) for n in names], "method": "otmf",
            "params": PARAMS}
    if base:
        body["base"] = data["base"]
    return parse_job_spec(body)


def _cross_entropy(data, tower, head, uri):
    family = get_family("open_clip")
    loaded = family.load_base(Fetched(data["base"]["uri"], _path(data["base"]["uri"]), "", 0), data["base"]["arch"])
    inputs = family.load_inputs(Fetched(uri, _path(uri), "", 0), loaded, labelled=True, field="d")
    features = features_of(family, loaded, tower, inputs, device=torch.device("cpu"))
    return F.cross_entropy(F.linear(features, head["weight"], head.get("bias")), inputs.labels).item()


def _path(uri):
    from pathlib import Path

    return Path(uri.removeprefix("file://"))


def test_tuned_head_is_stored_fits_better_and_measures_later_versions(env, tmp_path):
    data, _, settings, store = env
    first = run_job(spec(data, ["mnist"], base=True), store, settings=settings)
    manifest = first["manifest"]
    record = manifest["tasks"][0]
    assert record["head_data"]["sha256"] and manifest["metrics"]["steps"][0]["head_tuned"] is True
    store.download_version("default", "tuned", 1, tmp_path / "v1")
    tuned = load_file(tmp_path / "v1" / record["eval_files"]["head"])
    given = load_file(_path(data["tasks"]["mnist"]["head"]))
    assert not torch.equal(tuned["weight"], given["weight"])
    tower = get_family("open_clip").load_version(tmp_path / "v1", get_family("open_clip").load_base(
        Fetched("", _path(data["base"]["uri"]), "", 0), data["base"]["arch"]))
    head_data = data["tasks"]["mnist"]["head_data"]
    assert _cross_entropy(data, tower, tuned, head_data) < _cross_entropy(data, tower, given, head_data)

    # The next version measures mnist with the tuned head, not the one the first job named.
    second = run_job(spec(data, ["shapes"], base=False, tune=False), store, settings=settings)
    assert "head_data" not in second["manifest"]["tasks"][0]
    untuned = LineageStore((tmp_path / "plain").as_uri())
    run_job(spec(data, ["mnist"], base=True, tune=False), untuned, settings=settings)
    plain = run_job(spec(data, ["shapes"], base=False, tune=False), untuned, settings=settings)
    assert second["metrics"]["tasks"]["shapes"] == plain["metrics"]["tasks"]["shapes"]
    assert second["metrics"]["tasks"]["mnist"] != plain["metrics"]["tasks"]["mnist"]


def test_head_data_errors_are_typed_and_nothing_is_written(env, tmp_path):
    data, _, settings, store = env
    body = spec(data, ["mnist"], base=True).model_dump()
    out_of_range = tmp_path / "labels.npz"
    np.savez(out_of_range, x=np.zeros((8, 28, 28), np.uint8), y=np.full(8, 10, np.int64))
    body["tasks"][0]["head_data"] = out_of_range.as_uri()
    with pytest.raises(InvalidInput, match=r"labels must lie in \[0, 9\]") as info:
        run_job(parse_job_spec(body), store, settings=settings)
    assert info.value.param == "tasks.0.head_data"
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=np.zeros((8, 28, 28), np.uint8))
    body["tasks"][0]["head_data"] = unlabelled.as_uri()
    with pytest.raises(InvalidInput):
        run_job(parse_job_spec(body), store, settings=settings)
    assert store.get_lineage("default", "tuned") is None
    no_head = {k: v for k, v in task_entry(data, "mnist", tune_head=True).items() if k not in ("head", "eval")}
    with pytest.raises(InvalidInput, match="head_data"):
        parse_job_spec({"lineage": "x", "base": data["base"], "tasks": [no_head]})


def test_otmf_head_alignment_aligns_through_the_lineages_stored_heads_and_the_new_ones(env):
    data, _, settings, store = env
    aligned = {**PARAMS, "pre_data": "current", "head_alignment": 1.0}

    def job(names, base):
        body = {"lineage": "aligned", "tasks": [task_entry(data, n) for n in names], "method": "otmf",
                "params": aligned}
        return run_job(parse_job_spec({**body, **({"base": data["base"]} if base else {})}), store,
                       settings=settings)

    job(["mnist"], base=True)
    steps = job(["shapes", "gratings"], base=False)["manifest"]["metrics"]["steps"]
    # shapes aligns through mnist's head, read back from version 1; gratings through both earlier heads.
    assert [s["aligned_heads"] for s in steps] == [{"pre": 1, "post": 1}, {"pre": 2, "post": 1}]
