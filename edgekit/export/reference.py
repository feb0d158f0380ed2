"""The original model as the yardstick: PyTorch fp32 outputs and the metrics a bundle is gated on."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import numpy as np

from edgekit.formats import TASKS
from edgekit.runtime.encoder import EncoderModel, pool, relevance, split_pair
from edgekit.schema.manifest import RuntimeConfig

REFERENCE_BATCH = 32


def tool_versions(*packages: str) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def sentence_pooling(source: Path) -> tuple[str, bool]:
    """Pooling and normalization of a sentence-transformers checkpoint (mean, no normalization otherwise)."""
    pooling = "mean"
    pooling_file = source / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        config = json.loads(pooling_file.read_text())
        if config.get("pooling_mode_cls_token"):
            pooling = "cls"
    modules_file = source / "modules.json"
    normalize = modules_file.is_file() and any(m.get("type", "").endswith(".Normalize") for m in json.loads(modules_file.read_text()))
    return pooling, normalize


def default_max_length(source: Path, config: dict) -> int:
    """sentence-transformers' max_seq_length if present, else the position-embedding limit."""
    st_config = source / "sentence_bert_config.json"
    if st_config.is_file():
        return int(json.loads(st_config.read_text())["max_seq_length"])
    return int(config.get("max_position_embeddings", 512))


def parameter_count(source: Path) -> int:
    """Parameters (floating-point tensors) from safetensors headers, without loading any weights.

    Integer tensors are buffers such as BERT's ``position_ids``, not parameters.
    """
    from safetensors import safe_open

    total = 0
    for path in source.rglob("*.safetensors"):
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                if tensor.get_dtype().startswith(("F", "BF")):
                    total += int(np.prod(tensor.get_shape()))
    return total


def load_reference(source: Path, task: str):
    """The PyTorch fp32 model that bundles are compared with."""
    import torch
    import transformers

    loader = getattr(transformers, TASKS[task].auto_model)
    model = loader.from_pretrained(source, dtype=torch.float32, use_safetensors=any(source.rglob("*.safetensors")))
    return model.eval()


def reference_outputs(model, candidate: EncoderModel, texts: list[str]) -> list[np.ndarray]:
    """First output of the reference model per batch, fed exactly the token ids the bundle sees."""
    import torch

    outputs = []
    with torch.inference_mode():
        for start in range(0, len(texts), REFERENCE_BATCH):
            feeds, _ = candidate.feeds(texts[start : start + REFERENCE_BATCH])
            result = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            outputs.append(result[0].float().numpy())
    return outputs


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(-1) / np.clip(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12, None)


def compare(
    model, task: str, runtime: RuntimeConfig, candidate: EncoderModel, texts: list[str], labelled: list[tuple[str, str]]
) -> dict[str, float]:
    """Metrics of ``candidate`` vs the PyTorch fp32 reference ``model``: cosine, top-1 agreement, accuracy drop."""
    if TASKS[task].pairs:
        return compare_ranking(model, candidate, texts)
    cosines, agreements = [], []
    for start, ref in zip(range(0, len(texts), REFERENCE_BATCH), reference_outputs(model, candidate, texts)):
        batch = texts[start : start + REFERENCE_BATCH]
        got, mask = candidate.forward(batch)
        if task == "feature-extraction":
            cosines.append(cosine(pool(ref, mask, runtime.pooling, runtime.normalize), pool(got, mask, runtime.pooling, runtime.normalize)))
        elif task == "text-classification":
            cosines.append(cosine(ref, got))
            agreements.append(ref.argmax(-1) == got.argmax(-1))
        else:  # token-classification: compare real tokens only
            real = mask.astype(bool)
            cosines.append(cosine(ref, got)[real])
            agreements.append((ref.argmax(-1) == got.argmax(-1))[real])
    all_cosines = np.concatenate(cosines)
    metrics = {"cosine_mean": float(all_cosines.mean()), "cosine_min": float(all_cosines.min()), "samples": float(len(texts))}
    if agreements:
        metrics["top1_agreement"] = float(np.concatenate(agreements).mean())
    if labelled and task == "text-classification":
        label_texts = [t for t, _ in labelled]
        gold = np.array([label for _, label in labelled])
        names = np.array(runtime.labels)
        ref_pred = names[np.concatenate(reference_outputs(model, candidate, label_texts)).argmax(-1)]
        got_pred = names[np.concatenate([candidate.forward(label_texts[i : i + REFERENCE_BATCH])[0] for i in range(0, len(label_texts), REFERENCE_BATCH)]).argmax(-1)]
        metrics["accuracy_reference"] = float((ref_pred == gold).mean())
        metrics["accuracy"] = float((got_pred == gold).mean())
        metrics["accuracy_drop"] = max(0.0, metrics["accuracy_reference"] - metrics["accuracy"])
    return metrics


def compare_ranking(model, candidate: EncoderModel, samples: list[str]) -> dict[str, float]:
    """Score agreement of a cross-encoder over "query<TAB>document" samples, per query.

    Each query's relevance scores (reference vs bundle) are one vector: ``cosine_mean``/``cosine_min`` over the
    queries, ``top1_agreement`` the share of queries whose best document is the same, ``score_max_abs_diff`` the
    largest score difference of any pair.
    """
    pairs = [split_pair(sample) for sample in samples]
    ref_logits = np.concatenate(reference_outputs(model, candidate, pairs))
    got_logits = np.concatenate([candidate.forward(pairs[i : i + REFERENCE_BATCH])[0] for i in range(0, len(pairs), REFERENCE_BATCH)])
    ref, got = relevance(ref_logits), relevance(got_logits)
    queries: dict[str, list[int]] = {}
    for index, (query, _) in enumerate(pairs):
        queries.setdefault(query, []).append(index)
    groups = [np.array(rows) for rows in queries.values()]
    cosines = np.array([float(cosine(ref[rows], got[rows])) for rows in groups])
    same_best = [ref[rows].argmax() == got[rows].argmax() for rows in groups if len(rows) > 1]
    metrics = {"cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min()), "samples": float(len(pairs)),
               "score_max_abs_diff": float(np.abs(ref - got).max()), "queries": float(len(groups))}
    if same_best:
        metrics["top1_agreement"] = float(np.mean(same_best))
    return metrics
