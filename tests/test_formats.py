"""The format, task and quant-type registries: complete, resolvable, and in step with the gguf package."""

from __future__ import annotations

from dataclasses import fields

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from edgekit.formats import FORMATS, TASKS, load, tasks_for
from edgekit.formats.gguf import FILE_TYPES, GGML_TYPES
from edgekit.schema.recipe import GgufTarget, OnnxTarget

HOOKS = (
    "target", "facts", "runtime_check", "facts_from_manifest", "facts_from_recipe", "matrix_parameters", "fit_n_ctx",
    "memory", "workload", "point_workload", "speed", "plan_candidates", "bench", "worker_bytes",
    "calibration_point", "profile_points",
)  # build and runner import torch / the daemon


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_hook_resolves(name):
    spec = FORMATS[name]
    assert spec.name == name
    for hook in HOOKS:
        assert callable(spec.hook(hook)), hook


def test_targets_are_keyed_by_format():
    assert {name: load(spec.target) for name, spec in FORMATS.items()} == {"onnx": OnnxTarget, "gguf": GgufTarget}
    assert all(spec.model_suffix == f".{name}" for name, spec in FORMATS.items())


def test_each_task_is_served_by_exactly_one_format():
    assert set(TASKS) == {"feature-extraction", "text-classification", "token-classification", "text-ranking",
                          "text-generation"}
    served = [task for spec in FORMATS.values() for task in spec.tasks]
    assert sorted(served) == sorted(TASKS)
    assert FORMATS["gguf"].tasks == ("text-generation",)


def test_file_types_are_llama_file_types():
    """Every recipe quant is a llama.cpp file type, under the name gguf-py gives it."""
    for name, file_type in FILE_TYPES.items():
        assert file_type.ftype.startswith("LLAMA_FTYPE_")
        member = LlamaFileType[file_type.ftype.removeprefix("LLAMA_FTYPE_")]
        assert member.name.endswith(name)
        assert file_type.main_type in GGML_TYPES


def test_ggml_block_sizes_match_gguf():
    for name, (block, size) in GGML_TYPES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (block, size), name


def test_spec_fields_are_all_declared():
    assert {f.name for f in fields(next(iter(FORMATS.values())))} >= {"name", "build", "runner", *HOOKS}


def test_task_reference_models_are_transformers_auto_classes():
    import transformers

    for task in TASKS.values():
        assert task.auto_model.startswith("Auto") and hasattr(transformers, task.auto_model), task.name


def test_file_types_are_llama_cpp_constants():
    """The quantizer is called with these constants: llama-cpp-python's values equal gguf-py's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    for name, file_type in FILE_TYPES.items():
        assert getattr(llama_cpp, file_type.ftype) == LlamaFileType[file_type.ftype.removeprefix("LLAMA_FTYPE_")].value, name


def test_plan_ladder_is_ranked():
    ladder = [t for t in FILE_TYPES.values() if t.in_plan_ladder]
    assert all(t.kld_rank is not None for t in ladder)
    ranks = [t.kld_rank for t in FILE_TYPES.values() if t.kld_rank is not None]
    assert sorted(ranks) == list(range(len(ranks)))


@pytest.mark.parametrize("overrides", [{}, {"slots": 3, "n_ctx": 1024}, {"batch_max": 4, "batch_max_tokens": 512}])
def test_worker_bytes_hook_equals_the_daemon_budget(overrides):
    """The hook the daemon's footprint will call gives the daemon's current figure for every golden bundle."""
    from pathlib import Path

    from edgekit.bundle import read_manifest
    from edgekit.fit import from_manifest
    from edgekit.runtime.llama_params import PREFILL_CHUNK
    from edgekit.serve.budget import effective_n_ctx, footprint_bytes
    from edgekit.serve.settings import ServeSettings

    settings = ServeSettings(**overrides)
    bundles = sorted(p for p in (Path(__file__).parent / "golden" / "bundles").iterdir() if (p / "manifest.json").exists())
    assert {read_manifest(b).format for b in bundles} == set(FORMATS)
    for bundle in bundles:
        manifest = read_manifest(bundle)
        hook = FORMATS[manifest.format].hook("worker_bytes")
        predicted = hook(from_manifest(manifest), effective_n_ctx(manifest, settings), PREFILL_CHUNK, settings.slots,
                         settings.batch_max, settings.batch_max_tokens)
        assert predicted == footprint_bytes(manifest, settings), bundle.name


def test_routes_answer_the_tasks_the_daemon_serves_today():
    """The task sets edgekit/serve/app.py routes by, as the task table gives them."""
    assert tasks_for("/v1/chat/completions") == tasks_for("/v1/completions") == ("text-generation",)
    assert tasks_for("/v1/embeddings") == ("feature-extraction",)
    assert tasks_for("/v1/classify") == ("text-classification", "token-classification")
    assert tasks_for("/v1/rerank") == ("text-ranking",)
    assert [name for name, task in TASKS.items() if not task.batched] == ["text-generation"]
    assert {name: task.op for name, task in TASKS.items()} == {
        "feature-extraction": "embed", "text-classification": "classify", "token-classification": "classify",
        "text-ranking": "rerank", "text-generation": "generate",
    }
