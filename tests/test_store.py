"""The lineage store over a local folder and over a real S3 endpoint: atomic commits, conflicts, integrity."""

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core.errors import Conflict, NotFound, StoreUnavailable
from core.store import FileToCommit, LineageStore

BASE = {"family": "state_dict", "arch": None, "uri": "file:///base.safetensors", "sha256": "ab"}


def commit(store, tmp_path, parent, job="job_1", content=b"weights", name="lin", base=BASE):
    f = tmp_path / f"model-{job}.bin"
    f.write_bytes(content)
    return store.commit_version("acme", name, parent=parent, base=base, job_id=job,
                                files=[FileToCommit("model.safetensors", f)], manifest={"method": "m", "tasks": []})


def test_commit_read_and_download(store, tmp_path):
    assert store.get_lineage("acme", "lin") is None
    m1 = commit(store, tmp_path, 0, "job_1", b"one")
    m2 = commit(store, tmp_path, 1, "job_2", b"two")
    assert (m1["version"], m1["parent"], m2["version"], m2["parent"]) == (1, 0, 2, 1)
    assert store.get_lineage("acme", "lin")["head"] == 2
    assert [m["job_id"] for m in store.manifests("acme", "lin")] == ["job_1", "job_2"]
    assert store.list_lineages("acme") == ["lin"] and store.list_lineages("other") == []
    store.download_version("acme", "lin", 1, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"one"
    assert b"".join(store.iter_file("acme", "lin", 2, "model.safetensors")) == b"two"
    assert m2["files"][0]["bytes"] == 3 and len(m2["files"][0]["sha256"]) == 64


def test_moved_head_is_a_conflict_and_nothing_is_overwritten(store, tmp_path):
    commit(store, tmp_path, 0, "job_1", b"one")
    with pytest.raises(Conflict):
        commit(store, tmp_path, 0, "job_x", b"evil")
    assert b"".join(store.iter_file("acme", "lin", 1, "model.safetensors")) == b"one"
    with pytest.raises(Conflict):
        commit(store, tmp_path, 1, "job_2", base={**BASE, "uri": "file:///other"})


def test_concurrent_writers_on_one_head_commit_exactly_one_version(store, tmp_path):
    commit(store, tmp_path, 0, "job_0")
    outcomes = []

    def writer(i):
        try:
            outcomes.append(commit(store, tmp_path, 1, f"job_w{i}", f"w{i}".encode())["job_id"])
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o != "conflict"]
    assert len(winners) == 1
    assert store.get_lineage("acme", "lin")["head"] == 2
    manifest = store.manifest("acme", "lin", 2)
    assert manifest["job_id"] == winners[0]
    # The stored bytes are the winner's, matching the manifest.
    store.download_version("acme", "lin", 2, tmp_path / "check")


def test_a_file_store_moves_staged_files_into_place_and_copies_the_others(store, tmp_path):
    with store.staging("job_1") as staged:
        if store.root.startswith("s3://"):
            assert staged is None  # an S3 store uploads from anywhere
            return
        (staged / "model.safetensors").write_bytes(b"merged")
        user_file = tmp_path / "eval.npz"  # a user's input: never moved away
        user_file.write_bytes(b"eval set")
        m = store.commit_version("acme", "lin", parent=0, base=BASE, job_id="job_1",
                                 manifest={"method": "m", "tasks": []},
                                 files=[FileToCommit("model.safetensors", staged / "model.safetensors"),
                                        FileToCommit("tasks/t/eval.npz", user_file)])
        assert not (staged / "model.safetensors").exists() and user_file.read_bytes() == b"eval set"
        with store.staging("job_1") as again:
            assert again != staged  # a fresh folder each time
    assert not staged.exists() and not again.exists()  # removed when the job ends
    store.download_version("acme", "lin", 1, tmp_path / "out")  # sha256s checked
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"merged"
    assert [f["bytes"] for f in m["files"]] == [6, 8]
    assert store.list_lineages("acme") == ["lin"]


KILLED_WRITER = """
import os, sys, time
from core.store import LineageStore
with LineageStore(sys.argv[1]).staging("job_killed") as folder:
    (folder / "model.safetensors").write_bytes(b"half")
    print(folder, flush=True)
    time.sleep(600)
"""


def test_a_killed_jobs_staging_folder_is_swept_and_a_running_jobs_is_kept(tmp_path):
    root = (tmp_path / "store").as_uri()
    store = LineageStore(root)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, root], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        killed = Path(writer.stdout.readline().strip())
        with store.staging("job_running") as running:
            (running / "model.safetensors").write_bytes(b"being written")
            assert store.sweep_staging(min_age_s=0) == [], "a living writer's folder is never swept"
            assert store.sweep_staging() == [], "nothing younger than a minute is swept"
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=10)
            assert killed.exists()
            assert store.sweep_staging(min_age_s=0) == [killed.name]
            assert not killed.exists() and (running / "model.safetensors").read_bytes() == b"being written"
    finally:
        writer.kill()
        writer.wait()


