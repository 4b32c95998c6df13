"""The report-only text suite (bench/suite/text.py) without its fine-tunes: its task texts, its disjoint splits,
and a description that `bench.suite.build`'s continual merges take as they take the image suite's."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from bench.suite import text
from bench.suite.build import task_entry
from core.spec import JobSpec
from engine.tensorfiles import materialize

# What bench.suite.build.build_suite records per task; the text suite adds `validation`.
BUILD_SUITE_TASK_KEYS = {"classes", "individual_accuracy", "checkpoint", "head", "calibration", "eval", "head_data"}


@pytest.mark.parametrize("name", text.TEXT_TASKS)
def test_task_texts_are_deterministic_distinct_and_balanced(name):
    classes = text.TASKS[name][0]
    texts, labels = text.task_texts(name, 12 * classes + 1)
    assert (texts, labels.tolist()) == tuple(x if isinstance(x, list) else x.tolist()
                                             for x in text.task_texts(name, 12 * classes + 1))
    assert len(set(texts)) == len(texts)
    counts = Counter(labels.tolist())
    assert sorted(counts) == list(range(classes)) and max(counts.values()) - min(counts.values()) <= 1
    assert text.task_texts(name, 12 * classes + 1, seed=1)[0] != texts


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_validation_and_training_texts_are_disjoint(tmp_path):
    config = text.CONFIG | {"eval_size": 40, "validation_size": 30, "train_size": 80, "calib_size": 20}
    _, train, _ = text._write_task_data(tmp_path, "roles", config)
    evaluation, validation = (read_jsonl(tmp_path / f) for f in ("eval.jsonl", "validation.jsonl"))
    held_out = [{r["text"] for r in rows} for rows in (evaluation, validation)]
    assert (len(evaluation), len(validation), len(train)) == (40, 30, 80)
    assert not (held_out[0] & held_out[1]) and not (set(train) & (held_out[0] | held_out[1]))
    assert [r["text"] for r in read_jsonl(tmp_path / "calibration.jsonl")] == train[:20]
    assert all("y" not in r for r in read_jsonl(tmp_path / "calibration.jsonl"))
    assert {r["text"] for r in read_jsonl(tmp_path / "head_data.jsonl")} <= set(train)


def tiny_bert(folder):
    """A one-layer BertModel of width 8 with MiniLM's tokenizer: the suite's layout at a fraction of its cost."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(text.minilm_dir() / name, folder / name)
    return folder


def test_description_is_the_image_suites_and_is_reused(tmp_path, monkeypatch):
    """On a tiny BERT, fine-tunes replaced by the base itself with a zero head: the files and the description are
    under test, not the training."""
    def base_as_finetune(family, loaded, train, classes, config, seed):
        return materialize(loaded.tower), {"weight": torch.zeros(classes, 8), "bias": torch.zeros(classes)}

    tiny = tiny_bert(tmp_path / "tiny")
    monkeypatch.setattr(text, "minilm_dir", lambda: tiny)
    monkeypatch.setattr(text, "_finetune", base_as_finetune)
    monkeypatch.setattr(text, "TEXT_TASKS", ["count", "tense"])
    monkeypatch.setattr(text, "CONFIG", text.CONFIG | {"eval_size": 8, "validation_size": 4, "train_size": 12,
                                                       "calib_size": 4})
    suite = text.build_text_suite(tmp_path / "suite", log=lambda _: None)
    assert suite["base"]["family"] == "hf" and suite["base"]["uri"].endswith("/")
    assert set(suite["tasks"]) == set(suite["base_accuracy"]) == {"count", "tense"}
    for name, task in suite["tasks"].items():
        assert set(task) == BUILD_SUITE_TASK_KEYS | {"validation"}
        assert task["classes"] == text.TASKS[name][0] and 0 <= task["individual_accuracy"] <= 1
        spec = {"lineage": "text", "base": suite["base"], "tasks": [task_entry(suite, name, tune_head=True)],
                "method": "otmf"}
        assert JobSpec.model_validate(spec).tasks[0].head_data == task["head_data"]

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt although the settings are unchanged")

    monkeypatch.setattr(text, "_finetune", refuse)
    assert text.build_text_suite(tmp_path / "suite", log=lambda _: None) == suite
