"""deploy/kubernetes: the base (one replica, SQLite on a volume) and the ha variant (two
replicas on PostgreSQL or Redis), built here as kustomize builds them (resources, generated
ConfigMap and Secret, labels, the ha patches), every object validated against the Kubernetes
schemas (kubernetes-validate, strict) and checked against what the daemon reads."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.scheduler.config import SETTING_NAMES, Settings, load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor still supported upstream when written


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#"))  # fmt: skip
    return {name: value for name, value in pairs}


def build(variant: str) -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes/<variant>` applies (the parts used here)."""
    here = K8S / variant
    kustomization = yaml.safe_load((here / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        if (here / resource).is_dir():
            objects = build(str(Path(variant, resource)))
        else:
            objects += list(yaml.safe_load_all((here / resource).read_text()))
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (here / f).read_text() for f in generator["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": generator["name"]}, "data": data})  # fmt: skip
    for generator in kustomization.get("secretGenerator", []):
        keys: dict[str, str] = {}
        for env in generator["envs"]:  # the committed example stands for the operator's file
            keys |= {k: v or "x" for k, v in _env_file(here / f"{env}.example").items()}
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": generator["name"]}, "stringData": keys}  # fmt: skip
        objects = [o for o in objects if not (o["kind"] == "Secret"
                                              and o["metadata"]["name"] == generator["name"])]  # fmt: skip
        objects.append(secret)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        body = yaml.safe_load(patch["patch"])
        for obj in objects:
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]:
                if isinstance(body, dict) and body.get("$patch") == "delete":
                    obj["$deleted"] = True
                else:
                    _json_patch(obj, body)
        objects = [o for o in objects if not o.get("$deleted")]
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = namespace
        for entry in kustomization.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeSelectors") and obj["kind"] in (
                "Deployment",
                "PodDisruptionBudget",
            ):
                obj["spec"]["selector"]["matchLabels"].update(entry["pairs"])
                if obj["kind"] == "Deployment":
                    obj["spec"]["template"]["metadata"]["labels"].update(entry["pairs"])
            if entry.get("includeSelectors") and obj["kind"] == "Service":
                obj["spec"]["selector"].update(entry["pairs"])
        if obj["kind"] == "Deployment":
            for image in kustomization.get("images", []):
                for container in obj["spec"]["template"]["spec"]["containers"]:
                    if container["image"] == image["name"]:
                        container["image"] = f"{image['newName']}:{image['newTag']}"
    return objects


def _json_patch(obj: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """RFC 6902 add, replace and remove (what the ha patches use)."""
    for operation in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in operation["path"].lstrip("/").split("/")]  # fmt: skip
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if operation["op"] == "remove":
            assert last in node, operation
            del node[last]
        elif isinstance(node, list):
            value = copy.deepcopy(operation["value"])
            if last == "-":
                node.append(value)
            elif operation["op"] == "add":
                node.insert(int(last), value)
            else:
                node[int(last)] = value
        else:
            assert operation["op"] == "add" or last in node, operation
            node[last] = copy.deepcopy(operation["value"])


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


VARIANTS = ["base", "ha"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_valid_against_the_kubernetes_schemas(variant: str) -> None:
    validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed"
    )
    objects = build(variant)
    kinds = sorted(o["kind"] for o in objects)
    expected = ["ConfigMap", "Deployment", "Namespace", "PodDisruptionBudget", "Secret",
                "Service", "ServiceMonitor"] + (["PersistentVolumeClaim"] if variant == "base" else [])  # fmt: skip
    assert kinds == sorted(expected)
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD of the Prometheus Operator: checked below
        validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_pod_is_locked_down_probed_and_bounded(variant: str) -> None:
    objects = build(variant)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user[1]) == 10001
    assert pod["securityContext"]["runAsGroup"] == int(user[2])
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    # probes on /healthz at the port the daemon listens on
    env = {e["name"]: e for e in container["env"]}
    bind = env["SCHEDULER_ADMIN_BIND"]["value"]
    (port,) = container["ports"]
    assert int(bind.rpartition(":")[2]) == port["containerPort"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    grace = Settings.model_fields["shutdown_grace_seconds"].default
    assert pod["terminationGracePeriodSeconds"] > grace


@pytest.mark.parametrize("variant", VARIANTS)
def test_it_agrees_with_the_settings_and_the_job_table_loads(variant: str, tmp_path: Path) -> None:
    objects = build(variant)
    container = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in container["env"]]
    assert set(names) <= set(SETTING_NAMES), set(names) - set(SETTING_NAMES)
    secret = only(objects, "Secret")["stringData"]
    env: dict[str, str] = {}
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == only(objects, "Secret")["metadata"]["name"]
            assert ref["key"] in secret, f"{ref['key']} is not in the Secret"
            env[entry["name"]] = "t0k3n"
        else:
            env[entry["name"]] = entry["value"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    jobs = only(objects, "ConfigMap")["data"]
    assert env["SCHEDULER_JOBS_FILE"] == f"{mounts['jobs']}/{next(iter(jobs))}"
    if variant == "base":
        assert env["SCHEDULER_STATE_URL"] == f"sqlite:///{mounts['state']}/state.db"
        claim = only(objects, "PersistentVolumeClaim")["metadata"]["name"]
        volumes = {
            v["name"]: v for v in only(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
        }
        assert volumes["state"]["persistentVolumeClaim"]["claimName"] == claim
        assert only(objects, "Deployment")["spec"]["replicas"] == 1
        assert only(objects, "Deployment")["spec"]["strategy"]["type"] == "Recreate"
    else:
        assert "SCHEDULER_STATE_URL" in secret, "the shared store's URL is a secret"
        assert only(objects, "Deployment")["spec"]["replicas"] == 2
        assert only(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    path = tmp_path / "jobs.toml"
    path.write_text(next(iter(jobs.values())))
    tomllib.loads(path.read_text())
    config = load_config({**{k: v for k, v in env.items() if k != "SCHEDULER_STATE_URL"},
                          "SCHEDULER_JOBS_FILE": str(path)})  # fmt: skip
    assert config.jobs


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_service_and_the_service_monitor_find_the_pods(variant: str) -> None:
    objects = build(variant)
    deployment = only(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = only(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = only(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = only(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # the scrape job is named after this label's value: what the alert rules select
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "cronclock"
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    assert 'job="cronclock"' in alerts


def test_no_secret_is_committed() -> None:
    for example in K8S.glob("*/secrets.env.example"):
        assert all(not value for value in _env_file(example).values()), example
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "secrets.env" in ignored
