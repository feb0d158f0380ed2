"""One memory truth: what `edgekit fit` and `plan` accept for a board is what `edgekit serve --device` admits there.

The admission decision is the daemon's own (``Lifecycle._make_room``: 507 when a model's footprint
exceeds the budget), computed without starting a daemon or a worker. Bundles: the golden manifests of
real exported bundles (tests/golden/bundles) and the serving tests' SmolLM2 Q4_1 fixture bundle.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import REPO

from edgekit.bundle import read_manifest
from edgekit.fit import FitSettings, fit, from_manifest
from edgekit.fit.plan import plan
from edgekit.schema.device import load_catalog
from edgekit.schema.recipe import load_recipe
from edgekit.serve.budget import DAEMON_RSS, footprint_bytes
from edgekit.serve.errors import ApiError
from edgekit.serve.lifecycle import Lifecycle, ModelEntry
from edgekit.serve.settings import ServeSettings

GOLDEN = REPO / "tests" / "golden" / "bundles"
GOLDEN_BUNDLES = sorted(p.name for p in GOLDEN.iterdir())
CATALOG = load_catalog()


def admitted(manifest, settings: ServeSettings) -> tuple[bool, int, int]:
    """(whether the daemon would load the model, its footprint, the budget), from the daemon's admission code."""
    lifecycle = Lifecycle(settings, SimpleNamespace(entries={}))
    entry = ModelEntry(manifest.name, Path("/unused"), manifest, footprint_bytes(manifest, settings), asyncio.Semaphore(1))
    try:
        asyncio.run(lifecycle._make_room(entry))
    except ApiError as exc:
        assert exc.status == 507, exc
        return False, entry.footprint, lifecycle.budget
    return True, entry.footprint, lifecycle.budget


def assert_one_truth(manifest, device_id: str, tmp_path: Path, fit_settings: FitSettings, serve_settings: dict) -> bool:
    report = fit(manifest, CATALOG[device_id], fit_settings, CATALOG.values())
    ok, footprint, budget = admitted(manifest, ServeSettings(models=tmp_path, device=device_id, **serve_settings))
    assert report.memory["required"] == footprint + DAEMON_RSS
    assert report.usable_ram_bytes == budget + DAEMON_RSS
    ram = next(c for c in report.checks if c.name == "ram")
    assert (ram.verdict != "fail") == ok, (manifest.name, device_id, ram.message, footprint, budget)
    return ok


@pytest.mark.parametrize("device_id", sorted(CATALOG))
@pytest.mark.parametrize("bundle", GOLDEN_BUNDLES)
def test_fit_passes_exactly_when_serve_admits(bundle, device_id, tmp_path):
    assert_one_truth(read_manifest(GOLDEN / bundle), device_id, tmp_path, FitSettings(), {})


@pytest.mark.parametrize("device_id", sorted(CATALOG))
def test_fixture_bundle_fit_matches_admission(smollm_bundle, device_id, tmp_path):
    assert_one_truth(read_manifest(smollm_bundle), device_id, tmp_path, FitSettings(), {})


# fit's --parallel is serve's --slots for a generative model and its --batch-max for an encoder.
@pytest.mark.parametrize(("fit_settings", "serve_gguf", "serve_onnx"), [
    (FitSettings(n_ctx=2048), {"n_ctx": 2048}, {}),
    (FitSettings(n_ctx=8192, parallel=2), {"n_ctx": 8192, "slots": 2}, {"batch_max": 2}),
    (FitSettings(parallel=8), {"slots": 8}, {"batch_max": 8}),
    (FitSettings(batch_max_tokens=1024), {}, {"batch_max_tokens": 1024}),
    (FitSettings(batch_max_tokens=1024, max_embedding_inputs=64), {}, {"batch_max_tokens": 1024, "max_embedding_inputs": 64}),
], ids=["ctx2048", "ctx8192-parallel2", "parallel8", "batch-tokens1024", "batch-tokens1024-inputs64"])
@pytest.mark.parametrize("bundle", GOLDEN_BUNDLES)
def test_settings_mean_the_same_to_fit_and_serve(bundle, fit_settings, serve_gguf, serve_onnx, tmp_path):
    manifest = read_manifest(GOLDEN / bundle)
    for device_id in ("rpi-zero-2w", "rpi-3b-plus", "rpi-4-2gb"):
        assert_one_truth(manifest, device_id, tmp_path, fit_settings, serve_gguf if manifest.format == "gguf" else serve_onnx)


