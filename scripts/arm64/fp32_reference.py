"""The PyTorch fp32 embeddings an ONNX int8 bundle was gated against, for the texts the arm64 lane sends.

Workstation side (torch, transformers): runs on the host only. Block-int8 kernels differ by
instruction set (onnxruntime computes MatMulNBits with int8 dot products where the core has them),
so an Arm core's embeddings are judged the way export judged x86's: cosine with the original model,
against the bundle's own gates (min_cosine_each, min_cosine_mean). Prints one JSON object.

    python fp32_reference.py BUNDLE TEXT...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from edgekit.export.reference import load_reference, reference_outputs
    from edgekit.export.sources import store_dir
    from edgekit.runtime.encoder import EncoderModel, pool
    from edgekit.runtime.verify import model_file, verify_for_runtime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args()

    manifest = verify_for_runtime(args.bundle)
    candidate = EncoderModel(args.bundle, manifest.runtime, model_path=model_file(args.bundle, manifest))
    model = load_reference(store_dir(manifest.source_id), manifest.task)
    (hidden,) = reference_outputs(model, candidate, args.texts)
    _, mask = candidate.feeds(args.texts)
    embeddings = pool(hidden, mask, manifest.runtime.pooling, manifest.runtime.normalize)
    gates = {g.gate: g.threshold for g in manifest.gates if g.gate in ("min_cosine_each", "min_cosine_mean")}
    print(json.dumps({"bundle": manifest.name, "source": manifest.source_id, "gates": gates,
                      "embeddings": embeddings.astype(float).tolist()}))


if __name__ == "__main__":
    main()
