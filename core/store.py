"""The lineage store (contract §4): versions of merged models per tenant and lineage, in object storage.

Layout under the root:  {tenant}/{lineage}/lineage.json, {tenant}/{lineage}/v{n}/manifest.json and files. Every
name in that layout is built here (the module-level names below), so the engine writes and reads versions without
spelling out paths.

Committing version n:
  1. the head must be the caller's parent (n - 1), else `Conflict`;
  2. `v{n}/.claim` is created exclusively, so exactly one writer may write version n;
  3. every file is written, then the manifest (exclusively): the version exists from that moment on (a file
     store moves the files a job wrote into its `staging` folder with a rename instead of copying them);
  4. `lineage.json` is replaced with the new head.
A crash anywhere leaves the head at a complete version. Readers treat `lineage.json`'s head as a hint and step
forward over any manifest written after it, so a crash between 3 and 4 loses nothing, and a failure to write
`lineage.json` after the manifest does not fail the commit. A failure before the manifest (a full disk, a store
error) removes what was written of the version, its claim included, so the next job on the lineage goes ahead.
Error messages never name the store's root or object paths (those go to the log).

Lineage operations (contract §3.1) write new versions only: a rollback commits a copy of version k as head+1 and a
fork commits a copy of NAME@k as a new lineage's v1 (server-side copies, same sha256s). A delete marks `lineage.json`
(`deleted_at`, `purge_after`), after which the lineage reads as absent, and leaves a marker under `_purge/`; once
`purge_after` passes, `purge_due` removes the lineage's objects, `lineage.json` last, so the name stays taken until
the files are gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from core.digests import CHUNK, files_sha256
from core.errors import Conflict, InvalidInput, MergelineError, NotFound, StoreUnavailable
from core.ids import utc_now
from core.names import is_lineage_name, is_tenant_name
from core.objects import s3_copy_in_parts, s3_location, store_for_root

log = logging.getLogger("mergeline.store")

LINEAGE_FILE = "lineage.json"
MANIFEST_FILE = "manifest.json"
CLAIM_FILE = ".claim"
STATE_FILE = "state.safetensors"  # a version's method state, carried to the next step
TUNED_HEAD_FILE = "head.safetensors"  # the name a head re-fitted by the job is stored under
TASKS_FOLDER = "tasks/"  # a version's task eval sets and heads
PURGE_FOLDER = "_purge"  # _purge/{tenant}/{lineage}.json: deleted lineages awaiting purge ("_" starts no tenant)
STAGING_FOLDER = "_staging"  # _staging/{job}…/: a job's version files, written on a file store's own disk
STAGING_OWNER_FILE = ".owner"  # locked (flock) by the process writing a staging folder
CARRIED_KEYS = ("base", "method", "params", "metrics", "code_version", "device")  # what a copied version keeps
# An S3 object larger than this is copied in parts of this size (one CopyObject takes at most 5 GiB).
COPY_PART_BYTES = 1 << 30


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


def version_chain(manifests: list[dict]) -> list[dict]:
    """The manifests whose merges the newest one holds, oldest first: a version continues its parent's chain, a
    rollback to k continues k's (the versions after k drop out), a fork's v1 starts one (its manifest lists the
    source's tasks)."""
    by_version = {m["version"]: m for m in manifests}
    chain: list[dict] = []
    current = manifests[-1] if manifests else None
    while current is not None:
        chain.append(current)
        current = by_version.get(current.get("rollback_of", current["parent"]))
    return chain[::-1]


def model_files(manifest: dict) -> list[dict]:
    """A version's model files: every file but the method state and the task eval sets and heads."""
    return [f for f in manifest["files"] if f["path"] != STATE_FILE and not f["path"].startswith(TASKS_FOLDER)]


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class FileToCommit:
    path: str  # relative to the version folder, e.g. "model.safetensors" or "tokenizer/vocab.txt"
    local: Path
    dtype: str | None = None  # the dtype of the merged weights a weight file holds


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
    def __init__(self, root: str, *, claim_ttl_s: float = 900.0, copy_part_bytes: int = COPY_PART_BYTES):
        self.root = root
        self.claim_ttl_s = claim_ttl_s
        self.copy_part_bytes = copy_part_bytes
        self._store = store_for_root(root)
        self._s3 = s3_location(root)

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
        """Write an object from a local file: moved into place when it lies in this store's staging folder on the
        filesystem of its destination (a lineage folder may be a mount of its own), else copied."""
        import obstore

        if self._is_staged(local) and self._call(_move, local, Path(self._store.prefix) / key):
            return
        with open(local, "rb") as f:
            self._call(obstore.put, self._store, key, f, chunk_size=CHUNK)

    def _copy(self, src: str, dest: str, size: int) -> None:
        """Copy an object within the store, on the server; an S3 object over `copy_part_bytes` in parts."""
        import obstore

        if self._s3 is not None and size > self.copy_part_bytes:
            bucket, prefix = self._s3
            self._call(s3_copy_in_parts, bucket, prefix + src, prefix + dest, part_bytes=self.copy_part_bytes)
        else:
            self._call(obstore.copy, self._store, src, dest)

    @property
    def _staging_root(self) -> Path | None:
        """Where jobs stage their version files: a folder of a file:// store; None for other stores."""
        return Path(self._store.prefix) / STAGING_FOLDER if self.root.startswith("file://") else None

    @contextlib.contextmanager
    def staging(self, job_id: str) -> Iterator[Path | None]:
        """A fresh folder on a file:// store's own disk for a job to write its version's files into: committing
        them is then a rename, not a second write of every byte. None for other stores. Removed when the job ends;
        until a commit moves them, its files belong to no version and no reader sees them. The writing process
        holds a lock on the folder for as long as it lives, so that `sweep_staging` can tell a killed job's
        leftovers from a running job's files."""
        if self._staging_root is None:
            yield None
            return
        self._staging_root.mkdir(exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=self._staging_root))
        owner = os.open(folder / STAGING_OWNER_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(owner, fcntl.LOCK_EX)  # released by the kernel when this process ends, however it ends
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            os.close(owner)

    def sweep_staging(self, *, min_age_s: float = 60.0) -> list[str]:
        """Remove the staging folders no living process holds (a job killed or crashed mid-write left them) and
        returns their names. Folders younger than `min_age_s` are left alone: their job may still be taking its
        lock."""
        if self._staging_root is None or not self._staging_root.is_dir():
            return []
        swept = []
        for entry in self._staging_root.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if time.time() - entry.lstat().st_mtime < min_age_s:
                    continue
                if entry.is_symlink() or not entry.is_dir():
                    entry.unlink()  # nothing a job writes: never followed
                elif _unowned(entry):
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    continue
                swept.append(entry.name)
        if swept:
            log.info("removed staging folders of ended jobs", extra={"folders": ",".join(swept)})
        return swept

    def _is_staged(self, local: Path) -> bool:
        """Whether `local` lies in this store's staging folder."""
        return self._staging_root is not None and Path(local).resolve().is_relative_to(self._staging_root)

    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        import obstore

        self._call(lambda: next(iter(obstore.list(self._store, prefix="", chunk_size=1)), None))

    # -- reading ---------------------------------------------------------------------------------------------
    def get_lineage(self, tenant: str, name: str) -> dict | None:
        """`lineage.json` with its `head` brought up to the newest complete version, or None."""
        doc = self._get_json(self._key(tenant, name, LINEAGE_FILE))
        if doc is None or doc.get("deleted_at"):
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
        doc = self._get_json(self._key(tenant, name, LINEAGE_FILE))
        if doc is None or doc.get("deleted_at"):
            raise NotFound(f"no lineage {name!r}", param="lineage")
        return self._version_manifest(tenant, name, version)

    def _version_manifest(self, tenant: str, name: str, version: int) -> dict:
        doc = self._get_json(self._key(tenant, name, version_folder(version), MANIFEST_FILE))
        if doc is None:
            raise NotFound(f"lineage {name!r} has no version {version}", param="version")
        return doc

    def manifests(self, tenant: str, name: str) -> list[dict]:
        """Every version's manifest, oldest first."""
        head = self.require_lineage(tenant, name)["head"]
        return [self._version_manifest(tenant, name, v) for v in range(1, head + 1)]

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
        described = {"name": name, "head": doc["head"], "base": doc["base"], "created_at": doc.get("created_at"),
                     "versions": [self._version_manifest(tenant, name, v) for v in range(1, doc["head"] + 1)]}
        if doc.get("forked_from"):
            described["forked_from"] = doc["forked_from"]
        return described

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
        for item, digest in zip(files, files_sha256([f.local for f in files]), strict=True):
            rel = _safe_rel_path(item.path)
            entry = {"path": rel, "bytes": item.local.stat().st_size, "sha256": digest}
            entries.append(entry | ({"dtype": item.dtype} if item.dtype else {}))
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

    # -- lineage operations (contract §3.1) -------------------------------------------------------------------
    def check_name_free(self, tenant: str, name: str) -> None:
        """Conflict when `name` belongs to a deleted lineage that is not purged yet."""
        doc = self._get_json(self._key(tenant, name, LINEAGE_FILE))
        if doc is not None and doc.get("deleted_at"):
            raise Conflict(f"lineage {name!r} was deleted; its name is free once it is purged "
                           f"(after {doc.get('purge_after')})", param="lineage")

    def rollback(self, tenant: str, name: str, version: int, *, job_id: str) -> dict:
        """Commit head+1 as a copy of `version`: the same files (sha256s), method state and metrics, with
        `rollback_of`, so the next job merges onto `version`'s weights. Returns the new manifest."""
        lineage = self.require_lineage(tenant, name)
        head = self._version_manifest(tenant, name, lineage["head"]) if lineage["head"] else {}
        if head.get("job_id") == job_id:
            return head  # this operation's own retry: it committed already
        source = self._source_version(tenant, name, lineage, version)
        manifest = {"lineage": name, **{k: source[k] for k in CARRIED_KEYS if k in source}, "tasks": [],
                    "rollback_of": version}
        return self._commit_copy(tenant, name, lineage, [(name, version, f) for f in source["files"]], manifest,
                                 job_id)

    def fork(self, tenant: str, name: str, version: int, new_name: str, *, job_id: str) -> dict:
        """Start lineage `new_name` whose v1 is a copy of `name`@`version`: its files, method state, and the eval
        sets and heads of every task it holds (so the fork measures them without its source). Conflict when
        `new_name` is taken (a deleted lineage's name too, until its purge). Returns the new lineage."""
        lineage = self.require_lineage(tenant, name)
        self._source_version(tenant, name, lineage, version)
        chain = version_chain([self._version_manifest(tenant, name, v) for v in range(1, version + 1)])
        source = chain[-1]
        copies = {f["path"]: (name, version, f) for f in source["files"]}
        latest = {t["name"]: (m, t) for m in chain for t in m["tasks"]}
        tasks = []
        for m in chain:
            for t in m["tasks"]:
                tasks.append(t if latest[t["name"]][1] is t else {k: v for k, v in t.items() if k != "eval_files"})
        for m, t in latest.values():
            for rel in t.get("eval_files", {}).values():
                if rel not in copies:
                    copies[rel] = (name, m["version"], _manifest_entry(m, name, m["version"], rel))
        forked_from = {"lineage": name, "version": version}
        doc = {"name": new_name, "base": lineage["base"], "head": 0, "created_at": utc_now(),
               "forked_from": forked_from, "job_id": job_id}
        if not self._put(self._key(tenant, new_name, LINEAGE_FILE), json.dumps(doc, indent=2).encode(), create=True):
            held = self._get_json(self._key(tenant, new_name, LINEAGE_FILE)) or {}
            if held.get("job_id") != job_id or held.get("head") != 0:  # else: this fork's own retry resumes
                raise Conflict(f"lineage {new_name!r} already exists", param="name")
            doc = held
        manifest = {"lineage": new_name, **{k: source[k] for k in CARRIED_KEYS if k in source}, "tasks": tasks,
                    "forked_from": forked_from}
        self._commit_copy(tenant, new_name, doc, list(copies.values()), manifest, job_id)
        return self.describe(tenant, new_name)

    def delete_lineage(self, tenant: str, name: str, *, retention_s: float, job_id: str = "") -> dict:
        """Mark the lineage deleted (absent to every reader from now on) and due for purge after `retention_s`."""
        held = self._get_json(self._key(tenant, name, LINEAGE_FILE)) or {}
        if held.get("deleted_by") == job_id:  # this operation's own retry: it deleted the lineage already
            return {"name": name, "deleted_at": held["deleted_at"], "purge_after": held["purge_after"]}
        lineage = self.require_lineage(tenant, name)
        now = time.time()
        marker = {"tenant": tenant, "name": name, "purge_after": now + retention_s}
        # The purge marker first: a crash before the lineage is marked leaves a marker that purge_due drops.
        self._put(f"{PURGE_FOLDER}/{tenant}/{name}.json", json.dumps(marker).encode())
        deleted = {"name": name, "deleted_at": utc_now(), "purge_after": _iso(now + retention_s)}
        doc = {**lineage, **{k: deleted[k] for k in ("deleted_at", "purge_after")}, "deleted_by": job_id}
        self._put(self._key(tenant, name, LINEAGE_FILE), json.dumps(doc, indent=2).encode())
        return deleted

    def purge_due(self, now: float | None = None) -> list[str]:
        """Remove every deleted lineage whose retention has passed; returns them as "tenant/name"."""
        import obstore

        now = time.time() if now is None else now
        markers = self._call(lambda: [i["path"] for b in obstore.list(self._store, prefix=f"{PURGE_FOLDER}/")
                                      for i in b])
        purged = []
        for key in markers:
            marker = self._get_json(key) or {}
            if float(marker.get("purge_after", now + 1)) > now:
                continue
            tenant, name = marker.get("tenant", ""), marker.get("name", "")
            doc = self._get_json(self._key(tenant, name, LINEAGE_FILE))
            if doc is not None and doc.get("deleted_at"):
                self._remove_objects(tenant, name)
                purged.append(f"{tenant}/{name}")
            self._delete([key])
        return purged

    def _remove_objects(self, tenant: str, name: str) -> None:
        """Every object of the lineage, `lineage.json` last: until it goes, the name stays taken."""
        import obstore

        lineage_key = self._key(tenant, name, LINEAGE_FILE)
        paths = self._call(lambda: [i["path"] for b in obstore.list(self._store, prefix=f"{tenant}/{name}/")
                                    for i in b])
        others = [p for p in paths if p != lineage_key]
        for start in range(0, len(others), 500):
            self._delete(others[start:start + 500])
        self._delete([lineage_key])

    def _delete(self, keys: list[str]) -> None:
        """Delete objects; ones already gone (another worker purging the same lineage) are not an error."""
        import obstore

        try:
            self._call(obstore.delete, self._store, keys)
        except FileNotFoundError:
            for key in keys:
                with contextlib.suppress(FileNotFoundError):
                    self._call(obstore.delete, self._store, key)

    def _source_version(self, tenant: str, name: str, lineage: dict, version: int) -> dict:
        if version < 1:
            raise InvalidInput("version 0 is the base model, not a stored version: name a version from 1",
                               param="version")
        if version > lineage["head"]:
            raise NotFound(f"lineage {name!r} has no version {version}", param="version")
        return self._version_manifest(tenant, name, version)

    def _commit_copy(self, tenant: str, name: str, lineage: dict, copies: list[tuple[str, int, dict]],
                     manifest: dict, job_id: str) -> dict:
        """Commit version head+1 of `name` from files already in the store, (lineage, version, manifest entry)
        each, copied within the store; the same steps as `commit_version`. Returns the manifest as stored."""
        parent = lineage["head"]
        version = parent + 1
        self._claim(tenant, name, version, job_id)
        for src_name, src_version, entry in copies:
            src = self._key(tenant, src_name, version_folder(src_version), entry["path"])
            dest = self._key(tenant, name, version_folder(version), _safe_rel_path(entry["path"]))
            try:
                self._copy(src, dest, entry["bytes"])
            except FileNotFoundError:
                raise StoreUnavailable(f"{version_file_label(src_version, entry['path'])} of {src_name!r} is "
                                       "missing from the store") from None
        stored = {**manifest, "version": version, "parent": parent, "job_id": job_id, "created_at": utc_now(),
                  "files": [entry for _, _, entry in copies]}
        body = json.dumps(stored, indent=2).encode()
        if not self._put(self._key(tenant, name, version_folder(version), MANIFEST_FILE), body, create=True):
            raise Conflict(f"version {version} of {name!r} was committed by another writer", param="version")
        head_doc = {**lineage, "head": version, "updated_at": stored["created_at"]}
        self._put(self._key(tenant, name, LINEAGE_FILE), json.dumps(head_doc, indent=2).encode())
        return stored


def _unowned(folder: Path) -> bool:
    """Whether no process holds the staging folder's owner lock (taken and dropped here to find out)."""
    try:
        owner = os.open(folder / STAGING_OWNER_FILE, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True  # never locked: its process ended before taking the lock
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(owner)


def _move(source: Path, dest: Path) -> bool:
    """Rename `source` to `dest` (atomic, parents made); False when they lie on different filesystems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, dest)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    return True
