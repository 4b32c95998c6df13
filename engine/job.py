"""`run_job`: the one entry point that the CLI and the Celery worker share.

It fetches every input the spec names (checking the URI policy and recording sha256s), runs one continual step
per task with the chosen method, measures accuracy on every task of the lineage that has an eval set, and commits
exactly one new version through the lineage store. Every check that can fail runs before anything is written.

In order: `_plan_job` (checks that need no input file), `_fetch_inputs` and `_read_inputs` (every input, read and
checked), `merge_steps` (the continual steps; no store, so tests and benchmarks run the job's own loop), then
`_version_files` and `_manifest` (the version as committed). Every path inside a version comes from core.store.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from core import __version__ as code_version
from core.digests import files_sha256, in_parallel
from core.errors import Conflict, InvalidInput
from core.ids import new_job_id
from core.methods import CommonParams
from core.progress import NullProgress, Progress
from core.settings import Settings, get_settings
from core.spec import JobSpec, TaskSpec, parse_job_spec
from core.store import (
    STATE_FILE,
    FileToCommit,
    LineageStore,
    task_eval_path,
    task_head_path,
    tuned_head_path,
    version_chain,
    version_file_label,
)
from core.uris import Fetched, UriReader
from engine.allocator import use_for_job
from engine.evaluate import accuracy
from engine.families import get_family
from engine.families.base import Family, LoadedBase, Tensors, VersionFormat
from engine.heads import check_eval_data, check_head_data, tune_head
from engine.inputs import Inputs
from engine.methods import get_method
from engine.methods.base import Method, MethodState, StepHeads, StepInput, StepOutput
from engine.streaming import Sinks, Streaming
from engine.tensorfiles import materialize
from engine.tensors import load_state_dict, resolve_device, save_safetensors, torch_threads

log = logging.getLogger(__name__)


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


@dataclass
class JobPlan:
    """What the job merges onto and with, as checked before any input is fetched."""

    lineage: dict | None
    history: list[dict]  # every version's manifest, oldest first
    parent: int
    base_ref: dict  # family, arch, uri; sha256 once the base is fetched
    merged_before: list[str]  # the lineage's task names, in merge order
    family: Family
    method: Method
    device: torch.device


@dataclass
class JobInputs:
    """Every input of the job, read and checked."""

    tasks: list[TaskInputs]
    loaded: LoadedBase
    head: Tensors  # the parent version's tower (θ0 for a new lineage)
    state: MethodState
    calibration: dict[str, Inputs]
    evals: dict[str, EvalTask]
    head_data: dict[str, Inputs]


@dataclass
class StepTask:
    """One task for `merge_steps`. Its checkpoint is loaded only when its step runs, so one is in memory at a time."""

    name: str
    checkpoint: Callable[[], Tensors]
    calibration: Inputs | None = None
    head_data: Inputs | None = None  # labelled inputs to re-fit the task's head (in `evals`) on the new tower
    field: str = "task"


@dataclass
class MergeResult:
    tower: Mapping[str, torch.Tensor]  # the new head θ, float32, CPU (lazy when streamed)
    state: MethodState
    steps: list[dict]  # per task: its name and its step's metrics
    files: list[Path] | None = None  # the version's model files, when the merge streamed them


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
    if lineage is None:
        store.check_name_free(tenant, spec.lineage)
    history = version_chain(store.manifests(tenant, spec.lineage)) if lineage else []
    if history and history[-1].get("job_id") == job_id:
        # A redelivered job whose version is already committed: report it, never merge twice.
        return _result(history[-1])
    plan = _plan_job(spec, lineage, history, settings)
    torch.manual_seed(spec.params.seed)

    with tempfile.TemporaryDirectory(prefix="mergeline-job-") as tmp, store.staging(job_id) as staged:
        work = Path(tmp)
        # The version is written where committing it costs least: a file store's staging folder (a rename then).
        out_dir = staged or work / "version"
        inputs, merged = _merge(spec, plan, store, tenant, settings, work, out_dir, progress)
        metrics = _evaluate_all(plan.family, inputs.loaded, merged.tower, inputs.evals, plan.device)
        metrics["steps"] = merged.steps
        metrics["seconds"] = round(time.monotonic() - started, 3)
        progress.event("evaluated", f"accuracy on {len(inputs.evals)} task(s)",
                       {"avg_accuracy": metrics["avg_accuracy"]})

        files = _version_files(spec, plan, inputs, merged, out_dir)
        progress.event("committing", f"writing v{plan.parent + 1}")
        stored = store.commit_version(tenant, spec.lineage, parent=plan.parent, base=plan.base_ref, files=files,
                                      manifest=_manifest(spec, plan, inputs, metrics), job_id=job_id)
    progress.event("committed", f"committed v{stored['version']}", {"version": stored["version"]})
    return _result(stored)


def _merge(spec: JobSpec, plan: JobPlan, store: LineageStore, tenant: str, settings: Settings, work: Path,
           out_dir: Path, progress: Progress) -> tuple[JobInputs, MergeResult]:
    """Fetch and read every input, then run the continual steps (nothing is written to the store). Local inputs
    are hashed while the merge runs: their digests are all known when this returns."""
    if not use_for_job(plan.method.data_driven, settings.malloc_mmap_threshold):
        log.warning("MERGELINE_MALLOC_MMAP_THRESHOLD has no effect: the C library is not glibc")
    with UriReader(settings, work, store=store, tenant=tenant, background=True) as reader:
        base_file, tasks = _fetch_inputs(spec, plan, reader, progress)
        inputs = _read_inputs(spec, plan, store, tenant, base_file, tasks, work)
        # Every input is read and checked; from here on only a cancellation, an input that can no longer be read
        # or the store can stop the job. A data-free method streams: it reads every input tensor by tensor and
        # writes the version (into `out_dir`, where `_version_files` finds it) as it goes.
        open_version = partial(plan.family.open_version, inputs.loaded, out_dir, VersionFormat.of(spec.params))
        stream = None if plan.method.data_driven else Streaming(
            work / "steps", inputs.loaded.tower, open_version, elementwise=plan.method.elementwise)
        merged = merge_steps(
            plan.family, inputs.loaded, plan.method, spec.params, _step_tasks(plan, inputs), merged=inputs.head,
            state=inputs.state, position=len(plan.merged_before), device=plan.device, evals=inputs.evals,
            progress=progress, stream=stream)
    plan.base_ref["sha256"] = base_file.sha256
    return inputs, merged


def rebuild_version(store: LineageStore, tenant: str, lineage: str, version: int, *,
                    settings: Settings | None = None, progress: Progress | None = None) -> dict:
    """Re-run version `version` from its manifest (its inputs by URI, method, params and seed, onto its parent
    version from the store, on its device and thread count) into a temporary folder, without committing, and
    compare every file's sha256 with the manifest's. Returns {"version", "match", "files": [{path, sha256,
    rebuilt_sha256, match}], "inputs_changed": [fields whose sha256 differs from the one recorded]}."""
    settings = settings or get_settings()
    progress = progress or NullProgress()
    manifest = store.manifest(tenant, lineage, version)
    doc = store.require_lineage(tenant, lineage)
    spec = _spec_of(manifest)
    history = [store.manifest(tenant, lineage, v) for v in range(1, manifest["parent"] + 1)]
    plan = _plan_job(spec, {**doc, "head": manifest["parent"]}, history, settings)
    plan.device = resolve_device(manifest.get("device"))
    torch.manual_seed(spec.params.seed)
    with torch_threads(manifest.get("threads", torch.get_num_threads())), \
            tempfile.TemporaryDirectory(prefix="mergeline-rebuild-") as tmp:
        work = Path(tmp)
        inputs, merged = _merge(spec, plan, store, tenant, settings, work, work / "version", progress)
        written = _version_files(spec, plan, inputs, merged, work / "version")
        rebuilt = dict(zip([f.path for f in written], files_sha256([f.local for f in written]), strict=True))
    recorded = {f["path"]: f["sha256"] for f in manifest["files"]}
    files = [{"path": path, "sha256": recorded.get(path), "rebuilt_sha256": rebuilt.get(path),
              "match": recorded.get(path) == rebuilt.get(path)} for path in sorted(recorded.keys() | rebuilt.keys())]
    changed = _changed_inputs(manifest, plan, inputs)
    return {"version": version, "match": all(f["match"] for f in files), "files": files, "inputs_changed": changed}


def _spec_of(manifest: dict) -> JobSpec:
    """The job that made a version, as its manifest records it (task names may repeat earlier ones: replaced)."""
    kinds = ("calibration", "eval", "head", "head_data")
    tasks = [{"name": t["name"], "checkpoint": t["checkpoint"], "replace": True,
              **{k: t[k]["uri"] for k in kinds if k in t}} for t in manifest["tasks"]]
    return parse_job_spec({"lineage": manifest["lineage"], "method": manifest["method"],
                           "params": manifest["params"], "tasks": tasks})


def _changed_inputs(manifest: dict, plan: JobPlan, inputs: JobInputs) -> list[str]:
    """The inputs whose sha256 now differs from the one the manifest recorded, by spec field."""
    changed = ["base.uri"] if plan.base_ref.get("sha256") != manifest["base"].get("sha256") else []
    for t, record in zip(inputs.tasks, manifest["tasks"], strict=True):
        if t.checkpoint.sha256 != record["sha256"]:
            changed.append(f"{t.field}.checkpoint")
        for kind in ("calibration", "eval", "head", "head_data"):
            fetched: Fetched | None = getattr(t, kind)
            if fetched is not None and fetched.sha256 != record[kind]["sha256"]:
                changed.append(f"{t.field}.{kind}")
    return changed


def _result(manifest: dict) -> dict:
    return {"version": manifest["version"], "manifest": manifest, "metrics": manifest["metrics"]}


# -- plan and checks --------------------------------------------------------------------------------------------
def _plan_job(spec: JobSpec, lineage: dict | None, history: list[dict], settings: Settings) -> JobPlan:
    """The parent, base, family, method and device, with every check that needs no input file."""
    parent = lineage["head"] if lineage else 0
    if spec.parent_version is not None and spec.parent_version != parent:
        raise Conflict(f"lineage head is v{parent}, the job names parent_version {spec.parent_version}",
                       param="parent_version")
    base_ref = _base_ref(spec, lineage)
    merged_before = _task_names(history)
    _check_task_names(spec, merged_before)

    family = get_family(base_ref["family"])
    method = get_method(spec.method)
    if method.data_driven and not family.has_features:
        raise InvalidInput(f"{spec.method} needs a feature function; the {family.name} family has none",
                           param="method")
    device = resolve_device(spec.params.device or settings.device)
    return JobPlan(lineage, history, parent, base_ref, merged_before, family, method, device)


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


# -- loading inputs ---------------------------------------------------------------------------------------------
def _fetch_inputs(spec: JobSpec, plan: JobPlan, reader: UriReader,
                  progress: Progress) -> tuple[Fetched, list[TaskInputs]]:
    """The base and every task's files, fetched under the URI policy (several at once); a lineage's base is checked
    against the sha256 the lineage recorded."""
    fetches = [partial(reader.fetch, plan.base_ref["uri"], field="base.uri")]
    fetches += [partial(_fetch_task, reader, task, i, plan.method.data_driven) for i, task in enumerate(spec.tasks)]
    base_file, *tasks = in_parallel(lambda fetch: fetch(), fetches)
    if plan.lineage and base_file.sha256 != plan.lineage["base"].get("sha256"):
        raise Conflict(f"the base at {plan.base_ref['uri']} changed since the lineage was created", param="base")
    progress.event("inputs_fetched", f"fetched the base and {len(tasks)} task(s)")
    return base_file, tasks


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


def _read_inputs(spec: JobSpec, plan: JobPlan, store: LineageStore, tenant: str, base_file: Fetched,
                 tasks: list[TaskInputs], work: Path) -> JobInputs:
    """The base, the parent version and every data file, loaded and checked against each other."""
    family = plan.family
    loaded = family.load_base(base_file, plan.base_ref.get("arch"))
    if plan.method.data_driven:  # it runs the whole tower many times: in memory
        loaded.tower = materialize(loaded.tower)
    head, state = _load_head(store, tenant, spec, family, loaded, plan.parent, plan.history, work)
    if plan.method.data_driven:
        head = materialize(head)
    calibration = {
        t.spec.name: family.load_inputs(t.calibration, loaded, labelled=False, field=f"{t.field}.calibration")
        for t in tasks if plan.method.data_driven
    }
    evals = _lineage_evals(store, tenant, spec, family, loaded, plan.history, work)
    evals.update(_job_evals(family, loaded, tasks, len(plan.merged_before)))
    head_data = {t.spec.name: family.load_inputs(t.head_data, loaded, labelled=True, field=f"{t.field}.head_data")
                 for t in tasks if t.head_data is not None}
    for t in tasks:
        if t.spec.name in head_data:
            check_head_data(head_data[t.spec.name], evals[t.spec.name].head, field=t.field)
    return JobInputs(tasks, loaded, head, state, calibration, evals, head_data)


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


def _job_evals(family: Family, loaded: LoadedBase, tasks: list[TaskInputs], merged_before: int) -> dict[str, EvalTask]:
    """The eval sets and heads this job's tasks name (checked against each other); the tasks follow the lineage's
    `merged_before` ones."""
    evals = {
        t.spec.name: EvalTask(t.spec.name, merged_before + i + 1,
                              family.load_inputs(t.eval, loaded, labelled=True, field=f"{t.field}.eval"),
                              load_state_dict(t.head.path, field=f"{t.field}.head"), f"{t.field}.head")
        for i, t in enumerate(tasks) if t.eval is not None
    }
    for t in evals.values():
        check_eval_data(t.data, t.head, field=t.field.removesuffix(".head") + ".eval", head_field=t.field)
    return evals


def _lineage_evals(store: LineageStore, tenant: str, spec: JobSpec, family: Family, loaded: LoadedBase,
                   history: list[dict], work: Path) -> dict[str, EvalTask]:
    """Eval sets and heads of the lineage's earlier tasks, read back from the versions that stored them."""
    latest: dict[str, tuple[int, dict]] = {}
    for manifest in history:
        for task in manifest["tasks"]:
            latest[task["name"]] = (manifest["version"], task)
    return {name: _stored_eval(store, tenant, spec.lineage, family, loaded, version, task, work / "lineage" / name)
            for name, (version, task) in latest.items() if "eval_files" in task}