def test_the_fit_and_serve_defaults_are_the_same_settings(tmp_path):
    # A context of 8192 (SmolLM2's training context) is capped at serve's --n-ctx default by both.
    q8 = read_manifest(GOLDEN / "smollm2-135m-instruct-q8-0")
    assert fit(q8, CATALOG["rpi-5-8gb"]).settings["n_ctx"] == ServeSettings(models=tmp_path).n_ctx == 4096
    minilm = fit(read_manifest(GOLDEN / "all-minilm-l6-v2-int8-dynamic"), CATALOG["rpi-5-8gb"])
    # serve: --batch-max 32 texts, --batch-max-tokens 4096 -> 16 texts of MiniLM's 256 tokens
    assert (minilm.assumptions["batch_texts"], minilm.assumptions["batch_input_tokens"]) == (16, 256)


@pytest.mark.parametrize("bundle", GOLDEN_BUNDLES)
def test_encoders_are_never_charged_a_kv_cache(bundle):
    manifest = read_manifest(GOLDEN / bundle)
    report = fit(manifest, CATALOG["rpi-4-2gb"], FitSettings(parallel=4, n_ctx=8192))
    assert (report.memory["kv_cache"] == 0) == (manifest.task != "text-generation")


@pytest.mark.parametrize("device_id", sorted(CATALOG))
@pytest.mark.parametrize(("recipe", "bundles", "small"), [
    ("smollm2-135m-instruct", {"q8-0": "smollm2-135m-instruct-q8-0", "q4-k-m": "smollm2-135m-instruct-q4-k-m"},
     {"n_ctx": 1024}),
    ("all-minilm-l6-v2", {"int8-dynamic": "all-minilm-l6-v2-int8-dynamic"},
     {"batch_max_tokens": 1024, "max_embedding_inputs": 256}),
])
def test_what_plan_recommends_is_served(recipe, bundles, small, device_id, tmp_path):
    """With serve's defaults, and with the smaller settings a small board needs (the same settings to plan and serve)."""
    loaded = load_recipe(REPO / "recipes" / f"{recipe}.yaml").recipe
    recommended = 0
    for settings in ({}, small):
        result = plan(loaded, CATALOG[device_id], FitSettings(**settings), CATALOG.values())
        if result.best is None or result.best.target_name not in bundles:
            continue
        recommended += 1
        ok, footprint, budget = admitted(read_manifest(GOLDEN / bundles[result.best.target_name]),
                                         ServeSettings(models=tmp_path, device=device_id, **settings))
        assert ok, f"plan recommends {result.best.target_name} on {device_id}; serve refuses it ({footprint} > {budget})"
    if not recommended:
        pytest.skip(f"plan recommends no sample bundle's target on {device_id}")


def test_plan_suggests_the_context_at_which_a_model_fits(tmp_path):
    """rpi-zero-2w cannot hold SmolLM2 Q8_0 at 4096 tokens; at the suggested context serve admits the bundle."""
    q8 = read_manifest(GOLDEN / "smollm2-135m-instruct-q8-0")
    zero = CATALOG["rpi-zero-2w"]
    report = fit(q8, zero, FitSettings(), CATALOG.values())
    assert report.verdict == "fail" and report.suggested_n_ctx == 1024
    assert "fits at --ctx 1024" in report.reason
    ok, _, _ = admitted(q8, ServeSettings(models=tmp_path, device=zero.id, n_ctx=report.suggested_n_ctx))
    assert ok
    ok, _, _ = admitted(q8, ServeSettings(models=tmp_path, device=zero.id, n_ctx=report.suggested_n_ctx + 256))
    assert not ok
    assert from_manifest(q8).context_length == 8192


