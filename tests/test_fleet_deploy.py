"""The Kubernetes manifests under deploy/ validated offline against the Kubernetes API schemas (kubernetes-validate),
the ServiceMonitor against the fields of prometheus-operator's CRD, the overlays built with `kubectl kustomize` when
kubectl is installed; `edgekit fleet manifests` and `edgekit node-labels`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import REPO, run_cli
from serve_fixtures import publish_gguf

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUSTOMIZE = REPO / "deploy" / "kustomize"
KUSTOMIZATION_KINDS = ("Kustomization", "Component")
RESOURCE_FILES = sorted(p for p in KUSTOMIZE.rglob("*.yaml") if p.name != "kustomization.yaml")
OVERLAYS = sorted(p for p in (KUSTOMIZE / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
MIB = 2**20

# The ServiceMonitor fields these manifests use, as prometheus-operator's CRD declares them
# (example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml, monitoring.coreos.com/v1): kubernetes-validate
# knows only the built-in kinds. Unknown fields fail here, as the API server's structural schema prunes them.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SECRET_KEY = {"type": "object", "required": ["key"], "additionalProperties": False,
              "properties": {"key": {"type": "string"}, "name": {"type": "string"}, "optional": {"type": "boolean"}}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "matchExpressions": {"type": "array"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": {"type": "string", "pattern": DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        "authorization": {"type": "object", "additionalProperties": False,
                                          "properties": {"type": {"type": "string", "not": {"pattern": "(?i)^basic$"}},
                                                         "credentials": SECRET_KEY}},
                    }}},
            },
        },
    },
}


def validate(document: dict) -> None:
    if document["kind"] == "ServiceMonitor":
        jsonschema.validate(document, SERVICE_MONITOR_SCHEMA)
        # its metadata is a plain ObjectMeta: let the Kubernetes schema judge it on a kind it knows
        document = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document["metadata"]}
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("path", RESOURCE_FILES, ids=lambda p: str(p.relative_to(KUSTOMIZE)))
def test_resources_validate_against_kubernetes_schemas(path):
    for document in yaml.safe_load_all(path.read_text()):
        validate(document)


def test_the_service_monitor_schema_refuses_what_prometheus_operator_would_not_take():
    monitor = yaml.safe_load((KUSTOMIZE / "components/servicemonitor/servicemonitor.yaml").read_text())
    for broken in ({"port": 8080}, {"interval": "30 seconds"}, {"authorization": {"type": "Basic"}}, {"bearerToken": "x"}):
        endpoint = {**monitor["spec"]["endpoints"][0], **broken}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**monitor, "spec": {**monitor["spec"], "endpoints": [endpoint]}}, SERVICE_MONITOR_SCHEMA)


def _pointer(document: dict, path: str):
    node = document
    for part in path.strip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _documents(kustomization: Path, spec: dict) -> dict:
    found = {}
    for resource in [*spec.get("resources", []), *spec.get("components", [])]:
        folder = kustomization.parent / resource
        for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else [folder]:
            for document in yaml.safe_load_all(path.read_text()):
                if document.get("kind") not in KUSTOMIZATION_KINDS:
                    found[(document["kind"], document["metadata"]["name"])] = document
    return found


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZE.rglob("kustomization.yaml")), ids=lambda p: str(p.parent.relative_to(KUSTOMIZE)))
def test_kustomizations_name_existing_files_and_patch_existing_fields(kustomization):
    spec = yaml.safe_load(kustomization.read_text())
    assert spec["kind"] in KUSTOMIZATION_KINDS
    for resource in [*spec.get("resources", []), *spec.get("components", [])]:
        target = kustomization.parent / resource
        assert (target / "kustomization.yaml").is_file() if target.is_dir() else target.is_file(), resource
    documents = _documents(kustomization, spec)
    for patch in spec.get("patches", []):
        target = documents[(patch["target"]["kind"], patch["target"]["name"])]
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] in ("replace", "add")
            # replace: the field exists (kustomize fails otherwise); add: the parent exists
            _pointer(target, op["path"] if op["op"] == "replace" else op["path"].rsplit("/", 1)[0])


def test_daemonset_runs_the_fleet_update_and_serves_health():
    daemonset = yaml.safe_load((KUSTOMIZE / "base" / "daemonset.yaml").read_text())
    pod = daemonset["spec"]["template"]["spec"]
    assert "edgekit update" in " ".join(pod["initContainers"][0]["args"])
    serve = pod["containers"][0]
    assert serve["args"][0] == "serve"
    assert {p: serve[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == dict.fromkeys(
        ("startupProbe", "readinessProbe", "livenessProbe"), "/health")
    assert set(pod["nodeSelector"]) == {"edgekit.dev/device"}
    service = yaml.safe_load((KUSTOMIZE / "base" / "service.yaml").read_text())
    monitor = yaml.safe_load((KUSTOMIZE / "components/servicemonitor/servicemonitor.yaml").read_text())
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] in ports and ports["metrics"]["targetPort"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlays_build_with_kustomize_and_validate(overlay):
    built = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout
    documents = {d["kind"]: d for d in yaml.safe_load_all(built)}
    assert sorted(documents) == ["ConfigMap", "DaemonSet", "Service", "ServiceMonitor"]
    for document in documents.values():
        validate(document)
    device = documents["ConfigMap"]["data"]["device"]
    assert overlay.name == device
    pod = documents["DaemonSet"]["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"edgekit.dev/device": device}
    assert documents["Service"]["spec"]["selector"]["edgekit.dev/device"] == device == pod["metadata"]["labels"]["edgekit.dev/device"]
    assert documents["ServiceMonitor"]["spec"]["selector"]["matchLabels"]["edgekit.dev/device"] == device
    serve = pod["spec"]["containers"][0]
    budget = next(int(a.split("=")[1]) for a in serve["args"] if a.startswith("--memory-budget-mb="))
    memory = serve["resources"]["limits"]["memory"]
    assert memory == serve["resources"]["requests"]["memory"] and int(memory.removesuffix("Mi")) > budget


def edgekit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in this process (helpers.run_cli); the footprint test runs `fleet manifests` in a subprocess."""
    return run_cli(*args, env=env)


