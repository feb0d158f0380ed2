"""`edgekit doctor`: can this board run its runtime and its bundles, and do the bundles still give their export's answers?

In order, stopping at the first step that cannot go on:

1. this CPU's features against what the installed runtime build needs (the pack manifest's target),
   before anything native is loaded;
2. llama_cpp and onnxruntime imported in subprocesses: a build for instructions this CPU lacks dies
   with SIGILL there, and doctor reports it instead of dying;
3. every bundle's golden checks, each bundle in its own subprocess;
4. decode / prompt speed (GGUF) and batch-1 latency (ONNX) measured with `edgekit bench`'s code,
   next to `edgekit fit`'s prediction for this board.

Exit codes: 0 all passed, 1 a golden check failed (or a bundle did not verify), 3 this CPU or runtime
cannot run the bundles.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgekit.cli import JsonFlag, app, emit_json, err, out
from edgekit.errors import BackendError, ConfigError, GateFailed
from edgekit.formats import FORMATS
from edgekit.runtime import cpu, probe

PACK_MANIFEST = "pack.json"
PACK_SEARCH_LEVELS = 3  # sys.prefix is the venv inside the release folder: look up to this many parents
PROBE_TIMEOUT_S = 600  # imports under qemu emulation take minutes
CHECK_TIMEOUT_S = 1800
# Python module -> the bundle format it runs.
RUNTIME_MODULES: dict[str, str] = dict(sorted((spec.runtime_module, name) for name, spec in FORMATS.items()))
# Speeds fit predicts that doctor sets beside the measured ones.
FIT_PREDICTS = ("decode_tok_s", "prompt_tok_s", "batch1_p50_ms")
# Features newer cores have that runtime builds use, by machine: what a SIGILL most likely means this CPU lacks.
LIKELY_FEATURES: dict[str, tuple[str, ...]] = {
    "aarch64": ("asimddp", "fphp", "asimdhp", "i8mm", "bf16", "sve"),
    "x86_64": ("avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512_vnni"),
}
# Measuring settings: few, short runs; doctor reports the order of magnitude next to the prediction.
BENCH_RUNS = 3
BENCH_DECODE_TOKENS = 32
BENCH_CTX = 512


@dataclass(frozen=True)
class Pack:
    """What doctor reads from an installed pack's pack.json (written by `edgekit pack`, copied into the release)."""

    path: Path
    device: Any  # edgekit.schema.device.Device: the board's profile the pack was made for
    target_name: str
    machine: str
    required_features: tuple[str, ...]
    bundles: Path | None


@dataclass
class RuntimeProbe:
    module: str
    ok: bool
    returncode: int | None
    detail: str


@dataclass
class BundleResult:
    path: str
    name: str
    format: str | None = None
    golden: dict | None = None
    error: str | None = None
    exit_code: int = 0
    measured: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)


def find_pack(prefix: Path | None = None) -> Path | None:
    """pack.json in ``prefix`` (default sys.prefix) or one of its parents, up to PACK_SEARCH_LEVELS up."""
    folder = Path(prefix or sys.prefix).resolve()
    for candidate in [folder, *folder.parents][: PACK_SEARCH_LEVELS + 1]:
        if (candidate / PACK_MANIFEST).is_file():
            return candidate / PACK_MANIFEST
    return None


def read_pack(path: Path) -> Pack:
    """The parts of pack.json doctor uses: device (the profile), target.name/.machine/.cpu_features; bundles/ beside it."""
    from pydantic import ValidationError

    from edgekit.schema.device import Device
    from edgekit.schema.loading import describe_validation_error

    path = Path(path)
    if path.is_dir():
        path = path / PACK_MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        target = data["target"]
        device = Device.model_validate(data["device"])
        pack = Pack(path=path, device=device, target_name=target["name"], machine=target["machine"],
                    required_features=tuple(target["cpu_features"]), bundles=path.parent / "bundles")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable pack manifest ({type(exc).__name__}: {exc})") from exc
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from exc
    return pack if pack.bundles.is_dir() else replace(pack, bundles=None)


def likely_missing(features: frozenset[str], machine: str) -> list[str]:
    return [f for f in LIKELY_FEATURES.get(machine, ()) if f not in features]


