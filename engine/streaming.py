"""A data-free merge that streams: the method reads θ0, the head and θ_t key by key from their files and writes each
result straight into a file, so no tower is ever in memory as a whole.

The last step writes the version itself, through its family's layout (engine.families.base.VersionWriter). Between
two steps of a job the head of an `ElementwiseMethod` is not written at all: it is `Recomputed`, each block computed
again from that step's inputs when the next step reads it (reading two bfloat16 inputs costs less than writing and
reading back a float32 tower, and gives the same bits). A head is written to a float32 scratch file (exactly what
the in-memory merge would hold) only when recomputing it would cost more: when it stands on `MAX_RECOMPUTED` unwritten
steps, or when the next step reads it several times (TIES' threshold passes) and it stands on more than one. OPCM's
first head is θ_1 itself, read again from its files; its later heads are written to scratch.

Methods that are `elementwise` see big tensors as blocks of rows (`row_pieces`), so memory is bounded by a block,
not by the largest tensor; OPCM, which needs whole matrices, sees whole tensors.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from engine.tensorfiles import (
    LazyTensors,
    PlannedTensor,
    ShardedWriter,
    piece_infos,
    read_rows,
    row_pieces,
    shape_of,
)

PIECE_NUMEL = 1 << 18  # elements per block of rows (1 MB in float32: a block and its temporaries stay in cache)
MAX_RECOMPUTED = 4  # unwritten steps a head may stand on: a read holds a few blocks per step
SCRATCH_SHARD_BYTES = 1 << 62  # scratch towers are one file each
_counter = itertools.count()


class TowerSink(Protocol):
    """Where a step writes its tensors, one key at a time: `done()` then gives them back to read."""

    def __setitem__(self, key: str, value: torch.Tensor) -> None: ...

    def done(self) -> Mapping[str, torch.Tensor]: ...


class MemorySink(dict):
    """A sink that keeps its tensors (the in-memory merge)."""

    def done(self) -> MemorySink:
        return self


@dataclass
class Sinks:
    """Where a step's new head (`output`) and its intermediate towers (`scratch`) go: memory, or files when the
    merge streams (engine.streaming)."""

    output: Callable[[], TowerSink] = MemorySink
    scratch: Callable[[], TowerSink] = MemorySink
    # When set, an ElementwiseMethod hands its per-key `merge` here instead of writing `output`: the head is then
    # computed again from the step's inputs whenever it is read.
    recompute: Callable[[Callable[[str], torch.Tensor]], Mapping[str, torch.Tensor]] | None = None


class PieceView(Mapping[str, torch.Tensor]):
    """`tensors` seen through `pieces` ({name: (key, first row, stop row)}): a lazy tower reads only the block.
    With `keep_last`, the piece read last is kept and given again when asked for next (methods never modify the
    tensors they read in place, lazy or not)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], pieces: Mapping[str, tuple[str, int, int]], *,
                 keep_last: bool = False):
        self.tensors, self.pieces, self.keep_last = tensors, pieces, keep_last
        self.last: tuple[str, torch.Tensor] | None = None
        if isinstance(tensors, LazyTensors):
            self.lazy: LazyTensors | None = LazyTensors(piece_infos(tensors.infos, pieces), dtype=tensors.dtype,
                                                        field=tensors.field, check_finite=tensors.check_finite)
        else:
            self.lazy = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.last is not None and self.last[0] == name:
            return self.last[1]
        value = self._read(name)
        if self.keep_last:
            self.last = (name, value)
        return value

    def _read(self, name: str) -> torch.Tensor:
        if self.lazy is not None:
            return self.lazy[name]
        if isinstance(self.tensors, Recomputed):
            return self.tensors.merge(name)
        key, first, stop = self.pieces[name]
        return self.tensors[key] if name == key else read_rows(self.tensors, key, first, stop)

    def __iter__(self) -> Iterator[str]:
        return iter(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def shape_of(self, name: str) -> tuple[int, ...]:
        key, first, stop = self.pieces[name]
        shape = shape_of(self.tensors, key)
        return shape if name == key else (stop - first, *shape[1:])


class Recomputed(Mapping[str, torch.Tensor]):
    """A step's head that was never written: `merge(piece)` computes a piece of it from the step's inputs, and a
    whole tensor is its pieces put together. `depth` counts the unwritten steps it stands on (itself included),
    `folders` the scratch towers it reads."""

    def __init__(self, merge: Callable[[str], torch.Tensor], stream: Streaming, head: Mapping[str, torch.Tensor]):
        self.merge, self.shapes = merge, stream.shapes
        self.pieces: dict[str, list[str]] = {}
        for name, (key, _, _) in stream.pieces.items():
            self.pieces.setdefault(key, []).append(name)
        self.depth = head.depth + 1 if isinstance(head, Recomputed) else 1
        self.folders = scratch_folders(head)

    def __getitem__(self, key: str) -> torch.Tensor:
        names = self.pieces[key]
        return self.merge(key) if names == [key] else torch.cat([self.merge(n) for n in names])

    def __iter__(self) -> Iterator[str]:
        return iter(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]


def scratch_folders(head: Mapping[str, torch.Tensor]) -> set[Path]:
    """The folders of the files a head reads (its scratch towers)."""
    if isinstance(head, Recomputed):
        return head.folders
    return {info.path.parent for info in getattr(head, "infos", {}).values()}


class WriterSink:
    """A step's output written into planned files: keys are the tower's names or `pieces` of them; `names` maps
    a tower name to its name in the files. `done()` closes the files and returns them as a lazy float32 tower."""

    def __init__(self, writer: ShardedWriter, names: Mapping[str, str], pieces: Mapping[str, tuple[str, int, int]],
                 on_close=None):
        self.writer, self.names, self.pieces, self.on_close = writer, names, pieces, on_close
        self.files: list[Path] = []

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        key, first, stop = self.pieces[name]
        self.writer.write(self.names[key], value, rows=None if name == key else (first, stop))

    def done(self) -> LazyTensors:
        self.files = self.writer.close()
        if self.on_close is not None:
            self.files += self.on_close()
        return LazyTensors({k: self.writer.infos[f] for k, f in self.names.items()}, field="version")


def scratch_sink(folder: Path, shapes: Mapping[str, tuple[int, ...]],
                 pieces: Mapping[str, tuple[str, int, int]]) -> WriterSink:
    """A float32 tower in one scratch file under `folder` (a fresh folder each call)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tower-{next(_counter)}"
    planned = [PlannedTensor(k, torch.float32, tuple(s)) for k, s in shapes.items()]
    writer = ShardedWriter(path, planned, max_shard_bytes=SCRATCH_SHARD_BYTES)
    return WriterSink(writer, {k: k for k in shapes}, pieces)


class Streaming:
    """Where a streamed job's steps write: scratch files under `work`, the last step into the version through
    `final(pieces)` (the family's `open_version`); `version` is then that sink, its `files` the version's."""

    def __init__(self, work: Path, base: Mapping[str, torch.Tensor], final, *, elementwise: bool,
                 piece_numel: int = PIECE_NUMEL):
        self.work = Path(work)
        self.shapes = {k: shape_of(base, k) for k in base}
        self.whole = {k: (k, 0, s[0] if s else 0) for k, s in self.shapes.items()}
        self.pieces = row_pieces(self.shapes, piece_numel) if elementwise else self.whole
        self.final = final
        self.version: WriterSink | None = None
        self.base_view = PieceView(base, self.pieces, keep_last=True)

    def view(self, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """`tensors` by pieces. θ0 goes through one view for the whole job: its pieces, which every step reads, are
        checked for NaN/Inf once, and a step and the recomputed head beneath it, which read the same piece of θ0
        one after the other, read it once."""
        return self.base_view if tensors is self.base_view.tensors else PieceView(tensors, self.pieces)

    def sinks(self, last: bool, head: Mapping[str, torch.Tensor], task: Mapping[str, torch.Tensor]) -> Sinks:
        """Where one step on `head` with `task` writes its new head (the version when `last`; else recomputed, or a
        scratch tower when the method cannot recompute) and its intermediate towers. A task held in memory (a
        pickle) is not kept alive for recomputing: that head is written."""
        def version() -> WriterSink:
            self.version = self.final(self.pieces)
            return self.version

        def scratch_head() -> WriterSink:
            return scratch_sink(self.work / "heads", self.shapes, self.pieces)

        return Sinks(output=version if last else scratch_head,
                     scratch=lambda: scratch_sink(self.work / "scratch", self.shapes, self.whole),
                     recompute=None if last or isinstance(task, dict) else lambda merge: Recomputed(merge, self, head))

    def head(self, head: Mapping[str, torch.Tensor], reads: int) -> Mapping[str, torch.Tensor]:
        """`head` as a step that reads it `reads` times should get it: a recomputed head is written to scratch when
        recomputing it would cost more (see the module doc), and is then a lazy float32 tower."""
        if not isinstance(head, Recomputed) or (head.depth < MAX_RECOMPUTED and (reads <= 1 or head.depth <= 1)):
            return head
        sink = scratch_sink(self.work / "heads", self.shapes, self.pieces)
        for name in self.pieces:
            sink[name] = head.merge(name)
        return sink.done()

    def step_done(self, head: Mapping[str, torch.Tensor]) -> None:
        """Delete the scratch towers that the next step no longer reads (every one but `head`'s)."""
        keep = scratch_folders(head)
        for kind in ("heads", "scratch"):
            for folder in (self.work / kind).glob("tower-*"):
                if folder not in keep:
                    shutil.rmtree(folder)
