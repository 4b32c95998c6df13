"""The `mergeline` command (contract §6). Commands that need the engine import it lazily, so that the service-side
commands start fast and never load torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.errors import InvalidInput, MergelineError, NotFound
from core.ids import new_job_id
from core.settings import get_settings
from mergeline import cli_remote
from mergeline.bars import StepRow, step_bars
from service.client import ApiError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continual model merging: OTMF and baselines.")
lineage_app = typer.Typer(no_args_is_help=True, help="Read, roll back, fork and delete lineages.")
app.add_typer(lineage_app, name="lineage")
console = Console()
err = Console(stderr=True)

StoreOpt = typer.Option(None, "--store", help="lineage store: a folder, file://PATH or s3://bucket/prefix "
                        "(default: MERGELINE_STORE)")
TenantOpt = typer.Option("default", "--tenant", help="tenant whose lineages to use")
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON")
# lineage show / pull read the local store unless --url is given: an exported MERGELINE_URL never switches them.
ApiUrlOpt = typer.Option(None, "--url", help="read through the API at this URL instead of the local store")
ApiTokenOpt = typer.Option(None, "--token", envvar="MERGELINE_TOKEN", help="bearer token for --url")


def _store(root: str | None):
    from mergeline.compose import lineage_store

    return lineage_store(get_settings(), root)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def accuracy_table(title: str, columns: dict[str, dict], tasks: list[str]) -> Table:
    """Per-task accuracy, one column per result (method or version)."""
    table = Table(title=title)
    table.add_column("task")
    for name in columns:
        table.add_column(name, justify="right")
    for task in tasks:
        row = [task]
        for metrics in columns.values():
            acc = metrics.get("tasks", {}).get(task, {}).get("accuracy")
            row.append("–" if acc is None else f"{100 * acc:.1f}")
        table.add_row(*row)
    averages = [m.get("avg_accuracy") for m in columns.values()]
    table.add_row("[bold]average", *("–" if a is None else f"[bold]{100 * a:.1f}" for a in averages))
    return table


class BarProgress(StepRow):
    """The engine's progress as a rich bar (steps of the current task, each objective's loss), and each milestone
    as a line above it."""

    def event(self, type: str, message: str, data: dict | None = None) -> None:
        if type == "task_merged" and data and "accuracy" in data:
            message += f" (accuracy {100 * data['accuracy']:.1f}%)"
        self.bars.console.print(message, markup=False, highlight=False)


def _run(spec, store, *, tenant: str, quiet: bool) -> dict:
    from engine.job import run_job

    store.sweep_staging()  # a store without workers is tidied by the CLI: what killed merges left behind
    if quiet:
        return run_job(spec, store, tenant=tenant)
    with step_bars(console=err, transient=True) as bars:
        return run_job(spec, store, BarProgress(bars), tenant=tenant)


def fail(exc: MergelineError | ApiError) -> None:
    """Print a typed error (from the engine, the store or the API) and exit 1."""
    err.print(f"[red]error[/red] ({exc.type}): {escape(exc.message)}", highlight=False)
    raise typer.Exit(1)


@app.command()
def merge(
    job: Path = typer.Argument(..., help="job spec JSON file (contract §2)"),
    store: str | None = StoreOpt,
    tenant: str = TenantOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Run one merge job in this process and commit its version."""
    from core.spec import parse_job_spec

    try:
        try:
            text = job.read_text()
        except OSError as exc:
            raise InvalidInput(f"cannot read {job}: {exc.strerror}") from None
        spec = parse_job_spec(text)
        result = _run(spec, _store(store), tenant=tenant, quiet=as_json)
    except MergelineError as exc:
        if as_json:
            _print_json({"error": exc.to_dict()})
            raise typer.Exit(1) from None
        fail(exc)
    if as_json:
        _print_json(result)
        return
    metrics = result["metrics"]
    console.print(f"[green]committed[/green] {spec.lineage} v{result['version']} "
                  f"(parent v{result['manifest']['parent']}, {spec.method})")
    if metrics.get("tasks"):
        console.print(accuracy_table(f"{spec.lineage} v{result['version']}", {spec.method: metrics},
                                     list(metrics["tasks"])))
    cli_remote.print_step_warnings(metrics)


@lineage_app.command("show")
def lineage_show(name: str, store: str | None = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt,
                 url: str | None = ApiUrlOpt, token: str | None = ApiTokenOpt) -> None:
    """A lineage's head, base and versions."""
    from service.client import MergelineClient

    try:
        if url and not store:
            with MergelineClient(url, token) as client:
                doc = client.lineage(name)
        else:
            doc = _store(store).describe(tenant, name)
    except (ApiError, MergelineError) as exc:
        fail(exc)
    versions = doc["versions"]
    if as_json:
        _print_json(doc)
        return
    console.print(f"[bold]{name}[/bold]  head v{doc['head']}  base {doc['base']['family']} {doc['base']['uri']}")
    table = Table()
    for col in ("version", "parent", "method", "tasks", "avg accuracy", "created", "job"):
        table.add_column(col)
    for m in versions:
        avg = m.get("metrics", {}).get("avg_accuracy")
        table.add_row(str(m["version"]), str(m["parent"]), m["method"], ", ".join(t["name"] for t in m["tasks"]),
                      "–" if avg is None else f"{100 * avg:.1f}", m["created_at"][:19], m["job_id"])
    console.print(table)