def describe_exit(module: str, returncode: int, found: cpu.CpuFeatures, pack: Pack | None) -> str:
    """What a probe's or a check's non-zero exit means, in one line."""
    if returncode == -signal.SIGILL:
        if pack and pack.required_features:
            lacks = (f"although this CPU has every feature its pack lists ({', '.join(pack.required_features)}); "
                     "the pack's target is wrong for this board")
        else:
            candidates = likely_missing(found.features, found.machine)
            lacks = ("features builds for newer cores use that this CPU lacks: " + ", ".join(cpu.describe(f) for f in candidates)
                     if candidates else "the build needs more than this CPU has")
        return f"{module} died with SIGILL (illegal instruction): it was built for instructions this CPU does not have; {lacks}"
    if returncode < 0:
        return f"{module} was killed by signal {signal.Signals(-returncode).name}"
    return f"{module} exited with status {returncode}"


def probe_command(module: str) -> list[str]:
    """The subprocess that starts the engine ``module`` of a registered format (edgekit.runtime.probe)."""
    return [sys.executable, "-m", "edgekit.runtime.probe", FORMATS[RUNTIME_MODULES[module]].runtime_probe]


def run_probe(module: str, command: list[str], found: cpu.CpuFeatures, pack: Pack | None) -> RuntimeProbe:
    """Start a runtime in a subprocess; a crash there is reported, never shared."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return RuntimeProbe(module, False, None, f"importing {module} did not finish in {PROBE_TIMEOUT_S} s")
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode == 0:
        return RuntimeProbe(module, True, 0, last)
    if done.returncode == probe.NOT_INSTALLED:
        return RuntimeProbe(module, False, done.returncode, f"{module} is not installed or does not import: {last}")
    return RuntimeProbe(module, False, done.returncode, describe_exit(module, done.returncode, found, pack))


def bundle_dirs(refs: list[Path]) -> list[Path]:
    """Each ref is a bundle (holds manifest.json) or a folder of bundles (rejected and staging folders skipped)."""
    from edgekit.bundle import MANIFEST_NAME, REJECTED_SUFFIX, STAGING_PREFIX

    found = []
    for ref in refs:
        if (ref / MANIFEST_NAME).is_file():
            found.append(ref)
        elif ref.is_dir():
            found += [p for p in sorted(ref.iterdir()) if (p / MANIFEST_NAME).is_file()
                      and not p.name.startswith(STAGING_PREFIX) and not p.name.endswith(REJECTED_SUFFIX)]
        else:
            raise ConfigError(f"{ref}: no such bundle or folder of bundles")
    return found


def check_in_subprocess(bundle: Path, found: cpu.CpuFeatures, pack: Pack | None) -> BundleResult:
    """Golden checks of one bundle in ``python -m edgekit.runtime.golden``; a native crash is a result, not a crash."""
    result = BundleResult(path=str(bundle), name=bundle.name)
    try:
        done = subprocess.run([sys.executable, "-m", "edgekit.runtime.golden", str(bundle)], capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        result.error, result.exit_code = f"golden checks did not finish in {CHECK_TIMEOUT_S} s", 3
        return result
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    payload = json.loads(line) if line.startswith("{") else {}
    if "report" in payload:
        result.golden = payload["report"]
        result.exit_code = 0 if result.golden["passed"] else 1
    elif "error" in payload:
        result.error, result.exit_code = payload["error"], payload["exit_code"]
    else:
        result.error = describe_exit("the golden check", done.returncode, found, pack)
        result.error += f": {done.stderr.strip().splitlines()[-1]}" if done.returncode > 0 and done.stderr.strip() else ""
        result.exit_code = 3
    return result


def measure(bundle: Path, result: BundleResult, device, catalog, runs: int) -> None:
    """Speed of the bundle here (bench's child process) and, with a device, fit's prediction for the same input."""
    from edgekit.bench.measure import DEFAULT_PROMPT
    from edgekit.bench.run import BenchConfig, bench_bundle
    from edgekit.runtime.placement import plan_threads

    threads = plan_threads(None, device.cpu.cores if device else None).threads  # what the daemon would run with
    config = BenchConfig(threads=threads, ctx=BENCH_CTX, runs=runs, decode_tokens=BENCH_DECODE_TOKENS, prompt=DEFAULT_PROMPT)
    bench = bench_bundle(bundle, config)
    result.format = bench.format
    keys = [k for k in FORMATS[bench.format].speed_metrics if k in FIT_PREDICTS]
    result.measured = {k: round(bench.summary[k]["median"], 3) for k in keys}
    if device is None:
        return
    from edgekit.bundle import read_manifest
    from edgekit.fit import FitSettings, fit

    prompt_tokens = int(bench.runs[0].get("prompt_tokens", 0)) if bench.runs else 0
    settings = FitSettings(n_ctx=BENCH_CTX, threads=config.threads, daemon=False,
                           encoder_seq_len=bench.seq_len or FitSettings().encoder_seq_len,
                           prompt_tokens=prompt_tokens or FitSettings().prompt_tokens)
    report = fit(read_manifest(bundle), device, settings, catalog=catalog)
    # As bench measures them: decode right after a short prompt, and prompt speed over bench's own prompt length.
    predicted = {"decode_tok_s": report.decode_tok_s_short, "prompt_tok_s": report.prompt_tok_s_chat,
                 "batch1_p50_ms": report.latency_ms}
    result.predicted = {k: round(v, 3) for k, v in predicted.items() if k in keys and v is not None}


def _speed(result: BundleResult, key: str) -> str:
    """'37.1 / fit 62.9 (0.59x)': measured here, fit's prediction for the device, their ratio."""
    if key not in result.measured:
        return ""
    text = f"{result.measured[key]:.4g}"
    if result.predicted.get(key):
        text += f" / fit {result.predicted[key]:.4g} ({result.measured[key] / result.predicted[key]:.2f}x)"
    return text


def _golden_cell(result: BundleResult) -> tuple[str, str]:
    if result.error:
        return "[red]ERROR[/red]", escape(result.error)
    golden = result.golden or {}
    if not golden.get("recorded"):
        return "[yellow]not recorded[/yellow]", "the manifest has no golden record (exported before golden checks)"
    details = "\n".join(f"{c['name']}: {escape(c['detail'])}" for c in golden["checks"])
    return ("[green]pass[/green]" if golden["passed"] else "[red]FAIL[/red]"), details


def _print(summary: dict[str, Any], results: list[BundleResult]) -> None:
    c = summary["cpu"]
    out.print(f"CPU: {c['machine']}, features from {c['source']}: {' '.join(c['features']) or 'none of note'}"
              + (f"; pack target {c['target']} needs {', '.join(c['required']) or 'nothing'}" if c["target"] or c["required"] else "")
              + (f" — [red]missing {', '.join(c['missing'])}[/red]" if c["missing"] else ""))
    if summary["runtimes"]:
        runtimes = Table("runtime", "status", "detail", title="runtimes (imported in subprocesses)")
        for probe in summary["runtimes"]:
            runtimes.add_row(probe["module"], "[green]ok[/green]" if probe["ok"] else "[red]FAIL[/red]", escape(probe["detail"]))
        out.print(runtimes)
    if results:
        where = summary["device"] or "no device profile: pass --device for fit's prediction"
        table = Table(title=f"bundles on this host (prediction: {where})")
        table.add_column("bundle", overflow="fold")
        for name in ("golden", "checks", "decode tok/s", "prompt tok/s", "batch-1 ms"):
            table.add_column(name)
        for r in results:
            verdict, details = _golden_cell(r)
            speeds = (_speed(r, "decode_tok_s"), _speed(r, "prompt_tok_s"), _speed(r, "batch1_p50_ms"))
            table.add_row(r.name, verdict, details, *speeds)
        out.print(table)
    for note in summary["notes"]:
        out.print(f"note: {note}")


def _finish(summary: dict[str, Any], results: list[BundleResult], as_json: bool, code: int, message: str) -> None:
    summary["bundles"] = [asdict(r) for r in results]
    summary["exit_code"] = code
    if as_json:
        emit_json(summary)
    else:
        _print(summary, results)
    if code == 3:
        raise BackendError(message)
    if code == 1:
        raise GateFailed(message)


@app.command("doctor")
def doctor_cmd(
    bundles: Annotated[list[Path], typer.Argument(help="Bundles or folders of bundles (default: the installed pack's "
                                                       "bundles, else $EDGEKIT_HOME/bundles).")] = None,
    device: Annotated[str, typer.Option("--device", "-d", help="Device id or profile file for fit's prediction "
                                                               "(default: the installed pack's device).")] = None,
    pack: Annotated[Path, typer.Option("--pack", help="The installed pack's pack.json or its folder "
                                                      "(default: found next to this Python's prefix).")] = None,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure speed next to fit's prediction.")] = True,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Speed measurements per bundle, each in a fresh process "
                                                            "(the median is shown).")] = BENCH_RUNS,
    as_json: JsonFlag = False,
) -> None:
    """Check that this board can run its runtime and that every bundle reproduces its export's golden outputs.

    Exit 0 all passed, 1 a golden check failed, 3 this CPU or runtime cannot run the bundles.
    """
    from edgekit.paths import kit_paths

    found = cpu.detect()
    pack_file = pack or find_pack()
    installed = read_pack(pack_file) if pack_file else None
    required = list(installed.required_features) if installed else []
    absent = cpu.missing(required, found.features)
    notable = sorted(f for f in found.features if f in cpu.FEATURE_DESCRIPTIONS)
    summary: dict[str, Any] = {
        "cpu": {"machine": found.machine, "source": found.source, "features": notable, "required": required, "missing": absent,
                "target": installed.target_name if installed else None},
        "pack": str(installed.path) if installed else None, "device": None, "runtimes": [], "notes": []}
    if installed and installed.machine != found.machine:
        _finish(summary, [], as_json, 3, f"this machine is {found.machine}; the installed pack ({installed.device.id}, "
                                         f"{installed.target_name}) is for {installed.machine} boards; nothing was loaded")
        return
    if absent:
        for feature in absent:  # one line per feature, never wrapped
            err.print(cpu.missing_message(feature, f"{installed.device.id} ({installed.target_name})", found.source),
                      highlight=False, soft_wrap=True)
        _finish(summary, [], as_json, 3, f"this CPU cannot run the installed runtime; nothing was loaded ({len(absent)} "
                                         f"missing feature(s): {', '.join(absent)})")
        return

    with err.status("importing the runtimes in subprocesses"):
        probes = {m: run_probe(m, probe_command(m), found, installed) for m in RUNTIME_MODULES}
    summary["runtimes"] = [asdict(p) for p in probes.values()]
    crashed = [p for p in probes.values() if not p.ok and p.returncode is not None and p.returncode < 0]
    if crashed:
        _finish(summary, [], as_json, 3, "; ".join(p.detail for p in crashed))
        return

    refs = list(bundles or []) or [installed.bundles if installed and installed.bundles else kit_paths().bundles]
    dirs = bundle_dirs(refs if bundles else [r for r in refs if r.is_dir()])
    if not dirs:
        summary["notes"].append(f"no bundles in {', '.join(map(str, refs))}")
    device_profile, catalog = _device(device, installed, summary)
    results = []
    for index, bundle in enumerate(dirs, 1):
        fmt = _format_of(bundle)
        runtime = next((p for p in probes.values() if RUNTIME_MODULES[p.module] == fmt), None)
        if runtime is not None and not runtime.ok:
            results.append(BundleResult(path=str(bundle), name=bundle.name, format=fmt, error=runtime.detail, exit_code=3))
            continue
        with err.status(f"[{index}/{len(dirs)}] golden checks of {bundle.name}"):
            result = check_in_subprocess(bundle, found, installed)
        result.format = fmt
        if result.exit_code == 0 and speed:
            with err.status(f"[{index}/{len(dirs)}] measuring {bundle.name}"):
                measure(bundle, result, device_profile, catalog, runs)
        results.append(result)
    code = 3 if any(r.exit_code == 3 for r in results) else 1 if any(r.exit_code for r in results) else 0
    failed = [r for r in results if r.exit_code]
    first = failed[0] if failed else None
    message = ""
    if first is not None:
        message = first.error or (first.golden or {}).get("reason", "")
        if len(failed) > 1:
            message += f" (and {len(failed) - 1} more bundle(s) failed)"
    _finish(summary, results, as_json, code, message)


def _format_of(bundle: Path) -> str | None:
    from edgekit.bundle import read_manifest
    from edgekit.errors import BundleError

    try:
        return read_manifest(bundle).format
    except BundleError:
        return None


def _device(ref: str | None, installed: Pack | None, summary: dict[str, Any]):
    """The device profile fit predicts for (--device, else the pack's), and the catalog for its calibration."""
    from edgekit.errors import DeviceError
    from edgekit.schema.device import load_catalog, load_device

    if ref is None and installed is None:
        summary["notes"].append("no --device and no installed pack: speeds are shown without fit's prediction")
        return None, []
    try:
        catalog = list(load_catalog().values())
    except DeviceError:
        catalog = []
    device = load_device(ref) if ref is not None else installed.device
    summary["device"] = device.id
    return device, catalog
