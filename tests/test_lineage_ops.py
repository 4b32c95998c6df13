"""Lineage operations on the store, over a local folder and a real S3 endpoint: rollback, fork, delete and purge."""

import json
import time

import pytest

from core.errors import Conflict, InvalidInput, NotFound
from core.store import FileToCommit, LineageStore, version_chain

BASE = {"family": "state_dict", "arch": None, "uri": "file:///base.safetensors", "sha256": "ab"}


def commit(store, tmp_path, name, parent, task):
    """A version with weights, a method state and one task's eval set and head, like the engine writes."""
    files = []
    for rel in ("model.safetensors", "state.safetensors", f"tasks/{task}/eval.npz", f"tasks/{task}/head.safetensors"):
        local = tmp_path / "src" / name / str(parent) / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(f"{name}-{parent}-{rel}".encode())
        files.append(FileToCommit(rel, local))
    record = {"name": task, "index": parent + 1, "checkpoint": f"file:///{task}", "sha256": "cd",
              "eval_files": {"eval": f"tasks/{task}/eval.npz", "head": f"tasks/{task}/head.safetensors"}}
    return store.commit_version("acme", name, parent=parent, base=BASE, files=files, job_id=f"job_{name}{parent}",
                                manifest={"method": "opcm", "tasks": [record], "metrics": {"avg_accuracy": parent}})


def shas(manifest):
    return {f["path"]: f["sha256"] for f in manifest["files"]}


def test_rollback_commits_a_copy_of_k_as_the_new_head(store, tmp_path):
    for i, task in enumerate(("a", "b", "c")):
        commit(store, tmp_path, "lin", i, task)
    v1 = store.manifest("acme", "lin", 1)
    rolled = store.rollback("acme", "lin", 1, job_id="op_1")
    assert (rolled["version"], rolled["parent"], rolled["rollback_of"]) == (4, 3, 1)
    assert shas(rolled) == shas(v1) and rolled["method"] == "opcm" and rolled["metrics"] == v1["metrics"]
    store.download_version("acme", "lin", 4, tmp_path / "out")  # every copied file matches its sha256
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"lin-0-model.safetensors"
    assert store.get_lineage("acme", "lin")["head"] == 4
    assert [m["version"] for m in version_chain(store.manifests("acme", "lin"))] == [1, 4]
    assert store.rollback("acme", "lin", 1, job_id="op_1")["version"] == 4, "a retried operation commits once"
    assert [m["job_id"] for m in store.manifests("acme", "lin")][:3] == ["job_lin0", "job_lin1", "job_lin2"]
    with pytest.raises(NotFound):
        store.rollback("acme", "lin", 9, job_id="op_2")
    with pytest.raises(InvalidInput):
        store.rollback("acme", "lin", 0, job_id="op_3")
    with pytest.raises(NotFound):
        store.rollback("other", "lin", 1, job_id="op_4")


def test_fork_copies_k_with_every_task_eval_and_outlives_its_source(store, tmp_path):
    for i, task in enumerate(("a", "b")):
        commit(store, tmp_path, "lin", i, task)
    source = store.manifest("acme", "lin", 2)
    fork = store.fork("acme", "lin", 2, "fork", job_id="op_f")
    assert fork["head"] == 1 and fork["forked_from"] == {"lineage": "lin", "version": 2}
    v1 = fork["versions"][0]
    assert v1["forked_from"] == {"lineage": "lin", "version": 2} and v1["parent"] == 0
    assert {p: s for p, s in shas(v1).items() if p in shas(source)} == shas(source)
    assert "tasks/a/eval.npz" in shas(v1), "the earlier task's eval set travels with the fork"
    assert [t["name"] for t in v1["tasks"]] == ["a", "b"]
    with pytest.raises(Conflict):
        store.fork("acme", "lin", 1, "fork", job_id="op_g")
    with pytest.raises(Conflict):
        store.fork("acme", "lin", 1, "lin", job_id="op_h")

    store.delete_lineage("acme", "lin", retention_s=0)
    assert store.purge_due() == ["acme/lin"]
    store.download_version("acme", "fork", 1, tmp_path / "fork")
    assert (tmp_path / "fork" / "tasks" / "a" / "eval.npz").read_bytes() == b"lin-0-tasks/a/eval.npz"
    commit(store, tmp_path, "fork", 1, "c")  # the fork grows on its own
    assert store.get_lineage("acme", "fork")["head"] == 2


def test_delete_hides_the_lineage_keeps_its_name_until_the_purge_removes_every_file(store, tmp_path):
    commit(store, tmp_path, "lin", 0, "a")
    commit(store, tmp_path, "keep", 0, "a")
    deleted = store.delete_lineage("acme", "lin", retention_s=3600, job_id="op_d")
    assert deleted["name"] == "lin" and deleted["purge_after"] > deleted["deleted_at"][:19]
    assert store.delete_lineage("acme", "lin", retention_s=3600, job_id="op_d") == deleted, "a retry answers again"
    assert store.get_lineage("acme", "lin") is None
    for read in (lambda: store.describe("acme", "lin"), lambda: store.manifest("acme", "lin", 1),
                 lambda: store.download_version("acme", "lin", 1, tmp_path / "x"),
                 lambda: store.rollback("acme", "lin", 1, job_id="op_r"),
                 lambda: store.fork("acme", "lin", 1, "new", job_id="op_n"),
                 lambda: store.delete_lineage("acme", "lin", retention_s=0)):
        with pytest.raises(NotFound):
            read()
    with pytest.raises(Conflict):
        store.check_name_free("acme", "lin")
    with pytest.raises(Conflict):
        store.fork("acme", "keep", 1, "lin", job_id="op_k")

    assert store.purge_due() == [], "nothing is purged before its retention"
    assert store.purge_due(now=time.time() + 3601) == ["acme/lin"]
    assert store.purge_due(now=time.time() + 3601) == []
    assert not [p for p in store_paths(store) if p.startswith("acme/lin/")], "every file of the lineage is gone"
    assert store.get_lineage("acme", "keep")["head"] == 1
    store.check_name_free("acme", "lin")
    commit(store, tmp_path, "lin", 0, "z")  # the name is free again
    assert store.get_lineage("acme", "lin")["head"] == 1


