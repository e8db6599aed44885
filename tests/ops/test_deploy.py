"""The Kubernetes manifests and the Dockerfile: validated by their tools (kubernetes-validate,
hadolint) and checked for what the deployment depends on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from billing_service.config import Settings, load_price_table
from tests.support.tools import REPO, tool

DEPLOY = REPO / "deploy"
# deploy/prometheus/ holds Prometheus's own files (rules and their tests), not Kubernetes objects:
# tests/ops/test_alert_rules.py checks them.
MANIFESTS = sorted(
    path for path in DEPLOY.rglob("*.yaml") if not path.is_relative_to(DEPLOY / "prometheus")
)
KUBERNETES_VERSION = "1.30.0"  # native sidecars and preStop sleep are beta and on by default


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in documents(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in all_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_there_are_manifests_for_both_shapes() -> None:
    names = {path.relative_to(DEPLOY).as_posix() for path in MANIFESTS}
    assert any(name.startswith("sidecar/") for name in names)
    assert any(name.startswith("central/") for name in names)


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    result = validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_manifest(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    text = (DEPLOY / "central" / "billing.pdb.yaml").read_text()
    broken.write_text(text.replace("maxUnavailable: 1", "maxUnavailable: 1\n  maxUnavalable: 2"))
    assert validate(broken).returncode != 0


def test_the_sidecar_is_a_native_sidecar_on_loopback_with_grpc_probes() -> None:
    deployment = find("Deployment", "chat-service")
    (billing,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert billing["restartPolicy"] == "Always"
    env = env_of(billing)
    assert env["BILLING_LISTEN_ADDRESS"].startswith("127.0.0.1:")
    health_port = int(env["BILLING_HEALTH_LISTEN_ADDRESS"].rpartition(":")[2])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert billing[probe]["grpc"]["port"] == health_port
    assert billing["readinessProbe"]["grpc"]["service"] == "billing.v1.BillingService"
    assert "service" not in billing["livenessProbe"]["grpc"]  # "": the process itself
    (chat,) = deployment["spec"]["template"]["spec"]["containers"]
    assert env_of(chat)["BILLING_ADDRESS"] == "localhost:50051"


def test_the_central_shape_is_authenticated_balanced_and_disruption_budgeted() -> None:
    deployment = find("Deployment", "billing")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    (billing,) = pod_containers(deployment)
    env = env_of(billing)
    assert env["BILLING_LISTEN_ADDRESS"].startswith("0.0.0.0:")
    tokens_file = Path(env["BILLING_AUTH_TOKENS_FILE"])
    mounts = {m["name"]: m["mountPath"] for m in billing["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (auth_volume,) = [name for name, path in mounts.items() if path == str(tokens_file.parent)]
    secret = find("Secret", volumes[auth_volume]["secret"]["secretName"])
    assert tokens_file.name in secret["stringData"]
    assert billing["readinessProbe"]["grpc"]["service"] == "billing.v1.BillingService"
    for service_name in ("billing", "billing-headless"):
        service = find("Service", service_name)
        assert service["spec"]["selector"].items() <= labels.items()
    budget = find("PodDisruptionBudget", "billing")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    grace = float(env["BILLING_SHUTDOWN_GRACE_S"])
    pre_stop = billing["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > (
        grace + pre_stop
    )


def test_the_migration_job_runs_billing_service_migrate() -> None:
    job = find("Job", "billing-migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    images = {c["image"] for doc in all_documents() for c in _billing_containers(doc)}
    assert len(images) == 1, "the Job and the servers run the same image"


def test_the_stripe_key_comes_from_a_secret_and_the_prices_from_a_configmap(
    tmp_path: Path,
) -> None:
    secret = find("Secret", "billing-secrets")
    assert "STRIPE_API_KEY" in secret["stringData"]
    prices = find("ConfigMap", "billing-prices")
    table = tmp_path / "prices.toml"
    table.write_text(prices["data"]["prices.toml"])
    assert load_price_table(table).models
    for name in ("chat-service", "billing"):
        (billing,) = [c for c in pod_containers(find("Deployment", name)) if _is_billing(c)]
        env = env_of(billing)
        assert env["STRIPE_API_KEY"]["secretKeyRef"]["name"] == "billing-secrets"
        mounts = {m["mountPath"]: m["name"] for m in billing["volumeMounts"]}
        price_path = Path(env["BILLING_PRICE_TABLE"])
        assert price_path.name == "prices.toml"
        assert str(price_path.parent) in mounts


def test_every_container_has_requests_limits_and_runs_unprivileged() -> None:
    for doc in all_documents():
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod_containers(doc):
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), container["name"]
            assert "memory" in resources["limits"], container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_manifests_set_only_real_settings() -> None:
    settings = {f"BILLING_{name.upper()}" for name in Settings.model_fields}
    for doc in all_documents():
        for container in _billing_containers(doc):
            for name in env_of(container):
                if name.startswith("BILLING_"):
                    assert name in settings, f"{doc['metadata']['name']}: {name}"


def test_the_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `BILLING_")]
    documented = set(re.findall(r"`(BILLING_[A-Z0-9_]+)`", "\n".join(rows)))
    assert {f"BILLING_{name.upper()}" for name in Settings.model_fields} <= documented


def _is_billing(container: dict[str, Any]) -> bool:
    return "ai-billing" in container["image"]


def _billing_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] not in ("Deployment", "Job"):
        return []
    return [c for c in pod_containers(doc) if _is_billing(c)]


# The Dockerfile


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), per stage."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    result: list[list[str]] = []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            result.append([])
        result[-1].append(line)
    return result


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_multi_stage_slim_non_root_and_serves() -> None:
    build, *_, final = stages()
    assert len(stages()) >= 2
    assert re.fullmatch(r"FROM python:3\.11-slim\S* AS build", build[0])
    assert re.fullmatch(r"FROM python:3\.11-slim\S*", final[0])
    (user,) = [line for line in final if line.startswith("USER ")]
    assert re.fullmatch(r"USER [1-9]\d*(:[1-9]\d*)?", user)  # numeric: runAsNonRoot can check it
    assert 'ENTRYPOINT ["billing-service"]' in final
    assert 'CMD ["serve"]' in final
    copies = [line for line in final if line.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=build /opt/billing /opt/billing"]
    assert not any(line.startswith("RUN") and "apt-get" in line for line in final)


@pytest.mark.parametrize("excluded", ["tests", "bench", ".venv", ".git", "deploy"])
def test_the_build_context_leaves_out_what_the_image_does_not_need(excluded: str) -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything is excluded, then the few inputs are let back in
    assert f"!{excluded}/" not in ignore
    build = stages()[0]
    sources = [line.split()[1] for line in build if line.startswith("COPY")]
    assert not any(source.startswith(excluded) for source in sources)
