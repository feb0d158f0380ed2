"""Golden checks on the board: rerun what a bundle recorded at export and say whether this runtime agrees.

Board side: numpy, the schemas and the loaded runtime models only. The export records with the same
functions (``greedy_logprobs``, ``encoder_output``), so on the recording machine a check reproduces the
record exactly.

GGUF: each recorded prompt is tokenized (the ids must be identical: tokenization does not depend on
SIMD kernels), then decoded one token at a time along the recorded ids (teacher forcing). Where the board's
most likely token equals the recorded id at every step, its greedy generation is identical and the check
passes. Otherwise the share of agreeing steps and the mean KL divergence over the recorded top tokens
must stay within the bounds the manifest states, which allow for kernels that round differently
(x86 vs Arm dot products) but not for a runtime that computes something else.

ONNX: each recorded text is run at batch one; embeddings must keep the recorded cosine, class
probabilities must stay within the recorded absolute difference with the same labels.

``check_golden(manifest, model)`` takes an already loaded model (the daemon's worker calls it before it
reports ready); ``check_bundle(bundle_dir)`` verifies, loads and checks (``edgekit doctor``). Run as
``python -m edgekit.runtime.golden BUNDLE`` it prints the report as one JSON line, so a native crash
(SIGILL on a CPU that lacks an instruction) ends only that process.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgekit.errors import EdgekitError, RuntimeBackendError
from edgekit.schema.manifest import EncoderGolden, EncoderText, GreedyGolden, GreedyPrompt, Manifest

# Context a golden check loads a GGUF with: the recorded prompts and their continuations fit in it.
CHECK_N_CTX = 512


class GoldenCheck(BaseModel):
    """One recorded prompt or text, rerun on this machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="'prompt N' or 'text N' (1-based, in the manifest's order).")
    passed: bool
    detail: str = Field(description="One line: what was compared and the numbers.")
    prompt_ids_equal: bool | None = Field(None, description="GGUF: the prompt tokenized to the recorded ids.")
    ids_equal: bool | None = Field(None, description="GGUF: greedy tokens identical to the recorded ones.")
    first_difference: int | None = Field(None, description="GGUF: first step (0-based) whose most likely token differs.")
    top1_agreement: float | None = Field(
        None, description="GGUF: share of teacher-forced steps whose most likely token is the recorded id.")
    kld: float | None = Field(
        None, description="GGUF: mean per-step KL divergence (recorded || this machine) over the recorded top tokens + rest.")
    cosine: float | None = Field(None, description="ONNX embeddings: cosine similarity with the recorded embedding.")
    max_probability_diff: float | None = Field(None, description="ONNX classification: largest absolute probability difference.")
    labels_equal: bool | None = Field(None, description="ONNX classification: the same most likely labels as recorded.")


class GoldenReport(BaseModel):
    """Whether a loaded bundle reproduces its golden record on this machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: str
    recorded: bool = Field(description="False when the manifest has no golden record (not a failure).")
    passed: bool = Field(description="Every check passed (True when nothing was recorded).")
    reason: str = Field("", description="One line naming the first failing check; empty when passed.")
    recorded_on: str | None = None
    checks: list[GoldenCheck] = Field(default_factory=list)
    seconds: float = 0.0


# -- shared with the export, which records with these ----------------------------------------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(logits.max())
    return shifted - np.log(np.exp(shifted).sum())


def greedy_logprobs(model, prompt_ids: list[int], steps: int, feed: list[int] | None = None, *,
                    reuse: bool = False) -> list[np.ndarray]:
    """Next-token log-probabilities at each step after ``prompt_ids``, one token decoded at a time.

    The token fed after each step is ``feed[step]`` (teacher forcing, ``steps`` steps) or, without ``feed``, the
    most likely one (greedy: at most ``steps`` steps, ending at an end-of-generation token as the daemon does).
    ``model`` is a loaded ``edgekit.runtime.llm.GgufModel``; its context is reset first, or with ``reuse`` (the
    previous call of this run filled it) keeps the tokens ``prompt_ids`` starts with: golden prompts share the
    chat template's system turn, a third of a check's work (minutes on an emulated board). Recording and
    checking reuse alike.
    """
    import llama_cpp

    llm = model.llm
    if len(prompt_ids) + steps > model.n_ctx:
        raise RuntimeBackendError(f"a golden prompt of {len(prompt_ids)} tokens + {steps} steps does not fit the "
                                  f"context of {model.n_ctx} tokens")
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    # At least the last prompt token is evaluated again: its logits are the first step's.
    keep = min(llm.longest_token_prefix(llm.input_ids[:llm.n_tokens].tolist(), prompt_ids), len(prompt_ids) - 1) if reuse else 0
    if keep > 0:
        llm.n_tokens = keep  # eval() drops the context's cache from n_tokens on
    else:
        llm.reset()
    llm.eval(list(prompt_ids[keep:]))
    out = []
    for step in range(steps):
        # llama-cpp-python keeps no logits without logits_all; read the last position's from llama.cpp.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        out.append(log_softmax(logits))
        token = feed[step] if feed is not None else int(out[-1].argmax())
        if step + 1 == steps or (feed is None and llama_cpp.llama_vocab_is_eog(vocab, token)):
            break
        llm.eval([token])
    return out


def prompt_tokens(model, prompt: str, runtime) -> list[int]:
    """Token ids of a golden prompt: a one-turn chat through the model's template when it has one, as the daemon renders it."""
    text = model.render_chat([{"role": "user", "content": prompt}]) if model.template else prompt
    if runtime.text_normalization:
        text = unicodedata.normalize(runtime.text_normalization, text)
    return model.tokenize(text, chat=True)


