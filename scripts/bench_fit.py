"""Truth for `edgekit fit`: its predictions side by side with measurements on this machine.

0. Measures first. Peak RSS: each configuration in a fresh process. Decode speed: every decode
   configuration in one process, interleaved token by token over --rounds rounds (default 5), so a
   burst of load from another tenant of this shared machine, or a slow stretch of the host, hits all
   of them alike (timed in separate processes, one configuration differed by up to 40 % between runs).
1. Profiles this host (`edgekit profile-host` functions) and calibrates it with the same kinds of
   points profile-host writes: decode speed of the SmolLM2-135M Q8_0 bundle at short context and
   2,024 tokens into a context (its attention cost; taken from the interleaved run, in CPU time, one
   thread) and batch-1 latency of the MiniLM int8 bundle.
2. Peak RSS of a fresh subprocess that loads a bundle into edgekit serve's engine at its default slots and fills
   the context (prompt of n_ctx - 40 tokens, then up to 32 generated tokens) for GGUF Q8_0 / Q4_K_M x
   n_ctx 512 / 2048 / 8192, and that classifies batches of 1 and 32 max-length inputs with the ONNX
   encoder; vs `fit`'s prediction for this host (the runtime without the daemon). Target: within +-10 %.
3. Decode tokens/s predicted after host calibration vs measured (Q4_K_M short context, both quants
   at the end of full contexts). Target: within +-20 %. The two Q8_0 calibration measurements are
   taken in the same interleaved run; the 2,024-token one is printed as in-sample and not counted.
4. Each published calibration point of the catalog predicted from the other points (leave one out:
   the board's own other points, else boards with the same core, else the whole catalog). Target +-25 %; a prompt
   point measured by a llama.cpp older than its kernel family's `kernels_since` is shown but not counted.
5. Recipe-time size predictions vs the bundles' measured sizes.
6. Prompt speed: every published prompt point of the catalog with the llama.cpp build it ran, predicted from
   the kernel data alone (devices/kernels/prompt.yaml) and leave one out; the pp512 `fit --recipe` predicts for
   Llama-3.2-1B Q4_K_M on the Raspberry Pi 5 against the band its published points imply; and this host's
   prompt tokens/s of the Q4_K_M bundle at 16..512 tokens in one batch (llama-bench's pp<N>, process CPU time)
   against the prediction for this host's profile, uncalibrated and calibrated by its own point at one full
   prefill chunk (512 tokens, the one `edgekit profile-host` writes; in-sample there). --prompt-only runs just this
   part (seconds).

With --reuse-measurements the measured values of an earlier run (its bench-results/fit.json) are read
back and only the predictions and the table are recomputed: for iterating on the model without timing.

Bundles come from $EDGEKIT_HOME/bundles (smollm2-135m-instruct-q8-0 / -q4-k-m, all-minilm-l6-v2-int8-dynamic);
with --export-missing they are exported first. Without them, the upstream Q4_1 GGUF of the model store
is requantized with llama.cpp's quantizer and wrapped as a bundle under $EDGEKIT_HOME/bench-fit.
Prints a table and writes bench-results/fit.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit.bench import child  # noqa: E402
from edgekit.bench.calibrate import encoder_point, gguf_point  # noqa: E402
from edgekit.bench.measure import PROFILE_PROMPT_TOKENS  # noqa: E402
from edgekit.bundle import read_manifest  # noqa: E402
from edgekit.fit import (  # noqa: E402
    FitSettings,
    fit,
    from_manifest,
    from_recipe,
    speed,  # noqa: E402
)
from edgekit.fit.memory import serve_default  # noqa: E402
from edgekit.paths import kit_paths  # noqa: E402
from edgekit.schema.device import CalibrationPoint, Device, load_catalog  # noqa: E402

GGUF_BUNDLES = {"Q8_0": "smollm2-135m-instruct-q8-0", "Q4_K_M": "smollm2-135m-instruct-q4-k-m"}
ONNX_BUNDLE = "all-minilm-l6-v2-int8-dynamic"
CONTEXTS = (512, 2048, 8192)
ENCODER_BATCHES = (1, 32)
GENERATED = 32

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> float:
    return os.getloadavg()[0]


# -- bundles ---------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def wrap_requantized(quant: str, out_dir: Path) -> Path:
    """A bundle around llama.cpp's requantization of the store's upstream Q4_1 SmolLM2 GGUF (fallback only)."""
    import ctypes

    import llama_cpp

    from edgekit.runtime.gguf_file import gguf_facts
    from edgekit.schema.manifest import FileEntry, Manifest, RuntimeConfig

    bundle = out_dir / f"{GGUF_BUNDLES[quant]}-requantized"
    if (bundle / "manifest.json").is_file():
        return bundle
    bundle.mkdir(parents=True, exist_ok=True)
    source = kit_paths().model_store / "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
    target = bundle / "model.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not requantize {source} to {quant}")
    facts = gguf_facts(target)
    manifest = Manifest(
        name=bundle.name, recipe_name="bench-fit", recipe_sha256="0" * 64, source_id=str(source), task="text-generation",
        format="gguf", quantization=quant, parameters=134_515_008,
        files=[FileEntry(path="model.gguf", bytes=target.stat().st_size, sha256=_sha256(target))],
        runtime=RuntimeConfig(max_length=facts.context_length, context_length=facts.context_length),
        gguf=facts, passed=True, created=datetime.now(timezone.utc), tools={"llama-cpp-python": llama_cpp.__version__},
    )
    (bundle / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    return bundle


def bundle_identities(gguf: dict[str, Path], onnx: Path | None) -> dict[str, str]:
    """Bundle name -> SHA-256 of its model file (from the manifest): which bundles a run measured."""
    identities = {}
    for bundle, suffix in [*((b, ".gguf") for b in gguf.values()), *([(onnx, ".onnx")] if onnx else [])]:
        identities[bundle.name] = read_manifest(bundle).file(suffix).sha256
    return identities


def find_bundles(export_missing: bool) -> tuple[dict[str, Path], Path | None, str]:
    bundles = kit_paths().bundles
    have = lambda name: (bundles / name / "manifest.json").is_file()  # noqa: E731
    if export_missing:
        for recipe, names in (("smollm2-135m-instruct.yaml", GGUF_BUNDLES.values()), ("all-minilm-l6-v2.yaml", [ONNX_BUNDLE])):
            missing = [n for n in names if not have(n)]
            if missing:
                targets = [arg for n in missing for arg in ("--target", n.split("-", 3)[-1] if "smollm2" in n else "int8-dynamic")]
                log(f"exporting {', '.join(missing)}")
                subprocess.run([sys.executable, "-m", "edgekit", "export", str(ROOT / "recipes" / recipe), *targets],
                               check=True, stdout=subprocess.DEVNULL)
    if all(have(n) for n in GGUF_BUNDLES.values()):
        gguf = {q: bundles / n for q, n in GGUF_BUNDLES.items()}
        origin = "exported bundles in $EDGEKIT_HOME/bundles"
    else:
        log("GGUF bundles not exported yet: wrapping llama.cpp requantizations of the upstream Q4_1 file")
        gguf = {q: wrap_requantized(q, kit_paths().home / "bench-fit") for q in GGUF_BUNDLES}
        origin = "upstream Q4_1 GGUF requantized by llama.cpp (bundles not exported yet)"
    onnx = bundles / ONNX_BUNDLE if have(ONNX_BUNDLE) else None
    return gguf, onnx, origin


# -- host profile ----------------------------------------------------------------------------------

SHORT_CTX, SHORT_PROMPT = 128, 56  # the calibration configuration: decode right after a short prompt
# The host's attention cost is calibrated on this configuration, 2,024 tokens into the context (the
# depth `edgekit profile-host` measures); its row is in-sample and left out of the target count.
DEEP_CALIBRATION = "Q8_0 2048"


def decode_points(gguf_q8: Path, threads: int, raw: dict, measured_on: str) -> list[CalibrationPoint]:
    """The host's decode calibration points: Q8_0 right after a short prompt, and deep into a context."""
    manifest = read_manifest(gguf_q8)
    points = []
    for name in ("Q8_0 short", DEEP_CALIBRATION):
        d = raw["decode"][name]
        depth = d["prompt_tokens"] + GENERATED // 2 if name == DEEP_CALIBRATION else 0
        points.append(gguf_point(manifest, decode_tok_s=d["decode_tok_s"], context_tokens=depth, threads=threads,
                                 measured_on=measured_on, source="scripts/bench_fit.py",
                                 note=f"process CPU time, median of {len(d['rounds'])} interleaved rounds; "
                                      f"wall clock {d['decode_tok_s_wall']:.1f} tok/s"))
    return points