def _stored_eval(store: LineageStore, tenant: str, lineage: str, family: Family, loaded: LoadedBase, version: int,
                 task: dict, folder: Path) -> EvalTask:
    """One earlier task's eval set and head, downloaded from `version` (sha256-checked against its manifest)."""
    paths = {}
    for kind, rel in task["eval_files"].items():
        paths[kind] = folder / Path(rel).name
        store.download_file(tenant, lineage, version, rel, paths[kind])
    field = f"lineage.{task['name']}"
    stored = Fetched(version_file_label(version, task["eval_files"]["eval"]), paths["eval"], "", 0)
    data = family.load_inputs(stored, loaded, labelled=True, field=f"{field}.eval")
    head = load_state_dict(paths["head"], field=f"{field}.head")
    return EvalTask(task["name"], task["index"], data, head, f"{field}.head")


# -- merging ----------------------------------------------------------------------------------------------------
def _step_tasks(plan: JobPlan, inputs: JobInputs) -> list[StepTask]:
    family, loaded = plan.family, inputs.loaded
    def checkpoint(t: TaskInputs) -> Callable[[], Mapping[str, torch.Tensor]]:
        read = partial(family.load_checkpoint, t.checkpoint, loaded, field=f"{t.field}.checkpoint")
        return (lambda: materialize(read())) if plan.method.data_driven else read

    return [StepTask(t.spec.name, checkpoint(t),
                     calibration=inputs.calibration.get(t.spec.name), head_data=inputs.head_data.get(t.spec.name),
                     field=t.field)
            for t in inputs.tasks]


