"""Workstation side: turn a recipe into verified bundles.

``export(loaded_recipe, out_dir)`` resolves the source once, then hands each target to the
module registered for its ``format`` in ``FORMATS``. A format module exposes
``build(job: ExportJob) -> BuildResult``; it writes its files into ``job.staging`` and
measures itself against the original model. This module turns that into a manifest,
checks the gates and publishes the bundle atomically.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edgekit.bundle import file_entries, publish, remove_stale_staging, staging_dir
from edgekit.errors import RecipeError
from edgekit.export.sources import ResolvedSource, resolve_source
from edgekit.schema.manifest import GateResult, GgufFacts, Manifest, OnnxFacts, RuntimeConfig
from edgekit.schema.recipe import Gates, GgufTarget, LoadedRecipe, OnnxTarget

# Registry: recipe `format:` value -> module exposing build(job) -> BuildResult.
# Modules are imported only when a target of that format is exported (they pull in torch).
FORMATS: dict[str, str] = {
    "onnx": "edgekit.export.onnx",
    "gguf": "edgekit.export.gguf",
}

# Gate name -> (metric it reads, True when the metric must stay at or above the threshold).
GATE_METRICS: dict[str, tuple[str, bool]] = {
    "min_cosine_mean": ("cosine_mean", True),
    "min_cosine_each": ("cosine_min", True),
    "min_top1_agreement": ("top1_agreement", True),
    "max_accuracy_drop": ("accuracy_drop", False),
    "max_kld": ("kld_mean", False),
    "max_ppl_increase": ("ppl_increase", False),
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportJob:
    """Everything a format module needs to build one target."""

    loaded: LoadedRecipe
    target: OnnxTarget | GgufTarget
    source: ResolvedSource
    staging: Path
    scratch: Path  # shared by the targets of one export: intermediate files reused across targets
    memo: dict = field(default_factory=dict)  # shared by the targets of one export: e.g. the loaded reference model
    progress: Progress = field(default=lambda message: None)

    @property
    def recipe(self):
        return self.loaded.recipe


@dataclass(frozen=True)
class BuildResult:
    """What a format module reports about the files it wrote."""

    quantization: str
    parameters: int
    runtime: RuntimeConfig
    metrics: dict[str, float]
    tools: dict[str, str]
    onnx: OnnxFacts | None = None
    gguf: GgufFacts | None = None


def evaluate_gates(gates: Gates, metrics: dict[str, float]) -> list[GateResult]:
    """Compare measured metrics with the recipe's thresholds; a gate whose metric was not measured is a recipe error."""
    results = []
    for gate, threshold in gates.model_dump(exclude_none=True).items():
        metric, at_least = GATE_METRICS[gate]
        if metric not in metrics:
            raise RecipeError(
                f"gate '{gate}' needs metric '{metric}', which this task/format does not measure "
                f"(measured: {', '.join(sorted(metrics)) or 'none'})",
                hint=f"remove validation.gates.{gate} or add the data it needs (e.g. validation.labelled_file)",
            )
        measured = metrics[metric]
        passed = measured >= threshold if at_least else measured <= threshold
        results.append(GateResult(gate=gate, threshold=threshold, measured=measured, passed=passed))
    return results


@contextmanager
def quiet_backend_logs() -> Iterator[None]:
    """Backends log per-node chatter (INFO/WARNING on the root and their own loggers); keep stderr for progress."""
    import onnxruntime

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    onnxruntime.set_default_logger_severity(3)  # errors only from ORT's C++ graph cleanup notices
    loggers = [logging.getLogger(name) for name in ("", "onnxruntime", "onnxruntime.quantization.matmul_nbits_quantizer", "optimum")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch.onnx tracer and deprecation warnings say nothing the user can act on.
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def build_module(fmt: str):
    """Import the format module registered for ``fmt``."""
    return importlib.import_module(FORMATS[fmt])


def export(
    loaded: LoadedRecipe,
    out_dir: Path,
    *,
    targets: list[str] | None = None,
    progress: Progress = lambda message: None,
) -> list[tuple[Manifest, Path]]:
    """Export every (or the named) target of a recipe; returns each manifest with where it was published.

    Bundles whose gates fail are published as ``<name>.rejected``; the caller decides the exit code.
    """
    recipe = loaded.recipe
    chosen = [t for t in recipe.targets if targets is None or t.name in targets]
    unknown = set(targets or ()) - {t.name for t in recipe.targets}
    if unknown:
        raise RecipeError(
            f"{loaded.path}: no target named {', '.join(sorted(unknown))}",
            hint=f"targets are: {', '.join(t.name for t in recipe.targets)}",
        )
    out_dir = Path(out_dir)
    remove_stale_staging(out_dir)
    source = resolve_source(loaded)
    published = []
    memo: dict = {}
    with staging_dir(out_dir, "scratch") as scratch:
        for target in chosen:
            published.append(_export_target(loaded, target, source, out_dir, scratch, memo, progress))
    return published


def _export_target(
    loaded: LoadedRecipe, target, source: ResolvedSource, out_dir: Path, scratch: Path, memo: dict, progress: Progress
) -> tuple[Manifest, Path]:
    """Build one target in a staging directory, gate it, record its golden checks, and publish it under its final name."""
    from edgekit.export.golden import record_golden

    recipe = loaded.recipe
    name = recipe.bundle_name(target)
    progress(f"{name}: building {target.format} target")
    with staging_dir(out_dir, name) as staged:
        job = ExportJob(loaded=loaded, target=target, source=source, staging=staged, scratch=scratch, memo=memo, progress=progress)
        with quiet_backend_logs():
            result: BuildResult = build_module(target.format).build(job)
        gates = evaluate_gates(recipe.gates_for(target), result.metrics)
        progress(f"{name}: recording golden checks with the board-side runtime")
        golden = record_golden(loaded, target.format, recipe.task, result.runtime, staged)
        manifest = Manifest(
            name=name,
            recipe_name=recipe.name,
            recipe_sha256=loaded.sha256,
            source_id=source.label,
            source_revision=source.revision,
            task=recipe.task,
            format=target.format,
            quantization=result.quantization,
            parameters=result.parameters,
            files=file_entries(staged),
            runtime=result.runtime,
            onnx=result.onnx,
            gguf=result.gguf,
            metrics=result.metrics,
            gates=gates,
            passed=all(g.passed for g in gates),
            tools=result.tools,
            created=datetime.now(timezone.utc).replace(microsecond=0),
            golden=golden,
        )
        final = publish(staged, manifest, out_dir)
    return manifest, final
