"""bench.accuracy takes lineages measured before only where nothing that decides their outcome differs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.accuracy import METHODS, _measured_before, suite_fingerprint


def test_reused_lineages_need_the_same_build_split_params_and_order(tmp_path: Path):
    for name in ("base", "a"):
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode())
    suite = {"base": {"uri": (tmp_path / "base.safetensors").as_uri()},
             "tasks": {"a": {"checkpoint": (tmp_path / "a.safetensors").as_uri()}}}
    params = METHODS["ties"][1]
    run = {"order": ["a", "b"], "avg_accuracy": 0.5}
    old = {"suite": {"build_sha256": suite_fingerprint(suite), "split": "eval"}, "command": "python -m bench.accuracy",
           "methods": {"ties": {"params": params, "head_tuning": False, "runs": [run]}}}
    work = [("ties", 0, ["a", "b"], params), ("ties", 1, ["b", "a"], params), ("opcm", 0, ["a", "b"], {})]
    build = suite_fingerprint(suite)
    assert _measured_before(old, build, "eval", work) == {("ties", 0): run}
    assert _measured_before(old, build, "eval", [("ties", 0, ["a", "b"], {**params, "top_k": 5.0})]) == {}
    with pytest.raises(SystemExit, match="same build and split"):
        _measured_before(old, build, "validation", work)
    (tmp_path / "a.safetensors").write_bytes(b"rebuilt")
    with pytest.raises(SystemExit, match="same build and split"):
        _measured_before(old, suite_fingerprint(suite), "eval", work)


def test_a_folder_build_is_fingerprinted_by_its_weights_not_its_library_written_configs(tmp_path: Path):
    for name in ("base", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(name.encode())
        (tmp_path / name / "config.json").write_text('{"transformers_version": "5.0", "use_cache": true}')
    suite = {"base": {"uri": (tmp_path / "base").as_uri()}, "tasks": {"a": {"checkpoint": (tmp_path / "a").as_uri()}}}
    build = suite_fingerprint(suite)
    (tmp_path / "a" / "config.json").write_text('{"transformers_version": "5.25", "dtype": "float32"}')
    assert suite_fingerprint(suite) == build
    (tmp_path / "a" / "model.safetensors").write_bytes(b"retrained")
    assert suite_fingerprint(suite) != build
