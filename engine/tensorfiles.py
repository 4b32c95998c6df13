"""Safetensors files read and written one tensor at a time, so that a merge's memory is bounded by its largest
tensors, not by the model.

Reading: a file's header is parsed and checked against the file's size before any tensor is allocated (a header
that lies about shapes or offsets, a truncated file, a shard index naming a file outside its folder are
`InvalidInput`). Tensors are then read with plain positioned reads rather than a memory map: mapped pages count
towards the process's resident memory until unmapped, reads into fresh buffers do not outlive the tensor.

Writing: the whole layout (names, dtypes, shapes, the split into shards) is planned before the first tensor is
computed, so every file's header is written first and each tensor lands at its planned offset, in any order. The
layout depends only on the names, shapes and dtypes (names sorted, shards filled in that order), so the same job
writes the same bytes. Shards are named like transformers' (`model-00001-of-00002.safetensors` plus
`model.safetensors.index.json`); a model that fits one shard is one `model.safetensors`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from core.errors import InvalidInput

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
ALIGNMENT = 8

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `path`, bytes [start, end) of the file, in `dtype` and `shape`."""

    path: Path
    key: str  # its name in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rows(self, first: int, stop: int) -> TensorInfo:
        """The rows [first, stop) of the tensor (a contiguous byte range of it)."""
        row_bytes = (self.end - self.start) // self.shape[0]
        return replace(self, shape=(stop - first, *self.shape[1:]), start=self.start + first * row_bytes,
                       end=self.start + stop * row_bytes)


def read_header(path: Path, *, field: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file and its metadata, checked against the file's size."""
    path = Path(path)

    def bad(why: str) -> InvalidInput:
        return InvalidInput(f"{field}: {path.name} is not a readable safetensors file ({why})", param=field)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad("shorter than its header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise bad(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise bad(str(exc)) from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its metadata is not a map of strings")
    data_bytes = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            start, end = entry["data_offsets"]
            valid = all(isinstance(d, int) and d >= 0 for d in (*shape, start, end))
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r} has a malformed header entry") from None
        if not valid or not start <= end <= data_bytes:
            raise bad(f"tensor {key!r} lies outside the file (truncated?)")
        if end - start != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {key!r}: its header's shape and dtype do not match its byte range")
        infos[key] = TensorInfo(path, key, dtype, shape, 8 + n + start, 8 + n + end)
    spans = sorted((i.start, i.end) for i in infos.values() if i.end > i.start)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise bad("tensors overlap")
    return infos, metadata


def read_weights(location: Path, *, field: str) -> dict[str, TensorInfo]:
    """The tensors of a `.safetensors` file, or of a folder's `model.safetensors` or shard set (its index)."""
    location = Path(location)
    if not location.is_dir():
        return read_header(location, field=field)[0]
    if (location / MODEL_FILE).is_file():
        return read_header(location / MODEL_FILE, field=field)[0]
    if (location / INDEX_FILE).is_file():
        return read_sharded(location, INDEX_FILE, field=field)
    raise InvalidInput(f"{field}: the folder has neither {MODEL_FILE} nor {INDEX_FILE}", param=field)


def shard_names(folder: Path, index: str, *, field: str) -> tuple[dict[str, str], list[str]]:
    """(weight_map, its shard files) of a shard index; every shard a plain name of an existing file in `folder`."""
    try:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InvalidInput(f"{field}: {index} is not a valid shard index", param=field) from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", "..") or "\\" in shard:
            raise InvalidInput(f"{field}: {index} names a shard outside its folder: {shard!r}", param=field)
        if not (folder / shard).is_file():
            raise InvalidInput(f"{field}: {index} names a missing shard {shard!r}", param=field)
    return weight_map, shards


def read_sharded(folder: Path, index: str, *, field: str) -> dict[str, TensorInfo]:
    """Every tensor of the shards a safetensors index names, each in the shard the index says."""
    weight_map, shards = shard_names(folder, index, field=field)
    infos: dict[str, TensorInfo] = {}
    for shard in shards:
        for key, info in read_header(folder / shard, field=field)[0].items():
            if weight_map.get(key) != shard:
                raise InvalidInput(f"{field}: {shard} holds {key!r}, which {index} places elsewhere", param=field)
            infos[key] = info
    missing = sorted(weight_map.keys() - infos.keys())
    if missing:
        raise InvalidInput(f"{field}: {index} names {missing[0]!r}, which no shard holds", param=field)
    return infos


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, in its file's dtype, in a fresh CPU buffer."""
    data = torch.empty(info.end - info.start, dtype=torch.uint8)  # not zero-filled: every byte is read into
    with open(info.path, "rb", buffering=0) as f:
        view = memoryview(data.numpy())
        done = 0
        while done < len(data):
            got = os.preadv(f.fileno(), [view[done:]], info.start + done)
            if got == 0:
                raise InvalidInput(f"{info.path.name} ended while reading {info.key!r}", param="checkpoint")
            done += got
    if not data.numel():
        return torch.empty(info.shape, dtype=info.dtype)
    return data.view(info.dtype).reshape(info.shape)