def test_crash_before_the_head_pointer_moves_loses_nothing(tmp_path):
    store = LineageStore((tmp_path / "store").as_uri())
    commit(store, tmp_path, 0, "job_1")
    commit(store, tmp_path, 1, "job_2")
    # Simulate a crash after v2's manifest but before lineage.json moved: the head pointer still says 1.
    doc_path = tmp_path / "store" / "acme" / "lin" / "lineage.json"
    doc = json.loads(doc_path.read_text())
    doc_path.write_text(json.dumps({**doc, "head": 1}))
    assert store.get_lineage("acme", "lin")["head"] == 2
    assert commit(store, tmp_path, 2, "job_3")["version"] == 3


def test_crash_before_the_manifest_leaves_the_old_head(tmp_path):
    store = LineageStore((tmp_path / "store").as_uri(), claim_ttl_s=0.0)
    commit(store, tmp_path, 0, "job_1", b"one")
    # A writer died after claiming v2 and writing a file, before its manifest.
    v2 = tmp_path / "store" / "acme" / "lin" / "v2"
    v2.mkdir()
    (v2 / ".claim").write_text(json.dumps({"job_id": "job_dead", "at": 0}))
    (v2 / "model.safetensors").write_bytes(b"partial")
    assert store.get_lineage("acme", "lin")["head"] == 1
    with pytest.raises(NotFound):
        store.manifest("acme", "lin", 2)
    # The stale claim is taken over and the version committed whole.
    m = commit(store, tmp_path, 1, "job_2", b"two")
    assert m["version"] == 2
    assert (v2 / "model.safetensors").read_bytes() == b"two"


def test_live_claim_blocks_a_second_writer(tmp_path):
    store = LineageStore((tmp_path / "store").as_uri(), claim_ttl_s=3600)
    commit(store, tmp_path, 0, "job_1")
    v2 = tmp_path / "store" / "acme" / "lin" / "v2"
    v2.mkdir()
    (v2 / ".claim").write_text(json.dumps({"job_id": "job_busy", "at": 9e18}))
    with pytest.raises(Conflict, match="job_busy"):
        commit(store, tmp_path, 1, "job_2")
    # The claimant itself may resume (a redelivered job).
    assert commit(store, tmp_path, 1, "job_busy")["version"] == 2


def test_tampered_file_fails_download(tmp_path):
    store = LineageStore((tmp_path / "store").as_uri())
    commit(store, tmp_path, 0, "job_1", b"one")
    (tmp_path / "store" / "acme" / "lin" / "v1" / "model.safetensors").write_bytes(b"bad")
    with pytest.raises(StoreUnavailable, match="sha256"):
        store.download_version("acme", "lin", 1, tmp_path / "out")


def test_download_file_verifies_one_file_and_refuses_a_tampered_one(tmp_path):
    store = LineageStore((tmp_path / "store").as_uri())
    evals = tmp_path / "eval.npz"
    evals.write_bytes(b"eval set")
    store.commit_version("acme", "lin", parent=0, base=BASE, job_id="job_1", manifest={"method": "m", "tasks": []},
                         files=[FileToCommit("tasks/t/eval.npz", evals)])
    store.download_file("acme", "lin", 1, "tasks/t/eval.npz", tmp_path / "ok" / "eval.npz")
    assert (tmp_path / "ok" / "eval.npz").read_bytes() == b"eval set"
    with pytest.raises(NotFound):
        store.download_file("acme", "lin", 1, "tasks/t/head.safetensors", tmp_path / "ok" / "head.safetensors")

    (tmp_path / "store" / "acme" / "lin" / "v1" / "tasks" / "t" / "eval.npz").write_bytes(b"eval sex")
    target = tmp_path / "bad" / "eval.npz"
    with pytest.raises(StoreUnavailable, match="sha256"):
        store.download_file("acme", "lin", 1, "tasks/t/eval.npz", target)
    assert not target.exists() and not target.with_name("eval.npz.part").exists()


def test_reads_name_what_is_missing(store):
    with pytest.raises(NotFound):
        store.require_lineage("acme", "nope")
    with pytest.raises(NotFound):
        store.manifest("acme", "nope", 1)


def test_unreachable_s3_is_store_unavailable(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = LineageStore("s3://bucket/p")
    with pytest.raises(StoreUnavailable):
        store.get_lineage("acme", "lin")
