"""Reading the URIs a job spec names, under the configured policy, into a job's private work directory.

`file://` reads only regular files and folders below the allowed roots (`..` and symlinks that lead out are
refused, and FIFOs or devices are never opened); `s3://` reads from
any S3-compatible endpoint; `http(s)://` is off unless configured, and never reaches loopback, private or
link-local addresses unless that too is configured; `hf://` (core.hub) is off unless configured, and then reads only
the organisations allowed; `lineage://NAME@K` reads version K of the caller's own lineage (its model files) from the
lineage store. Every input's sha256 is recorded for the manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from core.addresses import check_public_host
from core.digests import CHUNK, cached_file_sha256, dir_sha256
from core.errors import AccessDenied, BadRequest, FetchFailed, NotFound
from core.hub import SCHEME as HF_SCHEME
from core.hub import check_hf_allowed, fetch_hf, parse_hf_uri
from core.objects import s3_store_for_bucket
from core.settings import Settings
from core.spec import JobSpec, parse_lineage_uri
from core.store import LineageStore, model_files


@dataclass(frozen=True)
class Fetched:
    uri: str
    path: Path  # a file, or a folder for directory URIs (those ending in "/")
    digest: str | Future[str]  # the sha256, or its hashing under way (`UriReader(background=True)`)
    bytes: int

    @property
    def sha256(self) -> str:
        """The input's sha256 (waiting for it if it is still being hashed)."""
        return self.digest if isinstance(self.digest, str) else self.digest.result()

    @classmethod
    def local(cls, path: Path) -> Fetched:
        """A local file or folder as a family takes it, without going through a `UriReader`: no URI policy and no
        digest, for code that builds its own inputs (the demo, benchmarks, tests)."""
        path = Path(path).resolve()
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return cls(path.as_uri(), path, "", sum(p.stat().st_size for p in files))


def check_submission_policy(spec: JobSpec, settings: Settings) -> None:
    """Refuse at submission what every worker would refuse: http(s) inputs while they are disabled, hf:// inputs
    while they are disabled or outside the organisations allowed, and a webhook whose host resolves to a loopback,
    private or link-local address (unless allowed). Resolves names: call it off the event loop."""
    if spec.webhook is not None and not settings.webhook_allow_private:
        url = spec.webhook.url
        try:
            check_public_host(urllib.parse.urlsplit(url).hostname or "", url, "webhook.url")
        except FetchFailed as exc:
            raise BadRequest(exc.message, param="webhook.url") from None
    for field, uri in spec.input_uris():
        if uri.startswith(("http://", "https://")) and not settings.allow_http:
            raise AccessDenied(f"{field}: http(s) URIs are disabled on this service (MERGELINE_ALLOW_HTTP)",
                               param=field)
        if uri.startswith(HF_SCHEME):
            check_hf_allowed(parse_hf_uri(uri), settings, f"{field}: {uri}", field)


def file_uri_path(uri: str) -> Path:
    """`file:///abs/x` and `file://rel/x` (relative to the working directory) to a path."""
    raw = urllib.parse.unquote(uri[len("file://") :])
    return Path(raw).expanduser()


@dataclass(frozen=True)
class StoreLocation:
    """Where the lineage store keeps its objects. Job inputs never read from there: every tenant's versions live
    in it, and a tenant reuses its own versions only through the lineage store itself."""

    path: Path | None = None  # a file:// store's folder
    bucket: str | None = None  # an s3:// store's bucket and key prefix
    prefix: str = ""

    @classmethod
    def of(cls, root: str) -> StoreLocation:
        if root.startswith("file://"):
            return cls(path=file_uri_path(root).resolve())
        bucket, _, prefix = root.removeprefix("s3://").partition("/")
        return cls(bucket=bucket, prefix=prefix.strip("/"))

    def overlaps_path(self, path: Path) -> bool:
        """`path` lies in the store, or is a folder holding it."""
        return self.path is not None and (path.is_relative_to(self.path) or self.path.is_relative_to(path))

    def overlaps_s3(self, bucket: str, key: str) -> bool:
        """`key` (an object, or a prefix to list) lies in the store, or lists it."""
        if bucket != self.bucket:
            return False
        inside, store = PurePosixPath(key.strip("/")), PurePosixPath(self.prefix)
        return not self.prefix or inside.is_relative_to(store) or store.is_relative_to(inside) or not key.strip("/")


