"""Where the GGUF golden-check bounds come from: how far a bundle's record moves under other kernels and other weights.

For each GGUF bundle (with a golden record) this measures, per recorded prompt, teacher-forced top-1 agreement
and the binned KL divergence edgekit.runtime.golden computes:

- same:   the bundle's own runtime again (decode kernels, as recorded): the floor, only the record's rounding;
- batch:  the prompt and the recorded tokens evaluated in one batch with llama.cpp's batched matrix kernels
          instead of one token at a time: a different kernel path on the same weights and CPU, the closest
          x86 stand-in for an Arm board's kernels;
- cross:  the record of one bundle against another bundle's weights (e.g. Q8_0's record on Q4_K_M): a
          different computation the check is meant to notice.

Usage: python scripts/golden_bounds.py BUNDLE BUNDLE... [--out bench-results/golden-bounds.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from edgekit.bundle import read_manifest
from edgekit.runtime.golden import binned_kld, check_golden, load_model, log_softmax


def batch_path(bundle: Path, manifest) -> list[dict]:
    from llama_cpp import Llama

    rows = []
    llm = Llama(str(bundle / manifest.file(".gguf").path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, verbose=False)
    try:
        for index, prompt in enumerate(manifest.golden.prompts, 1):
            tokens = prompt.prompt_ids + prompt.ids
            llm.reset()
            llm.eval(tokens)
            steps = [log_softmax(row) for row in np.array(llm.scores[len(prompt.prompt_ids) - 1: len(tokens) - 1])]
            rows.append({"prompt": index, "top1_agreement": float(np.mean([int(s.argmax()) == i for s, i in zip(steps, prompt.ids)])),
                         "kld": float(np.mean([binned_kld(t, s) for t, s in zip(prompt.top_logprobs, steps)]))})
    finally:
        llm.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results/golden-bounds.json"))
    args = parser.parse_args()
    manifests = {b: read_manifest(b) for b in args.bundles}
    results = []
    for bundle, manifest in manifests.items():
        model = load_model(bundle, manifest)
        try:
            for record_of, record in manifests.items():
                kind = "same" if record_of == bundle else "cross"
                report = check_golden(record, model)
                for index, check in enumerate(report.checks, 1):
                    results.append({"model": manifest.name, "record": record.name, "kind": kind, "prompt": index,
                                    "ids_equal": check.ids_equal, "top1_agreement": check.top1_agreement, "kld": check.kld})
        finally:
            model.llm.close()
        for row in batch_path(bundle, manifest):
            results.append({"model": manifest.name, "record": manifest.name, "kind": "batch", "ids_equal": None, **row})
    print(f"{'kind':6} {'model':34} {'record':34} {'prompt':>6} {'ids':>5} {'top-1':>7} {'KLD':>10}")
    for r in results:
        ids = "" if r["ids_equal"] is None else ("same" if r["ids_equal"] else "diff")
        print(f"{r['kind']:6} {r['model']:34} {r['record']:34} {r['prompt']:>6} {ids:>5} {r['top1_agreement']:>7.4f} {r['kld']:>10.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.machine(), "processor": platform.processor(), "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
