"""Object storage behind one interface (obstore): a local folder for `file://`, any S3-compatible endpoint for
`s3://`. S3 credentials, region and `AWS_ENDPOINT_URL` come from the environment as usual."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import InvalidInput


def s3_store_for_bucket(bucket: str, prefix: str | None = None):
    from obstore.store import S3Store

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    options = {"allow_http": True} if endpoint.startswith("http://") else None
    config = {}
    if endpoint:
        # Path-style addressing works with every S3-compatible server (MinIO, moto, Ceph).
        config = {"endpoint": endpoint, "virtual_hosted_style_request": False}
    if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        config["region"] = "us-east-1"
    return S3Store(bucket, prefix=prefix or None, config=config or None, client_options=options)


def store_for_root(root: str):
    """The obstore store for a lineage-store root: `file://PATH` or `s3://bucket[/prefix]`."""
    from obstore.store import LocalStore

    if root.startswith("file://"):
        path = Path(root[len("file://") :]).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return LocalStore(path, automatic_cleanup=True)  # a purged lineage leaves no empty folders
    if root.startswith("s3://"):
        bucket, _, prefix = root[len("s3://") :].partition("/")
        if not bucket:
            raise InvalidInput(f"store root {root!r} names no bucket", param="store")
        return s3_store_for_bucket(bucket, prefix.strip("/"))
    raise InvalidInput(f"store root {root!r}: use file://PATH or s3://bucket/prefix", param="store")
