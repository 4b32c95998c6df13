"""A merge at the size people merge: a synthetic Llama-shaped bfloat16 model (3.4 B parameters by default), a base
and two fine-tunes written in shards, merged with `task_arithmetic` and `ties` through `mergeline merge` (the hf
family, one job with both tasks) and by mergekit on the same files in the same run; `cat files > /dev/null` gives
the machine's physical read limit. Every command runs under `/usr/bin/time -v` (wall time, peak RSS).

    python -m bench.big_merge              # the 3 B model (about 21 GB of inputs; ~45 GB of disk at the peak)
    python -m bench.big_merge --size small # a 0.2 B model, to try the script

Writes bench/results/big_merge[_small].json and the "Big-model merge" section of docs/benchmarks.md (rendered by
bench.report.big_merge_section). Generated files are deleted afterwards. Throughput is the bytes of the three input
models divided by the command's wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import DOCS, ROOT, machine, now
from bench.peer_env import peer_python, peer_versions

RESULTS = ROOT / "bench" / "results"
SIZES = {
    # open_llama_3b's shape: 3.43 B parameters
    "3b": {"vocab_size": 32000, "hidden_size": 3200, "intermediate_size": 8640, "num_hidden_layers": 26,
           "num_attention_heads": 32, "num_key_value_heads": 32},
    "small": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
              "num_attention_heads": 16, "num_key_value_heads": 16},
}
SHARD_BYTES = 2 * 10**9
SCALING, TOP_K = 0.3, 20.0
RSS_TARGET_GIB = 2.0
# The streaming engine's way of working that the figures measure; bumped when it changes (the report flags results
# of another). 2: heads between steps recomputed, versions staged in the store, inputs hashed while read.
STREAMING_ENGINE = 2


# -- the synthetic model ----------------------------------------------------------------------------------------
def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LlamaForCausalLM with this config, as save_pretrained names them."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    return shapes


def shard_plan(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    shards, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_models(root: Path, cfg: dict) -> list[Path]:
    """base, task0, task1 as save_pretrained folders of bfloat16 shards (tasks = base + small noise), written
    shard by shard straight from random tensors: no model object is ever built."""
    from transformers import LlamaConfig

    folders = [root / name for name in ("base", "task0", "task1")]
    config = LlamaConfig(**cfg, max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    shapes = llama_shapes(cfg)
    plan = shard_plan(shapes)
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    g = torch.Generator().manual_seed(0)

    def random_bits(shape: tuple[int, ...]) -> torch.Tensor:  # int16 noise, drawn 64 bits at a time (3× randn's speed)
        n = math.prod(shape)
        return torch.randint(-2**62, 2**62, ((n + 3) // 4,), generator=g, dtype=torch.int64).view(torch.int16)[:n]

    for folder in folders:
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
        weight_map = {k: name for name, keys in zip(names, plan, strict=True) for k in keys}
        total = sum(math.prod(s) * 2 for s in shapes.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name, keys in zip(names, plan, strict=True):
        shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
        for key in keys:
            # bfloat16 bit patterns: a random sign, exponent 120-123 (magnitudes 0.008-0.125) and mantissa; a
            # fine-tune flips the 4 low mantissa bits at random (relative changes up to 12%). Always finite.
            base = (random_bits(shapes[key]) & (0x81FF - 0x10000)) | 0x3C00  # 0x81FF as an int16
            shards[0][key] = base.view(torch.bfloat16).reshape(shapes[key])
            for j in (1, 2):
                task = base ^ (random_bits(shapes[key]) & 0x000F)
                shards[j][key] = task.view(torch.bfloat16).reshape(shapes[key])
        for folder, tensors in zip(folders, shards, strict=True):
            save_file(tensors, folder / name, metadata={"format": "pt"})
        del shards
    return folders


# -- measured commands ------------------------------------------------------------------------------------------
def timed(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None) -> dict:
    """Wall seconds and peak RSS of `cmd`, from /usr/bin/time -v."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(rss_kib / 2**20, 3)}


