"""A LoRA-adapter task against the full checkpoint of the same task: job time and peak memory.

The model is Llama-shaped with random weights (built from a LlamaConfig, nothing downloaded; about 110 M parameters,
float32). The task is a PEFT LoRA adapter (rank 16 on q/k/v/o of every layer) and, for comparison, the full
checkpoint PEFT's `merge_and_unload()` makes of it, so both jobs merge the same task weights; the script checks that
the two versions agree. Each job runs `run_job` in a fresh process (bench/jobrun.py): wall time of the process,
the job's own time, and the process's peak RSS (ru_maxrss).

    .venv/bin/python -m bench.lora_cost [--methods task_arithmetic,ties] [--layers 12]
Writes bench/results/lora_cost.json; `bench.report` renders it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.common import CACHE, ROOT, repo_env, run_measured, write_result

WORK = CACHE / "lora"
LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(layers: int, log=print) -> dict:
    """base/ (save_pretrained), adapter/ (PEFT), full/ (merge_and_unload of the adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    log(f"random Llama-shaped model: {params / 1e6:.1f} M parameters")
    model.save_pretrained(WORK / "base")
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **LORA))
    peft_model.save_pretrained(WORK / "adapter")
    peft_model.merge_and_unload().save_pretrained(WORK / "full")
    return {"parameters": params, "layers": layers, "lora": LORA,
            "bytes": {name: folder_bytes(WORK / name) for name in ("base", "adapter", "full")}}


def run_job(method: str, task: str) -> dict:
    lineage = f"{task}-{method.replace('_', '-')}"
    spec = {"lineage": lineage, "base": {"family": "hf", "uri": (WORK / "base").as_uri() + "/"},
            "tasks": [{"name": "task", "checkpoint": (WORK / task).as_uri() + "/"}], "method": method,
            "params": {"scaling_factor": 1.0}}
    spec_path = WORK / f"{lineage}.json"
    spec_path.write_text(json.dumps(spec))
    store = (WORK / "store").as_uri()
    measured = run_measured([sys.executable, "-m", "bench.jobrun", str(spec_path), store, str(WORK)],
                            env=repo_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"), cwd=ROOT)
    out = json.loads(measured["stdout"].strip().splitlines()[-1])
    return {"lineage": lineage, "wall_s": round(measured["wall_s"], 2), "job_s": round(out["job_s"], 2),
            "peak_rss_mib": round(out["peak_rss_mib"], 1)}


def versions_agree(lineages: list[str]) -> float:
    """The largest absolute difference between the versions the adapter and the full checkpoint gave."""
    from safetensors.torch import load_file

    store = WORK / "store" / "default"
    first, second = (load_file(store / name / "v1" / "model.safetensors") for name in lineages)
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def section(result: dict | None) -> list[str]:
    """The markdown section of docs/benchmarks.md."""
    if not result:
        return []
    size = result["model"]["bytes"]
    lines = [
        "## LoRA adapter against the full checkpoint",
        "",
        f"A random Llama-shaped model ({result['model']['parameters'] / 1e6:.0f} M parameters, float32; "
        f"{size['base'] / 2**20:.0f} MiB); the task is a LoRA adapter (rank {result['model']['lora']['r']} on "
        f"{', '.join(result['model']['lora']['target_modules'])}; {size['adapter'] / 2**20:.1f} MiB) or the full "
        f"checkpoint `merge_and_unload()` makes of it ({size['full'] / 2**20:.0f} MiB). One task, `scaling_factor` 1, "
        f"each job in a fresh process. Command: `{result['command']}` ({result['generated_at']}; 1-min load average "
        f"{result['machine']['load_avg_1m']} on {result['machine']['cores']} cores, so the times carry the noise of a "
        "shared machine).",
        "",
        "| method | task given as | job (s) | process wall (s) | peak RSS (MiB) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for run in result["runs"]:
        lines.append(f"| {run['method']} | {run['task']} | {run['job_s']:.1f} | {run['wall_s']:.1f} | "
                     f"{run['peak_rss_mib']:.0f} |")
    lines += ["", "The two versions of each method agree to "
              + ", ".join(f"{m}: {d:.1e}" for m, d in result["max_abs_difference"].items())
              + " (largest absolute difference of any weight). The adapter job skips reading and hashing the full "
              "checkpoint and holds only the task tensors the adapter changes (θ0's own tensors stand for the rest).",
              ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args(argv)
    model = prepare(args.layers)
    runs, differences = [], {}
    for method in args.methods.split(","):
        pair = []
        for task in ("full", "adapter"):
            run = run_job(method, task) | {"method": method, "task": task}
            print(json.dumps(run))
            runs.append(run)
            pair.append(run["lineage"])
        differences[method] = versions_agree(pair)
    command = "python -m bench.lora_cost" + (f" --methods {args.methods}" if args.methods != "task_arithmetic,ties"
                                             else "") + (f" --layers {args.layers}" if args.layers != 12 else "")
    path = write_result("lora_cost", {"model": model, "runs": runs, "max_abs_difference": differences,
                                      "command": command})
    shutil.rmtree(WORK, ignore_errors=True)
    print("\n".join(section(json.loads(path.read_text()))))


if __name__ == "__main__":
    main()