def test_footprint_terms_never_speak_of_a_kv_cache_for_an_encoder(tmp_path):
    from edgekit.serve.budget import footprint_terms

    settings = ServeSettings(models=tmp_path)
    minilm = footprint_terms(read_manifest(GOLDEN / "all-minilm-l6-v2-int8-dynamic"), settings)
    assert minilm == "weights + activations of 16 x 256-token micro-batches of a request of up to 2048 texts"
    q8 = footprint_terms(read_manifest(GOLDEN / "smollm2-135m-instruct-q8-0"), settings)
    assert q8 == "weights + one KV cache of n_ctx 4096 shared by 4 slot(s) + 1 context(s) of saved prompts"
    uncached = footprint_terms(read_manifest(GOLDEN / "smollm2-135m-instruct-q8-0"),
                               ServeSettings(models=tmp_path, prompt_cache_contexts=0))
    assert uncached == "weights + one KV cache of n_ctx 4096 shared by 4 slot(s)"


@pytest.mark.parametrize(("serve_settings", "measured_mib"), [
    ({}, 403.1),  # after the largest micro-batch (16 x 256) and the worst request (2,048 texts padded to 256)
    ({"batch_max": 1, "max_embedding_inputs": 1}, 152.2),  # batch 1 of 256 tokens
])
def test_the_encoder_worker_is_charged_what_it_holds(serve_settings, measured_mib, tmp_path):
    """The MiniLM worker's peak RSS measured by scripts/bench_worker_rss.py (x86-64, 2 threads): the charge is within 10 %."""
    manifest = read_manifest(GOLDEN / "all-minilm-l6-v2-int8-dynamic")
    charged = footprint_bytes(manifest, ServeSettings(models=tmp_path, **serve_settings)) / (1 << 20)
    assert abs(charged / measured_mib - 1) < 0.10, charged


@pytest.mark.parametrize(("n_ctx", "slots"), [(512, 1), (512, 4), (1000, 3)])
def test_the_kv_cache_charged_is_the_one_the_worker_allocates(smollm_bundle, n_ctx, slots, tmp_path):
    """The GGUF worker's slots share one unified KV pool: llama.cpp allocates the cells fit and the budget charge,
    at the bytes per cell of the loaded model, whatever the number of slots."""
    from edgekit.bundle import read_manifest
    from edgekit.fit import RunSettings, estimate_memory
    from edgekit.serve.protocol import WorkerConfig
    from edgekit.serve.runners import GenerationRunner

    manifest = read_manifest(smollm_bundle)
    config = WorkerConfig(n_ctx=n_ctx, threads=1, slots=slots, batch_max=1, batch_max_tokens=64, max_prompt_chars=10_000)
    runner = GenerationRunner(smollm_bundle, manifest, config)
    try:
        model = runner.models[0]
        llama_cpp = model._llama_cpp
        cells = llama_cpp.llama_n_ctx(model.llm.ctx)
        if slots > 1:
            assert runner.engine.pool == cells and model.llm.context_params.kv_unified
        charged = estimate_memory(from_manifest(manifest), RunSettings(n_ctx=n_ctx, parallel=slots)).kv_cache
        assert charged == cells * model.kv_bytes_per_token
        assert report_kv(manifest, n_ctx, slots) == charged
    finally:
        if runner.engine is not None:
            runner.engine.close()


def report_kv(manifest, n_ctx: int, parallel: int) -> int:
    """The KV cache `edgekit fit --ctx N --parallel P` reports."""
    return fit(manifest, CATALOG["rpi-5-8gb"], FitSettings(n_ctx=n_ctx, parallel=parallel)).memory["kv_cache"]
