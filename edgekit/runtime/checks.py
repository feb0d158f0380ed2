"""Format checks done before a backend sees a file: a backend parser is the attack surface."""

from __future__ import annotations

import os
from pathlib import Path

from edgekit.errors import BundleError


def _onnx_tensors(graph):
    """Every initializer of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g is not None and attribute.g.ByteSize():
                yield from _onnx_tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _onnx_tensors(sub)


def check_onnx_external_data(model_path: Path, bundle_dir: Path) -> None:
    """Refuse an ONNX file whose external-data locations leave the bundle (onnx CVE-2022-25882, CVE-2024-27318)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as exc:
        raise BundleError(f"{model_path}: not a readable ONNX file: {exc}") from exc
    for tensor in _onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
        if not location:
            raise BundleError(f"{model_path}: tensor {tensor.name!r} has external data without a location")
        target = (model_path.parent / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or not target.is_relative_to(bundle_dir.resolve()):
            raise BundleError(f"{model_path}: tensor {tensor.name!r} external data {location!r} is outside the bundle")
