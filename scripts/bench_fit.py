"""Truth for `edgekit fit`: its predictions side by side with measurements on this machine.

0. Measures first. Peak RSS: each configuration in a fresh process. Decode speed: every decode
   configuration in one process, interleaved token by token over --rounds rounds (default 5), so a
   burst of load from another tenant of this shared machine, or a slow stretch of the host, hits all
   of them alike (timed in separate processes, one configuration differed by up to 40 % between runs).
1. Profiles this host (`edgekit profile-host` functions) and calibrates it with the same kinds of
   points profile-host writes: decode speed of the SmolLM2-135M Q8_0 bundle at short context and
   2,024 tokens into a context (its attention cost; taken from the interleaved run, in CPU time, one
   thread) and batch-1 latency of the MiniLM int8 bundle.
2. Peak RSS of a fresh subprocess that loads a bundle with the runtime's settings and fills the
   context (prompt of n_ctx - 40 tokens, then 32 generated tokens) for GGUF Q8_0 / Q4_K_M x
   n_ctx 512 / 2048 / 8192, and that classifies batches of 1 and 32 max-length inputs with the ONNX
   encoder; vs `fit`'s prediction for this host (bare runtime, no daemon). Target: within +-10 %.
3. Decode tokens/s predicted after host calibration vs measured (Q4_K_M short context, both quants
   at the end of full contexts). Target: within +-20 %. The two Q8_0 calibration measurements are
   taken in the same interleaved run; the 2,024-token one is printed as in-sample and not counted.
4. Each published calibration point of the catalog predicted from the other points (leave one out:
   the board's own other points, else boards with the same core, else the whole catalog). Target +-25 %.
5. Recipe-time size predictions vs the bundles' measured sizes.

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
from edgekit.bundle import read_manifest  # noqa: E402
from edgekit.fit import FitSettings, fit, from_manifest, from_recipe  # noqa: E402
from edgekit.fit import speed  # noqa: E402
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
            raw["gguf"][f"{quant} {n_ctx}"] = run_child("gguf-rss", path, str(n_ctx), str(threads), str(GENERATED))
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
        if "decode" not in self.raw:
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
                             "calibrated_from": cal.scope, "points_used": len(cal.points), "source": point.source})
    return rows


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
    print("\nPeak RSS (fresh process, bare runtime)       predicted    measured    error  (target +-10 %)")
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
              f"    {r['calibrated_from']}  {_mark(r['error'], 0.25)}")
    print("\nBundle size predicted from recipe facts       predicted    measured    error")
    for r in result["sizes"]:
        print(f"  {r['bundle']:<40} {r['predicted_bytes'] / 1e6:9.2f} MB {r['measured_bytes'] / 1e6:8.2f} MB {r['error']:+8.3%}")
    s = result["summary"]
    print(f"\nwithin target: RSS {s['rss_within']}/{s['rss_total']}, decode {s['decode_within']}/{s['decode_total']}, "
          f"published {s['published_within']}/{s['published_total']}")


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
    args = parser.parse_args()

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
    host, calibration = host_profile(gguf["Q8_0"], onnx, args.threads, raw, recorded)
    everything = [*catalog.values(), host]
    rss, deep_decode = rss_rows(gguf, onnx, host, everything, args.threads, raw)
    decode = short_decode_rows(gguf, host, args.threads, raw) + deep_decode
    published = published_rows(catalog)
    sizes = size_rows(gguf, onnx)
    result = {
        "host": json.loads(host.model_dump_json()), "host_calibration": calibration, "threads": args.threads,
        "bundles_origin": origin, "bundles": bundles, "rounds": recorded.data.get("rounds", 1) if recorded is not None else args.rounds,
        "load_average_start": load_start, "load_average_end": load_average(),
        "rss": rss, "decode": decode, "published": published, "sizes": sizes, "measurements": raw,
        "summary": {
            "rss_within": sum(abs(r["error"]) <= 0.10 for r in rss), "rss_total": len(rss),
            "decode_within": sum(abs(r["error"]) <= 0.20 for r in decode if not r["in_sample"]),
            "decode_total": sum(not r["in_sample"] for r in decode),
            "published_within": sum(abs(r["error"]) <= 0.25 for r in published), "published_total": len(published),
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