class UriReader:
    """Fetches a job's inputs into `workdir`, enforcing the URI policy of `settings`; `lineage://` URIs read
    `tenant`'s versions from `store`.

    With `background`, local files are hashed on a thread of their own while the caller goes on (a merge reads them
    meanwhile, on another core): their `Fetched.sha256` waits for it. Leaving a `with` block waits for the hashing
    to end, or stops it when the block raised."""

    def __init__(self, settings: Settings, workdir: Path, *, store: LineageStore | None = None,
                 tenant: str | None = None, background: bool = False):
        self.settings = settings
        self.workdir = workdir
        self.lineages = store
        self.tenant = tenant
        self._roots = settings.allowed_root_paths()
        self._store = StoreLocation.of(settings.store)
        self._count = itertools.count(1)  # fetches may run on several threads
        self._hashing = ThreadPoolExecutor(max_workers=1) if background else None
        self._stop = threading.Event()

    def __enter__(self) -> UriReader:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(finish=exc_type is None)

    def close(self, *, finish: bool = False) -> None:
        """Stop the hashing under way, or with `finish` wait for it to end."""
        if not finish:
            self._stop.set()
        if self._hashing is not None:
            self._hashing.shutdown(wait=True, cancel_futures=not finish)

    def fetch(self, uri: str, *, field: str | None = None) -> Fetched:
        try:
            if uri.startswith("file://"):
                return self._fetch_file(uri, field)
            if uri.startswith("s3://"):
                return self._fetch_s3(uri, field)
            if uri.startswith(("http://", "https://")):
                return self._fetch_http(uri, field)
            if uri.startswith("lineage://"):
                return self._fetch_lineage(uri, field)
            if uri.startswith(HF_SCHEME):
                return self._fetch_hf(uri, field)
        except (AccessDenied, FetchFailed):
            raise
        except OSError as exc:
            raise FetchFailed(f"{uri}: {exc.strerror or exc}", param=field) from None
        raise AccessDenied(f"unsupported URI scheme: {uri}", param=field)

    # -- file:// -------------------------------------------------------------------------------------------
    def _fetch_file(self, uri: str, field: str | None) -> Fetched:
        raw = file_uri_path(uri)
        missing = FetchFailed(f"{uri}: no such file or folder", param=field)
        if self._store.overlaps_path(raw.resolve()):
            raise missing  # the store's own objects answer as absent, whether they exist or not
        if not raw.exists():
            raise missing
        path = raw.resolve(strict=True)  # follows symlinks, so a link out of a root is judged by its target
        if not any(path.is_relative_to(root) for root in self._roots):
            raise AccessDenied(f"{uri} is outside the allowed roots (MERGELINE_ALLOWED_ROOTS)", param=field)
        if uri.endswith("/") or path.is_dir():
            if not path.is_dir():
                raise FetchFailed(f"{uri}: not a folder", param=field)
            for inner in path.rglob("*"):
                target = inner.resolve()
                if not any(target.is_relative_to(root) for root in self._roots):
                    raise AccessDenied(f"{uri}: {inner.name} links outside the allowed roots", param=field)
                if self._store.overlaps_path(target):
                    raise missing
                if not (target.is_dir() or target.is_file()):
                    raise FetchFailed(f"{uri}: {inner.name} is not a regular file", param=field)
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            return Fetched(uri, path, self._hashed(lambda: dir_sha256(path, self._local_sha256)[0], uri, field), size)
        if not path.is_file():  # a FIFO or device would block or never end: never opened
            raise FetchFailed(f"{uri}: not a regular file", param=field)
        return Fetched(uri, path, self._hashed(lambda: self._local_sha256(path), uri, field), path.stat().st_size)

    def _hashed(self, digest: Callable[[], str], uri: str, field: str | None) -> str | Future[str]:
        """`digest()` now, or on the hashing thread (`background`); a file that cannot be read is `FetchFailed`."""
        def run() -> str:
            try:
                return digest()
            except OSError as exc:
                raise FetchFailed(f"{uri}: {exc.strerror or exc}", param=field) from None

        return run() if self._hashing is None else self._hashing.submit(run)

    def _local_sha256(self, path: Path) -> str:
        return cached_file_sha256(path, Path(self.settings.cache_dir).expanduser(), self._stop)

    # -- lineage:// ----------------------------------------------------------------------------------------
    def _fetch_lineage(self, uri: str, field: str | None) -> Fetched:
        """Version K's model files (sha256-checked against its manifest): the weights file itself when the version
        has one file of weights and no config.json, else the folder (a save_pretrained model)."""
        ref = parse_lineage_uri(uri)
        missing = FetchFailed(f"{uri}: no such lineage version", param=field)  # the same whoever owns the name
        if ref is None or self.lineages is None or self.tenant is None or ref[1] < 1:
            raise missing
        name, version = ref
        dest = self._dest(f"lineage://{name}/v{version}/", is_dir=True)
        try:
            manifest = self.lineages.manifest(self.tenant, name, version)
            files = model_files(manifest)
            for entry in files:
                self.lineages.download_file(self.tenant, name, version, entry["path"], dest / entry["path"])
        except NotFound:
            raise missing from None
        weights = [f for f in files if f["path"].endswith((".safetensors", ".bin", ".pt"))]
        if len(weights) == 1 and not any(f["path"] == "config.json" for f in files):
            return Fetched(uri, dest / weights[0]["path"], weights[0]["sha256"], weights[0]["bytes"])
        digest, size = dir_sha256(dest)
        return Fetched(uri, dest, digest, size)

    # -- s3:// ---------------------------------------------------------------------------------------------
    def _fetch_s3(self, uri: str, field: str | None) -> Fetched:
        import obstore

        bucket, _, key = uri[len("s3://") :].partition("/")
        if self._store.overlaps_s3(bucket, key):
            raise FetchFailed(f"{uri}: no such object", param=field)  # as absent as a missing object
        store = s3_store_for_bucket(bucket)
        try:
            if key.endswith("/"):
                dest = self._dest(uri, is_dir=True)
                listed = [item for batch in obstore.list(store, prefix=key) for item in batch]
                if not listed:
                    raise FetchFailed(f"{uri}: no objects under this prefix", param=field)
                for item in listed:
                    rel = item["path"][len(key) :].lstrip("/")
                    if not rel or ".." in Path(rel).parts:
                        continue
                    self._download_s3(store, item["path"], dest / rel)
                digest, size = dir_sha256(dest)
                return Fetched(uri, dest, digest, size)
            dest = self._dest(uri)
            digest, size = self._download_s3(store, key, dest)
            return Fetched(uri, dest, digest, size)
        except FileNotFoundError:
            raise FetchFailed(f"{uri}: no such object", param=field) from None
        except FetchFailed:
            raise
        except Exception as exc:  # obstore raises its own error types for network and auth failures
            raise FetchFailed(f"{uri}: {type(exc).__name__}: {exc}".splitlines()[0], param=field) from None

    @retry(
        # A cut-off or failed transfer is tried again; a missing object or a refusal is final.
        retry=retry_if_exception(lambda e: not isinstance(e, FileNotFoundError | AccessDenied)),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2),
        reraise=True,
    )
    def _download_s3(self, store, key: str, dest: Path) -> tuple[str, int]:
        import obstore

        result = obstore.get(store, key)
        expected = result.meta["size"]
        digest, size = self._stream_to(dest, (bytes(chunk) for chunk in result.stream(min_chunk_size=CHUNK)))
        if size != expected:
            raise FetchFailed(f"s3 object {key} was cut off: {size} of {expected} bytes")
        return digest, size

    # -- http(s):// ----------------------------------------------------------------------------------------
    def _fetch_http(self, uri: str, field: str | None) -> Fetched:
        if not self.settings.allow_http:
            raise AccessDenied(f"{uri}: http(s) URIs are disabled (MERGELINE_ALLOW_HTTP)", param=field)
        if uri.endswith("/"):
            raise FetchFailed(f"{uri}: folders cannot be read over http(s); name the files or use s3://", param=field)
        host = urllib.parse.urlsplit(uri).hostname or ""
        if not self.settings.allow_private_http:
            check_public_host(host, uri, field)
        dest = self._dest(uri)
        try:
            with httpx.stream("GET", uri, timeout=30.0, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise FetchFailed(f"{uri}: HTTP {response.status_code}", param=field)
                expected = response.headers.get("content-length")
                digest, size = self._stream_to(dest, response.iter_bytes(CHUNK))
        except httpx.HTTPError as exc:
            raise FetchFailed(f"{uri}: {type(exc).__name__}: {exc}", param=field) from None
        if expected is not None and size != int(expected):
            raise FetchFailed(f"{uri}: download cut off at {size} of {expected} bytes", param=field)
        return Fetched(uri, dest, digest, size)

    # -- hf:// ---------------------------------------------------------------------------------------------
    def _fetch_hf(self, uri: str, field: str | None) -> Fetched:
        try:
            ref = parse_hf_uri(uri)
        except ValueError as exc:
            raise AccessDenied(str(exc), param=field) from None
        view = fetch_hf(ref, uri, self._dest(uri, is_dir=True), self.settings, field)
        # Digests are remembered per cached file (the link's target), so a repository is hashed once, not per job.
        digest, size = dir_sha256(view, lambda link: self._local_sha256(link.resolve()))
        return Fetched(uri, view, digest, size)

    # -- helpers -------------------------------------------------------------------------------------------
    def _dest(self, uri: str, *, is_dir: bool = False) -> Path:
        name = Path(urllib.parse.urlsplit(uri).path.rstrip("/")).name or "download"
        dest = self.workdir / "inputs" / f"{next(self._count):03d}" / name
        if is_dir:
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def _stream_to(self, dest: Path, chunks) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with open(tmp, "wb") as f:
            for chunk in chunks:
                size += len(chunk)
                if size > self.settings.max_download_bytes:
                    raise FetchFailed(f"{dest.name}: larger than MERGELINE_MAX_DOWNLOAD_BYTES")
                digest.update(chunk)
                f.write(chunk)
        os.replace(tmp, dest)
        return digest.hexdigest(), size
