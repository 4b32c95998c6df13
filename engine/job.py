"""`run_job`: the one entry point that the CLI and the Celery worker share.

It fetches every input the spec names (checking the URI policy and recording sha256s), runs one continual step
per task with the chosen method, measures accuracy on every task of the lineage that has an eval set, and commits
exactly one new version through the lineage store. Every check that can fail runs before anything is written.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from core import __version__ as code_version
from core.errors import Conflict, InvalidInput
from core.ids import new_job_id
from core.progress import NullProgress, Progress
from core.settings import Settings, get_settings
from core.spec import JobSpec, TaskSpec
from core.store import FileToCommit, LineageStore
from core.uris import Fetched, UriReader
from engine.evaluate import accuracy
from engine.families import get_family
from engine.families.base import Family, LoadedBase, Tensors
from engine.heads import check_head_data, tune_head
from engine.inputs import Inputs
from engine.methods import get_method
from engine.methods.base import MethodState, StepInput
from engine.tensors import load_state_dict, resolve_device, save_safetensors

STATE_FILE = "state.safetensors"
TUNED_HEAD = Path("head.safetensors")


@dataclass
class TaskInputs:
    """One task of the job with its fetched files."""

    spec: TaskSpec
    field: str  # "tasks.3", for error messages
    checkpoint: Fetched
    calibration: Fetched | None
    eval: Fetched | None
    head: Fetched | None
    head_data: Fetched | None


@dataclass
class EvalTask:
    """A task of the lineage whose accuracy is measured on the new version."""

    name: str
    index: int  # position in the lineage, 1-based
    data: Inputs
    head: Tensors
    field: str


def run_job(
    spec: JobSpec,
    store: LineageStore,
    progress: Progress | None = None,
    *,
    tenant: str = "default",
    job_id: str | None = None,
    settings: Settings | None = None,
) -> dict:
    """Run a merge job and commit its version. Returns {"version", "manifest", "metrics"}."""
    settings = settings or get_settings()
    progress = progress or NullProgress()
    job_id = job_id or new_job_id()
    started = time.monotonic()

    lineage = store.get_lineage(tenant, spec.lineage)
    history = store.manifests(tenant, spec.lineage) if lineage else []
    if history and history[-1].get("job_id") == job_id:
        # A redelivered job whose version is already committed: report it, never merge twice.
        return _result(history[-1])
    parent = lineage["head"] if lineage else 0
    if spec.parent_version is not None and spec.parent_version != parent:
        raise Conflict(f"lineage head is v{parent}, the job names parent_version {spec.parent_version}",
                       param="parent_version")
    base_ref = _base_ref(spec, lineage)
    merged_before = _task_names(history)
    _check_task_names(spec, merged_before)

    family = get_family(base_ref["family"])
    method = get_method(spec.method)
    params = spec.params
    if method.data_driven and not family.has_features:
        raise InvalidInput(f"{spec.method} needs a feature function; the {family.name} family has none",
                           param="method")
    device = resolve_device(params.device or settings.device)
    torch.manual_seed(params.seed)

    with tempfile.TemporaryDirectory(prefix="mergeline-job-") as tmp:
        work = Path(tmp)
        reader = UriReader(settings, work)
        base_file = reader.fetch(base_ref["uri"], field="base.uri")
        if lineage and base_file.sha256 != lineage["base"].get("sha256"):
            raise Conflict(f"the base at {base_ref['uri']} changed since the lineage was created", param="base")
        base_ref["sha256"] = base_file.sha256
        tasks = [_fetch_task(reader, task, i, method.data_driven) for i, task in enumerate(spec.tasks)]
        progress.event("inputs_fetched", f"fetched the base and {len(tasks)} task(s)")

        loaded = family.load_base(base_file, base_ref.get("arch"))
        merged, state = _load_head(store, tenant, spec, family, loaded, parent, history, work)
        calibration = {
            t.spec.name: family.load_inputs(t.calibration, loaded, labelled=False, field=f"{t.field}.calibration")
            for t in tasks if method.data_driven
        }
        evals = _lineage_evals(store, tenant, spec, family, loaded, history, work)
        for i, t in enumerate(tasks):
            if t.eval is not None:
                evals[t.spec.name] = EvalTask(
                    t.spec.name, len(merged_before) + i + 1,
                    family.load_inputs(t.eval, loaded, labelled=True, field=f"{t.field}.eval"),
                    load_state_dict(t.head.path, field=f"{t.field}.head"), f"{t.field}.head")
        head_data = {t.spec.name: family.load_inputs(t.head_data, loaded, labelled=True, field=f"{t.field}.head_data")
                     for t in tasks if t.head_data is not None}
        for t in tasks:
            if t.spec.name in head_data:
                check_head_data(head_data[t.spec.name], evals[t.spec.name].head, field=t.field)
        # Every input is read and checked; from here on only a cancellation or the store can stop the job.

        position = len(merged_before)
        step_metrics = []
        for i, task in enumerate(tasks):
            progress.event("task_started", f"merging {task.spec.name}", {"task_index": i, "name": task.spec.name})
            theta_t = family.load_checkpoint(task.checkpoint, loaded, field=f"{task.field}.checkpoint")
            out = method.step(StepInput(
                base=loaded.tower, merged=merged, task=theta_t, index=position, state=state, params=params,
                device=device, family=family, loaded=loaded, calibration=calibration.get(task.spec.name),
                progress=lambda step, total, loss, i=i: progress.update(
                    task_index=i, tasks_total=len(tasks), step=step, steps_total=total, loss=loss),
            ))
            del theta_t
            merged, state, position = out.merged, out.state, position + 1
            step_metrics.append({"task": task.spec.name, **out.metrics})
            data = {"task_index": i, "name": task.spec.name, **out.metrics}
            if task.spec.name in head_data:
                evals[task.spec.name].head = tune_head(
                    family, loaded, {k: v.to(device) for k, v in merged.items()}, head_data[task.spec.name],
                    evals[task.spec.name].head, steps=params.head_steps, lr=params.head_lr, seed=params.seed,
                    device=device, field=task.field)
                progress.event("head_tuned", f"tuned the head of {task.spec.name}", {"task_index": i})
                step_metrics[-1]["head_tuned"] = True
            if task.spec.name in evals:
                data["accuracy"] = _accuracies(family, loaded, merged, [evals[task.spec.name]], device)[task.spec.name]
            progress.event("task_merged", f"merged {task.spec.name}", data)

        metrics = _evaluate_all(family, loaded, merged, evals, device)
        metrics["steps"] = step_metrics
        metrics["seconds"] = round(time.monotonic() - started, 3)
        progress.event("evaluated", f"accuracy on {len(evals)} task(s)", {"avg_accuracy": metrics["avg_accuracy"]})

        out_dir = work / "version"
        files = [FileToCommit(p.relative_to(out_dir).as_posix(), p)
                 for p in family.save_version(loaded, merged, out_dir)]
        save_safetensors(state.tensors, out_dir / STATE_FILE,
                         metadata={"method": spec.method, "meta": json.dumps(state.meta)})
        files.append(FileToCommit(STATE_FILE, out_dir / STATE_FILE))
        for t in tasks:
            if t.eval is not None:
                files.append(FileToCommit(_eval_path(t.spec.name, t.eval.path), t.eval.path))
                head_file = t.head.path
                if t.head_data is not None:  # the version keeps the tuned head, which later versions measure with
                    head_file = out_dir / _head_path(t.spec.name, TUNED_HEAD)
                    head_file.parent.mkdir(parents=True, exist_ok=True)
                    save_safetensors(evals[t.spec.name].head, head_file)
                files.append(FileToCommit(_head_path(t.spec.name, head_file), head_file))

        manifest = {
            "lineage": spec.lineage,
            "base": base_ref,
            "method": spec.method,
            "params": params.model_dump(),
            "tasks": [_task_record(t, position - len(tasks) + i + 1) for i, t in enumerate(tasks)],
            "metrics": metrics,
            "code_version": code_version,
            "device": str(device),
        }
        progress.event("committing", f"writing v{parent + 1}")
        stored = store.commit_version(tenant, spec.lineage, parent=parent, base=base_ref, files=files,
                                      manifest=manifest, job_id=job_id)
    progress.event("committed", f"committed v{stored['version']}", {"version": stored["version"]})
    return _result(stored)


def _result(manifest: dict) -> dict:
    return {"version": manifest["version"], "manifest": manifest, "metrics": manifest["metrics"]}


def _base_ref(spec: JobSpec, lineage: dict | None) -> dict:
    """The lineage's base (family, arch, uri): the stored one, checked against the spec's when both exist."""
    if lineage is None:
        if spec.base is None:
            raise InvalidInput(f"lineage {spec.lineage!r} does not exist yet, so the job needs `base`", param="base")
        return spec.base.identity()
    stored = {k: lineage["base"].get(k) for k in ("family", "arch", "uri")}
    if spec.base is not None and spec.base.identity() != stored:
        raise Conflict(f"`base` does not match lineage {spec.lineage!r}'s base ({stored['uri']})", param="base")
    return dict(stored)


def _task_names(history: list[dict]) -> list[str]:
    return [t["name"] for m in history for t in m["tasks"]]


def _check_task_names(spec: JobSpec, merged_before: list[str]) -> None:
    merged = set(merged_before)
    for i, task in enumerate(spec.tasks):
        if task.name in merged and not task.replace:
            raise InvalidInput(f"task {task.name!r} is already in lineage {spec.lineage!r}; "
                               'set "replace": true to merge it again', param=f"tasks.{i}.name")


def _fetch_task(reader: UriReader, task: TaskSpec, i: int, needs_calibration: bool) -> TaskInputs:
    field = f"tasks.{i}"
    return TaskInputs(
        spec=task,
        field=field,
        checkpoint=reader.fetch(task.checkpoint, field=f"{field}.checkpoint"),
        calibration=reader.fetch(task.calibration, field=f"{field}.calibration")
        if needs_calibration and task.calibration else None,
        eval=reader.fetch(task.eval, field=f"{field}.eval") if task.eval else None,
        head=reader.fetch(task.head, field=f"{field}.head") if task.head else None,
        head_data=reader.fetch(task.head_data, field=f"{field}.head_data") if task.head_data else None,
    )


def _load_head(store: LineageStore, tenant: str, spec: JobSpec, family: Family, loaded: LoadedBase, parent: int,
               history: list[dict], work: Path) -> tuple[Tensors, MethodState]:
    """The head's tower weights and, when the head was made by this job's method, its carried state."""
    if parent == 0:
        return loaded.tower, MethodState()
    folder = work / "head"
    store.download_version(tenant, spec.lineage, parent, folder)
    tower = family.load_version(folder, loaded)
    state = MethodState()
    if history[-1]["method"] == spec.method and (folder / STATE_FILE).exists():
        with safe_open(folder / STATE_FILE, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            state = MethodState({k: f.get_tensor(k) for k in f.keys()}, meta)  # noqa: SIM118
    return tower, state


def _eval_path(name: str, source: Path) -> str:
    return f"tasks/{name}/eval{''.join(source.suffixes[-1:])}"


def _head_path(name: str, source: Path) -> str:
    return f"tasks/{name}/head{''.join(source.suffixes[-1:])}"


def _task_record(t: TaskInputs, index: int) -> dict:
    record = {"name": t.spec.name, "index": index, "checkpoint": t.checkpoint.uri, "sha256": t.checkpoint.sha256}
    for kind in ("calibration", "eval", "head", "head_data"):
        fetched: Fetched | None = getattr(t, kind)
        if fetched is not None:
            record[kind] = {"uri": fetched.uri, "sha256": fetched.sha256}
    if t.eval is not None:
        # Kept in the version so that later versions can still measure this task (with its tuned head, if tuned).
        record["eval_files"] = {"eval": _eval_path(t.spec.name, t.eval.path),
                                "head": _head_path(t.spec.name, TUNED_HEAD if t.head_data else t.head.path)}
    return record


def _lineage_evals(store: LineageStore, tenant: str, spec: JobSpec, family: Family, loaded: LoadedBase,
                   history: list[dict], work: Path) -> dict[str, EvalTask]:
    """Eval sets and heads of the lineage's earlier tasks, read back from the versions that stored them."""
    latest: dict[str, tuple[int, dict]] = {}
    for manifest in history:
        for task in manifest["tasks"]:
            latest[task["name"]] = (manifest["version"], task)
    evals = {}
    for name, (version, task) in latest.items():
        if "eval_files" not in task:
            continue
        paths = {}
        for kind, rel in task["eval_files"].items():
            dest = work / "lineage" / name / Path(rel).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                for chunk in store.iter_file(tenant, spec.lineage, version, rel):
                    f.write(chunk)
            paths[kind] = dest
        field = f"lineage.{name}"
        data = family.load_inputs(Fetched(f"v{version}/{task['eval_files']['eval']}", paths["eval"], "", 0),
                                  loaded, labelled=True, field=f"{field}.eval")
        evals[name] = EvalTask(name, task["index"], data, load_state_dict(paths["head"], field=f"{field}.head"),
                               f"{field}.head")
    return evals


def _accuracies(family: Family, loaded: LoadedBase, tower: Tensors, tasks: list[EvalTask],
                device: torch.device) -> dict[str, float]:
    """Each task's accuracy under `tower`, moved to the device once for all of them."""
    on_device = {k: v.to(device) for k, v in tower.items()}
    return {t.name: round(accuracy(family, loaded, on_device, t.data, t.head, device=device, field=t.field), 6)
            for t in tasks}


def _evaluate_all(family: Family, loaded: LoadedBase, tower: Tensors, evals: dict[str, EvalTask],
                  device: torch.device) -> dict:
    ordered = sorted(evals.values(), key=lambda t: t.index)
    measured = _accuracies(family, loaded, tower, ordered, device)
    per_task = {t.name: {"accuracy": measured[t.name], "step": t.index} for t in ordered}
    values = list(measured.values())
    return {"tasks": per_task, "avg_accuracy": round(sum(values) / len(values), 6) if values else None}
