"""The job spec: every rule of contract §2 enforced, errors naming the field."""

import pytest

from core.errors import InvalidInput
from core.spec import parse_job_spec

BASE = {"family": "open_clip", "arch": "ViT-B-32", "uri": "s3://models/base.safetensors"}
TASK = {"name": "mnist", "checkpoint": "s3://models/mnist.safetensors", "calibration": "s3://data/mnist-calib.npz"}


def spec(**overrides):
    return {"lineage": "vision-prod", "base": BASE, "tasks": [TASK], **overrides}


def error(data) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_job_spec(data)
    return info.value


def test_contract_example_parses_with_defaults():
    job = parse_job_spec({**spec(), "method": "otmf", "params": {"alpha": 0.8, "steps": 100, "lr": 0.01,
                          "batch_size": 16, "seed": 0}, "parent_version": None,
                          "webhook": {"url": "https://ci.example/hooks/merge", "secret": "s3cr3t"}})
    assert job.method == "otmf"
    assert job.params.blur == 0.01 and job.params.alpha == 0.8 and job.params.pre_data == "reservoir"
    assert job.params.steps == 100


def test_default_method_is_otmf():
    assert parse_job_spec(spec()).method == "otmf"


@pytest.mark.parametrize(
    ("data", "param"),
    [
        (spec(lineage="Bad Name"), "lineage"),
        (spec(lineage="-x"), "lineage"),
        (spec(tasks=[]), "tasks"),
        (spec(tasks=[TASK] * 65), "tasks"),
        (spec(tasks=[TASK, TASK]), ""),
        (spec(method="magic"), "method"),
        (spec(params={"alpha": 2}), "params.alpha"),
        (spec(params={"nonsense": 1}), "params.nonsense"),
        (spec(method="ties", params={"steps": 3}), "params.steps"),
        (spec(params={"steps": 30, "epochs": 2}), "params"),
        (spec(params={"mask_bound": "tanh"}), "params.mask_bound"),
        (spec(params={"mask_granularity": "column"}), "params.mask_granularity"),
        (spec(parent_version=-1), "parent_version"),
        (spec(base={**BASE, "family": "onnx"}), "base.family"),
        (spec(base={**BASE, "uri": "ftp://x/y.safetensors"}), "base.uri"),
        (spec(base={"family": "open_clip", "uri": "s3://m/b.safetensors"}), "base"),
        (spec(base={"family": "hf", "arch": "bert", "uri": "s3://m/b/"}), "base"),
        (spec(tasks=[{**TASK, "calibration": None}]), "tasks.0.calibration"),
        (spec(params={"head_alignment": 1.0}), "tasks.0.head"),
        (spec(params={"head_alignment": -1.0}), "params.head_alignment"),
        (spec(tasks=[{**TASK, "eval": "s3://d/e.npz"}]), "tasks.0"),
        (spec(tasks=[{**TASK, "name": "a/b"}]), "tasks.0.name"),
        (spec(surprise=True), "surprise"),
        (spec(webhook={"url": "ftp://x", "secret": "s"}), "webhook.url"),
    ],
)
def test_bad_specs_name_the_field(data, param):
    exc = error(data)
    assert exc.type == "invalid_input"
    assert (exc.param or "") .startswith(param)


def test_otmf_refuses_state_dict_family():
    exc = error(spec(base={"family": "state_dict", "uri": "s3://m/b.safetensors"}))
    assert "feature function" in exc.message


def test_data_free_methods_need_no_calibration():
    job = parse_job_spec(spec(method="task_arithmetic", tasks=[{"name": "a", "checkpoint": "file:///x.safetensors"}]))
    assert job.params.scaling_factor == 0.3


def test_not_json_and_not_object():
    assert "not valid JSON" in error("{nope").message
    assert "JSON object" in error("[1, 2]").message
