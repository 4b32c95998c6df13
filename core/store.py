"""The lineage store (contract §4): versions of merged models per tenant and lineage, in object storage.

Layout under the root:  {tenant}/{lineage}/lineage.json, {tenant}/{lineage}/v{n}/manifest.json and files. Every
name in that layout is built here (the module-level names below), so the engine writes and reads versions without
spelling out paths.

Committing version n:
  1. the head must be the caller's parent (n - 1), else `Conflict`;
  2. `v{n}/.claim` is created exclusively, so exactly one writer may write version n;
  3. every file is written, then the manifest (exclusively): the version exists from that moment on;
  4. `lineage.json` is replaced with the new head.
A crash anywhere leaves the head at a complete version. Readers treat `lineage.json`'s head as a hint and step
forward over any manifest written after it, so a crash between 3 and 4 loses nothing, and a failure to write
`lineage.json` after the manifest does not fail the commit. A failure before the manifest (a full disk, a store
error) removes what was written of the version, its claim included, so the next job on the lineage goes ahead.
Error messages never name the store's root or object paths (those go to the log).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.digests import CHUNK, file_sha256
from core.errors import Conflict, InvalidInput, MergelineError, NotFound, StoreUnavailable
from core.ids import utc_now
from core.names import is_lineage_name, is_tenant_name
from core.objects import store_for_root

log = logging.getLogger("mergeline.store")

LINEAGE_FILE = "lineage.json"
MANIFEST_FILE = "manifest.json"
CLAIM_FILE = ".claim"
STATE_FILE = "state.safetensors"  # a version's method state, carried to the next step
TUNED_HEAD_FILE = "head.safetensors"  # the name a head re-fitted by the job is stored under


def version_folder(version: int) -> str:
    return f"v{int(version)}"


def version_file_label(version: int, path: str) -> str:
    """How a file of a version is named in messages: its path under the lineage."""
    return f"{version_folder(version)}/{path}"


def task_eval_path(task: str, source: str | Path) -> str:
    """Where a version keeps a task's eval set, with the suffix of the file it came from."""
    return f"tasks/{task}/eval{_last_suffix(source)}"


def task_head_path(task: str, source: str | Path) -> str:
    """Where a version keeps a task's classification head, with the suffix of the file it came from."""
    return f"tasks/{task}/head{_last_suffix(source)}"


def tuned_head_path(task: str) -> str:
    return task_head_path(task, TUNED_HEAD_FILE)


def _last_suffix(source: str | Path) -> str:
    return "".join(Path(source).suffixes[-1:])


@dataclass(frozen=True)
class FileToCommit:
    path: str  # relative to the version folder, e.g. "model.safetensors" or "tokenizer/vocab.txt"
    local: Path


def _manifest_entry(manifest: dict, name: str, version: int, path: str) -> dict:
    entry = next((f for f in manifest["files"] if f["path"] == path), None)
    if entry is None:
        raise NotFound(f"version {version} of {name!r} has no file {path!r}", param="path")
    return entry


