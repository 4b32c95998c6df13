"""URI policy and fetching: allowed roots, symlinks, S3 files and folders, http(s) off by default and never to
private addresses, downloads cut off mid-transfer."""

import hashlib
import http.server
import threading

import boto3
import pytest

from core.errors import AccessDenied, FetchFailed
from core.settings import Settings
from core.uris import UriReader


@pytest.fixture
def roots(tmp_path):
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "a.bin").write_bytes(b"alpha")
    (outside / "secret.bin").write_bytes(b"secret")
    return allowed, outside


def reader(tmp_path, allowed, **kw):
    return UriReader(Settings(allowed_roots=allowed.as_uri(), **kw), tmp_path / "work")


def test_file_inside_root_with_sha256(tmp_path, roots):
    allowed, _ = roots
    got = reader(tmp_path, allowed).fetch((allowed / "a.bin").as_uri())
    assert got.sha256 == hashlib.sha256(b"alpha").hexdigest() and got.bytes == 5


def test_background_hashing_gives_the_same_digests_and_a_failing_block_stops_it(tmp_path, roots):
    from core.digests import CHUNK, Stopped, file_sha256

    allowed, _ = roots
    folder = allowed / "model"
    folder.mkdir()
    for i in range(3):
        (folder / f"shard{i}.bin").write_bytes(bytes([i]) * (CHUNK + 7))
    settings = Settings(allowed_roots=allowed.as_uri(), cache_dir=str(tmp_path / "cache"))
    now = [reader(tmp_path, allowed).fetch(uri) for uri in (folder.as_uri() + "/", (allowed / "a.bin").as_uri())]
    with UriReader(settings, tmp_path / "work", background=True) as r:
        later = [r.fetch(f.uri) for f in now]
    assert [(f.sha256, f.bytes) for f in later] == [(f.sha256, f.bytes) for f in now]
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):  # what a reader's failing `with` block does to the hashing under way
        file_sha256(folder / "shard0.bin", stop)


def test_dotdot_and_symlinks_out_of_the_root_are_refused(tmp_path, roots):
    allowed, outside = roots
    r = reader(tmp_path, allowed)
    with pytest.raises(AccessDenied):
        r.fetch(f"file://{allowed}/../outside/secret.bin")
    (allowed / "link.bin").symlink_to(outside / "secret.bin")
    with pytest.raises(AccessDenied):
        r.fetch((allowed / "link.bin").as_uri())
    folder = allowed / "model"
    folder.mkdir()
    (folder / "config.json").symlink_to(outside / "secret.bin")
    with pytest.raises(AccessDenied):
        r.fetch(folder.as_uri() + "/")


def test_missing_file_is_fetch_failed(tmp_path, roots):
    with pytest.raises(FetchFailed) as info:
        reader(tmp_path, roots[0]).fetch((roots[0] / "nope.bin").as_uri(), field="tasks.0.checkpoint")
    assert info.value.param == "tasks.0.checkpoint" and info.value.type == "fetch_failed"


