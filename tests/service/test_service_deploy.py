"""docker-compose.yml, the Dockerfiles and the Kubernetes manifests, checked statically (no Docker engine here);
the processes they describe are the ones the end-to-end tests start natively."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_ENV = {f"MERGELINE_{name.upper()}" for name in Settings.model_fields}
API_COMMAND = ["uvicorn", "--factory", "mergeline.compose:api_app"]


def env_names(env: dict | list) -> set[str]:
    return set(env) if isinstance(env, dict) else {e["name"] for e in env}


def check_env(names: set[str]) -> None:
    unknown = {n for n in names if n.startswith("MERGELINE_")} - SETTINGS_ENV
    assert not unknown, f"not settings: {unknown}"


def check_entry_points(command: list[str]) -> None:
    """The command names a real factory or `mergeline` subcommand."""
    if command[:2] == ["uvicorn", "--factory"]:
        module, _, attr = command[2].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    elif command[0] == "mergeline":
        from mergeline.cli import app

        assert command[1] in get_command(app).commands, command
    else:
        pytest.fail(f"unexpected command {command}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_publishes_only_the_api_and_has_no_default_secrets(compose):
    """Redis and MinIO stay inside the compose network; every password and key must come from the environment."""
    services = compose["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"api"}
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MERGELINE_API_TOKENS"):
        uses = re.findall(r"\$\{" + secret + r"(:?[-?][^}]*)?\}", text)
        assert uses and all(use.startswith(":?") for use in uses), (secret, uses)


def test_images_compose_builds_are_the_ones_deploy_runs(compose):
    import core

    built = {service["image"] for service in compose["services"].values() if "build" in service}
    assert built == {f"mergeline-api:{core.__version__}", f"mergeline-worker:{core.__version__}"}
    ran = {c["image"] for doc in manifests() if doc["kind"] == "Deployment"
           for c in doc["spec"]["template"]["spec"]["containers"]}
    assert ran == built


def test_compose_services(compose):
    services = compose["services"]
    assert {"api", "worker", "redis", "minio", "minio-init"} <= set(services)
    api, worker = services["api"], services["worker"]
    assert api["command"][:3] == API_COMMAND and "8000:8000" in api["ports"] and "--proxy-headers" in api["command"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert worker["command"] == ["mergeline", "worker"] and worker["build"]["dockerfile"] == "docker/Dockerfile.worker"
    for command in (api["command"], worker["command"]):
        check_entry_points(command)
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        check_env(env_names(env))
        assert env["MERGELINE_BROKER_URL"] == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0"
        assert env["MERGELINE_STORE"].startswith("s3://mergeline/")
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    redis = services["redis"]
    assert redis["image"].startswith("redis:") and "--appendonly yes" in redis["command"][-1]
    assert '--requirepass "$$REDIS_PASSWORD"' in redis["command"][-1]
    assert services["minio"]["image"].startswith("minio/minio") and services["minio"]["command"][0] == "server"
    init = services["minio-init"]
    assert init["image"].startswith("minio/mc") and "mc mb --ignore-existing local/mergeline" in init["command"][0]


@pytest.mark.parametrize(("name", "extras"), [("Dockerfile.api", "service"), ("Dockerfile.worker", "engine")])
def test_dockerfiles(name, extras):
    text = (ROOT / "docker" / name).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    assert re.search(rf'pip install "\.\[[a-z,]*{extras}[a-z,]*\]"', text)
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / source).exists(), source
    assert "USER 10001" in text
    cmd = next(line for line in lines if line.startswith("CMD ["))
    check_entry_points(yaml.safe_load(cmd[3:].strip()))
    if name == "Dockerfile.worker":
        assert "requirements/torch.txt" in text, "torch is pinned and installed first"


def manifests() -> list[dict]:
    docs = []
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests():
    docs = manifests()
    by_kind = {}
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc)
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    config = by_kind["ConfigMap"]["mergeline-config"]["data"]
    check_env(set(config))
    assert "MERGELINE_BROKER_URL" not in config, "it carries the Redis password: it belongs in the Secret"
    assert config["MERGELINE_STORE"].startswith("s3://") and config["AWS_ENDPOINT_URL"].startswith("http")

    def container(name: str) -> dict:
        deployment = by_kind["Deployment"][name]
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        (c,) = spec["template"]["spec"]["containers"]
        refs = [next(iter(e.values()))["name"] for e in c["envFrom"]]
        assert refs == ["mergeline-config", "mergeline-secrets"], "config from the ConfigMap and the Secret"
        check_entry_points(c["command"])
        check_env(env_names(c.get("env", [])))
        return c

    api = container("mergeline-api")
    assert api["command"][:3] == API_COMMAND and api["ports"][0]["containerPort"] == 8000
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = by_kind["Service"]["mergeline-api"]
    assert service["spec"]["selector"] == by_kind["Deployment"]["mergeline-api"]["spec"]["selector"]["matchLabels"]
    worker = container("mergeline-worker")
    assert worker["command"] == ["mergeline", "worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    redis = by_kind["StatefulSet"]["mergeline-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly yes" in redis["command"][-1] and "--requirepass" in redis["command"][-1]
    assert "mergeline-redis" in by_kind["Service"]
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in redis["env"]}
    assert {e["name"] for e in redis["env"]} == {"REDIS_PASSWORD", "REDISCLI_AUTH"} and secret_refs == {
        "mergeline-secrets"}


def test_e2e_starts_the_processes_the_deployments_describe():
    """The end-to-end tests run the same API factory and worker command as the images."""
    conftest = (Path(__file__).parent / "svc_procs.py").read_text()
    assert '"--factory", "mergeline.compose:api_app"' in conftest
    assert 'mergeline_cmd("worker"' in conftest
