"""sha256 of files and folders, as recorded in manifests and checked on download."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

CHUNK = 8 * 2**20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cached_file_sha256(path: Path, cache_dir: Path) -> str:
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
    digest = file_sha256(path)
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    return digest


def dir_sha256(path: Path, file_digest=file_sha256) -> tuple[str, int]:
    """One digest for a folder: its files' relative paths and digests, in order."""
    digest, total = hashlib.sha256(), 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
        total += file.stat().st_size
    return digest.hexdigest(), total
