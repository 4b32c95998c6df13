"""sha256 of files and folders, as recorded in manifests and checked on download."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 8 * 2**20


class Stopped(Exception):
    """Hashing was stopped (`stop` was set) before the file's end."""


def file_sha256(path: Path, stop: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))  # one buffer for the whole file: no fresh pages per chunk
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if stop is not None and stop.is_set():
                raise Stopped(path.name)
            digest.update(buffer[:n])
    return digest.hexdigest()


def files_sha256(paths: list[Path], file_digest=file_sha256) -> list[str]:
    """`file_digest` of each file, several at once (hashlib releases the GIL while it hashes)."""
    return in_parallel(file_digest, paths)


def in_parallel(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """[fn(item) for item in items], on up to one thread per core; the first item's error, in order, is raised."""
    if len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def cached_file_sha256(path: Path, cache_dir: Path, stop: threading.Event | None = None) -> str:
    """`file_sha256`, remembered per file identity and change times: every job of a lineage names the same base,
    and hashing it again each time dominated data-free jobs. ctime cannot be set by users (unlike mtime), so a
    rewritten file always misses the cache."""
    st = path.stat()
    identity = f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    entry = cache_dir / "sha256" / hashlib.sha256(identity.encode()).hexdigest()
    with contextlib.suppress(OSError):
        known = entry.read_text()
        if len(known) == 64:
            return known
    digest = file_sha256(path, stop)
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    return digest


def dir_sha256(path: Path, file_digest=file_sha256) -> tuple[str, int]:
    """One digest for a folder: its files' relative paths and digests, in order."""
    digest, total = hashlib.sha256(), 0
    files = sorted(p for p in path.rglob("*") if p.is_file())
    for file, file_hex in zip(files, files_sha256(files, file_digest), strict=True):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_hex}\n".encode())
        total += file.stat().st_size
    return digest.hexdigest(), total
