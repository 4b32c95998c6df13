"""Peer tools (FusionBench, mergekit), each in its own virtual environment under bench/.cache/venvs/.

Both are installed from PyPI with pip. Neither pins torch exactly, so each venv takes the CPU build of torch that
this machine's pip find-links offers (`/opt/wheels`, e.g. torch 2.13.0+cpu) when there is one: it installs
offline in seconds, where PyPI's default torch wheel would pull several GB of CUDA libraries. The versions
actually installed are recorded in `versions.json` inside each venv and reported with every figure.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import venv
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
PEERS = {
    # name: (pip requirements, modules whose versions are reported)
    # fusion-bench 0.2.33 imports CLIPVisionTransformer, which transformers 5 removed; datasets 4+ needs a newer
    # huggingface-hub than transformers 4 accepts.
    "fusion-bench": (["fusion-bench==0.2.33", "transformers<5", "datasets<4"],
                     ["fusion_bench", "torch", "transformers", "lightning", "datasets"]),
    "mergekit": (["mergekit==0.1.5"], ["mergekit", "torch", "transformers", "safetensors"]),
}


def local_torch_wheel() -> str | None:
    """A CPU torch wheel from pip's configured find-links, if the machine has one (installs without network)."""
    wheels = sorted(glob.glob("/opt/wheels/torch-*+cpu-cp3*-*.whl"))
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = [w for w in wheels if f"-{tag}-" in w]
    return wheels[-1] if wheels else None


def peer_python(name: str, *, log=print) -> Path:
    """The python of the peer's venv, creating and installing it on first use."""
    requirements, modules = PEERS[name]
    root = CACHE / "venvs" / name
    python = root / "bin" / "python"
    stamp = root / "versions.json"
    if stamp.exists():
        return python
    log(f"creating the {name} venv at {root} (pip, once)")
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    torch_req = [w] if (w := local_torch_wheel()) else []
    cmd = [str(python), "-m", "pip", "install", "-q", *torch_req, *requirements]
    subprocess.run(cmd, check=True)
    probe = "import importlib.metadata as m, json, sys; " \
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    dists = {"fusion_bench": "fusion-bench"}
    out = subprocess.run([str(python), "-c", probe, *(dists.get(m, m) for m in modules)], check=True,
                         capture_output=True, text=True).stdout
    stamp.write_text(out)
    return python


def peer_versions(name: str) -> dict:
    stamp = CACHE / "venvs" / name / "versions.json"
    return json.loads(stamp.read_text()) if stamp.exists() else {}


if __name__ == "__main__":
    for peer in sys.argv[1:] or list(PEERS):
        print(peer, peer_python(peer), peer_versions(peer))