def encoder_output(model, task: str, text: str) -> np.ndarray:
    """The bundle's output for one text at batch one: embedding, class probabilities ([labels] or [tokens, labels]),
    or a text-ranking sample's ("query<TAB>document") relevance score ([1])."""
    if task == "feature-extraction":
        return model.embed([text])[0].astype(np.float32)
    if task == "text-ranking":
        from edgekit.runtime.encoder import relevance, split_pair

        logits, _ = model.forward([split_pair(text)])
        return relevance(logits).astype(np.float32)
    return model.classify([text])[0].astype(np.float32)


def pack_f16(values: np.ndarray) -> str:
    """Base64 of little-endian float16 values (half the bytes of float32; cosine error ~1e-7)."""
    return base64.b64encode(np.asarray(values, dtype="<f2").tobytes()).decode("ascii")


def unpack_f16(text: str, shape: list[int]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float32).reshape(shape)


def output_labels(probabilities: np.ndarray, labels: list[str]) -> list[str]:
    """Most likely label of each row (one row for a text, one per token)."""
    rows = probabilities.reshape(-1, probabilities.shape[-1])
    return [labels[i] if i < len(labels) else str(i) for i in rows.argmax(axis=-1)]


# -- the checks --------------------------------------------------------------------------------------

def binned_kld(recorded: dict[int, float], logprobs: np.ndarray) -> float:
    """KL(recorded || this machine) over the recorded tokens plus one bin for every other token.

    Merging outcomes never increases a KL divergence, so this is a lower bound of the full one; the
    recorded probabilities are renormalized when their 3-decimal rounding makes them sum past 1.
    """
    ids = np.fromiter(recorded.keys(), dtype=np.int64)
    p = np.exp(np.fromiter(recorded.values(), dtype=np.float64))
    if p.sum() > 1.0:
        p = p / p.sum()
    q = np.exp(logprobs[ids])
    p_rest, q_rest = max(1.0 - p.sum(), 0.0), max(1.0 - q.sum(), 1e-12)
    kld = float((p * (np.log(p) - np.log(np.maximum(q, 1e-300)))).sum())
    if p_rest > 0:
        kld += p_rest * (np.log(p_rest) - np.log(q_rest))
    return max(kld, 0.0)


def check_prompt(index: int, prompt: GreedyPrompt, golden: GreedyGolden, model, runtime) -> GoldenCheck:
    name = f"prompt {index}"
    tokenized = prompt_tokens(model, prompt.prompt, runtime)
    steps = greedy_logprobs(model, prompt.prompt_ids, len(prompt.ids), feed=prompt.ids, reuse=index > 1)
    board = [int(lp.argmax()) for lp in steps]
    differ = [i for i, (a, b) in enumerate(zip(board, prompt.ids)) if a != b]
    agreement = 1.0 - len(differ) / len(prompt.ids) if prompt.ids else 1.0
    kld = float(np.mean([binned_kld(top, lp) for top, lp in zip(prompt.top_logprobs, steps)])) if steps else 0.0
    numbers = (f"teacher-forced top-1 {agreement:.3f} (bound >= {golden.min_top1_agreement:g}), "
               f"KLD {kld:.2g} (bound <= {golden.max_kld:g})")
    common = dict(name=name, ids_equal=not differ, first_difference=differ[0] if differ else None,
                  top1_agreement=round(agreement, 6), kld=round(kld, 8), prompt_ids_equal=tokenized == prompt.prompt_ids)
    if tokenized != prompt.prompt_ids:
        shorter = min(len(tokenized), len(prompt.prompt_ids))
        at = next((i for i, (a, b) in enumerate(zip(tokenized, prompt.prompt_ids)) if a != b), shorter)
        return GoldenCheck(passed=False, **common, detail=f"the prompt tokenizes differently from the record (first "
                                                          f"difference at token {at} of {len(prompt.prompt_ids)}); {numbers}")
    if not differ:
        return GoldenCheck(passed=True, **common, detail=f"{len(prompt.ids)} greedy tokens identical; KLD {kld:.2g}")
    within = agreement >= golden.min_top1_agreement and kld <= golden.max_kld
    where = f"greedy tokens differ from step {differ[0]} (this machine {board[differ[0]]}, recorded {prompt.ids[differ[0]]})"
    return GoldenCheck(passed=within, **common, detail=f"{where}; {numbers}" + ("" if within else ": outside the bound"))


