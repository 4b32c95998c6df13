"""The layering of docs/architecture.md: an import only ever points down, and the torch-free layers stay torch-free.

Every module is read with `ast`, so an import inside a function counts as much as one at the top of the file."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "engine", "service", "worker", "mergeline")
# What each layer may import of ours (itself always).
ALLOWED = {"core": set(), "engine": {"core"}, "service": {"core"}, "worker": {"core"}, "mergeline": set(LAYERS)}
TORCH_FREE = ("core", "service", "worker")
HEAVY = {"torch", "torchvision", "safetensors", "open_clip", "transformers", "ot", "numpy", "scipy", "sklearn",
         "mlxtend", "huggingface_hub"}
# core.hub fetches hf:// inputs with huggingface_hub (torch-free, imported on first use, on workers only).
LIGHT_ENOUGH = {"core": {"huggingface_hub"}}


def imports(layer: str) -> Iterator[tuple[str, str]]:
    """(where, statement) of every absolute import in the layer, one per imported top-level package."""
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no Python files under {layer}/"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                yield module.partition(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down(layer: str) -> None:
    allowed = ALLOWED[layer] | {layer}
    bad = [where for top, where in imports(layer) if top in LAYERS and top not in allowed]
    assert not bad, f"{layer} may import {sorted(ALLOWED[layer]) or 'nothing of ours'}; it imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", TORCH_FREE)
def test_torch_free_layers_import_no_torch(layer: str) -> None:
    heavy = HEAVY - LIGHT_ENOUGH.get(layer, set())
    bad = [where for top, where in imports(layer) if top in heavy]
    assert not bad, f"{layer} is torch-free; it imports:\n" + "\n".join(bad)
