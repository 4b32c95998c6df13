"""Tensor files in and out, the device and dtype a job computes in.

Checkpoints come from users, so reading them is a trust boundary: `.safetensors` is parsed without code execution,
and pickles (`.pt`/`.bin`) are only opened by `torch.load(weights_only=True)`, which refuses arbitrary objects.
Every failure becomes an `InvalidInput` naming the spec field, never a stack trace.
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.errors import IncompatibleCheckpoint, InvalidInput
from core.settings import Settings
from engine.tensorfiles import LazyTensors, read_weights, shape_of, write_file

Tensors = dict[str, torch.Tensor]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def load_state_dict(path: Path, *, field: str) -> Tensors:
    """A flat {name: tensor} dict from a `.safetensors`, `.pt`, `.pth` or `.bin` file, on the CPU.

    A top-level {"state_dict": {...}} wrapper (PyTorch Lightning, OpenCLIP training checkpoints) is unwrapped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidInput(
                f"{field}: {path.name} is not a readable safetensors file ({exc})", param=field
            ) from None
    if suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise InvalidInput(
                f"{field}: {path.name} is not a weights-only pickle (it holds objects other than tensors and "
                "containers); save a plain state dict, preferably as .safetensors",
                param=field,
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError, AttributeError, ImportError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidInput(f"{field}: {path.name} is not a readable torch file ({message})", param=field) from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        return _as_tensor_dict(obj, path, field)
    raise InvalidInput(
        f"{field}: {path.name}: unsupported checkpoint format {suffix or '(no suffix)'}; use .safetensors, .pt or .bin",
        param=field,
    )


def open_state_dict(path: Path, *, field: str) -> Mapping[str, torch.Tensor]:
    """Like `load_state_dict`, but safetensors (a file, or a folder's single file or shard index) are read lazily:
    headers now, each tensor (in its own dtype) when asked."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".safetensors":
        return LazyTensors(read_weights(path, field=field), dtype=None, field=field, check_finite=True)
    return load_state_dict(path, field=field)


def as_tower(tensors: Mapping[str, torch.Tensor], *, field: str) -> Mapping[str, torch.Tensor]:
    """Tower tensors as the methods take them: float32, NaN/Inf refused (as each is read, for lazy ones)."""
    if isinstance(tensors, LazyTensors):
        return LazyTensors(tensors.infos, dtype=torch.float32, field=field, check_finite=True)
    check_finite(tensors, field=field)
    return {k: v.to(torch.float32) for k, v in tensors.items()}


def _as_tensor_dict(obj: object, path: Path, field: str) -> Tensors:
    if not isinstance(obj, Mapping) or not obj:
        raise InvalidInput(f"{field}: {path.name} does not hold a non-empty dict of named tensors", param=field)
    out: Tensors = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InvalidInput(
                f"{field}: {path.name}: entry {key!r} is a {type(value).__name__}, not a tensor", param=field
            )
        out[key] = value
    return out


def check_finite(tensors: Mapping[str, torch.Tensor], *, field: str) -> None:
    """Refuse NaN/Inf weights up front: merged into a lineage they would silently poison every later version.
    Lazy tensors are checked as they are read instead."""
    if isinstance(tensors, LazyTensors):
        return
    for key, value in tensors.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise InvalidInput(f"{field}: tensor {key!r} contains NaN or Inf values", param=field)


def check_compatible(
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    got: Mapping[str, torch.Tensor],
    *,
    field: str,
    what: str = "checkpoint",
    ignore: Iterable[str] = (),
    optional: Iterable[str] = (),
    shown: str = "",
) -> None:
    """Raise IncompatibleCheckpoint on the first missing, differently shaped, then unexpected key of `got`.

    `ignore`: keys of `got` that are tolerated without being expected; `optional`: expected keys that may be absent;
    `shown`: a prefix added to key names in messages, so they read as they appear in the user's file.
    """
    optional = set(optional)
    for key, shape in expected.items():
        if key not in got:
            if key in optional:
                continue
            raise IncompatibleCheckpoint(f"{field}: {what} is missing key {shown + key!r}", param=field)
        if shape_of(got, key) != tuple(shape):
            raise IncompatibleCheckpoint(
                f"{field}: {what} key {shown + key!r} has shape {list(shape_of(got, key))}, expected {list(shape)}",
                param=field,
            )
    ignore = set(ignore)
    for key in got:
        if key not in expected and key not in ignore:
            raise IncompatibleCheckpoint(f"{field}: {what} has unexpected key {shown + key!r}", param=field)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors, atomically (a crash never leaves a half-written file under `path`) and
    byte-deterministically (names and metadata sorted), from any device; tied tensors are simply written twice."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(tensors, path, metadata)


def resolve_device(requested: str | None) -> torch.device:
    """The device a job computes on: `params.device` if given, else MERGELINE_DEVICE; `auto` is CUDA when visible."""
    if requested is None:
        try:
            requested = Settings().device
        except ValidationError:
            raise InvalidInput("MERGELINE_DEVICE must be auto, cpu, cuda or cuda:N", param="MERGELINE_DEVICE") from None
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or (requested.startswith("cuda:") and requested[5:].isdigit()):
        if not torch.cuda.is_available():
            raise InvalidInput(f"device {requested!r} was requested but no CUDA device is visible", param="device")
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInput(
                f"device {requested!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible",
                param="device",
            )
        return device
    raise InvalidInput(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N", param="device")


def load_npz(path: Path, *, field: str) -> dict[str, np.ndarray]:
    """The arrays of a calibration/eval `.npz`, loaded eagerly and without pickles (object arrays are refused)."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise InvalidInput(f"{field}: {path.name}: expected an .npz file", param=field)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InvalidInput(f"{field}: {path.name} is not a readable .npz file ({exc})", param=field) from None


def labels_tensor(y: object, n: int, *, field: str) -> torch.Tensor:
    """Eval labels as int64 [n]: integers, one per input, non-negative (they index the head's classes)."""
    array = np.asarray(y)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise InvalidInput(f"{field}: labels `y` must be integers, got dtype {array.dtype}", param=field)
    if array.shape != (n,):
        raise InvalidInput(
            f"{field}: labels `y` must have shape [{n}] (one per input), got {list(array.shape)}", param=field
        )
    if n and int(array.min()) < 0:
        raise InvalidInput(f"{field}: labels `y` must be non-negative class indices", param=field)
    return torch.from_numpy(array.astype(np.int64))


def check_same_tower(reference: Mapping[str, torch.Tensor], tower: Mapping[str, torch.Tensor]) -> None:
    """A version must hold exactly the base's tower keys and shapes: a mismatch is an engine bug, not a user error."""
    if tower.keys() != reference.keys():
        missing = sorted(reference.keys() - tower.keys())[:3]
        extra = sorted(tower.keys() - reference.keys())[:3]
        raise ValueError(f"tower keys differ from the base's: missing {missing}, unexpected {extra}")
    for key in tower:
        if shape_of(tower, key) != shape_of(reference, key):
            raise ValueError(f"tower {key!r} has shape {list(shape_of(tower, key))}, the base "
                             f"{list(shape_of(reference, key))}")


def buffers_to(module: torch.nn.Module, device: torch.device) -> None:
    """Move only a module's buffers to `device`: its parameters are replaced by `functional_call`, so moving them
    would only spend memory on the accelerator."""
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.device != device:
                sub._buffers[name] = buffer.to(device)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore the count (CPU reductions, so a version's bytes, depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