def check_text(index: int, text: EncoderText, golden: EncoderGolden, model, task: str, labels: list[str]) -> GoldenCheck:
    name = f"text {index}"
    got = encoder_output(model, task, text.text)
    if list(got.shape) != text.shape:
        return GoldenCheck(name=name, passed=False,
                           detail=f"output shape {list(got.shape)} differs from the recorded {text.shape}")
    want = unpack_f16(text.output, text.shape)
    if task == "feature-extraction":
        cosine = float(np.dot(got, want) / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-12))
        passed = golden.min_cosine is None or cosine >= golden.min_cosine
        detail = f"cosine {cosine:.6f} (bound >= {golden.min_cosine:g})" + ("" if passed else ": outside the bound")
        return GoldenCheck(name=name, passed=passed, cosine=round(cosine, 8), detail=detail)
    bound = golden.max_probability_diff if golden.max_probability_diff is not None else 1.0
    diff = float(np.abs(got - want).max())
    mine = output_labels(got, labels)
    rows = np.sort(want.reshape(-1, want.shape[-1]), axis=-1)
    margins = rows[:, -1] - (rows[:, -2] if rows.shape[-1] > 1 else 0.0)
    # A label may flip only where the recorded top two are within the probability bound of each other twice over.
    flips = [i for i, (a, b) in enumerate(zip(mine, text.labels)) if a != b and margins[i] >= 2 * bound]
    passed = diff <= bound and not flips and len(mine) == len(text.labels)
    detail = f"max probability difference {diff:.4f} (bound <= {bound:g}), labels {'equal' if mine == text.labels else 'differ'}"
    if flips:
        detail += f"; label {flips[0]} is {mine[flips[0]]!r}, recorded {text.labels[flips[0]]!r} with a clear margin"
    return GoldenCheck(name=name, passed=passed, max_probability_diff=round(diff, 6), labels_equal=mine == text.labels,
                       detail=detail + ("" if passed else ": outside the bound"))


def check_golden(manifest: Manifest, model) -> GoldenReport:
    """Rerun ``manifest``'s golden record on ``model`` (a loaded GgufModel or EncoderModel of that bundle)."""
    started = time.perf_counter()
    golden = manifest.golden
    if golden is None:
        return GoldenReport(bundle=manifest.name, recorded=False, passed=True)
    if isinstance(golden, GreedyGolden):
        checks = [check_prompt(i, p, golden, model, manifest.runtime) for i, p in enumerate(golden.prompts, 1)]
    else:
        labels = list(manifest.runtime.labels)
        checks = [check_text(i, t, golden, model, manifest.task, labels) for i, t in enumerate(golden.texts, 1)]
    failed = next((c for c in checks if not c.passed), None)
    reason = f"golden check failed for {manifest.name}: {failed.name}: {failed.detail}" if failed else ""
    return GoldenReport(bundle=manifest.name, recorded=True, passed=failed is None, reason=reason,
                        recorded_on=golden.recorded_on, checks=checks, seconds=round(time.perf_counter() - started, 3))


# -- load and check (edgekit doctor) -------------------------------------------------------------------

def load_model(bundle_dir: Path, manifest: Manifest, *, threads: int | None = None, n_ctx: int = CHECK_N_CTX):
    """Load a verified bundle's model the way the daemon does."""
    from edgekit.formats import FORMATS
    from edgekit.runtime.verify import model_file

    loader = FORMATS[manifest.format].hook("load_model")
    return loader(bundle_dir, manifest, model_file(bundle_dir, manifest), threads, n_ctx)


def load_gguf(bundle_dir: Path, manifest: Manifest, path: Path, threads: int | None, n_ctx: int):
    from edgekit.runtime.llm import GgufModel

    context = manifest.runtime.context_length or (manifest.gguf.context_length if manifest.gguf else None)
    return GgufModel(path, n_ctx=min(n_ctx, context) if context else n_ctx, threads=threads,
                     chat_template=manifest.runtime.chat_template)


def load_onnx(bundle_dir: Path, manifest: Manifest, path: Path, threads: int | None, n_ctx: int):
    from edgekit.runtime.encoder import EncoderModel

    return EncoderModel(bundle_dir, manifest.runtime, threads=threads, model_path=path)


def check_bundle(bundle_dir: Path, *, threads: int | None = None) -> GoldenReport:
    """Verify a bundle (sha256, headers), load it and rerun its golden record."""
    from edgekit.runtime.verify import verify_for_runtime

    manifest = verify_for_runtime(Path(bundle_dir))
    if manifest.golden is None:
        return GoldenReport(bundle=manifest.name, recorded=False, passed=True)
    return check_golden(manifest, load_model(Path(bundle_dir), manifest, threads=threads))


def main(argv: list[str] | None = None) -> int:
    """``python -m edgekit.runtime.golden BUNDLE [--threads N]``: one JSON line, exit 0 passed / 1 failed / the error's code."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgekit.runtime.golden")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        report = check_bundle(args.bundle, threads=args.threads)
    except EdgekitError as exc:
        sys.stdout.write(json.dumps({"error": str(exc), "exit_code": exc.exit_code}) + "\n")
        return exc.exit_code
    sys.stdout.write(json.dumps({"report": report.model_dump(mode="json")}) + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