def _finite(value: torch.Tensor) -> bool:
    """No NaN or Inf in `value`: min and max in one reduction (NaN propagates into both), far cheaper on the CPU
    than `isfinite(value).all()`."""
    if not value.numel():
        return True
    low, high = torch.aminmax(value)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


class LazyTensors(Mapping[str, torch.Tensor]):
    """Named tensors read from files on each access (nothing is held), as `dtype` (None: the file's).

    The merge reads its inputs through these, so a tower is never in memory as a whole; `check_finite` refuses
    NaN/Inf as each tensor is read, naming `field` (once per key: a merge may read a tensor several times)."""

    def __init__(self, infos: Mapping[str, TensorInfo], *, dtype: torch.dtype | None = torch.float32,
                 field: str = "checkpoint", check_finite: bool = False):
        self.infos, self.dtype, self.field, self.check_finite = dict(infos), dtype, field, check_finite
        self.checked: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        value = read_tensor(info)
        if self.check_finite and key not in self.checked and value.is_floating_point():
            if not _finite(value):
                raise InvalidInput(f"{self.field}: tensor {info.key!r} contains NaN or Inf values", param=self.field)
            self.checked.add(key)
        return value if self.dtype is None or not value.is_floating_point() else value.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def rows(self, key: str, first: int, stop: int) -> torch.Tensor:
        """Rows [first, stop) of `key`, reading only their bytes."""
        return LazyTensors({key: self.infos[key].rows(first, stop)}, dtype=self.dtype, field=self.field,
                           check_finite=self.check_finite)[key]

    def __len__(self) -> int:
        return len(self.infos)