def _local_lineages(store, tenant: str) -> list[dict]:
    lineages = []
    for name in store.list_lineages(tenant):
        try:
            lineages.append(store.describe(tenant, name))
        except NotFound:  # a folder without lineage.json yet (its first commit is under way)
            continue
    return lineages


@lineage_app.command("list")
def lineage_list(store: str | None = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt,
                 url: str | None = ApiUrlOpt, token: str | None = ApiTokenOpt) -> None:
    """Every lineage: its head version, the head's method, how many tasks it measures and their average accuracy."""
    from service.client import MergelineClient

    try:
        if url and not store:
            with MergelineClient(url, token) as client:
                lineages = list(client.iter_lineages())
        else:
            lineages = _local_lineages(_store(store), tenant)
    except (ApiError, MergelineError) as exc:
        fail(exc)
    if as_json:
        _print_json({"data": lineages})
        return
    table = Table(box=box.SIMPLE)
    for col in ("lineage", "head", "method", "tasks", "acc %", "updated"):
        table.add_column(col, no_wrap=True)
    for doc in lineages:
        head = doc["versions"][-1] if doc["versions"] else {}
        metrics = head.get("metrics", {})
        avg = metrics.get("avg_accuracy")
        updated = (head.get("created_at") or "–")[5:16].replace("T", " ")
        table.add_row(doc["name"], f"v{doc['head']}", head.get("method", "–"), str(len(metrics.get("tasks", {}))),
                      "–" if avg is None else f"{100 * avg:.1f}", updated)
    console.print(table if lineages else "no lineages yet", highlight=False)


@app.command()
def pull(
    ref: str = typer.Argument(..., help="NAME or NAME@VERSION (default: the head)"),
    dest: Path = typer.Argument(..., help="folder to write the version's files into"),
    store: str | None = StoreOpt,
    tenant: str = TenantOpt,
    as_json: bool = JsonOpt,
    url: str | None = ApiUrlOpt,
    token: str | None = ApiTokenOpt,
) -> None:
    """Download a version's files, verified against its manifest."""
    from service.client import MergelineClient

    name, _, version = ref.partition("@")
    try:
        if version and not version.isdigit():
            raise InvalidInput(f"bad version {version!r} in {ref!r}: use NAME@N", param="version")
        if url and not store:
            with MergelineClient(url, token) as client:
                v = int(version) if version else client.lineage(name)["head"]
                if v == 0:
                    raise InvalidInput(f"{name}@0 is the base model: pull its URI directly", param="version")
                manifest = client.download_version(name, v, dest)
        else:
            s = _store(store)
            v = int(version) if version else s.require_lineage(tenant, name)["head"]
            if v == 0:
                raise InvalidInput(f"{name}@0 is the base model: pull its URI directly", param="version")
            manifest = s.download_version(tenant, name, v, dest)
    except (ApiError, MergelineError) as exc:
        fail(exc)
    if as_json:
        _print_json({"version": v, "dir": str(dest), "files": manifest["files"]})
    else:
        console.print(f"pulled {name}@{v} into {dest}: " + ", ".join(f["path"] for f in manifest["files"]))


@lineage_app.command("rollback")
def lineage_rollback(name: str, version: int = typer.Argument(..., help="the version to make the head again"),
                     store: str | None = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt,
                     url: str | None = ApiUrlOpt, token: str | None = ApiTokenOpt) -> None:
    """Commit a new head whose files and method state are VERSION's (the next job merges onto them)."""
    manifest = _lineage_op(url, token, store, lambda client: client.rollback(name, version),
                           lambda s: s.rollback(tenant, name, version, job_id=new_job_id("op")))
    if as_json:
        _print_json(manifest)
        return
    console.print(f"{escape(name)} v{manifest['version']} = v{version} (rolled back from v{manifest['parent']})")


@lineage_app.command("fork")
def lineage_fork(ref: str = typer.Argument(..., help="NAME@VERSION to start from"),
                 new: str = typer.Argument(..., help="the new lineage's name"),
                 store: str | None = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt,
                 url: str | None = ApiUrlOpt, token: str | None = ApiTokenOpt) -> None:
    """Start lineage NEW whose v1 is a copy of NAME@VERSION (files, state, task eval sets and heads)."""
    name, _, version = ref.partition("@")
    if not version.isdigit() or not version.isascii():
        fail(InvalidInput(f"bad reference {ref!r}: use NAME@VERSION", param="ref"))
    doc = _lineage_op(url, token, store, lambda client: client.fork(name, int(version), new),
                      lambda s: s.fork(tenant, name, int(version), new, job_id=new_job_id("op")))
    if as_json:
        _print_json(doc)
        return
    console.print(f"{escape(new)} v1 = {escape(name)}@{version}")


