"""The shape of a format's registry entry; see edgekit.formats."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from edgekit.formats.tasks import tasks_of


def load(dotted: str) -> Any:
    """Import ``package.module:attribute`` (or a whole module when there is no ``:``)."""
    module, _, attribute = dotted.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


@dataclass(frozen=True)
class FormatSpec:
    """What edgekit knows about one bundle format; hooks are dotted paths, imported on first use."""

    name: str  # registry key: recipe target `format:`, manifest `format`
    model_suffix: str  # the bundle's one model file ends with this
    target: str  # recipe target model (edgekit.schema.recipe)
    facts: str  # manifest facts model (edgekit.schema.manifest), stored under manifest.<name>
    build: str  # module exposing build(job) -> BuildResult (workstation: imports torch)
    runtime_check: str  # (bundle_dir, manifest) -> None, before the backend opens the file
    runner: str  # worker runner class (edgekit.serve.runners)
    facts_from_manifest: str  # fit: (manifest) -> ModelFacts
    facts_from_recipe: str  # fit: (recipe, target, architecture facts) -> ModelFacts
    matrix_parameters: str  # fit: (facts) -> weights multiplied per token
    fit_n_ctx: str  # fit: (facts, settings) -> the context the fit is made at
    memory: str  # fit: (facts, run settings, isa) -> (weights, repacked, kv, prompt_cache, compute, reserved, runtime) bytes
    workload: str  # fit: (facts) -> Workload
    point_workload: str  # fit: (CalibrationPoint) -> Workload
    speed: str  # fit: (facts, work, device, settings, n_ctx, catalog) -> SpeedPrediction
    load_model: str  # board: (bundle_dir, manifest, model_path, threads, n_ctx) -> the runtime model, as the daemon loads it
    golden_record: str  # export: (staged, runtime, task, samples) -> the bundle's golden record
    runtime_module: str  # the engine's Python module, as doctor names it
    runtime_probe: str  # () -> engine version: imports and starts the engine (doctor runs it in a subprocess)
    worker_bytes: str  # serve: (facts, n_ctx, n_ubatch, slots, batch_max, batch_max_tokens, job_texts=, prompt_cache_contexts=) -> peak RSS of a worker
    plan_candidates: str  # plan: (recipe) -> [(target, in_recipe)], best quality first
    bench: str  # `edgekit bench` in a child process: (bundle, manifest, config) -> dict
    calibration_point: str  # `edgekit bench --calibrate`: (manifest, BenchResult, common fields) -> CalibrationPoint
    profile_points: str  # `edgekit profile-host`: (folder, manifest, depth, common fields) -> [CalibrationPoint]
    build_tools: tuple[str, ...]  # distributions whose versions the manifest records (``tools``)
    engine: tuple[str, str]  # (engine label, distribution whose version is reported)
    speed_metrics: tuple[str, ...]  # bench metrics summarized; the first is the headline speed
    quality_metric: tuple[str, str]  # manifest metric shown next to speed: (metric, label)

    @property
    def tasks(self) -> tuple[str, ...]:
        """Tasks a bundle of this format serves (from the task table)."""
        return tasks_of(self.name)

    def hook(self, name: str) -> Any:
        """The object a dotted-path field names, imported now."""
        return load(getattr(self, name))
