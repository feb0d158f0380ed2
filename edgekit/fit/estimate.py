"""`fit(subject, device, settings) -> FitReport`: will this bundle (or recipe target) run on this board?

Pure: reads only metadata (a manifest, or a recipe's architecture facts), never a model file, so it
runs on any CI runner. The verdict is pass / warn (inside the headroom margin) / fail, with every
number it rests on and the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgekit.fit import memory, speed
from edgekit.fit.facts import ModelFacts, bits_per_weight, from_manifest
from edgekit.fit.memory import MIB, serve_default
from edgekit.formats import FORMATS
from edgekit.schema.device import Device
from edgekit.schema.manifest import Manifest

Verdict = Literal["pass", "warn", "fail"]
_ORDER = {"pass": 0, "warn": 1, "fail": 2}


class FitSettings(BaseModel):
    """How the model will be run and what counts as fitting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_ctx: int | None = Field(None, ge=1, description="Context tokens per sequence (GGUF); default: the model's training "
                              "context, at most edgekit serve's --n-ctx default.")
    parallel: int | None = Field(None, ge=1, le=256, description="Sequences served at once (GGUF: edgekit serve's --slots) or "
                                 "texts of the largest batch (ONNX: serve's --batch-max); default: edgekit serve's.")
    batch_max_tokens: int = Field(serve_default("batch_max_tokens"), ge=16,
                                  description="ONNX: most padded tokens of one micro-batch (edgekit serve's --batch-max-tokens).")
    max_embedding_inputs: int = Field(serve_default("max_embedding_inputs"), ge=1,
                                      description="ONNX: most texts of one request, tokenized at once by the worker "
                                      "(edgekit serve's --max-embedding-inputs).")
    prompt_cache_contexts: float = Field(serve_default("prompt_cache_contexts"), ge=0, le=4, description="GGUF: RAM for "
                                         "saved prompts, in contexts' worth of KV cache (edgekit serve's "
                                         "--prompt-cache-contexts).")
    n_ubatch: int = Field(memory.RunSettings.n_ubatch, ge=1, description="Prompt tokens per compute step (edgekit "
                          "serve's).")
    flash_attn: bool = Field(memory.RunSettings.flash_attn, description="Charge the compute buffers of llama.cpp with "
                             "flash attention, as edgekit serve runs it; off: the larger buffers of a runtime without it.")
    kv_type: Literal["f16", "bf16", "f32", "q8_0"] = Field("f16", description="KV cache element type.")
    threads: int | None = Field(None, ge=1, description="Inference threads; default: the device's cores.")
    daemon: bool = Field(True, description="Count edgekit serve's web stack in the runtime baseline.")
    headroom: float = Field(0.15, ge=0, lt=1, description="Warn when the model needs more than (1 - headroom) of usable RAM.")
    min_tok_s: float | None = Field(None, gt=0, description="Fail when predicted decode tokens/s is below this.")
    prompt_tokens: int = Field(128, ge=1, description="GGUF: tokens of the prompt time to first token is predicted for "
                               "(a chat turn with its system prompt and template).")
    max_ttft_s: float | None = Field(None, gt=0, description="GGUF: fail when predicted time to first token exceeds this.")
    max_latency_ms: float | None = Field(None, gt=0, description="Encoders: fail when predicted batch-1 latency exceeds this.")
    speed_margin: float = Field(0.25, ge=0, lt=1, description="Warn when a speed is within this share of its limit (prediction error).")
    encoder_seq_len: int = Field(32, ge=1, description="Tokens of the input encoder latency is predicted for.")


