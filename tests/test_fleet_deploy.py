"""The Kubernetes manifests under deploy/ validated offline against the Kubernetes API schemas (kubernetes-validate)."""

from __future__ import annotations

import pytest
import yaml
from helpers import REPO

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUSTOMIZE = REPO / "deploy" / "kustomize"
RESOURCE_FILES = sorted(p for p in KUSTOMIZE.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", RESOURCE_FILES, ids=lambda p: str(p.relative_to(KUSTOMIZE)))
def test_resources_validate_against_kubernetes_schemas(path):
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def _pointer(document: dict, path: str):
    node = document
    for part in path.strip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize("kustomization", sorted(KUSTOMIZE.rglob("kustomization.yaml")), ids=lambda p: str(p.parent.relative_to(KUSTOMIZE)))
def test_kustomizations_name_existing_files_and_patch_existing_fields(kustomization):
    spec = yaml.safe_load(kustomization.read_text())
    assert spec["kind"] == "Kustomization"
    for resource in spec["resources"]:
        target = kustomization.parent / resource
        assert (target / "kustomization.yaml").is_file() if target.is_dir() else target.is_file(), resource
    base = {}
    for resource in spec["resources"]:
        folder = kustomization.parent / resource
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else [folder]:
            for document in yaml.safe_load_all(path.read_text()):
                if document.get("kind") != "Kustomization":
                    base[(document["kind"], document["metadata"]["name"])] = document
    for patch in spec.get("patches", []):
        target = base[(patch["target"]["kind"], patch["target"]["name"])]
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "replace"
            _pointer(target, op["path"])  # a replace of a field that does not exist fails in kustomize too


def test_daemonset_runs_the_fleet_update_and_serves_health():
    daemonset = yaml.safe_load((KUSTOMIZE / "base" / "daemonset.yaml").read_text())
    pod = daemonset["spec"]["template"]["spec"]
    assert "edgekit update" in " ".join(pod["initContainers"][0]["args"])
    serve = pod["containers"][0]
    assert serve["args"][0] == "serve" and serve["readinessProbe"]["httpGet"]["path"] == "/health"
    assert set(pod["nodeSelector"]) == {"edgekit.dev/device"}