def input_files(folders: list[Path]) -> list[Path]:
    return [p for f in folders for p in sorted(f.glob("*.safetensors"))]


def mergeline_run(work: Path, folders: list[Path], method: str) -> dict:
    params = {"scaling_factor": SCALING} | ({"top_k": TOP_K} if method == "ties" else {})
    spec = {"lineage": f"big-{method}", "base": {"family": "hf", "uri": folders[0].as_uri() + "/"},
            "method": method, "params": params,
            "tasks": [{"name": f.name, "checkpoint": f.as_uri() + "/"} for f in folders[1:]]}
    (work / "spec.json").write_text(json.dumps(spec))
    store = work / "store"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "MERGELINE_ALLOWED_ROOTS": str(work), "MERGELINE_CACHE_DIR": str(work / "sha-cache"),
           "HOME": str(work)}
    out = timed([ROOT / ".venv" / "bin" / "mergeline", "merge", work / "spec.json", "--store", store], env=env)
    manifest = json.loads(next(store.rglob("manifest.json")).read_text())
    out["version_files"] = len([f for f in manifest["files"] if f["path"].endswith(".safetensors")]) - 1
    out["version_dtype"] = next(f["dtype"] for f in manifest["files"] if f.get("dtype"))
    shutil.rmtree(store)
    shutil.rmtree(work / "sha-cache", ignore_errors=True)
    return out


def mergekit_run(work: Path, folders: list[Path], method: str) -> dict:
    models = [{"model": str(f), "parameters": {"weight": SCALING} | (
        {"density": TOP_K / 100} if method == "ties" else {})} for f in folders[1:]]
    config = {"merge_method": method, "base_model": str(folders[0]), "models": models, "dtype": "bfloat16",
              "parameters": {"normalize": False}}
    (work / "mergekit.yml").write_text(json.dumps(config))  # JSON is YAML
    out_dir = work / "mergekit-out"
    python = peer_python("mergekit")
    out = timed([python.parent / "mergekit-yaml", work / "mergekit.yml", out_dir, "--lazy-unpickle",
                 "--no-copy-tokenizer"], env={"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(work),
                                              "HF_HUB_OFFLINE": "1"})
    shutil.rmtree(out_dir)
    return out


def cat_run(folders: list[Path]) -> dict:
    return timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *input_files(folders)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="3b")
    parser.add_argument("--workdir", default=None, help="where the models are written (default: a temp folder)")
    args = parser.parse_args(argv)
    cfg = SIZES[args.size]
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mergeline-big-", dir=args.workdir))
    try:
        t = time.perf_counter()
        folders = write_models(work, cfg)
        generated_s = time.perf_counter() - t
        files = input_files(folders)
        input_bytes = sum(p.stat().st_size for p in files)
        params = sum(math.prod(s) for s in llama_shapes(cfg).values())
        runs: dict[str, dict] = {"cat": cat_run(folders)}
        for method in ("task_arithmetic", "ties"):
            runs[f"mergeline {method}"] = mergeline_run(work, folders, method)
            runs[f"mergekit {method}"] = mergekit_run(work, folders, method)
        runs["cat (again)"] = cat_run(folders)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for entry in runs.values():
        entry["gb_per_s"] = round(input_bytes / 1e9 / entry["wall_s"], 3)
    result = {
        "command": f"python -m bench.big_merge --size {args.size}",
        "engine": STREAMING_ENGINE,
        "model": {"shape": "Llama (LlamaForCausalLM layout)", **cfg, "parameters": params, "dtype": "bfloat16",
                  "models": 3, "input_files": len(files), "input_gb": round(input_bytes / 1e9, 2)},
        "params": {"scaling_factor": SCALING, "top_k": TOP_K},
        "runs": runs,
        "rss_target_gib": RSS_TARGET_GIB,
        "mergekit": peer_versions("mergekit"),
        "generate_s": round(generated_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "generated_at": now(),
        "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "big_merge" if args.size == "3b" else f"big_merge_{args.size}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    from bench.report import big_merge_section, splice_section

    splice_section(DOCS / "benchmarks.md", "big-merge", big_merge_section(result))
    print(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
