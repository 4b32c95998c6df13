"""The C allocator's policy in a job process. glibc's malloc is tuned through `mallopt`; other C libraries are left
be. Two policies trade the same thing in opposite directions: the kernel zero-fills every freshly mapped page (time)
and freed heap blocks stay in the process (memory)."""

from __future__ import annotations

import contextlib
import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for the mmap threshold on 64-bit systems
KEPT_FREE_BYTES = 256 * 2**20  # freed heap a streamed merge keeps for reuse
DEFAULT_TRIM_THRESHOLD = 128 * 2**10  # glibc's own


@functools.cache
def _mallopt_function():
    """glibc's `mallopt`, or None under another C library."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None).mallopt
    return None


def _mallopt(param: int, value: int) -> bool:
    mallopt = _mallopt_function()
    return mallopt is not None and bool(mallopt(param, value))


def use_for_job(data_driven: bool, mmap_threshold: int | None) -> bool:
    """The policy of a job's process, set as the job starts (a worker runs jobs of both kinds one after another): a
    streamed data-free merge reuses freed blocks; a data-driven one maps large blocks when `mmap_threshold` is set and
    leaves the allocator as it is otherwise. False where a threshold was asked for and the C library is not glibc."""
    if not data_driven:
        reuse_freed_blocks()
    elif mmap_threshold is not None:
        return map_large_blocks(mmap_threshold)
    return True


def reuse_freed_blocks() -> None:
    """Serve blocks up to glibc's ceiling from the heap and keep up to KEPT_FREE_BYTES of it freed: a streamed merge
    allocates a block for every read and operation and frees it soon after, and mapping fresh pages for each cost a
    fifth of its CPU time."""
    _mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
    _mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)


def map_large_blocks(threshold: int) -> bool:
    """Serve every allocation of at least `threshold` bytes with its own mapping, unmapped when freed. glibc would
    otherwise raise its threshold to the size of each mapped block freed (up to 32 MiB) and serve later tensors from
    its heap, where freed ones leave holes that the process keeps: its peak then exceeds its live memory by up to a
    model's worth. glibc's own trim threshold is restored, in case a streamed merge in this process raised it.
    Returns False where the C library is not glibc."""
    return _mallopt(M_MMAP_THRESHOLD, threshold) and _mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
