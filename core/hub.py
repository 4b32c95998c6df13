"""`hf://org/name[@revision]` URIs: Hugging Face Hub repositories as job inputs.

Off unless `MERGELINE_ALLOW_HF=true`, and then only for the organisations `MERGELINE_HF_ORGS` lists (`*` for any).
Files come through `huggingface_hub` itself, so its token (`HF_TOKEN`, or the login it cached), its cache (`HF_HOME`,
`HF_HUB_CACHE`) and its offline mode (`HF_HUB_OFFLINE=1`: the cache only, no network) all apply. Only a repository's
top-level weights (`*.safetensors`), JSON (config, shard index, adapter config, tokenizer) and tokenizer files are
read. `huggingface_hub` is imported on first use: the API validates hf:// URIs without it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import AccessDenied, FetchFailed
from core.settings import Settings

SCHEME = "hf://"
# What a model folder needs: weights, config/index/adapter/tokenizer JSON, tokenizer vocabularies. Top level only.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
IGNORE_PATTERNS = ["*/*"]
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"  # the Hub's rule for organisation and repository names
_URI = re.compile(rf"hf://(?P<org>{_NAME})/(?P<name>{_NAME})(?:@(?P<revision>[^\s]{{1,128}}))?/?")
_REVISION_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubRef:
    org: str
    name: str
    revision: str | None  # a branch, tag or commit; None: the default branch

    @property
    def repo_id(self) -> str:
        return f"{self.org}/{self.name}"


def parse_hf_uri(uri: str) -> HubRef:
    """`hf://org/name[@revision][/]` as a HubRef; ValueError for any other form. A revision is a branch, tag or
    commit name: dotted/dashed words, `/`-separated (`refs/pr/1`), never `.`/`..` parts or a leading dot."""
    match = _URI.fullmatch(uri)
    if match is None or ".." in match["org"] + match["name"] or "--" in match["org"] + match["name"]:
        raise ValueError(f"{uri!r} is not an hf://org/name[@revision] URI")
    revision = match["revision"]
    if revision is not None:
        revision = revision.rstrip("/") if uri.endswith("/") else revision
        if not all(_REVISION_PART.fullmatch(part) for part in revision.split("/")) or revision.endswith(".lock"):
            raise ValueError(f"{uri!r}: revision {revision!r} is not a branch, tag or commit name")
    return HubRef(match["org"], match["name"], revision)


def check_hf_allowed(ref: HubRef, settings: Settings, uri: str, field: str | None) -> None:
    """AccessDenied unless hf:// inputs are on and the organisation is on the allow-list."""
    if not settings.allow_hf:
        raise AccessDenied(f"{uri}: hf:// URIs are disabled on this service (MERGELINE_ALLOW_HF)", param=field)
    if not settings.hf_org_allowed(ref.org):
        raise AccessDenied(f"{uri}: organisation {ref.org!r} is not in MERGELINE_HF_ORGS", param=field)


def fetch_hf(ref: HubRef, uri: str, view: Path, settings: Settings, field: str | None) -> Path:
    """The repository's model files, downloaded into (or found in) huggingface_hub's cache, linked into the folder
    `view` (so the job sees exactly the files it asked for, whatever else the cache holds). Returns `view`."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import DryRunError

    check_hf_allowed(ref, settings, uri, field)
    options = dict(repo_id=ref.repo_id, revision=ref.revision, allow_patterns=ALLOW_PATTERNS,
                   ignore_patterns=IGNORE_PATTERNS)
    with _hub_errors(uri, field):
        if not constants.HF_HUB_OFFLINE:
            try:
                planned = snapshot_download(**options, dry_run=True)
            except DryRunError:
                planned = []  # the Hub cannot be reached: the cache answers below, or the fetch fails there
            size = sum(f.file_size for f in planned if f.will_download)
            if size > settings.max_download_bytes:
                raise FetchFailed(f"{uri}: {size} bytes to download, more than MERGELINE_MAX_DOWNLOAD_BYTES",
                                  param=field)
        snapshot = Path(snapshot_download(**options))
    files = sorted(p for p in snapshot.iterdir() if p.is_file())
    if not files:
        raise FetchFailed(f"{uri}: the repository has no model files (*.safetensors, *.json)", param=field)
    view.mkdir(parents=True, exist_ok=True)
    for file in files:
        os.symlink(file.resolve(), view / file.name)
    return view


@contextlib.contextmanager
def _hub_errors(uri: str, field: str | None) -> Iterator[None]:
    """huggingface_hub's errors as ours: a refusal (gated, private, bad token) is AccessDenied, anything else that
    stops the download (missing repository or revision, offline without a cached copy, network) FetchFailed."""
    from huggingface_hub import errors

    try:
        yield
    except FetchFailed:
        raise
    except errors.GatedRepoError:
        raise AccessDenied(f"{uri}: the Hub refused access (a gated repository; check HF_TOKEN)", param=field) from None
    except errors.RepositoryNotFoundError:
        raise FetchFailed(f"{uri}: no such repository on the Hub, or no access to it (check HF_TOKEN)",
                          param=field) from None
    except errors.RevisionNotFoundError:
        raise FetchFailed(f"{uri}: no such revision", param=field) from None
    except errors.LocalEntryNotFoundError:
        raise FetchFailed(f"{uri}: not in the Hugging Face cache, and the Hub cannot be reached (HF_HUB_OFFLINE, or "
                          "no network)", param=field) from None
    except errors.HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", None) in (401, 403):
            raise AccessDenied(f"{uri}: the Hub refused access (check HF_TOKEN)", param=field) from None
        raise FetchFailed(f"{uri}: the Hub answered {str(exc).splitlines()[0]}", param=field) from None
    except (OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FetchFailed(f"{uri}: {message}", param=field) from None
