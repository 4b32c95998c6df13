"""hf://org/name[@revision] inputs through huggingface_hub: off by default, limited to allowed organisations,
revisions validated, the token, cache and offline mode of huggingface_hub honoured. The Hub is a local server
(tests/hub_server.py) that huggingface_hub downloads from, so its cache is laid out by huggingface_hub itself."""

from __future__ import annotations

import os

import pytest
from helpers_models import write_tiny_hf
from hub_server import HubServer, Repo
from safetensors.torch import load_file

from core.errors import AccessDenied, FetchFailed, InvalidInput
from core.settings import Settings
from core.spec import parse_job_spec
from core.store import LineageStore
from core.uris import UriReader, check_submission_policy
from engine.job import run_job

COMMIT = "c0ffee" + "0" * 34
ADAPTER_COMMIT = "ada" + "1" * 37


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub with acme/tiny-llama (plus files a job must not fetch) and a private acme/secret; huggingface_hub
    points at it, with its cache under tmp_path and offline mode off until a test turns it on."""
    from huggingface_hub import constants

    folder = write_tiny_hf(tmp_path / "published", "llama")
    (folder / "README.md").write_text("# tiny llama\n")
    (folder / "original").mkdir()
    (folder / "original" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with HubServer() as server:
        server.repos["acme/tiny-llama"] = Repo.of_folder(folder, commit=COMMIT)
        server.repos["acme/tiny-llama"].revisions["v1"] = COMMIT
        server.repos["acme/secret"] = Repo.of_folder(folder, commit=COMMIT, token="hf_test_token")
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login
        yield server


def hub_settings(tmp_path, **overrides) -> Settings:
    values = dict(store=(tmp_path / "store").as_uri(), allowed_roots=str(tmp_path), allow_hf=True, hf_orgs="acme",
                  cache_dir=str(tmp_path / "digests"))
    return Settings(**(values | overrides))


def fetch(tmp_path, uri: str, **overrides):
    return UriReader(hub_settings(tmp_path, **overrides), tmp_path / "work").fetch(uri, field="base.uri")


def spec_for(base_uri: str, task_uri: str, lineage: str = "hub"):
    return parse_job_spec({"lineage": lineage, "base": {"family": "hf", "uri": base_uri},
                           "tasks": [{"name": "t", "checkpoint": task_uri}], "method": "task_arithmetic"})


@pytest.mark.parametrize("uri", ["hf://acme/tiny-llama", "hf://acme/tiny-llama@v1", "hf://acme/tiny-llama@refs/pr/1",
                                 f"hf://acme/tiny-llama@{COMMIT}/", "hf://Acme/tiny.llama_2"])
def test_hf_uris_in_a_spec(uri):
    assert spec_for(uri, uri).base.uri == uri


@pytest.mark.parametrize("uri", ["hf://acme/tiny-llama@../../etc", "hf://acme/tiny-llama@a/../b", "hf://acme",
                                 "hf://acme/tiny-llama/sub/dir", "hf://acme/tiny-llama@.hidden", "hf://../x/y",
                                 "hf://acme/tiny-llama@a b", "hf://acme/tiny-llama@main.lock"])
def test_malformed_hf_uris_are_refused_by_the_spec(uri):
    with pytest.raises(InvalidInput) as caught:
        spec_for(uri, "file:///x/y.safetensors")
    assert caught.value.param == "base.uri"


def test_submission_policy(tmp_path):
    spec = spec_for("hf://acme/tiny-llama", "hf://other/model@main")
    with pytest.raises(AccessDenied, match="MERGELINE_ALLOW_HF") as caught:
        check_submission_policy(spec, Settings())  # off by default
    assert caught.value.param == "base.uri"
    with pytest.raises(AccessDenied, match="'other' is not in MERGELINE_HF_ORGS") as caught:
        check_submission_policy(spec, Settings(allow_hf=True, hf_orgs="acme"))
    assert caught.value.param == "tasks.0.checkpoint"
    with pytest.raises(AccessDenied, match="MERGELINE_HF_ORGS"):
        check_submission_policy(spec, Settings(allow_hf=True))  # on, but no organisation listed
    check_submission_policy(spec, Settings(allow_hf=True, hf_orgs="ACME, other"))
    check_submission_policy(spec, Settings(allow_hf=True, hf_orgs="*"))


def test_fetch_refuses_disabled_or_unlisted_organisations_without_a_request(tmp_path, hub):
    with pytest.raises(AccessDenied, match="MERGELINE_ALLOW_HF"):
        fetch(tmp_path, "hf://acme/tiny-llama", allow_hf=False)
    with pytest.raises(AccessDenied, match="not in MERGELINE_HF_ORGS"):
        fetch(tmp_path, "hf://acme/tiny-llama", hf_orgs="someone-else")
    with pytest.raises(AccessDenied, match="not a branch, tag or commit"):
        fetch(tmp_path, "hf://acme/tiny-llama@../../x")
    assert hub.requests == []


def test_fetch_fills_huggingface_hubs_cache_and_offline_mode_reads_it(tmp_path, hub, monkeypatch):
    from huggingface_hub import constants, scan_cache_dir

    fetched = fetch(tmp_path, "hf://acme/tiny-llama")
    assert sorted(p.name for p in fetched.path.iterdir()) == ["config.json", "generation_config.json",
                                                               "model.safetensors"]  # no README, no sub-folders
    assert load_file(fetched.path / "model.safetensors").keys() == load_file(
        tmp_path / "published" / "model.safetensors").keys()
    cached = scan_cache_dir(tmp_path / "hf-cache")
    assert [(r.repo_id, [v.commit_hash for v in r.revisions]) for r in cached.repos] == [("acme/tiny-llama", [COMMIT])]
    assert all(os.path.realpath(p).startswith(str(tmp_path / "hf-cache")) for p in fetched.path.iterdir())
    snapshot = tmp_path / "hf-cache" / "models--acme--tiny-llama" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in fetched.path.iterdir())  # downloaded

    asked = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for uri in ("hf://acme/tiny-llama", "hf://acme/tiny-llama@main/", f"hf://acme/tiny-llama@{COMMIT}"):
        again = fetch(tmp_path, uri)
        assert (again.sha256, again.bytes) == (fetched.sha256, fetched.bytes)
    assert len(hub.requests) == asked  # offline: the cache answered
    assert len(list((tmp_path / "digests" / "sha256").iterdir())) == 3  # each cached file hashed once, not per fetch
    for uri in ("hf://acme/never-fetched", "hf://acme/tiny-llama@v1"):  # a tag never resolved online is not cached
        with pytest.raises(FetchFailed, match="not in the Hugging Face cache"):
            fetch(tmp_path, uri)


def test_fetch_errors(tmp_path, hub, monkeypatch):
    with pytest.raises(FetchFailed, match="no such repository"):
        fetch(tmp_path, "hf://acme/missing")
    with pytest.raises(FetchFailed, match="no such revision"):
        fetch(tmp_path, "hf://acme/tiny-llama@nope")
    with pytest.raises(FetchFailed, match="no such repository on the Hub, or no access"):
        fetch(tmp_path, "hf://acme/secret")  # private, and no token
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert (fetch(tmp_path, "hf://acme/secret").path / "config.json").is_file()
    with pytest.raises(FetchFailed, match="MERGELINE_MAX_DOWNLOAD_BYTES"):
        fetch(tmp_path, "hf://acme/tiny-llama", max_download_bytes=1000)
    assert not (tmp_path / "hf-cache" / "models--acme--tiny-llama" / "snapshots").exists()


def test_a_job_merges_hub_repositories_online_then_offline(tmp_path, hub, monkeypatch):
    """Base and task (a LoRA adapter) named by hf:// URIs; the same job offline gives the same version."""
    from huggingface_hub import constants
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "published")
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "adapter")
    hub.repos["acme/tiny-llama-lora"] = Repo.of_folder(tmp_path / "adapter", commit=ADAPTER_COMMIT)
    settings = hub_settings(tmp_path)
    store = LineageStore(settings.store)
    result = run_job(spec_for("hf://acme/tiny-llama", "hf://acme/tiny-llama-lora@main"), store, settings=settings)
    assert result["manifest"]["tasks"][0]["checkpoint"] == "hf://acme/tiny-llama-lora@main"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run_job(spec_for("hf://acme/tiny-llama", "hf://acme/tiny-llama-lora@main", "offline"), store, settings=settings)
    for lineage in ("hub", "offline"):
        store.download_version("default", lineage, 1, tmp_path / lineage)
    assert (tmp_path / "hub/model.safetensors").read_bytes() == (tmp_path / "offline/model.safetensors").read_bytes()
    merged = load_file(tmp_path / "hub/model.safetensors")
    published = load_file(tmp_path / "published/model.safetensors")
    assert not (merged["model.layers.0.self_attn.q_proj.weight"] == published[
        "model.layers.0.self_attn.q_proj.weight"]).all()

    # Outside the allow-list: refused before anything is written.
    with pytest.raises(AccessDenied):
        run_job(spec_for("hf://acme/tiny-llama", "hf://acme/tiny-llama-lora", "refused"), store,
                settings=hub_settings(tmp_path, hf_orgs="someone-else"))
    assert store.get_lineage("default", "refused") is None