class Check(BaseModel):
    """One gate of the verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["ram", "speed", "ttft", "latency", "context", "size-facts"]
    verdict: Verdict
    value: float
    limit: float | None
    message: str


class FitReport(BaseModel):
    """The answer for one model on one device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: str = Field(description="Bundle name (or recipe bundle name for predictions).")
    device: str = Field(description="Device profile id.")
    origin: Literal["bundle", "recipe"] = Field(description="bundle: sizes measured; recipe: predicted from architecture facts.")
    format: str
    quant: str
    parameters: int
    bits_per_weight: float
    settings: dict = Field(description="The run settings the estimate is for (resolved defaults included).")
    memory: dict[str, int] = Field(
        description="RAM terms in bytes: weights, repacked, kv_cache, prompt_cache, compute, runtime (of the model's process), daemon "
        "(edgekit serve's own process); total (peak resident set without memory pressure) and required (what must stay "
        "resident; the RAM check uses it, and edgekit serve charges its budget required - daemon for the model)."
    )
    usable_ram_bytes: int
    ram_share: float = Field(description="memory.required / usable RAM.")
    disk_bytes: int = Field(description="Bundle size on disk (measured for bundles, predicted for recipes).")
    predicted_disk_bytes: int | None = Field(None, description="The recipe-time prediction when a bundle exists too.")
    disk_prediction_error: float | None = Field(None, description="(predicted - measured) / measured bundle size.")
    cold_load_s: float = Field(description="Bundle size / storage read speed.")
    decode_tok_s: float | None = Field(None, description="Predicted generation speed half-way through the context (the speed check uses it).")
    decode_tok_s_short: float | None = Field(None, description="Predicted generation speed at the start of a conversation (how benchmarks report it).")
    decode_tok_s_band: list[float] | None = Field(
        None, description="Lowest and highest decode_tok_s over the boards with this board's SoC (same cores, clock and "
        "bandwidth), each calibrated on its own published points; None when they agree within 1 %.")
    prompt_tok_s: float | None = Field(None, description="Predicted prompt speed as llama-bench's pp512 reports it (512 "
                                       "tokens in one batch), the figure published benchmarks give.")
    prompt_tok_s_chat: float | None = Field(None, description="Predicted prompt speed over a prompt of "
                                            "assumptions.prompt_tokens tokens in batches of settings.n_ubatch.")
    ttft_s: float | None = Field(None, description="Predicted time to first token for a prompt of assumptions.prompt_tokens "
                                 "tokens: its prefill plus one decode step at that depth.")
    latency_ms: float | None = None
    calibration: dict[str, dict] = Field(
        default_factory=dict, description="Per speed kind: factor (measured / modelled speed), scope and points used."
    )
    checks: list[Check]
    verdict: Verdict
    reason: str
    notes: list[str] = Field(default_factory=list)
    assumptions: dict = Field(
        default_factory=dict,
        description="What the figures assume: GGUF n_ctx, slots, decode_depth (tokens already in the context for "
        "decode_tok_s; decode_tok_s_short is at decode_short_depth), prompt_tokens and n_ubatch (the prompt ttft_s and "
        "prompt_tok_s_chat are for, prefilled in batches of n_ubatch tokens); ONNX latency_input_tokens (the input "
        "latency_ms is for) and the largest batch memory is charged for (batch_texts x batch_input_tokens).")
    suggested_n_ctx: int | None = Field(
        None, description="When RAM fails (or warns): the largest context, a multiple of 256, at which it fits "
        "(or passes outside the headroom margin); serve it with `edgekit serve --n-ctx N`.")
    suggested_batch_max_tokens: int | None = Field(
        None, description="Encoders, when RAM fails: the micro-batch in tokens (serve --batch-max-tokens) and ...")
    suggested_max_embedding_inputs: int | None = Field(
        None, description="... the texts per request (serve --max-embedding-inputs) at which it fits.")


def _worst(verdicts: Iterable[Verdict]) -> Verdict:
    return max(verdicts, key=_ORDER.__getitem__, default="pass")