def test_s3_file_and_folder(tmp_path, roots, s3_bucket, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="m/base.safetensors", Body=b"x" * 1000)
    s3.put_object(Bucket=s3_bucket, Key="hf/config.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key="hf/sub/vocab.txt", Body=b"a\nb")
    r = reader(tmp_path, roots[0])
    got = r.fetch(f"s3://{s3_bucket}/m/base.safetensors")
    assert got.path.read_bytes() == b"x" * 1000 and got.sha256 == hashlib.sha256(b"x" * 1000).hexdigest()
    folder = r.fetch(f"s3://{s3_bucket}/hf/")
    assert (folder.path / "config.json").read_bytes() == b"{}"
    assert (folder.path / "sub" / "vocab.txt").read_bytes() == b"a\nb"
    with pytest.raises(FetchFailed):
        r.fetch(f"s3://{s3_bucket}/m/missing.safetensors")
    with pytest.raises(FetchFailed):
        r.fetch(f"s3://{s3_bucket}/empty/")


def test_http_is_off_by_default_and_private_addresses_are_refused(tmp_path, roots):
    with pytest.raises(AccessDenied, match="disabled"):
        reader(tmp_path, roots[0]).fetch("https://example.com/model.safetensors")
    r = reader(tmp_path, roots[0], allow_http=True)
    for uri in ("http://127.0.0.1/x.bin", "http://localhost/x.bin", "http://10.1.2.3/x.bin",
                "http://169.254.169.254/latest/meta-data", "http://[::1]/x.bin", "http://192.168.0.1/x"):
        with pytest.raises(AccessDenied):
            r.fetch(uri)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/whole.bin":
            body = b"w" * 100
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/cut.bin":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"c" * 10)  # then the connection closes mid-body
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_http_download_when_allowed_and_cut_off_download_fails(tmp_path, roots, http_server):
    r = reader(tmp_path, roots[0], allow_http=True, allow_private_http=True)
    assert r.fetch(f"{http_server}/whole.bin").path.read_bytes() == b"w" * 100
    with pytest.raises(FetchFailed):
        r.fetch(f"{http_server}/cut.bin")
    with pytest.raises(FetchFailed, match="404"):
        r.fetch(f"{http_server}/missing.bin")


def test_local_sha256_is_cached_and_a_rewritten_file_is_hashed_again(tmp_path, roots):
    allowed, _ = roots
    cache = tmp_path / "cache"
    r = UriReader(Settings(allowed_roots=allowed.as_uri(), cache_dir=str(cache)), tmp_path / "work")
    target = allowed / "a.bin"
    first = r.fetch(target.as_uri())
    assert len(list((cache / "sha256").iterdir())) == 1
    assert r.fetch(target.as_uri()).sha256 == first.sha256
    stat = target.stat()
    target.write_bytes(b"omega")  # same size, and its mtime forged back: ctime still moves
    import os

    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert r.fetch(target.as_uri()).sha256 == hashlib.sha256(b"omega").hexdigest()


def test_the_stores_own_objects_answer_as_absent(tmp_path, roots, s3_bucket, s3_endpoint):
    """No job input reads the lineage store: file:// (directly, through a link, or a folder holding the store) and
    s3:// under the store's prefix fail exactly like a missing object, whether the object exists or not."""
    allowed, _ = roots
    store = allowed / "store"
    (store / "alpha" / "secret" / "v1").mkdir(parents=True)
    (store / "alpha" / "secret" / "v1" / "model.safetensors").write_bytes(b"weights")
    r = UriReader(Settings(allowed_roots=allowed.as_uri(), store=store.as_uri()), tmp_path / "work")
    (allowed / "link.bin").symlink_to(store / "alpha" / "secret" / "v1" / "model.safetensors")
    for uri in [(store / "alpha/secret/v1/model.safetensors").as_uri(), (store / "alpha/secret/v9/x").as_uri(),
                (allowed / "link.bin").as_uri(), allowed.as_uri() + "/"]:
        with pytest.raises(FetchFailed) as info:
            r.fetch(uri, field="base.uri")
        assert info.value.type == "fetch_failed" and info.value.message == f"{uri}: no such file or folder"

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_object(Bucket=s3_bucket, Key="lineages/alpha/secret/v1/model.safetensors", Body=b"weights")
    s3.put_object(Bucket=s3_bucket, Key="inputs/base.safetensors", Body=b"base")
    r = UriReader(Settings(allowed_roots=allowed.as_uri(), store=f"s3://{s3_bucket}/lineages"), tmp_path / "w2")
    for key in ["lineages/alpha/secret/v1/model.safetensors", "lineages/alpha/secret/v7/model.safetensors",
                "lineages//alpha/secret/v1/model.safetensors", "lineages/", ""]:
        uri = f"s3://{s3_bucket}/{key}"
        with pytest.raises(FetchFailed) as info:
            r.fetch(uri)
        assert info.value.type == "fetch_failed" and info.value.message == f"{uri}: no such object"
    assert r.fetch(f"s3://{s3_bucket}/inputs/base.safetensors").bytes == 4
