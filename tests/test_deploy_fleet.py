"""What a fleet operator deploys: the systemd template unit for several instances on one
host, and the Kubernetes manifests, checked offline against the Kubernetes API's schemas
(kubernetes-validate ships them) and against the daemon's own config validation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import yaml
from kubernetes_validate import ValidationError
from kubernetes_validate import validate as validate_kubernetes

from iotflow.config.load import load_settings

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "systemd" / "iotflow@.service"
SINGLE = ROOT / "systemd" / "iotflow.service"
KUBERNETES = ROOT / "deploy" / "kubernetes"
IOTFLOW_BIN = Path(sys.executable).parent / "iotflow"
# The oldest Kubernetes the manifests are for (StatefulSet PVC retention is GA in 1.27).
KUBERNETES_VERSION = "1.30.0"
MAX_EXPOSURE = 2.0


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


# -- systemd: several instances on one host ------------------------------------------------


@pytest.fixture
def instance_unit(tmp_path: Path) -> Path:
    """An instance of the template (`iotflow@a.service`), its commands pointed at this venv."""
    text = TEMPLATE.read_text().replace("/opt/iotflow/bin/iotflow", str(IOTFLOW_BIN))
    (tmp_path / "iotflow@.service").write_text(text)
    path = tmp_path / "iotflow@a.service"
    path.write_text(text)
    return path


def test_the_template_differs_from_the_unit_only_by_the_instance() -> None:
    template, single = directives(TEMPLATE.read_text()), directives(SINGLE.read_text())
    config = "-c /etc/iotflow/%i.toml"
    assert template["Service.ExecStart"] == [f"/opt/iotflow/bin/iotflow run {config}"]
    assert template["Service.ExecStartPre"] == [f"/opt/iotflow/bin/iotflow check {config}"]
    assert template["Service.ExecReload"][0] == f"/opt/iotflow/bin/iotflow check {config}"
    assert template["Service.StateDirectory"] == ["iotflow/%i"]
    assert template["Service.WorkingDirectory"] == ["/var/lib/iotflow/%i"]
    assert template["Service.EnvironmentFile"] == [
        "-/etc/iotflow/iotflow.env",
        "-/etc/iotflow/%i.env",
    ]
    per_instance = {
        "Unit.Description",
        "Service.ExecStart",
        "Service.ExecStartPre",
        "Service.ExecReload",
        "Service.Environment",
        "Service.EnvironmentFile",
        "Service.StateDirectory",
        "Service.WorkingDirectory",
    }
    assert set(template) == set(single)
    for key in set(single) - per_instance:
        assert template[key] == single[key], key  # the same sandbox, limits and timeouts


def test_an_instance_of_the_template_passes_systemd_analyze_verify(instance_unit: Path) -> None:
    analyze = tool("systemd-analyze")
    result = run([analyze, "verify", str(instance_unit)])
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "iotflow" in line] == []


def test_an_instance_is_rated_as_well_as_the_unit(instance_unit: Path) -> None:
    analyze = tool("systemd-analyze")
    result = run([analyze, "security", "--offline=true", "--no-pager", str(instance_unit)])
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert result.returncode == 0, result.stderr
    line = next(
        ln for ln in result.stdout.splitlines() if "Overall exposure level for iotflow@a" in ln
    )
    exposure = float(line.split(":")[1].split()[0])
    assert exposure <= MAX_EXPOSURE, result.stdout


# -- Kubernetes ----------------------------------------------------------------------------


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path.name, document


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in manifests() if d["kind"] == kind]


def test_every_manifest_is_valid_for_kubernetes() -> None:
    kinds = []
    for _file, document in manifests():
        kinds.append(document["kind"])
        if document["kind"] == "ServiceMonitor":
            continue  # a CRD: see the next test
        # Strict: an unknown or misspelt field is an error, not silently dropped.
        validate_kubernetes(document, KUBERNETES_VERSION, strict=True)
    assert sorted(kinds) == [
        "ConfigMap",
        "Secret",
        "Service",
        "Service",
        "ServiceMonitor",
        "StatefulSet",
    ]


def test_the_validator_refuses_a_misspelt_field() -> None:
    (statefulset,) = by_kind("StatefulSet")
    spoiled = json.loads(json.dumps(statefulset))
    spoiled["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(ValidationError):
        validate_kubernetes(spoiled, KUBERNETES_VERSION, strict=True)


def kubernetes_type(name: str) -> jsonschema.protocols.Validator:
    """A validator of one API type (`labelselector-meta-v1`) from kubernetes-validate's
    schemas, its references resolved within them (as kubernetes-validate itself does)."""
    folder = resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict"
    )
    schema = json.loads(folder.joinpath(f"{name}.json").read_text())
    definitions = json.loads(folder.joinpath("_definitions.json").read_text())
    registry: referencing.Registry[Any] = referencing.Registry().with_resources(
        [
            (
                "https://kubernetes.io/api/_definitions.json",
                referencing.Resource.from_contents(definitions),
            ),
        ]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_the_service_monitor_selects_the_api_service_and_its_port() -> None:
    """ServiceMonitor is a custom resource of the Prometheus Operator: its CRD schema ships
    with the operator, not with any validator on PyPI. Its Kubernetes parts are checked
    against the Kubernetes schemas, and what it refers to against our own manifests."""
    (monitor,) = by_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    kubernetes_type("objectmeta-meta-v1").validate(monitor["metadata"])
    kubernetes_type("labelselector-meta-v1").validate(monitor["spec"]["selector"])
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    selected = [
        s
        for s in by_kind("Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["iotflow"], "each pod scraped once"
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval"}
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"


def test_the_statefulset_runs_a_fleet() -> None:
    (statefulset,) = by_kind("StatefulSet")
    spec = statefulset["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # A volume per pod for its spool, where the config puts it.
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/iotflow"
    # The headless Service names the pods; the other one selects them all.
    peers = next(s for s in by_kind("Service") if s["metadata"]["name"] == spec["serviceName"])
    assert peers["spec"]["clusterIP"] == "None"
    labels = spec["template"]["metadata"]["labels"]
    for service in by_kind("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in {p["name"] for p in container["ports"]}
    # Stopping waits for the drain, as the systemd unit does.
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    env = {e["name"] for e in container["env"]}
    assert {"POD_NAME", "POD_NAMESPACE"} <= env
    (secret,) = by_kind("Secret")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]


def test_the_config_map_is_a_valid_fleet_config(tmp_path: Path) -> None:
    (config_map,) = by_kind("ConfigMap")
    (secret,) = by_kind("Secret")
    path = tmp_path / "iotflow.toml"
    path.write_text(config_map["data"]["iotflow.toml"])
    env = {"POD_NAME": "iotflow-2", "POD_NAMESPACE": "lora", **secret["stringData"]}
    config = load_settings(path, env=env).config
    assert config.mqtt.client_id == "iotflow-2"  # one per pod, stable across its restarts
    assert config.mqtt.shared_group
    assert config.registry.url.startswith("postgresql://")
    assert config.spool.path.startswith("/var/lib/iotflow/")
    assert config.api.url == "http://iotflow-2.iotflow-peers.lora.svc:8080"
    assert config.api.port == 8080