def merge_steps(
    family: Family,
    loaded: LoadedBase,
    method: Method,
    params: CommonParams,
    tasks: list[StepTask],
    *,
    merged: Tensors,
    state: MethodState,
    position: int,
    device: torch.device,
    evals: dict[str, EvalTask] | None = None,
    progress: Progress | None = None,
    on_step: Callable[[int, StepOutput], None] | None = None,
    stream: Streaming | None = None,
) -> MergeResult:
    """Merge `tasks` in order onto `merged`, a head that holds `position` tasks, one method step each, carrying the
    method's state from step to step. After a task's step its head in `evals` is re-fitted when it has head data,
    and its accuracy is measured when it is in `evals`; `on_step(i, output)` then sees the step's output.
    Reads and writes no store, so tests and benchmarks run exactly the job's steps. With `stream`, every step reads
    its inputs tensor by tensor and writes its head into files, the last step into the version."""
    evals = {} if evals is None else evals
    progress = progress or NullProgress()
    steps: list[dict] = []
    for i, task in enumerate(tasks):
        progress.event("task_started", f"merging {task.name}", {"task_index": i, "name": task.name})
        # The checkpoint is referenced by the StepInput only, so it is freed as soon as the step returns (unless the
        # streamed head is recomputed from it).
        if stream is None:
            views, sinks = (loaded.tower, merged, task.checkpoint()), Sinks()
        else:
            merged = stream.head(merged, method.head_reads(position + i))
            checkpoint = task.checkpoint()
            sinks = stream.sinks(i == len(tasks) - 1, merged, checkpoint)
            views = tuple(stream.view(v) for v in (loaded.tower, merged, checkpoint))
            del checkpoint
        out = method.step(StepInput(
            base=views[0], merged=views[1], task=views[2], index=position + i, state=state, params=params,
            device=device, family=family, loaded=loaded, calibration=task.calibration,
            progress=lambda step, total, loss, objective=None, losses=None, i=i: progress.update(
                task_index=i, tasks_total=len(tasks), step=step, steps_total=total, loss=loss, objective=objective,
                losses=losses),
            sinks=sinks, heads=_step_heads(evals, task, position + i),
        ))
        del views, sinks
        merged, state = out.merged, out.state
        if stream is not None:
            stream.step_done(merged)
        steps.append({"task": task.name, **out.metrics})
        data = {"task_index": i, "name": task.name, **out.metrics}
        if task.head_data is not None:
            evals[task.name].head = _tune_head(family, loaded, merged, task, evals[task.name].head, params, device)
            progress.event("head_tuned", f"tuned the head of {task.name}", {"task_index": i})
            steps[-1]["head_tuned"] = True
        if task.name in evals:
            data["accuracy"] = _accuracies(family, loaded, merged, [evals[task.name]], device)[task.name]
        progress.event("task_merged", f"merged {task.name}", data)
        if "warning" in out.metrics:  # e.g. OTMF's masks never bettered: the step is not what the method promises
            progress.event("step_warning", f"{task.name}: {out.metrics['warning']}",
                           {"task_index": i, "name": task.name})
        if on_step is not None:
            on_step(i, out)
    return MergeResult(merged, state, steps, stream.version.files if stream and stream.version else None)