def _reason(exc: Exception) -> str:
    """A store failure's kind without its text (which names the store's paths or endpoint)."""
    errno = next((e.errno for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, OSError) and e.errno),
                 None)
    text = str(exc)
    for marker in ("No space left", "File too large", "Permission denied", "Read-only file system",
                   "Connection refused", "timed out"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__ if errno is None else f"errno {errno}"


def _safe_rel_path(path: str) -> str:
    parts = Path(path).parts
    if not parts or path.startswith("/") or ".." in parts or path != Path(path).as_posix():
        raise InvalidInput(f"bad file path {path!r}", param="path")
    return path


class LineageStore:
    def __init__(self, root: str, *, claim_ttl_s: float = 900.0):
        self.root = root
        self.claim_ttl_s = claim_ttl_s
        self._store = store_for_root(root)

    # -- low level -------------------------------------------------------------------------------------------
    def _key(self, tenant: str, lineage: str, *parts: str) -> str:
        if not is_tenant_name(tenant):
            raise InvalidInput(f"bad tenant name {tenant!r}", param="tenant")
        if not is_lineage_name(lineage):
            raise InvalidInput(f"bad lineage name {lineage!r}", param="lineage")
        return "/".join((tenant, lineage, *parts))

    def _call(self, fn, *args, **kwargs):
        """Run one obstore call; network and server failures become StoreUnavailable."""
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, MergelineError):
            raise
        except Exception as exc:
            if type(exc).__name__ == "AlreadyExistsError":
                raise
            log.warning("lineage store call failed", extra={"reason": f"{type(exc).__name__}: {exc}"[:2000]})
            raise StoreUnavailable(f"the lineage store failed ({_reason(exc)}); see the service log") from None

    def _get_json(self, key: str) -> dict | None:
        import obstore

        try:
            data = self._call(obstore.get, self._store, key).bytes()
        except FileNotFoundError:
            return None
        return json.loads(bytes(data))

    def _exists(self, key: str) -> bool:
        import obstore

        try:
            self._call(obstore.head, self._store, key)
            return True
        except FileNotFoundError:
            return False

    def _put(self, key: str, data: bytes, *, create: bool = False) -> bool:
        """Write an object; with `create`, only if it does not exist (False when it did)."""
        import obstore

        try:
            self._call(obstore.put, self._store, key, data, mode="create" if create else "overwrite")
            return True
        except Exception as exc:
            if type(exc).__name__ == "AlreadyExistsError":
                return False
            raise

    def _put_file(self, key: str, local: Path) -> None:
        import obstore

        with open(local, "rb") as f:
            self._call(obstore.put, self._store, key, f, chunk_size=CHUNK)

    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        import obstore

        self._call(lambda: next(iter(obstore.list(self._store, prefix="", chunk_size=1)), None))

    # -- reading ---------------------------------------------------------------------------------------------
    def get_lineage(self, tenant: str, name: str) -> dict | None:
        """`lineage.json` with its `head` brought up to the newest complete version, or None."""
        doc = self._get_json(self._key(tenant, name, LINEAGE_FILE))
        if doc is None:
            return None
        head = int(doc["head"])
        while self._exists(self._key(tenant, name, version_folder(head + 1), MANIFEST_FILE)):
            head += 1
        doc["head"] = head
        return doc

    def require_lineage(self, tenant: str, name: str) -> dict:
        doc = self.get_lineage(tenant, name)
        if doc is None:
            raise NotFound(f"no lineage {name!r}", param="lineage")
        return doc

    def manifest(self, tenant: str, name: str, version: int) -> dict:
        doc = self._get_json(self._key(tenant, name, version_folder(version), MANIFEST_FILE))
        if doc is None:
            raise NotFound(f"lineage {name!r} has no version {version}", param="version")
        return doc

    def manifests(self, tenant: str, name: str) -> list[dict]:
        """Every version's manifest, oldest first."""
        head = self.require_lineage(tenant, name)["head"]
        return [self.manifest(tenant, name, v) for v in range(1, head + 1)]

    def list_lineages(self, tenant: str) -> list[str]:
        import obstore

        if not is_tenant_name(tenant):
            raise InvalidInput(f"bad tenant name {tenant!r}", param="tenant")
        result = self._call(obstore.list_with_delimiter, self._store, f"{tenant}/")
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in result["common_prefixes"]]
        return sorted(n for n in names if is_lineage_name(n))

    def describe(self, tenant: str, name: str) -> dict:
        """A lineage as readers see it: name, head, base, creation time and every version's manifest, oldest first."""
        doc = self.require_lineage(tenant, name)
        return {"name": name, "head": doc["head"], "base": doc["base"], "created_at": doc.get("created_at"),
                "versions": [self.manifest(tenant, name, v) for v in range(1, doc["head"] + 1)]}

    def iter_file(self, tenant: str, name: str, version: int, path: str) -> Iterator[bytes]:
        """Stream one file of a committed version (only files its manifest names)."""
        _manifest_entry(self.manifest(tenant, name, version), name, version, path)
        yield from self._stream(tenant, name, version, path)

    def download_file(self, tenant: str, name: str, version: int, path: str, dest: Path) -> None:
        """Copy one file of a committed version to `dest`, verifying its sha256 against the manifest."""
        entry = _manifest_entry(self.manifest(tenant, name, version), name, version, path)
        self._download(tenant, name, version, entry, dest)

    def download_version(self, tenant: str, name: str, version: int, dest: Path) -> dict:
        """Copy a version's files into `dest`, verifying each sha256 against the manifest; returns the manifest."""
        manifest = self.manifest(tenant, name, version)
        for entry in manifest["files"]:
            self._download(tenant, name, version, entry, dest / _safe_rel_path(entry["path"]))
        return manifest

    def _stream(self, tenant: str, name: str, version: int, path: str) -> Iterator[bytes]:
        import obstore

        try:
            result = self._call(obstore.get, self._store, self._key(tenant, name, version_folder(version), path))
        except FileNotFoundError:
            raise NotFound(f"file {path!r} of version {version} is missing from the store") from None
        for chunk in result.stream(min_chunk_size=CHUNK):
            yield bytes(chunk)

    def _download(self, tenant: str, name: str, version: int, entry: dict, target: Path) -> None:
        """Write one manifest entry's file to `target` through a `.part` file, kept only if its sha256 matches:
        a tampered or damaged object never reaches a reader."""
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        tmp = target.with_name(target.name + ".part")
        with open(tmp, "wb") as f:
            for chunk in self._stream(tenant, name, version, entry["path"]):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != entry["sha256"]:
            tmp.unlink()
            raise StoreUnavailable(f"{entry['path']} of version {version} does not match its manifest sha256")
        tmp.replace(target)

    # -- writing ---------------------------------------------------------------------------------------------
    def commit_version(
        self,
        tenant: str,
        name: str,
        *,
        parent: int,
        base: dict,
        files: list[FileToCommit],
        manifest: dict,
        job_id: str,
    ) -> dict:
        """Commit version parent+1 (see the module doc). Returns the manifest as stored."""
        lineage = self.get_lineage(tenant, name)
        if lineage is None:
            if parent != 0:
                raise Conflict(f"lineage {name!r} does not exist, so it has no version {parent}")
            doc = {"name": name, "base": base, "head": 0, "created_at": utc_now()}
            if not self._put(self._key(tenant, name, LINEAGE_FILE), json.dumps(doc, indent=2).encode(), create=True):
                lineage = self.require_lineage(tenant, name)  # another writer created it first
            else:
                lineage = doc
        if lineage["base"] != base:
            raise Conflict(f"lineage {name!r} has another base model ({lineage['base'].get('uri')})", param="base")
        if lineage["head"] != parent:
            raise Conflict(f"lineage {name!r} moved: head is v{lineage['head']}, the job merged onto v{parent}",
                           param="parent_version")

        version = parent + 1
        self._claim(tenant, name, version, job_id)
        written: list[str] = []
        try:
            stored = self._write_version(tenant, name, version, parent, files, manifest, job_id, written)
        except Conflict:
            raise  # another writer's version: nothing of it is ours to remove
        except BaseException:
            self._release(tenant, name, version, job_id, written)
            raise
        head_doc = {**lineage, "head": version, "updated_at": stored["created_at"]}
        try:
            self._put(self._key(tenant, name, LINEAGE_FILE), json.dumps(head_doc, indent=2).encode())
        except StoreUnavailable:
            # The manifest is written, so the version exists: readers step over a stale head pointer.
            log.warning("version committed but lineage.json not updated", extra={"lineage": name, "version": version})
        return stored

    def _write_version(self, tenant: str, name: str, version: int, parent: int, files: list[FileToCommit],
                       manifest: dict, job_id: str, written: list[str]) -> dict:
        """Every file of the version, then its manifest; `written` collects the keys put so far."""
        entries = []
        for item in files:
            rel = _safe_rel_path(item.path)
            entries.append({"path": rel, "bytes": item.local.stat().st_size, "sha256": file_sha256(item.local)})
            key = self._key(tenant, name, version_folder(version), rel)
            written.append(key)
            self._put_file(key, item.local)
        stored = {**manifest, "version": version, "parent": parent, "job_id": job_id,
                  "created_at": utc_now(), "files": entries}
        body = json.dumps(stored, indent=2, sort_keys=False).encode()
        if not self._put(self._key(tenant, name, version_folder(version), MANIFEST_FILE), body, create=True):
            raise Conflict(f"version {version} of {name!r} was committed by another writer", param="parent_version")
        return stored

    def _release(self, tenant: str, name: str, version: int, job_id: str, written: list[str]) -> None:
        """Remove a version that failed before its manifest: its files, then its claim (if still this job's).
        Best effort: whatever stays behind is taken over once the claim's TTL lapses."""
        import obstore

        with contextlib.suppress(Exception):
            if self._exists(self._key(tenant, name, version_folder(version), MANIFEST_FILE)):
                return  # the manifest made it after all: the version exists
            for key in written:
                with contextlib.suppress(FileNotFoundError):
                    self._call(obstore.delete, self._store, key)
            claim = self._key(tenant, name, version_folder(version), CLAIM_FILE)
            if (self._get_json(claim) or {}).get("job_id") == job_id:
                self._call(obstore.delete, self._store, claim)

    def _claim(self, tenant: str, name: str, version: int, job_id: str) -> None:
        """Become the only writer of `version`, or raise Conflict. A claim left by a writer that died (older than
        the claim TTL, still without a manifest) may be taken over; a job may resume its own claim."""
        key = self._key(tenant, name, version_folder(version), CLAIM_FILE)
        mine = json.dumps({"job_id": job_id, "at": time.time()}).encode()
        if self._put(key, mine, create=True):
            return
        if self._exists(self._key(tenant, name, version_folder(version), MANIFEST_FILE)):
            raise Conflict(f"version {version} of {name!r} already exists", param="parent_version")
        held = self._get_json(key) or {}
        if held.get("job_id") != job_id and time.time() - float(held.get("at", 0)) < self.claim_ttl_s:
            raise Conflict(f"version {version} of {name!r} is being written by job {held.get('job_id')}",
                           param="parent_version")
        self._put(key, mine)
        if (self._get_json(key) or {}).get("job_id") != job_id:
            raise Conflict(f"version {version} of {name!r} was claimed by another writer", param="parent_version")
