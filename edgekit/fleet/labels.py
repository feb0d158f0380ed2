"""Kubernetes node labels for a board: its device id (what a DaemonSet per board class selects on) and its CPU features.

``edgekit.dev/device`` is the catalog id (or the id of a profile written by ``edgekit profile-host``);
``kubernetes.io/arch`` already names the architecture in Kubernetes' own words, so the labels here add only
what Kubernetes does not know: the core type and one ``edgekit.dev/isa-<flag>`` label per instruction-set
feature the inference kernels use (so a workload built for dot-product cores can require them).
"""

from __future__ import annotations

import re

from edgekit.errors import ConfigError
from edgekit.schema.device import ARM_FLAGS, X86_FLAGS, Device

PREFIX = "edgekit.dev"
DEVICE_LABEL = f"{PREFIX}/device"
CORE_LABEL = f"{PREFIX}/core-type"
ISA_PREFIX = f"{PREFIX}/isa-"
# Kubernetes label values: at most 63 characters, alphanumerics with - _ . inside
# (https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set)
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def isa_label(flag: str) -> str:
    return ISA_PREFIX + flag.replace("_", "-")


def node_labels(device: Device) -> dict[str, str | None]:
    """Labels to set on the board's node; ``None``: a label to remove (a feature this board lacks)."""
    labels: dict[str, str | None] = {DEVICE_LABEL: device.id, CORE_LABEL: device.cpu.core_type}
    for flag in (*ARM_FLAGS, *X86_FLAGS):
        labels[isa_label(flag)] = "true" if getattr(device.cpu.isa, flag) else None
    for key, value in labels.items():
        if value is not None and not LABEL_VALUE.match(value):
            raise ConfigError(f"{value!r} is not a valid Kubernetes label value for {key}",
                              hint="label values are at most 63 characters: letters, digits, '-', '_' and '.'")
    return labels


def kubectl_arguments(node: str, labels: dict[str, str | None]) -> list[str]:
    """``kubectl label`` arguments that set the present labels and remove the absent ones."""
    return ["label", "node", node, "--overwrite",
            *(f"{k}={v}" if v is not None else f"{k}-" for k, v in labels.items())]