def edgekit_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "COLUMNS": "400", **(env or {})})


def test_fleet_manifests_sizes_memory_from_the_daemons_footprint(tmp_path, fake_gguf):
    from edgekit.runtime.verify import read_manifest_capped
    from edgekit.schema.device import load_device
    from edgekit.serve.budget import footprint_bytes
    from edgekit.serve.settings import ServeSettings
    from edgekit.serve.systemd import DAEMON_RESERVE

    bundles = [publish_gguf(fake_gguf, tmp_path / "src", name) for name in ("fake-a", "fake-b")]
    out = tmp_path / "overlays" / "rpi-4-4gb"
    specs = [arg for b in bundles for arg in ("--bundle", f"registry.lan:5000/models/{b.name}:1={b}")]
    done = edgekit_process("fleet", "manifests", "--device", "rpi-4-4gb", *specs, "--out", str(out), "--n-ctx", "64",
                   "--base", os.path.relpath(KUSTOMIZE / "base", out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    settings = ServeSettings(n_ctx=64)
    footprints = [footprint_bytes(read_manifest_capped(b), settings) for b in bundles]
    budget_mib = -(-(sum(footprints) + max(footprints)) // MIB)  # the models, and the largest again for a switch
    assert report["footprints"] == {"fake-a": footprints[0], "fake-b": footprints[1]}
    assert (report["budget_mib"], report["memory_mib"], report["cpu"]) == (budget_mib, budget_mib + DAEMON_RESERVE // MIB,
                                                                           load_device("rpi-4-4gb").cpu.cores)
    configmap = yaml.safe_load((out / "configmap.yaml").read_text())
    assert configmap["data"]["bundle-refs"].split() == [f"registry.lan:5000/models/{n}:1" for n in ("fake-a", "fake-b")]
    if shutil.which("kubectl"):
        test_overlays_build_with_kustomize_and_validate(out)


def test_fleet_manifests_refuses_a_bundle_that_does_not_fit(tmp_path, fake_gguf):
    bundle = publish_gguf(fake_gguf, tmp_path / "src", "fake-a")
    board = yaml.safe_load((REPO / "devices" / "rpi-zero-2w.yaml").read_text())
    board["id"] = "tiny-board"
    board["memory"].update(total_mib=256, os_reserved_mib=170)  # 86 MiB usable: the daemon alone takes most of it
    (tmp_path / "tiny-board.yaml").write_text(yaml.safe_dump(board))
    out = tmp_path / "overlay"
    done = edgekit("fleet", "manifests", "--device", str(tmp_path / "tiny-board.yaml"), "--bundle", f"r.lan/m:1={bundle}",
                   "--out", str(out))
    assert done.returncode == 1, done.stderr
    assert "tiny-board offers" in " ".join(done.stderr.split()) and not out.exists()


def test_node_labels_print_and_apply(tmp_path):
    done = edgekit("node-labels", "--device", "rpi-5-8gb")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["edgekit.dev/device=rpi-5-8gb", "edgekit.dev/core-type=cortex-a76", "edgekit.dev/isa-neon=true",
                                   "edgekit.dev/isa-dotprod=true", "edgekit.dev/isa-fp16=true"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "kubectl-args"
    (fake_bin / "kubectl").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\necho "node/board-1 labeled"\n')
    (fake_bin / "kubectl").chmod(0o755)
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    applied = edgekit("node-labels", "--device", "intel-n100-16gb", "--node", "board-1", "--apply", "--json", env=env)
    assert applied.returncode == 0, applied.stderr
    args = record.read_text().split()
    assert args[:4] == ["label", "node", "board-1", "--overwrite"]
    assert "edgekit.dev/device=intel-n100-16gb" in args and "edgekit.dev/isa-avx2=true" in args
    assert "edgekit.dev/isa-dotprod-" in args  # a feature this board lacks: the label is removed
    assert json.loads(applied.stdout)["labels"]["edgekit.dev/device"] == "intel-n100-16gb"
    assert edgekit("node-labels", "--device", "rpi-5-8gb", "--apply").returncode == 2
