"""GGUF format: checkpoint -> f16 GGUF (own converter on the gguf package) -> llama.cpp quantizer -> measured bundle.

Two starting points:

- a Hugging Face checkpoint: converted to an f16 reference GGUF, checked against PyTorch (same
  tokens, greedy next token on >= 99 % of positions) and the Hugging Face tokenizer (identical
  ids), then quantized; the bundle is measured against the f16 reference.
- an existing GGUF (``source.gguf_file``): header-checked before llama.cpp opens it, then
  requantized; f32/f16/bf16/Q8_0 sources are accepted as they are, lower-bit ones only with the
  target's ``allow_requantize``, and the bundle is measured against the source file.

The f16 reference, its PyTorch check and its logits on the eval text are made once per export
in ``job.scratch`` and shared by the recipe's targets through ``job.memo``. The bundle holds
``model.gguf`` (tokenizer and chat template inside) and the manifest. Heavy imports (torch,
transformers, llama_cpp) happen inside functions.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import BundleError, ExportError, RecipeError, SourceError
from edgekit.export import BuildResult, ExportJob
from edgekit.export.gguf import quality
from edgekit.export.gguf.convert import OUTTYPES, ConversionReport, convert_checkpoint
from edgekit.export.gguf.quantize import LOSSLESS_ENOUGH, quantize
from edgekit.export.gguf.vocab import normalization_for_pre
from edgekit.formats.gguf import SPEC as GGUF
from edgekit.runtime.gguf_file import GgufHeader, gguf_facts, read_gguf_header
from edgekit.schema.manifest import GgufFacts, RuntimeConfig
from edgekit.schema.recipe import GgufTarget

MODEL_FILE = "model.gguf"


def eval_text(job: ExportJob) -> str:
    """The running text quality is measured on: validation.text_file, else the validation samples."""
    validation = job.recipe.validation
    if validation.text_file is not None:
        return job.loaded.resolve(validation.text_file).read_text(encoding="utf-8")
    samples = list(validation.samples)
    if validation.samples_file is not None:
        samples += job.loaded.resolve(validation.samples_file).read_text(encoding="utf-8").splitlines()
    if not any(s.strip() for s in samples):
        raise RecipeError(
            f"{job.loaded.path}: a gguf target needs text to measure on",
            hint="set validation.text_file (e.g. data/eval-text.txt)",
        )
    return "\n".join(samples)


def probe_texts(text: str) -> list[str]:
    """Texts the tokenizer check runs on: the built-in stress strings and every line of the eval text."""
    return [*quality.PROBE_TEXTS, *(line for line in text.splitlines() if line.strip())]


def _check_tokenizer(reference_dir: Path, model: Path, texts: list[str], normalization: str | None) -> None:
    mismatches = quality.tokenization_mismatches(reference_dir, model, texts, normalization)
    if mismatches:
        first = mismatches[0]
        raise ExportError(
            f"the GGUF tokenizes {len(mismatches)} of {len(texts)} probe texts differently from the Hugging Face "
            f"tokenizer, e.g. {first.text[:60]!r}: expected {first.expected[:12]}, got {first.got[:12]}",
            hint="the tokenizer's pre-tokenizer or special tokens are not handled by the converter; report it",
        )


def _runtime(job: ExportJob, header: GgufHeader, facts: GgufFacts, normalization: str | None) -> RuntimeConfig:
    template = header.get("tokenizer.chat_template")
    return RuntimeConfig(
        max_length=job.recipe.max_length or facts.context_length,
        chat_template=template if isinstance(template, str) else None,
        context_length=facts.context_length,
        text_normalization=normalization,
    )


def _header(path: Path, error: type) -> GgufHeader:
    try:
        return read_gguf_header(path)
    except BundleError as exc:
        raise error(f"GGUF rejected before llama.cpp opened it: {exc.message}", hint=exc.hint) from exc


def _measure(scorers: dict, pairs: list[tuple[str, str]], windows: list[list[int]], job: ExportJob, save=None) -> dict:
    try:
        return quality.compare(scorers, pairs, windows, progress=job.progress, save=save)
    finally:
        for scorer in scorers.values():
            scorer.close()


@dataclass(frozen=True)
class Reference:
    """The f16 conversion of a checkpoint and its measurements, made once per export and shared by its targets."""

    path: Path
    conversion: ConversionReport
    text: str
    windows: list[list[int]]
    vs_torch: dict[str, float]
    logits: Path  # directory of the reference's saved logits per window


def _reference(job: ExportJob) -> Reference:
    """Convert the checkpoint to f16 and hold it to PyTorch: greedy next token on >= 99 % of positions."""
    key = (GGUF.name, "reference")
    if key in job.memo:
        return job.memo[key]
    source = job.source.path
    validation = job.recipe.validation
    path = job.scratch / "reference-f16.gguf"
    job.progress("converting the checkpoint to an f16 reference GGUF")
    conversion = convert_checkpoint(
        source, path, outtype="F16", name=job.recipe.name, allow_pickle=job.recipe.source.allow_pickle, progress=job.progress
    )
    text = eval_text(job)
    windows = quality.text_windows(path, text, validation.context_window, validation.max_eval_tokens,
                                   conversion.vocabulary.text_normalization)
    job.progress("checking the f16 GGUF against PyTorch")
    logits = job.scratch / "reference-logits"
    scorers = {"torch": quality.TorchScorer(source), "reference": quality.GgufScorer(path, validation.context_window)}
    vs_torch = _measure(scorers, [("torch", "reference")], windows, job, save={"reference": logits})[("torch", "reference")]
    if vs_torch["top1_agreement"] < validation.min_conversion_top1:
        raise ExportError(
            f"conversion check failed: the f16 GGUF picks the same next token as PyTorch on only "
            f"{vs_torch['top1_agreement']:.2%} of {int(vs_torch['eval_tokens'])} positions "
            f"(need {validation.min_conversion_top1:.0%}, validation.min_conversion_top1)",
            hint="the converter mishandles this checkpoint; report it with the model id",
        )
    job.memo[key] = Reference(path, conversion, text, windows, vs_torch, logits)
    return job.memo[key]


def _from_checkpoint(job: ExportJob) -> BuildResult:
    target: GgufTarget = job.target
    source = job.source.path
    reference = _reference(job)
    final = job.staging / MODEL_FILE
    if target.quant == "F16":
        shutil.copy(reference.path, final)
    elif target.quant in OUTTYPES:
        convert_checkpoint(source, final, outtype=target.quant, name=job.recipe.name,
                           allow_pickle=job.recipe.source.allow_pickle, progress=job.progress)
    else:
        job.progress(f"quantizing to {target.quant} with llama.cpp")
        quantize(reference.path, final, target.quant)

    normalization = reference.conversion.vocabulary.text_normalization
    texts = probe_texts(reference.text)
    job.progress(f"checking tokenization on {len(texts)} texts")
    _check_tokenizer(source, final, texts, normalization)

    if target.quant == "F16":  # the reference itself: zero distance by construction
        ppl = reference.vs_torch["ppl"]
        vs_reference = {"ppl_reference": ppl, "ppl": ppl, "ppl_increase": 0.0, "kld_mean": 0.0, "kld_p99": 0.0,
                        "top1_agreement": 1.0, "eval_tokens": reference.vs_torch["eval_tokens"]}
    else:
        scorers = {"reference": quality.SavedScorer(reference.logits),
                   "candidate": quality.GgufScorer(final, job.recipe.validation.context_window)}
        vs_reference = _measure(scorers, [("reference", "candidate")], reference.windows, job)[("reference", "candidate")]
    metrics = {
        **vs_reference,
        "torch_top1_agreement": reference.vs_torch["top1_agreement"],
        "torch_kld_mean": reference.vs_torch["kld_mean"],
        "torch_ppl": reference.vs_torch["ppl_reference"],
        "tokenizer_texts": float(len(texts)),
        "tokenizer_mismatches": 0.0,
        "conversion_seconds": round(reference.conversion.seconds, 3),
    }
    header = _header(final, ExportError)
    facts = gguf_facts(header)
    return BuildResult(
        quantization=target.quant,
        parameters=reference.conversion.parameters,
        runtime=_runtime(job, header, facts, normalization),
        metrics=metrics,
        tools=quality_tools(),
        gguf=facts,
    )


def _from_gguf(job: ExportJob) -> BuildResult:
    target: GgufTarget = job.target
    source_file = job.source.path / job.recipe.source.gguf_file
    if not source_file.is_file():
        raise SourceError(f"{job.source.label}: no file {job.recipe.source.gguf_file} in {job.source.path}",
                          hint="check source.gguf_file")
    source_header = _header(source_file, SourceError)
    source_type = gguf_facts(source_header).quant_type
    if source_type not in LOSSLESS_ENOUGH and not target.allow_requantize:
        raise RecipeError(
            f"{job.loaded.path}: target '{target.name}': the source GGUF is {source_type}; requantizing an already "
            "low-bit file compounds the quantization error",
            hint="start from an f16/bf16/Q8_0 GGUF or the checkpoint, "
            "or set allow_requantize: true on the target to accept the loss",
        )
    final = job.staging / MODEL_FILE
    unchanged = target.quant == source_type
    if unchanged:
        shutil.copy(source_file, final)
    else:
        if source_type not in LOSSLESS_ENOUGH:
            job.progress(f"requantizing {source_type} -> {target.quant}: quality loss compounds (allow_requantize is set)")
        else:
            job.progress(f"quantizing {source_type} -> {target.quant} with llama.cpp")
        quantize(source_file, final, target.quant, requantize=source_type not in ("F32", "F16", "BF16"))

    pre = source_header.get("tokenizer.ggml.pre")
    normalization = normalization_for_pre(pre if isinstance(pre, str) else None)
    text = eval_text(job)
    texts = probe_texts(text)
    expected, got = quality.gguf_tokenize(source_file, texts, normalization), quality.gguf_tokenize(final, texts, normalization)
    mismatched = sum(a != b for a, b in zip(expected, got))
    if mismatched:
        raise ExportError(f"the requantized GGUF tokenizes {mismatched} of {len(texts)} probe texts differently from its source")

    validation = job.recipe.validation
    windows = quality.text_windows(source_file, text, validation.context_window, validation.max_eval_tokens, normalization)
    scorers = {"reference": quality.GgufScorer(source_file, validation.context_window)}
    if unchanged:
        metrics = _measure(scorers, [("reference", "reference")], windows, job)[("reference", "reference")]
    else:
        scorers["candidate"] = quality.GgufScorer(final, validation.context_window)
        metrics = _measure(scorers, [("reference", "candidate")], windows, job)[("reference", "candidate")]
    metrics |= {"tokenizer_texts": float(len(texts)), "tokenizer_mismatches": 0.0}
    header = _header(final, ExportError)
    facts = gguf_facts(header).model_copy(update={"requantized_from": source_type})
    return BuildResult(
        quantization=target.quant,
        parameters=sum(t.n_elements for t in source_header.tensors if not t.name.startswith("rope_")),
        runtime=_runtime(job, header, facts, normalization),
        metrics=metrics,
        tools=quality_tools(),
        gguf=facts,
    )


def quality_tools() -> dict[str, str]:
    from edgekit.export.reference import tool_versions

    return tool_versions(*GGUF.build_tools)


def build(job: ExportJob) -> BuildResult:
    """Build one gguf target into ``job.staging`` (intermediate files go to ``job.scratch``, shared by the targets)."""
    if job.recipe.source.gguf_file is not None:
        return _from_gguf(job)
    return _from_checkpoint(job)