def _step_heads(evals: dict[str, EvalTask], task: StepTask, merged_before: int) -> StepHeads:
    """The heads of the task being merged and of the `merged_before` tasks before it, as far as they are known."""
    name = task.name
    return StepHeads(task=evals[name].head if name in evals else None,
                     earlier={e.index - 1: e.head for e in evals.values()
                              if e.index <= merged_before and e.name != name},
                     task_refit=task.head_data is not None)


def _tune_head(family: Family, loaded: LoadedBase, tower: Tensors, task: StepTask, head: Tensors,
               params: CommonParams, device: torch.device) -> Tensors:
    on_device = {k: v.to(device) for k, v in tower.items()}
    return tune_head(family, loaded, on_device, task.head_data, head, steps=params.head_steps, lr=params.head_lr,
                     seed=params.seed, device=device, field=task.field)


def _accuracies(family: Family, loaded: LoadedBase, tower: Tensors, tasks: list[EvalTask],
                device: torch.device) -> dict[str, float]:
    """Each task's accuracy under `tower`, moved to the device once for all of them."""
    if not tasks:
        return {}  # nothing to measure: a streamed tower stays on disk
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


# -- the version ------------------------------------------------------------------------------------------------
def _version_files(spec: JobSpec, plan: JobPlan, inputs: JobInputs, merged: MergeResult,
                   out_dir: Path) -> list[FileToCommit]:
    """The version's files, written under `out_dir`: the family's model files (already there when the merge
    streamed), the method state, and every task's eval set and head (the tuned head where the task was tuned),
    which later versions measure the task with. Weight files record the dtype of the merged weights."""
    fmt = VersionFormat.of(spec.params)
    written = merged.files
    if written is None:
        written = plan.family.save_version(inputs.loaded, merged.tower, out_dir, fmt)
    dtype = str(fmt.dtype or inputs.loaded.dtype).removeprefix("torch.")
    files = [FileToCommit(p.relative_to(out_dir).as_posix(), p, dtype if p.suffix == ".safetensors" else None)
             for p in written]
    save_safetensors(merged.state.tensors, out_dir / STATE_FILE,
                     metadata={"method": spec.method, "meta": json.dumps(merged.state.meta)})
    files.append(FileToCommit(STATE_FILE, out_dir / STATE_FILE))
    for t in inputs.tasks:
        if t.eval is None:
            continue
        files.append(FileToCommit(task_eval_path(t.spec.name, t.eval.path), t.eval.path))
        head_file = t.head.path
        if t.head_data is not None:
            head_file = out_dir / tuned_head_path(t.spec.name)
            head_file.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors(inputs.evals[t.spec.name].head, head_file)
        files.append(FileToCommit(task_head_path(t.spec.name, head_file), head_file))
    return files


