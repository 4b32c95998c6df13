"""Object storage behind one interface (obstore): a local folder for `file://`, any S3-compatible endpoint for
`s3://`. S3 credentials, region and `AWS_ENDPOINT_URL` come from the environment as usual."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import InvalidInput


def _s3_endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def _s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_store_for_bucket(bucket: str, prefix: str | None = None):
    from obstore.store import S3Store

    endpoint = _s3_endpoint()
    options = {"allow_http": True} if endpoint.startswith("http://") else None
    config = {}
    if endpoint:
        # Path-style addressing works with every S3-compatible server (MinIO, moto, Ceph).
        config = {"endpoint": endpoint, "virtual_hosted_style_request": False}
    if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        config["region"] = _s3_region()
    return S3Store(bucket, prefix=prefix or None, config=config or None, client_options=options)


def s3_location(root: str) -> tuple[str, str] | None:
    """(bucket, key prefix ending in "/" or empty) of an `s3://` store root; None for another root."""
    if not root.startswith("s3://"):
        return None
    bucket, _, prefix = root[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def s3_copy_in_parts(bucket: str, src: str, dest: str, *, part_bytes: int) -> None:
    """Copy an object within `bucket` on the server, in parts of `part_bytes` (UploadPartCopy): one CopyObject
    takes at most 5 GiB. boto3's managed copy sends the parts concurrently and aborts the upload if one fails.
    FileNotFoundError when `src` does not exist."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from botocore.exceptions import ClientError

    endpoint = _s3_endpoint()
    client = boto3.client("s3", endpoint_url=endpoint or None, region_name=_s3_region(),
                          config=Config(s3={"addressing_style": "path"} if endpoint else None))
    try:
        client.copy({"Bucket": bucket, "Key": src}, bucket, dest,
                    Config=TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            raise FileNotFoundError(src) from None
        raise


def store_for_root(root: str):
    """The obstore store for a lineage-store root: `file://PATH` or `s3://bucket[/prefix]`."""
    from obstore.store import LocalStore

    if root.startswith("file://"):
        path = Path(root[len("file://") :]).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return LocalStore(path, automatic_cleanup=True)  # a purged lineage leaves no empty folders
    if (location := s3_location(root)) is not None:
        bucket, prefix = location
        if not bucket:
            raise InvalidInput(f"store root {root!r} names no bucket", param="store")
        return s3_store_for_bucket(bucket, prefix.rstrip("/"))
    raise InvalidInput(f"store root {root!r}: use file://PATH or s3://bucket/prefix", param="store")