def _mb(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def resolve_n_ctx(facts: ModelFacts, settings: FitSettings) -> int:
    """The context the fit is made at: the setting, else the format's default."""
    return FORMATS[facts.format].hook("fit_n_ctx")(facts, settings)


def decoder_n_ctx(facts: ModelFacts, settings: FitSettings) -> int:
    """GGUF: the model's training context, at most edgekit serve's default context (capped the same way)."""
    return settings.n_ctx or min(facts.context_length, serve_default("n_ctx"))


def encoder_n_ctx(facts: ModelFacts, settings: FitSettings) -> int:
    """ONNX: the longest input the bundle accepts."""
    return settings.n_ctx or facts.max_length or facts.context_length


@dataclass
class SpeedPrediction:
    """A format's predicted speeds, the calibrations they rest on and the checks they add."""

    calibrations: dict[str, dict]
    checks: list[Check] = field(default_factory=list)
    decode_tok_s: float | None = None
    decode_tok_s_short: float | None = None
    prompt_tok_s: float | None = None
    prompt_tok_s_chat: float | None = None
    ttft_s: float | None = None
    latency_ms: float | None = None
    assumptions: dict = field(default_factory=dict)
    decode_band: tuple[float, float] | None = None


def decoder_speed(facts: ModelFacts, work: speed.Workload, device: Device, settings: FitSettings, n_ctx: int,
                  catalog: list[Device]) -> SpeedPrediction:
    """GGUF: decode (mid-context and short) and prompt speed; speed and context checks."""
    checks: list[Check] = []
    cal_d = speed.calibrate(device, "decode", catalog)
    cal_p = speed.calibrate(device, "prompt", catalog)
    # Decode speed at the middle of the context: the KV cache read grows as the context fills.
    decode = speed.roofline_decode_tok_s(work, device, settings.threads, n_past=n_ctx // 2, calibration=cal_d)
    decode_short = speed.roofline_decode_tok_s(work, device, settings.threads, n_past=0, calibration=cal_d)
    # llama-bench's pp512 (one 512-token batch), and the chat prompt as edgekit serve prefills it (n_ubatch chunks).
    pp512 = min(n_ctx, 512)
    prompt = pp512 / speed.prefill_seconds(work, device, settings.threads, pp512, pp512, cal_p, cal_d)
    n_prompt = min(settings.prompt_tokens, n_ctx)
    prefill = speed.prefill_seconds(work, device, settings.threads, n_prompt, settings.n_ubatch, cal_p, cal_d)
    ttft = prefill + 1.0 / speed.roofline_decode_tok_s(work, device, settings.threads, n_past=n_prompt, calibration=cal_d)
    calibrations = {c.kind: {"factor": c.factor, "scope": c.scope, "points": list(c.points)} for c in (cal_d, cal_p)}
    if cal_d.attention_points:  # the board was measured deep into a context too
        calibrations["decode"].update(attention_factor=round(cal_d.attention_scale, 6),
                                      attention_points=list(cal_d.attention_points))
    if settings.min_tok_s is not None:
        checks.append(_speed_check("speed", decode, settings.min_tok_s, settings.speed_margin, higher_is_better=True,
                                   unit="tok/s", what="decode"))
    if settings.max_ttft_s is not None:
        checks.append(_speed_check("ttft", ttft, settings.max_ttft_s, settings.speed_margin, higher_is_better=False,
                                   unit="s", what=f"time to first token ({n_prompt}-token prompt)"))
    if n_ctx > facts.context_length:
        checks.append(Check(name="context", verdict="warn", value=n_ctx, limit=facts.context_length,
                            message=f"context {n_ctx} exceeds the model's training context {facts.context_length}"))
    # Boards with the same SoC calibrated on their own published points: the spread of deep decode over them.
    band = sorted(speed.roofline_decode_tok_s(work, device, settings.threads, n_past=n_ctx // 2, calibration=cal)
                  for cal in speed.soc_calibrations(device, "decode", catalog).values())
    assumptions = {"n_ctx": n_ctx, "slots": settings.parallel or serve_default("slots"), "decode_depth": n_ctx // 2,
                   "decode_short_depth": 0, "prompt_tokens": n_prompt, "n_ubatch": settings.n_ubatch}
    return SpeedPrediction(calibrations, checks, decode, decode_short, prompt, prompt_tok_s_chat=n_prompt / prefill,
                           ttft_s=ttft, assumptions=assumptions,
                           decode_band=(band[0], band[-1]) if band[-1] > band[0] * 1.01 else None)


def encoder_speed(facts: ModelFacts, work: speed.Workload, device: Device, settings: FitSettings, n_ctx: int,
                  catalog: list[Device]) -> SpeedPrediction:
    """ONNX: batch-1 latency of an ``encoder_seq_len``-token input; latency check."""
    checks: list[Check] = []
    cal_e = speed.calibrate(device, "encoder", catalog)
    seq = min(settings.encoder_seq_len, n_ctx)
    latency = speed.roofline_encoder_ms(work, device, seq, 1, settings.threads) / cal_e.factor
    calibrations = {"encoder": {"factor": cal_e.factor, "scope": cal_e.scope, "points": list(cal_e.points)}}
    if settings.max_latency_ms is not None:
        checks.append(_speed_check("latency", latency, settings.max_latency_ms, settings.speed_margin,
                                   higher_is_better=False, unit="ms", what=f"batch-1 latency ({seq} tokens)"))
    texts, tokens = memory.encoder_batch(facts, _run_settings(settings, n_ctx))
    assumptions = {"latency_input_tokens": seq, "batch_texts": texts, "batch_input_tokens": tokens,
                   "request_texts": max(texts, settings.max_embedding_inputs) if settings.daemon else texts}
    return SpeedPrediction(calibrations, checks, latency_ms=latency, assumptions=assumptions)


def _run_settings(settings: FitSettings, n_ctx: int) -> memory.RunSettings:
    """The run the fit is for; the encoder's micro-batch split and request size are the daemon worker's."""
    serve = settings.daemon
    return memory.RunSettings(n_ctx=n_ctx, parallel=settings.parallel, n_ubatch=settings.n_ubatch,
                              flash_attn=settings.flash_attn, kv_type=settings.kv_type, daemon=serve,
                              batch_max_tokens=settings.batch_max_tokens if serve else None,
                              job_texts=settings.max_embedding_inputs if serve else None,
                              prompt_cache_contexts=settings.prompt_cache_contexts if serve else None)


def largest_fitting_batch(facts: ModelFacts, settings: FitSettings, n_ctx: int, limit: int,
                          isa=None) -> tuple[int, int] | None:
    """Encoders: the largest (--batch-max-tokens, --max-embedding-inputs) at or below the current ones whose required RAM
    is at most ``limit``, the micro-batch kept as large as it can be; None when even one text at a time does not fit."""
    run = _run_settings(settings, n_ctx)
    texts, tokens = memory.encoder_batch(facts, run)
    jobs = sorted({settings.max_embedding_inputs, *(2**k for k in range(12) if 2**k < settings.max_embedding_inputs)},
                  reverse=True)
    for count in range(texts, 0, -1):
        for job in (j for j in jobs if j >= count):
            smaller = replace(run, batch_max_tokens=count * tokens, job_texts=job)
            if (count, job) != (texts, settings.max_embedding_inputs) and \
                    memory.estimate_memory(facts, smaller, isa).required <= limit:
                return count * tokens, job
    return None


def largest_fitting_n_ctx(facts: ModelFacts, settings: FitSettings, n_ctx: int, limit: int,
                          isa=None) -> int | None:
    """The largest context below ``n_ctx`` (a multiple of llama.cpp's 256-cell padding) whose required RAM is at most
    ``limit``; None when even the smallest does not fit or the context does not change the memory (encoders)."""
    def need(ctx: int) -> int:
        return memory.estimate_memory(facts, _run_settings(settings, ctx), isa).required

    low, high = 1, (n_ctx - 1) // memory.KV_PAD  # candidates: multiples of 256 below n_ctx
    if high < 1 or need(memory.KV_PAD) > limit or need(memory.KV_PAD) == need(high * memory.KV_PAD):
        return None
    while low < high:  # the required memory grows with the context: bisect
        middle = (low + high + 1) // 2
        low, high = (middle, high) if need(middle * memory.KV_PAD) <= limit else (low, middle - 1)
    return low * memory.KV_PAD


def fit(subject: Manifest | ModelFacts, device: Device, settings: FitSettings | None = None,
        catalog: Iterable[Device] = (), predicted: ModelFacts | None = None) -> FitReport:
    """Estimate peak RAM, disk and speed of ``subject`` on ``device`` and give a verdict.

    ``catalog`` supplies calibration points of other boards when ``device`` has none of its own;
    ``predicted`` is the recipe-time prediction of the same bundle, to report how far off it was.
    """
    settings = settings or FitSettings()
    facts = from_manifest(subject) if isinstance(subject, Manifest) else subject
    catalog = list(catalog)
    n_ctx = resolve_n_ctx(facts, settings)
    mem = memory.estimate_memory(facts, _run_settings(settings, n_ctx), device.cpu.isa)
    usable = device.usable_ram_bytes
    checks: list[Check] = []
    notes = list(facts.notes)

    # With the daemon, the check is edgekit serve's admission decision: the worker's charge against
    # the budget (usable RAM minus the daemon's own process, edgekit.serve.budget.device_budget).
    need = mem.required
    share = need / usable
    suggested_n_ctx = None
    suggested_batch = None
    if need > usable:
        suggested_n_ctx = largest_fitting_n_ctx(facts, settings, n_ctx, usable)
        fix = f"; fits at --ctx {suggested_n_ctx}" if suggested_n_ctx else ""
        if mem.kv_cache == 0:
            suggested_batch = largest_fitting_batch(facts, settings, n_ctx, usable, device.cpu.isa)
            fix = (f"; fits with --batch-max-tokens {suggested_batch[0]} --max-embedding-inputs {suggested_batch[1]}"
                   if suggested_batch else "")
        ram = Check(name="ram", verdict="fail", value=need, limit=usable,
                    message=f"needs {_mb(need)} of RAM, {device.id} has {_mb(usable)} usable "
                            f"({_mb(need - usable)} short){fix}")
    elif share > 1 - settings.headroom:
        suggested_n_ctx = largest_fitting_n_ctx(facts, settings, n_ctx, int(usable * (1 - settings.headroom)))
        fix = f"; outside it at --ctx {suggested_n_ctx}" if suggested_n_ctx else ""
        ram = Check(name="ram", verdict="warn", value=need, limit=usable,
                    message=f"needs {_mb(need)} of {_mb(usable)} usable RAM ({share:.0%}), "
                            f"inside the {settings.headroom:.0%} headroom margin{fix}")
    else:
        ram = Check(name="ram", verdict="pass", value=need, limit=usable,
                    message=f"needs {_mb(need)} of {_mb(usable)} usable RAM ({share:.0%})")
    checks.append(ram)

    work = speed.workload_of(facts)
    predicted_speed = FORMATS[facts.format].hook("speed")(facts, work, device, settings, n_ctx, catalog)
    checks += predicted_speed.checks
    calibrations = predicted_speed.calibrations
    decode, decode_short = predicted_speed.decode_tok_s, predicted_speed.decode_tok_s_short
    prompt, latency = predicted_speed.prompt_tok_s, predicted_speed.latency_ms
    prompt_chat, ttft = predicted_speed.prompt_tok_s_chat, predicted_speed.ttft_s
    for kind, cal in calibrations.items():
        if cal["scope"] in ("catalog", "none"):
            notes.append(f"{kind} speed: {device.id} has no calibration point of its own or of its core type; "
                         f"scaled by the catalog-wide factor {cal['factor']:.2f}")

    disk_error = None
    if predicted is not None and facts.origin == "bundle":
        disk_error = (predicted.bundle_bytes - facts.bundle_bytes) / facts.bundle_bytes

    verdict = _worst(c.verdict for c in checks)
    failing = [c for c in checks if c.verdict == verdict and verdict != "pass"]
    reason = "; ".join(c.message for c in failing) if failing else ram.message
    return FitReport(
        subject=facts.name, device=device.id, origin=facts.origin, format=facts.format, quant=facts.quant,
        parameters=facts.parameters, bits_per_weight=round(bits_per_weight(facts), 4),
        settings={"n_ctx": n_ctx, "parallel": settings.parallel, "n_ubatch": settings.n_ubatch,
                  "batch_max_tokens": settings.batch_max_tokens,
                  "flash_attn": settings.flash_attn, "kv_type": settings.kv_type,
                  "threads": min(settings.threads or device.cpu.cores, device.cpu.cores), "daemon": settings.daemon},
        memory=mem.as_dict(), usable_ram_bytes=usable, ram_share=round(share, 6), disk_bytes=facts.bundle_bytes,
        predicted_disk_bytes=predicted.bundle_bytes if predicted is not None else None,
        disk_prediction_error=None if disk_error is None else round(disk_error, 6),
        cold_load_s=round(facts.bundle_bytes / (device.storage.read_mb_s * 1e6), 4),
        decode_tok_s=None if decode is None else round(decode, 4),
        decode_tok_s_short=None if decode_short is None else round(decode_short, 4),
        decode_tok_s_band=None if predicted_speed.decode_band is None else [round(v, 4) for v in predicted_speed.decode_band],
        prompt_tok_s=None if prompt is None else round(prompt, 4),
        prompt_tok_s_chat=None if prompt_chat is None else round(prompt_chat, 4),
        ttft_s=None if ttft is None else round(ttft, 4),
        latency_ms=None if latency is None else round(latency, 4),
        calibration={k: {**v, "factor": round(v["factor"], 6)} for k, v in calibrations.items()},
        checks=checks, verdict=verdict, reason=reason, notes=notes, assumptions=predicted_speed.assumptions,
        suggested_n_ctx=suggested_n_ctx,
        suggested_batch_max_tokens=suggested_batch[0] if suggested_batch else None,
        suggested_max_embedding_inputs=suggested_batch[1] if suggested_batch else None,
    )


def _speed_check(name, value: float, limit: float, margin: float, *, higher_is_better: bool, unit: str, what: str) -> Check:
    if higher_is_better:
        bad, close = value < limit, value < limit * (1 + margin)
    else:
        bad, close = value > limit, value > limit * (1 - margin)
    verdict: Verdict = "fail" if bad else "warn" if close else "pass"
    relation = {"fail": "misses", "warn": "is within the prediction margin of", "pass": "meets"}[verdict]
    return Check(name=name, verdict=verdict, value=round(value, 4), limit=limit,
                 message=f"predicted {what} {value:.3g} {unit} {relation} the limit {limit:g} {unit}")