def shape_of(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape, without reading it when `tensors` is lazy (has its own `shape_of`)."""
    own = getattr(tensors, "shape_of", None)
    return own(key) if own is not None else tuple(tensors[key].shape)


def read_rows(tensors: Mapping[str, torch.Tensor], key: str, first: int, stop: int) -> torch.Tensor:
    """Rows [first, stop) of `tensors[key]`, reading only them when `tensors` can (has its own `rows`)."""
    own = getattr(tensors, "rows", None)
    return own(key, first, stop) if own is not None else tensors[key][first:stop]


def dtype_of(tensors: Mapping[str, torch.Tensor], key: str) -> torch.dtype:
    """A tensor's dtype as `tensors` gives it, without reading it when `tensors` is lazy."""
    if isinstance(tensors, LazyTensors):
        stored = tensors.infos[key].dtype
        return tensors.dtype if tensors.dtype is not None and stored.is_floating_point else stored
    return tensors[key].dtype


def rekey(tensors: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> Mapping[str, torch.Tensor]:
    """`tensors` under new names ({new: old}), without reading lazy ones."""
    if isinstance(tensors, LazyTensors):
        return LazyTensors({n: tensors.infos[o] for n, o in names.items()}, dtype=tensors.dtype, field=tensors.field,
                           check_finite=tensors.check_finite)
    return {n: tensors[o] for n, o in names.items()}


def float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype that holds most of the elements of `tensors` (float32 when none is floating)."""
    counts: dict[torch.dtype, int] = {}
    for key in tensors:
        dtype = tensors.infos[key].dtype if isinstance(tensors, LazyTensors) else tensors[key].dtype
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + math.prod(shape_of(tensors, key))
    return max(counts, key=lambda d: (counts[d], str(d))) if counts else torch.float32


def materialize(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor in memory (for the feature function, evaluation and data-driven methods)."""
    return dict(tensors) if not isinstance(tensors, LazyTensors) else {k: tensors[k] for k in tensors}


# -- pieces: big tensors in row blocks, for element-wise methods ---------------------------------------------------
def row_pieces(shapes: Mapping[str, tuple[int, ...]], max_numel: int) -> dict[str, tuple[str, int, int]]:
    """{piece name: (key, first row, stop row)}: every tensor of more than `max_numel` elements cut into blocks of
    rows. An element-wise method merges the pieces exactly as it would the whole tensors; a small tensor is one
    piece named as itself."""
    pieces: dict[str, tuple[str, int, int]] = {}
    for key, shape in shapes.items():
        numel = math.prod(shape)
        if numel <= max_numel or len(shape) < 2 or shape[0] < 2:
            pieces[key] = (key, 0, shape[0] if shape else 0)
            continue
        step = max(1, max_numel // (numel // shape[0]))
        for first in range(0, shape[0], step):
            pieces[f"{key}[{first}:{min(first + step, shape[0])}]"] = (key, first, min(first + step, shape[0]))
    return pieces


def piece_infos(infos: Mapping[str, TensorInfo], pieces: Mapping[str, tuple[str, int, int]]) -> dict[str, TensorInfo]:
    return {name: infos[key] if name == key else infos[key].rows(first, stop)
            for name, (key, first, stop) in pieces.items()}


# -- writing -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def split_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """The tensors, in name order, in consecutive shards of at most `max_shard_bytes` (a bigger tensor alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: t.key):
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The safetensors header (keys sorted, padded with spaces to 8 bytes) and each tensor's data offsets."""
    offsets, entries, at = {}, {}, 0
    for t in tensors:
        offsets[t.key] = (at, at + t.nbytes)
        entries[t.key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + t.nbytes]}
        at += t.nbytes
    header = {"__metadata__": dict(sorted(metadata.items())), **entries} if metadata else entries
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw, offsets


def write_file(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file, written atomically (through `.part`) and byte-deterministically (sorted header)."""
    path = Path(path)
    planned = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in sorted(tensors.items())]
    header, _ = _header(planned, metadata or {})
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(header)
        for t in planned:
            value = tensors[t.key].detach().to("cpu").contiguous().reshape(-1)
            f.write(memoryview(value.view(torch.uint8).numpy()))
    os.replace(part, path)
    return path


class ShardedWriter:
    """A model's weights written tensor by tensor into a planned set of safetensors files under `folder`.

    `write(key, tensor)` casts to the planned dtype and writes at the planned offset; `close()` checks that every
    tensor was written, writes the index (when sharded) and returns the files. Files are written as `.part` and
    renamed on close, so a failed merge leaves no model file behind."""

    def __init__(self, folder: Path, tensors: list[PlannedTensor], *, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None, stem: str = "model"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        shards = split_shards(tensors, max_shard_bytes)
        n = len(shards)
        names = [f"{stem}.safetensors"] if n == 1 else [
            f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.index = None if n == 1 else self.folder / f"{stem}.safetensors.index.json"
        self.infos: dict[str, TensorInfo] = {}
        self.files: list[Path] = []
        for name, shard in zip(names, shards, strict=True):
            path = self.folder / name
            header, offsets = _header(shard, metadata or {})
            part = path.with_name(path.name + ".part")
            with open(part, "wb") as f:
                f.write(header)
                f.truncate(len(header) + sum(t.nbytes for t in shard))
            self.files.append(path)
            for t in shard:
                start, end = offsets[t.key]
                self.infos[t.key] = TensorInfo(part, t.key, t.dtype, t.shape, len(header) + start, len(header) + end)
        self.total_bytes = sum(t.nbytes for t in tensors)
        self.pending = {k: i.end - i.start for k, i in self.infos.items()}

    def write(self, key: str, value: torch.Tensor, *, rows: tuple[int, int] | None = None) -> None:
        """Write `value` as tensor `key`, or as its rows [first, stop)."""
        info = self.infos[key]
        if rows is not None and rows != (0, info.shape[0] if info.shape else 0):
            info = info.rows(*rows)
        if tuple(value.shape) != info.shape:
            raise ValueError(f"{key!r}: writing shape {list(value.shape)} where {list(info.shape)} is planned")
        data = memoryview(value.detach().to("cpu", info.dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
        with open(info.path, "r+b", buffering=0) as f:
            written = 0
            while written < len(data):
                written += os.pwrite(f.fileno(), data[written:], info.start + written)
        self.pending[key] -= len(data)

    def close(self) -> list[Path]:
        missing = sorted(k for k, left in self.pending.items() if left)
        if missing:
            raise ValueError(f"the version's tensors {missing[:3]} were not (fully) written")
        for path in self.files:
            os.replace(path.with_name(path.name + ".part"), path)
        self.infos = {k: replace(i, path=Path(str(i.path).removesuffix(".part"))) for k, i in self.infos.items()}
        if self.index is not None:
            weight_map = {k: i.path.name for k, i in sorted(self.infos.items())}
            self.index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes},
                                              "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
            return [*self.files, self.index]
        return list(self.files)

    def abort(self) -> None:
        for path in self.files:
            path.with_name(path.name + ".part").unlink(missing_ok=True)