def _manifest(spec: JobSpec, plan: JobPlan, inputs: JobInputs, metrics: dict) -> dict:
    position = len(plan.merged_before)
    return {
        "lineage": spec.lineage,
        "base": plan.base_ref,
        "method": spec.method,
        "params": spec.params.model_dump(),
        "tasks": [_task_record(t, position + i + 1) for i, t in enumerate(inputs.tasks)],
        "metrics": metrics,
        "code_version": code_version,
        "device": str(plan.device),
        **({"metadata": spec.metadata} if spec.metadata else {}),
        "threads": torch.get_num_threads(),  # CPU reductions, and so the version's bytes, depend on it
    }


def _task_record(t: TaskInputs, index: int) -> dict:
    record = {"name": t.spec.name, "index": index, "checkpoint": t.checkpoint.uri, "sha256": t.checkpoint.sha256}
    for kind in ("calibration", "eval", "head", "head_data"):
        fetched: Fetched | None = getattr(t, kind)
        if fetched is not None:
            record[kind] = {"uri": fetched.uri, "sha256": fetched.sha256}
    if t.eval is not None:
        # Kept in the version so that later versions can still measure this task (with its tuned head, if tuned).
        record["eval_files"] = {"eval": task_eval_path(t.spec.name, t.eval.path),
                                "head": tuned_head_path(t.spec.name) if t.head_data else
                                task_head_path(t.spec.name, t.head.path)}
    return record
