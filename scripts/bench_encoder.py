"""Benchmark of the encoder export path on all-MiniLM-L6-v2, side by side in one run.

Exports four targets of the sample recipe into a scratch directory (fp32, plain per-tensor
dynamic int8, edgekit's block-wise dynamic int8, static int8), then measures, interleaving
the variants round by round so machine noise hits them all alike:
- batch-1 latency on a short and a medium sentence: PyTorch fp32 (transformers) vs each ONNX bundle;
- bundle size vs the fp32 bundle;
- cosine vs PyTorch fp32 on the recipe's validation sentences (mean and worst), from the manifests.

Prints a table and writes bench-results/encoder.json. Usage:
    python scripts/bench_encoder.py [--rounds 15] [--iters 40] [--out bench-results/encoder.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "all-minilm-l6-v2.yaml"
SHORT = "Great service."
MEDIUM = "The replacement charger arrived two days late, but support refunded the shipping cost without any fuss."

# name -> target definition appended to the sample recipe for this benchmark
VARIANTS = {
    "onnx-fp32": {"format": "onnx", "name": "fp32", "optimization_level": 2},
    "int8-per-tensor": {"format": "onnx", "name": "int8-per-tensor", "optimization_level": 2,
                        "quantization": {"mode": "dynamic", "block_size": None, "per_channel": True}},
}


def export_variants(scratch: Path) -> dict[str, Path]:
    from edgekit.export import export
    from edgekit.schema.recipe import load_recipe

    data = yaml.safe_load(RECIPE.read_text())
    data["targets"] = [*data["targets"], *VARIANTS.values()]
    data["validation"]["gates"] = {}  # measure everything; the recipe's gates are checked by `edgekit export`
    data["validation"]["samples_file"] = str(ROOT / "recipes" / data["validation"]["samples_file"])
    for target in data["targets"]:
        calibration = (target.get("quantization") or {}).get("calibration")
        if calibration and calibration.get("samples_file"):
            calibration["samples_file"] = str(ROOT / "recipes" / calibration["samples_file"])
    recipe_path = scratch / "bench-recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
    published = export(load_recipe(recipe_path), scratch / "bundles", progress=lambda m: print(f"  {m}", file=sys.stderr))
    return {manifest.name.removeprefix(data["name"] + "-"): where for manifest, where in published}


def time_rounds(runners: dict, rounds: int, iters: int) -> dict[str, list[float]]:
    """Interleave the variants: every round runs each one ``iters`` times; returns per-call seconds."""
    samples = {name: [] for name in runners}
    for run in runners.values():  # warm-up
        for _ in range(10):
            run()
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(iters):
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "encoder.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch
    from transformers import AutoModel

    from edgekit.bundle import verify_bundle
    from edgekit.export.sources import store_dir
    from edgekit.runtime.encoder import EncoderModel

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        print("exporting variants (this takes a few minutes)...", file=sys.stderr)
        bundles = export_variants(Path(tmp))
        manifests = {name: verify_bundle(path) for name, path in bundles.items()}
        encoders = {name: EncoderModel(path, manifests[name].runtime, threads=args.threads) for name, path in bundles.items()}
        reference = AutoModel.from_pretrained(store_dir("sentence-transformers/all-MiniLM-L6-v2"), dtype=torch.float32).eval()

        results = {}
        for label, text in (("short", SHORT), ("medium", MEDIUM)):
            any_encoder = next(iter(encoders.values()))
            feeds, _ = any_encoder.feeds([text])
            torch_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}

            def run_torch():
                with torch.inference_mode():
                    reference(**torch_feeds)

            runners = {"pytorch-fp32": run_torch}
            for name, encoder in encoders.items():
                encoder_feeds, _ = encoder.feeds([text])
                runners[name] = lambda session=encoder.session, f=encoder_feeds: session.run(None, f)
            samples = time_rounds(runners, args.rounds, args.iters)
            results[label] = {name: statistics.median(values) * 1000 for name, values in samples.items()}
            results[label + "_p90"] = {name: float(np.percentile(values, 90)) * 1000 for name, values in samples.items()}

    fp32_bytes = manifests["fp32"].total_bytes
    rows = []
    for name in ["pytorch-fp32", *manifests]:
        manifest = manifests.get(name)
        rows.append({
            "variant": name,
            "quantization": manifest.quantization if manifest else "fp32 (PyTorch)",
            "bytes": manifest.total_bytes if manifest else None,
            "size_vs_fp32": manifest.total_bytes / fp32_bytes if manifest else None,
            "cosine_mean": manifest.metrics["cosine_mean"] if manifest else 1.0,
            "cosine_min": manifest.metrics["cosine_min"] if manifest else 1.0,
            "short_ms": results["short"][name],
            "medium_ms": results["medium"][name],
            "speedup_vs_pytorch_short": results["short"]["pytorch-fp32"] / results["short"][name],
            "speedup_vs_ort_fp32_short": results["short"]["fp32"] / results["short"][name],
            "speedup_vs_pytorch_medium": results["medium"]["pytorch-fp32"] / results["medium"][name],
        })

    header = f"{'variant':18} {'quantization':26} {'MB':>6} {'size':>6} {'cos mean':>9} {'cos min':>8} {'short ms':>9} {'x torch':>8} {'x ortfp32':>9} {'medium ms':>10} {'x torch':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        mb = f"{r['bytes'] / 1e6:6.1f}" if r["bytes"] else "     -"
        size = f"{r['size_vs_fp32']:6.3f}" if r["size_vs_fp32"] else "     -"
        print(f"{r['variant']:18} {r['quantization']:26} {mb} {size} {r['cosine_mean']:9.5f} {r['cosine_min']:8.5f} "
              f"{r['short_ms']:9.2f} {r['speedup_vs_pytorch_short']:8.2f} {r['speedup_vs_ort_fp32_short']:9.2f} "
              f"{r['medium_ms']:10.2f} {r['speedup_vs_pytorch_medium']:8.2f}")
    report = {
        "command": "python scripts/bench_encoder.py " + " ".join(sys.argv[1:]),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version()},
        "sentences": {"short": SHORT, "medium": MEDIUM},
        "validation_sentences": int(manifests["fp32"].metrics["samples"]),
        "rounds": args.rounds, "iters_per_round": args.iters,
        "rows": rows,
        "p90_ms": {k: v for k, v in results.items() if k.endswith("_p90")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