def store_paths(store):
    import obstore

    return [item["path"] for batch in obstore.list(store._store) for item in batch]


def test_version_chain_follows_rollbacks():
    m = [{"version": 1, "parent": 0}, {"version": 2, "parent": 1}, {"version": 3, "parent": 2, "rollback_of": 1},
         {"version": 4, "parent": 3}, {"version": 5, "parent": 4, "rollback_of": 2}]
    assert [x["version"] for x in version_chain(m[:4])] == [1, 3, 4]
    assert [x["version"] for x in version_chain(m)] == [1, 2, 5]
    assert version_chain([]) == []


def test_purge_of_a_file_store_leaves_no_folder(tmp_path):
    store = LineageStore((tmp_path / "store").as_uri())
    commit(store, tmp_path, "lin", 0, "a")
    store.delete_lineage("acme", "lin", retention_s=0)
    store.purge_due()
    assert not (tmp_path / "store" / "acme" / "lin").exists()


def test_cli_rollback_fork_delete_on_a_local_store(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mergeline.cli import app as cli

    store = LineageStore((tmp_path / "store").as_uri())
    for i, task in enumerate(("a", "b")):
        commit(store, tmp_path, "lin", i, task)
    local = ["--store", str(tmp_path / "store"), "--tenant", "acme", "--json"]

    def invoke(*args):
        result = CliRunner().invoke(cli, ["lineage", *args, *local])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    assert invoke("rollback", "lin", "1")["rollback_of"] == 1
    assert shas(store.manifest("acme", "lin", 3)) == shas(store.manifest("acme", "lin", 1))
    assert invoke("fork", "lin@2", "lin-fork")["forked_from"] == {"lineage": "lin", "version": 2}
    monkeypatch.setenv("MERGELINE_RETENTION_DAYS", "0")
    from core.settings import get_settings

    get_settings.cache_clear()
    try:
        assert invoke("delete", "lin")["name"] == "lin"
    finally:
        get_settings.cache_clear()
    assert not (tmp_path / "store" / "acme" / "lin").exists(), "with no retention the CLI purges at once"
    assert store.get_lineage("acme", "lin-fork")["head"] == 1
    missing = CliRunner().invoke(cli, ["lineage", "rollback", "lin", "1", *local[:-1]])
    assert missing.exit_code == 1 and "not_found" in missing.output
    bad = CliRunner().invoke(cli, ["lineage", "fork", "lin-fork", "x", *local[:-1]])
    assert bad.exit_code == 1 and "NAME@VERSION" in bad.output


def test_s3_copies_larger_than_a_part_are_made_in_parts(s3_endpoint, s3_bucket, tmp_path):
    """One S3 CopyObject takes at most 5 GiB: a rollback or fork copies a larger file in parts on the server
    (UploadPartCopy). Here the part size is S3's smallest (5 MiB) and the model file 2.5 parts; the small method
    state is one plain copy."""
    import hashlib
    import os

    import boto3

    from core.errors import StoreUnavailable

    part = 5 << 20
    store = LineageStore(f"s3://{s3_bucket}/prefix", copy_part_bytes=part)
    model, state = tmp_path / "model.safetensors", tmp_path / "state.safetensors"
    model.write_bytes(os.urandom(2 * part + part // 2))
    state.write_bytes(b"state")
    store.commit_version("acme", "lin", parent=0, base=BASE, job_id="job_1",
                         files=[FileToCommit("model.safetensors", model), FileToCommit("state.safetensors", state)],
                         manifest={"method": "opcm", "tasks": [], "metrics": {}})
    assert store.rollback("acme", "lin", 1, job_id="op_r")["version"] == 2
    store.fork("acme", "lin", 1, "fork", job_id="op_f")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for version in ("lin/v2", "fork/v1"):
        etag = s3.head_object(Bucket=s3_bucket, Key=f"prefix/acme/{version}/model.safetensors")["ETag"].strip('"')
        assert etag.endswith("-3"), f"{version}: copied in three parts, not at once ({etag})"
        etag = s3.head_object(Bucket=s3_bucket, Key=f"prefix/acme/{version}/state.safetensors")["ETag"].strip('"')
        assert "-" not in etag, f"{version}: a small file is one copy"
    store.download_version("acme", "fork", 1, tmp_path / "out")  # checks every file's sha256 against the manifest
    assert hashlib.sha256((tmp_path / "out" / "model.safetensors").read_bytes()).digest() == \
        hashlib.sha256(model.read_bytes()).digest()
    s3.delete_object(Bucket=s3_bucket, Key="prefix/acme/lin/v1/model.safetensors")
    with pytest.raises(StoreUnavailable, match="missing from the store"):
        store.rollback("acme", "lin", 1, job_id="op_gone")