def host_profile(gguf_q8: Path, onnx: Path | None, threads: int, raw: dict, recorded: Recorded | None = None) -> tuple[Device, dict]:
    """This host as a device profile, calibrated by the decode measurements of the Q8_0 bundle in ``raw``
    (short context and 2,024 tokens deep) and the batch-1 latency of the encoder bundle."""
    short, deep = raw["decode"]["Q8_0 short"], raw["decode"][DEEP_CALIBRATION]
    calibration = {"decode_tok_s": short["decode_tok_s"], "decode_tok_s_wall": short["decode_tok_s_wall"],
                   "deep_decode_tok_s": deep["decode_tok_s"], "deep_context_tokens": deep["prompt_tokens"] + GENERATED // 2}
    if recorded is not None:  # the recorded hardware and encoder point; decode points rebuilt from the recording
        device, recorded_calibration = recorded.host()
        encoder = [p for p in device.calibration if p.format == "onnx"]
        points = decode_points(gguf_q8, threads, raw, device.calibration[0].measured_on) + encoder
        calibration.update({k: v for k, v in recorded_calibration.items() if k in ("latency_ms", "seq_len")})
        return device.model_copy(update={"calibration": points}), calibration
    from edgekit.bench import host, measure

    log("profiling this host (CPU, RAM, STREAM-like bandwidth, storage)")
    cpu, memory = host.cpu_spec(), host.memory_spec()
    # One thread timed in CPU time, like the decode measurements: wall-clock copy rates of shared cores vary several-fold.
    bandwidth = host.bandwidth_spec(threads, cpu_clock=threads == 1)
    storage = host.storage_spec(gguf_q8)
    measured_on = host.host_label()
    points = decode_points(gguf_q8, threads, raw, measured_on)
    if onnx is not None:
        log(f"calibration: batch-1 latency of {ONNX_BUNDLE}")
        om = read_manifest(onnx)
        model = measure.load_encoder(onnx, threads)
        latency_ms = measure.encoder_latency_ms(model, om.task, repeats=200)
        seq_len = model.count_tokens([measure.PROFILE_TEXT])[0]
        points.append(encoder_point(om, latency_ms=latency_ms, seq_len=seq_len, threads=threads, measured_on=measured_on,
                                    source="scripts/bench_fit.py"))
        calibration.update(latency_ms=latency_ms, seq_len=seq_len)
    device = Device(id="this-host", name=f"This host ({host.cpu_model_name()})", cpu=cpu, memory=memory,
                    memory_bandwidth=bandwidth, storage=storage, calibration=points)
    return device, calibration


# -- measurements ----------------------------------------------------------------------------------

def run_child(*args: str) -> dict:
    """A measurement in a fresh process (python -m edgekit.bench.child)."""
    done = child.run(*args)
    if done.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed: {done.stderr[-2000:]}")
    return child.result(done)


def measure(gguf: dict[str, Path], onnx: Path | None, threads: int, rounds: int) -> dict:
    """Every measurement of the benchmark: peak RSS in a fresh process per configuration, decode
    speeds in one process, interleaved (the value of a configuration is its median over the rounds;
    the rounds are kept so the spread is visible)."""
    raw: dict = {"gguf": {}, "decode": {}, "onnx": {}}
    decode_configs = {}
    for quant, bundle in gguf.items():
        path = str(bundle / read_manifest(bundle).file(".gguf").path)
        decode_configs[f"{quant} short"] = (path, SHORT_CTX, SHORT_PROMPT)
        for n_ctx in CONTEXTS:
            log(f"peak RSS: GGUF {quant} ctx {n_ctx}")
            raw["gguf"][f"{quant} {n_ctx}"] = run_child("gguf-rss", path, str(n_ctx), str(threads), str(GENERATED),
                                                        str(serve_default("slots")))
            decode_configs[f"{quant} {n_ctx}"] = (path, n_ctx, n_ctx - GENERATED - 8)
    for batch in ENCODER_BATCHES if onnx is not None else ():
        log(f"peak RSS: ONNX batch {batch}")
        raw["onnx"][str(batch)] = run_child("encoder-rss", str(onnx), str(batch), str(threads))
    log(f"decode speed: {len(decode_configs)} configurations in one process, {rounds} interleaved rounds "
        f"(filling {sum(c[2] for c in decode_configs.values())} tokens of context first)")
    decoded = run_child("decode-interleaved", json.dumps(decode_configs), str(threads), str(GENERATED), str(rounds))
    for name, d in decoded.items():
        rates = d["rounds"]
        raw["decode"][name] = {"prompt_tokens": d["prompt_tokens"], "rounds": rates,
                               **{key: statistics.median(r[key] for r in rates) for key in rates[0]}}
    return raw


class Recorded:
    """The measurements of an earlier run (its fit.json), handed out as the live measurements would be."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text())
        self.raw = self.data.get("measurements") or {}
        if "decode" not in self.raw or any("slots" not in m for m in self.raw.get("gguf", {}).values()):
            sys.exit(f"{path} was written by an older version of this benchmark: run it without --reuse-measurements")

    def host(self) -> tuple[Device, dict]:
        return Device.model_validate(self.data["host"]), self.data["host_calibration"]


def spread(measured: dict) -> dict:
    """Lowest and highest decode rate over the rounds of one configuration."""
    rates = [r["decode_tok_s"] for r in measured["rounds"]]
    return {"measured_min": min(rates), "measured_max": max(rates)}


def rss_rows(gguf: dict[str, Path], onnx: Path | None, host: Device, catalog, threads: int,
             raw: dict) -> tuple[list[dict], list[dict]]:
    rss, decode = [], []
    for quant, bundle in gguf.items():
        manifest = read_manifest(bundle)
        facts = from_manifest(manifest)
        work = speed.workload_of(facts)
        calibration = speed.calibrate(host, "decode")
        for n_ctx in CONTEXTS:
            measured = raw["gguf"][f"{quant} {n_ctx}"]
            timed = raw["decode"][f"{quant} {n_ctx}"]
            report = fit(manifest, host, FitSettings(n_ctx=n_ctx, daemon=False, threads=threads), catalog)
            predicted = report.memory["total"]
            rss.append({"config": f"GGUF {quant} ctx {n_ctx}", "predicted_bytes": predicted, "measured_bytes": measured["peak_rss"],
                        "error": predicted / measured["peak_rss"] - 1, "terms": report.memory})
            n_past = timed["prompt_tokens"] + GENERATED // 2
            pred_decode = speed.roofline_decode_tok_s(work, host, threads, n_past=n_past, calibration=calibration)
            # No constant of the speed model is fitted on these rows (the form of the model, memory and
            # kernel time added, was chosen with the Q4_K_M short-context row of an earlier run in view).
            decode.append({"config": f"{quant} decode at {n_past} tokens of context", "quant": quant, "n_past": n_past,
                           "predicted": pred_decode, "measured": timed["decode_tok_s"], **spread(timed),
                           "error": pred_decode / timed["decode_tok_s"] - 1,
                           "in_sample": f"{quant} {n_ctx}" == DEEP_CALIBRATION})
    if onnx is not None:
        manifest = read_manifest(onnx)
        for batch in ENCODER_BATCHES:
            measured = raw["onnx"][str(batch)]
            report = fit(manifest, host, FitSettings(parallel=batch, daemon=False, threads=threads), catalog)
            predicted = report.memory["total"]
            rss.append({"config": f"ONNX int8 batch {batch} x {measured['tokens']} tokens", "predicted_bytes": predicted,
                        "measured_bytes": measured["peak_rss"], "error": predicted / measured["peak_rss"] - 1, "terms": report.memory})
    return rss, decode


def short_decode_rows(gguf: dict[str, Path], host: Device, threads: int, raw: dict) -> list[dict]:
    """Q4_K_M decode at short context, predicted from the Q8_0 calibration (Q8_0 itself is the calibration point)."""
    rows = []
    calibration = speed.calibrate(host, "decode")
    for quant, bundle in gguf.items():
        if quant == "Q8_0":
            continue
        facts = from_manifest(read_manifest(bundle))
        measured = raw["decode"][f"{quant} short"]["decode_tok_s"]
        extra = spread(raw["decode"][f"{quant} short"])
        predicted = speed.roofline_decode_tok_s(speed.workload_of(facts), host, threads, n_past=0, calibration=calibration)
        rows.append({"config": f"{quant} decode, short context", "quant": quant, "n_past": 0,
                     "predicted": predicted, "measured": measured, **extra,
                     "error": predicted / measured - 1, "in_sample": False})
    return rows


def published_rows(catalog) -> list[dict]:
    """Every published point predicted without itself (leave one out), and by the bare roofline."""
    devices = list(catalog.values())
    rows = []
    for device in devices:
        for point in device.calibration:
            for kind in speed.point_kinds(point):
                cal = speed.calibrate(device, kind, devices, exclude=point)
                measured = {"decode": point.decode_tok_s, "prompt": point.prompt_tok_s, "encoder": point.latency_ms}[kind]
                roofline = speed.point_prediction(point, device, kind)
                predicted = speed.point_prediction(point, device, kind, cal)
                rows.append({"device": device.id, "model": point.model, "quant": point.quant, "kind": kind,
                             "measured": measured, "predicted": predicted, "error": predicted / measured - 1,
                             "roofline": roofline, "roofline_error": roofline / measured - 1,
                             "calibrated_from": cal.scope, "points_used": len(cal.points), "source": point.source,
                             # a prompt point of an older llama.cpp ran other matrix kernels: shown, not counted
                             "counted": kind != "prompt" or speed.current_kernels(point, device)})
    return rows


HOST_PROMPT_POINT = PROFILE_PROMPT_TOKENS  # profile-host's prompt length
PROMPT_LENGTHS = tuple(sorted({16, 32, 64, 128, 256, 512, HOST_PROMPT_POINT}))


def prompt_lengths(model_path: str, threads: int, repeats: int = 5) -> dict:
    """Prompt tokens/s at each of PROMPT_LENGTHS in one batch (llama-bench's pp<N>) and decode tokens/s after an
    8-token prompt; medians of ``repeats`` in process CPU time (a shared machine steals wall-clock time)."""
    import llama_cpp

    from edgekit.bench.measure import synthetic_prompt

    llm = llama_cpp.Llama(model_path=model_path, n_ctx=1024, n_batch=max(PROMPT_LENGTHS), n_ubatch=max(PROMPT_LENGTHS),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = synthetic_prompt(llm.n_vocab(), max(PROMPT_LENGTHS) + 40)
    rates = {}
    for n in PROMPT_LENGTHS:
        samples = []
        for _ in range(repeats):
            llm.reset()
            start = time.process_time()
            llm.eval(prompt[:n])
            samples.append(n / (time.process_time() - start))
        rates[str(n)] = statistics.median(samples)
    decode = []
    for _ in range(3):
        llm.reset()
        llm.eval(prompt[:8])
        start = time.process_time()
        for token in prompt[8:40]:
            llm.eval([token])
        decode.append(32 / (time.process_time() - start))
    return {"threads": threads, "prompt_tok_s": rates, "decode_tok_s": statistics.median(decode)}


def measure_prompt_lengths(bundle: Path, threads: int) -> dict:
    """prompt_lengths in a fresh process (this script as its own child)."""
    path = str(bundle / read_manifest(bundle).file(".gguf").path)
    done = subprocess.run([sys.executable, __file__, "--child-prompt-lengths", path, str(threads)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"prompt-length child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompt_published_rows(catalog) -> list[dict]:
    """Every published prompt point: its build, the kernel data's prediction alone, and leave one out."""
    devices = list(catalog.values())
    rows = []
    for device in devices:
        for point in device.calibration:
            if point.prompt_tok_s is None:
                continue
            cal = speed.calibrate(device, "prompt", devices, exclude=point)
            kernels = speed.prompt_efficiency(device, speed._main_type(point.quant, point.hidden_size))
            uncalibrated = speed.point_prediction(point, device, "prompt")
            predicted = speed.point_prediction(point, device, "prompt", cal)
            rows.append({"device": device.id, "family": speed.kernel_family(device), "model": point.model,
                         "quant": point.quant, "prompt_tokens": point.prompt_tokens, "build": point.build,
                         "build_date": str(point.build_date), "current_kernels": speed.current_kernels(point, device),
                         "efficiency": kernels, "published": point.prompt_tok_s, "uncalibrated": uncalibrated,
                         "uncalibrated_error": uncalibrated / point.prompt_tok_s - 1, "predicted": predicted,
                         "error": predicted / point.prompt_tok_s - 1, "calibrated_from": cal.scope, "source": point.source})
    return rows


def recipe_prompt_row(catalog) -> dict:
    """fit --recipe's pp512 of Llama-3.2-1B Q4_K_M on the Pi 5 against the band its current published points imply
    (2 x parameters x pp512 operations per second, over the 1B model's own matrix work)."""
    from edgekit.schema.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "llama-3.2-1b-instruct.yaml").recipe
    facts = from_recipe(recipe, next(t for t in recipe.targets if t.quant == "Q4_K_M"))
    pi5 = catalog["rpi-5-8gb"]
    report = fit(facts, pi5, FitSettings(), catalog.values())
    points = [p for p in pi5.calibration if p.prompt_tok_s and speed.current_kernels(p, pi5)]
    band = sorted(2 * p.parameters * p.prompt_tok_s / (2 * facts.matrix_parameters) for p in points)
    return {"model": facts.name, "device": pi5.id, "predicted_pp512": report.prompt_tok_s, "band": [band[0], band[-1]],
            "ttft_s_128": report.ttft_s, "points": [f"{p.model} {p.quant} {p.prompt_tok_s}" for p in points]}


def host_prompt_rows(bundle: Path, host: Device, measured: dict) -> list[dict]:
    """This host's prompt tokens/s per prompt length vs the prediction for its profile: from the kernel data alone,
    and calibrated by its own HOST_PROMPT_POINT-token point (as profile-host writes it)."""
    manifest = read_manifest(bundle)
    work = speed.workload_of(from_manifest(manifest))
    threads, rates = measured["threads"], measured["prompt_tok_s"]
    point = gguf_point(manifest, decode_tok_s=measured["decode_tok_s"], prompt_tok_s=rates[str(HOST_PROMPT_POINT)],
                       prompt_tokens=HOST_PROMPT_POINT, threads=threads, measured_on="this host", source="scripts/bench_fit.py")
    calibrated_host = host.model_copy(update={"calibration": [point]})
    cal, cal_d = speed.calibrate(calibrated_host, "prompt", []), speed.calibrate(calibrated_host, "decode", [])
    rows = []
    for n in PROMPT_LENGTHS:
        uncalibrated = n / speed.prefill_seconds(work, host, threads, n, 512)
        predicted = n / speed.prefill_seconds(work, calibrated_host, threads, n, 512, cal, cal_d)
        rows.append({"prompt_tokens": n, "measured": rates[str(n)], "uncalibrated": uncalibrated,
                     "uncalibrated_error": uncalibrated / rates[str(n)] - 1, "predicted": predicted,
                     "error": predicted / rates[str(n)] - 1, "in_sample": n == HOST_PROMPT_POINT,
                     "family": speed.kernel_family(host), "calibration_factor": cal.factor})
    return rows


def print_prompt_tables(result: dict) -> None:
    print("\nPrompt speed, published points          build        kernels  published  kernel-data    error"
          "  leave-one-out    error")
    for r in result["prompt_published"]:
        label = f"{r['device']} {r['model'][:16]} {r['quant']} pp{r['prompt_tokens']}"
        kernels = "current" if r["current_kernels"] else "older"
        print(f"  {label:<40} {r['build_date']:<12} {kernels:<8} {r['published']:8.2f} {r['uncalibrated']:11.2f} "
              f"{r['uncalibrated_error']:+8.1%} {r['predicted']:12.2f} {r['error']:+8.1%}")
    rp = result.get("prompt_recipe")
    if rp:
        print(f"\n  fit --recipe {rp['model']} on {rp['device']}: pp512 {rp['predicted_pp512']:.1f} tok/s; its published "
              f"points imply {rp['band'][0]:.1f}-{rp['band'][1]:.1f}; TTFT of a 128-token prompt {rp['ttft_s_128']:.2f} s")
    if result.get("prompt_host"):
        factor = result["prompt_host"][0]["calibration_factor"]
        print(f"\nThis host, prompt tok/s in one batch ({result['prompt_host'][0]['family']} kernels; calibration factor "
              f"{factor:.2f} from its own pp{HOST_PROMPT_POINT})")
        print("  tokens   measured   kernel-data    error   calibrated    error")
        for r in result["prompt_host"]:
            mark = "in-sample" if r["in_sample"] else _mark(r["error"], 0.20)
            print(f"  {r['prompt_tokens']:6d} {r['measured']:10.1f} {r['uncalibrated']:13.1f} {r['uncalibrated_error']:+8.1%}"
                  f" {r['predicted']:12.1f} {r['error']:+8.1%}  {mark}")


def size_rows(gguf: dict[str, Path], onnx: Path | None) -> list[dict]:
    from edgekit.schema.recipe import Recipe, load_recipe

    rows = []
    smollm = load_recipe(ROOT / "recipes" / "smollm2-135m-instruct.yaml").recipe
    if smollm.architecture is None:  # the sample recipe carries no facts; use its config.json's
        data = smollm.model_dump(mode="json", exclude_none=True)
        data["architecture"] = {"source": "config.json of HuggingFaceTB/SmolLM2-135M-Instruct", "parameters": 134_515_008,
                                "n_layer": 30, "hidden_size": 576, "intermediate_size": 1536, "n_head": 9, "n_head_kv": 3,
                                "vocab_size": 49152, "context_length": 8192, "tie_word_embeddings": True}
        smollm = Recipe.model_validate(data)
    for quant, bundle in gguf.items():
        target = next(t for t in smollm.targets if getattr(t, "quant", None) == quant)
        predicted, measured = from_recipe(smollm, target).bundle_bytes, read_manifest(bundle).total_bytes
        rows.append({"bundle": bundle.name, "predicted_bytes": predicted, "measured_bytes": measured,
                     "error": predicted / measured - 1})
    if onnx is not None:
        minilm = load_recipe(ROOT / "recipes" / "all-minilm-l6-v2.yaml").recipe
        target = next(t for t in minilm.targets if t.name == "int8-dynamic")
        predicted, measured = from_recipe(minilm, target).bundle_bytes, read_manifest(onnx).total_bytes
        rows.append({"bundle": onnx.name, "predicted_bytes": predicted, "measured_bytes": measured, "error": predicted / measured - 1})
    return rows


# -- report ----------------------------------------------------------------------------------------

def _mark(error: float, limit: float) -> str:
    return "ok" if abs(error) <= limit else "MISS"


def print_tables(result: dict) -> None:
    print(f"\nhost: {result['host']['name']}, {result['host']['cpu']['cores']} cores, "
          f"{result['host']['memory_bandwidth']['gb_s']} GB/s copy; load average {result['load_average_start']:.1f} -> "
          f"{result['load_average_end']:.1f}; bundles: {result['bundles_origin']}")
    print("\nPeak RSS (fresh process, no daemon)          predicted    measured    error  (target +-10 %)")
    for r in result["rss"]:
        print(f"  {r['config']:<40} {r['predicted_bytes'] / 2**20:9.1f} MiB {r['measured_bytes'] / 2**20:8.1f} MiB "
              f"{r['error']:+7.1%}  {_mark(r['error'], 0.10)}")
    print(f"\nDecode tok/s after host calibration                       predicted    measured    error  (target +-20 %)"
          f"  rounds: min-max of {result.get('rounds', 1)}")
    for r in result["decode"]:
        span = f"{r['measured_min']:.1f}-{r['measured_max']:.1f}"
        mark = "in-sample" if r["in_sample"] else _mark(r["error"], 0.20)
        print(f"  {r['config']:<52} {r['predicted']:10.1f} {r['measured']:11.1f} {r['error']:+8.1%}  {mark:9}  {span}")
    print("\nPublished points, leave one out              measured   predicted    error  uncalibrated  from")
    for r in result["published"]:
        label = f"{r['device']} {r['model'][:18]} {r['quant']} {r['kind']}"
        print(f"  {label:<42} {r['measured']:8.2f} {r['predicted']:10.2f} {r['error']:+8.1%} {r['roofline_error']:+9.1%}"
              f"    {r['calibrated_from']}  {_mark(r['error'], 0.25) if r['counted'] else 'older kernels, not counted'}")
    print("\nBundle size predicted from recipe facts       predicted    measured    error")
    for r in result["sizes"]:
        print(f"  {r['bundle']:<40} {r['predicted_bytes'] / 1e6:9.2f} MB {r['measured_bytes'] / 1e6:8.2f} MB {r['error']:+8.3%}")
    s = result["summary"]
    print_prompt_tables(result)
    print(f"\nwithin target: RSS {s['rss_within']}/{s['rss_total']}, decode {s['decode_within']}/{s['decode_total']}, "
          f"published {s['published_within']}/{s['published_total']}")


def prompt_only(threads: int, out: Path) -> None:
    """Part 6 alone: no RSS or decode runs, this host profiled (no speed points) and the Q4_K_M bundle's prompt lengths."""
    from edgekit.bench import host as host_facts

    catalog = load_catalog()
    bundle = kit_paths().bundles / GGUF_BUNDLES["Q4_K_M"]
    if not (bundle / "manifest.json").is_file():
        sys.exit(f"{bundle}: no such bundle; export recipes/smollm2-135m-instruct.yaml first")
    load_start = load_average()
    cpu = host_facts.cpu_spec()
    host = Device(id="this-host", name=f"This host ({host_facts.cpu_model_name()})", cpu=cpu,
                  memory=host_facts.memory_spec(), memory_bandwidth=host_facts.bandwidth_spec(threads, cpu_clock=threads == 1),
                  storage=host_facts.storage_spec(bundle))
    log(f"prompt speed of {bundle.name} at {', '.join(map(str, PROMPT_LENGTHS))} tokens, {threads} thread(s)")
    measured = measure_prompt_lengths(bundle, threads)
    result = {"host": json.loads(host.model_dump_json()), "threads": threads, "load_average_start": load_start,
              "load_average_end": load_average(), "prompt_published": prompt_published_rows(catalog),
              "prompt_recipe": recipe_prompt_row(catalog), "prompt_host": host_prompt_rows(bundle, host, measured),
              "measurements": {"prompt_lengths": measured}, "created": datetime.now(timezone.utc).isoformat()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"host: {host.name}, {threads} thread(s), {host.memory_bandwidth.gb_s} GB/s copy; load average "
          f"{result['load_average_start']:.1f} -> {result['load_average_end']:.1f}")
    print_prompt_tables(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-missing", action="store_true", help="Export the sample bundles first if they are missing.")
    # One thread by default: this machine's cores are shared with other work, and llama.cpp's spinning
    # thread barriers make multi-threaded timings collapse under contention. Predictions use the same count.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds of the decode measurements; medians are compared.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "fit.json")
    parser.add_argument("--reuse-measurements", action="store_true",
                        help="Read the measured values from the existing --out file and recompute only the predictions.")
    parser.add_argument("--prompt-only", action="store_true",
                        help="Only the prompt-speed part (6): published points and this host's prompt lengths; writes "
                        "bench-results/fit-prompt.json.")
    parser.add_argument("--child-prompt-lengths", nargs=2, metavar=("GGUF", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_prompt_lengths:
        print(json.dumps(prompt_lengths(args.child_prompt_lengths[0], int(args.child_prompt_lengths[1]))))
        return
    if args.prompt_only:
        prompt_only(args.threads, args.out.with_name("fit-prompt.json"))
        return

    recorded = Recorded(args.out) if args.reuse_measurements else None
    load_start = load_average()
    catalog = load_catalog()
    gguf, onnx, origin = find_bundles(args.export_missing and recorded is None)
    bundles = bundle_identities(gguf, onnx)
    if recorded is not None:
        threads = recorded.data["threads"]
        if threads != args.threads:
            log(f"using the recorded run's {threads} thread(s)")
        args.threads = threads
        origin = recorded.data["bundles_origin"]
        if recorded.data.get("bundles", bundles) != bundles:  # runs before this check was added carry none
            sys.exit(f"{args.out} measured other bundles than $EDGEKIT_HOME/bundles holds now: "
                     "run without --reuse-measurements to measure these")
        if not recorded.raw["onnx"]:
            onnx = None
    raw = recorded.raw if recorded is not None else measure(gguf, onnx, args.threads, args.rounds)
    if recorded is None:
        raw["prompt_lengths"] = measure_prompt_lengths(gguf["Q4_K_M"], args.threads)
    host, calibration = host_profile(gguf["Q8_0"], onnx, args.threads, raw, recorded)
    everything = [*catalog.values(), host]
    rss, deep_decode = rss_rows(gguf, onnx, host, everything, args.threads, raw)
    decode = short_decode_rows(gguf, host, args.threads, raw) + deep_decode
    published = published_rows(catalog)
    sizes = size_rows(gguf, onnx)
    prompt_host = host_prompt_rows(gguf["Q4_K_M"], host, raw["prompt_lengths"]) if "prompt_lengths" in raw else []
    result = {
        "host": json.loads(host.model_dump_json()), "host_calibration": calibration, "threads": args.threads,
        "bundles_origin": origin, "bundles": bundles, "rounds": recorded.data.get("rounds", 1) if recorded is not None else args.rounds,
        "load_average_start": load_start, "load_average_end": load_average(),
        "rss": rss, "decode": decode, "published": published, "sizes": sizes, "measurements": raw,
        "prompt_published": prompt_published_rows(catalog), "prompt_recipe": recipe_prompt_row(catalog),
        "prompt_host": prompt_host,
        "summary": {
            "rss_within": sum(abs(r["error"]) <= 0.10 for r in rss), "rss_total": len(rss),
            "decode_within": sum(abs(r["error"]) <= 0.20 for r in decode if not r["in_sample"]),
            "decode_total": sum(not r["in_sample"] for r in decode),
            "published_within": sum(abs(r["error"]) <= 0.25 for r in published if r["counted"]),
            "published_total": sum(r["counted"] for r in published),
            "rss_abs_error_median": statistics.median(abs(r["error"]) for r in rss) if rss else None,
        },
        "created": datetime.now(timezone.utc).isoformat(),
    }
    if recorded is not None:
        result["load_average_start"] = recorded.data["load_average_start"]
        result["load_average_end"] = recorded.data["load_average_end"]
        result["created"] = recorded.data["created"]  # when the measurements were taken
        result["predictions_recomputed"] = datetime.now(timezone.utc).isoformat()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