@lineage_app.command("delete")
def lineage_delete(name: str, store: str | None = StoreOpt, tenant: str = TenantOpt, as_json: bool = JsonOpt,
                   url: str | None = ApiUrlOpt, token: str | None = ApiTokenOpt) -> None:
    """Delete a lineage: gone for readers now, its files purged after MERGELINE_RETENTION_DAYS (then its name is
    free again)."""
    retention_s = get_settings().retention_days * 86400

    def local(s):
        deleted = s.delete_lineage(tenant, name, retention_s=retention_s, job_id=new_job_id("op"))
        s.purge_due()  # a store without workers purges whenever the CLI deletes
        return deleted

    deleted = _lineage_op(url, token, store, lambda client: client.delete_lineage(name), local)
    if as_json:
        _print_json(deleted)
        return
    console.print(f"deleted {escape(name)}; its files are purged after {deleted['purge_after']}")


def _lineage_op(url: str | None, token: str | None, store: str | None, remote, local) -> dict:
    """A lineage operation through the API (`--url`) or on the local store; a typed error exits 1."""
    from service.client import MergelineClient

    try:
        if url and not store:
            with MergelineClient(url, token) as client:
                return remote(client)
        return local(_store(store))
    except (ApiError, MergelineError) as exc:
        fail(exc)


@app.command()
def rebuild(
    ref: str = typer.Argument(..., help="NAME@VERSION"),
    store: str | None = StoreOpt,
    tenant: str = TenantOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Re-run a version from its manifest (same inputs, method, params, seed, parent) without committing, and check
    every file's sha256 against the manifest; exit 0 only if all match."""
    from engine.job import rebuild_version

    name, _, version = ref.partition("@")
    try:
        if not version.isdigit() or int(version) == 0:
            raise InvalidInput(f"bad version {version!r} in {ref!r}: use NAME@N with N ≥ 1", param="version")
        report = rebuild_version(_store(store), tenant, name, int(version))
    except MergelineError as exc:
        if as_json:
            _print_json({"error": exc.to_dict()})
            raise typer.Exit(1) from None
        fail(exc)
    if as_json:
        _print_json(report)
    else:
        table = Table(title=f"{name}@{version} rebuilt")
        for col in ("file", "sha256 (manifest)", "sha256 (rebuilt)", "match"):
            table.add_column(col)
        for f in report["files"]:
            table.add_row(f["path"], (f["sha256"] or "–")[:16], (f["rebuilt_sha256"] or "–")[:16],
                          "[green]yes" if f["match"] else "[red]NO")
        console.print(table)
        if report["inputs_changed"]:
            console.print("inputs changed since the version was made: " + ", ".join(report["inputs_changed"]))
        verdict = "[green]every file matches its manifest" if report["match"] else "[red]files differ from the manifest"
        console.print(verdict)
    if not report["match"]:
        raise typer.Exit(1)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("mergeline-data/demo"), help="where the demo's models, data and store go"),
    tasks: int = typer.Option(4, min=2, max=8, help="how many tasks to merge continually"),
    steps: int = typer.Option(100, min=1, help="OTMF iterations per task"),
    threads: int = typer.Option(None, min=1, help="torch threads (default: one per idle core, at most 4)"),
    pretrain: bool = typer.Option(False, "--pretrain", help="pretrain the base on the spot (minutes) instead of "
                                  "using the shipped one, which this made"),
    as_json: bool = JsonOpt,
) -> None:
    """Fine-tune a small pretrained OpenCLIP base on tasks built from offline data, merge the fine-tunes
    continually with OTMF and with task arithmetic, and compare per-task accuracy."""
    from mergeline.demo import DemoConfig, run_demo
    from mergeline.demo.base import BaseConfig
    from mergeline.demo.screen import closing_panel, print_next_commands

    try:
        with step_bars(console=err, disable=as_json) as bars:
            config = DemoConfig(otmf_steps=steps, pretrain=BaseConfig() if pretrain else None)
            report = run_demo(workdir, n_tasks=tasks, config=config, threads=threads, bars=bars)
    except MergelineError as exc:
        fail(exc)
    if as_json:
        _print_json(report)
        return
    columns = {"individual": report["individual"], **report["methods"]}
    console.print(accuracy_table(f"continual merging of {tasks} tasks (accuracy %)", columns, report["tasks"]))
    console.print(closing_panel(report))
    print_next_commands(console, report)


cli_remote.register(app)


# What a client-only install (`pip install .`) lacks, by the extra that brings it.
EXTRA_OF = {**dict.fromkeys(("torch", "torchvision", "open_clip", "transformers", "safetensors", "ot", "mlxtend",
                             "sklearn"), "engine"),
            **dict.fromkeys(("fastapi", "uvicorn", "celery", "kombu", "redis", "fakeredis", "prometheus_client",
                             "sse_starlette"), "service")}


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        err.print(f"error: this command needs the `{extra}` extra ({exc.name} is not installed): "
                  f"pip install '.[{extra}]' in the source folder, or `bash scripts/setup.sh` for everything",
                  markup=False)
        raise SystemExit(2) from None
