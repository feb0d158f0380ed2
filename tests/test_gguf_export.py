"""The gguf format module through the export pipeline: bundles, manifests, gates, GGUF sources (tiny llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_cli

from edgekit.bundle import verify_bundle
from edgekit.errors import RecipeError, SourceError
from edgekit.export import ExportJob, export
from edgekit.export.gguf import build
from edgekit.export.gguf.convert import convert_checkpoint
from edgekit.export.gguf.quantize import quantize
from edgekit.export.sources import ResolvedSource
from edgekit.schema.recipe import load_recipe

EVAL = str(REPO / "recipes/data/eval-text.txt")


def gguf_recipe(path: Path, source: dict, targets: list[dict], **validation) -> Path:
    recipe = {
        "name": "tiny-chat",
        "source": source,
        "task": "text-generation",
        "targets": targets,
        # Random tiny models have near-tied logits that f16 rounding flips: 97 % instead of 99 % (SmolLM2 reaches 99.8 %).
        "validation": {"text_file": EVAL, "context_window": 128, "max_eval_tokens": 256, "min_conversion_top1": 0.97,
                       **validation},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_export_writes_a_verified_gguf_bundle(llama_smollm_dir, tmp_path):  # noqa: F811
    recipe = gguf_recipe(tmp_path / "tiny.yaml", {"path": str(llama_smollm_dir)},
                         [{"format": "gguf", "name": "q8", "quant": "Q8_0",
                           "gates": {"max_kld": 0.5, "min_top1_agreement": 0.6}}])
    [(manifest, where)] = export(load_recipe(recipe), tmp_path / "bundles")
    assert where == tmp_path / "bundles" / "tiny-chat-q8"
    assert manifest.passed and [g.gate for g in manifest.gates] == ["min_top1_agreement", "max_kld"]
    assert verify_bundle(where) == manifest
    assert sorted(p.name for p in where.iterdir()) == ["manifest.json", "model.gguf"]  # no work files left behind
    assert manifest.format == "gguf" and manifest.quantization == "Q8_0" and manifest.task == "text-generation"
    facts = manifest.gguf
    shape = (facts.architecture, facts.n_layer, facts.n_head, facts.n_head_kv, facts.n_embd, facts.n_vocab)
    assert shape == ("llama", 2, 4, 2, 64, 49152)
    assert facts.quant_type == "Q8_0" and 8.4 < facts.bits_per_weight < 8.6
    metrics = manifest.metrics
    assert metrics["eval_tokens"] == 254  # 256 tokens in two windows of 128: 127 predictions each
    assert metrics["torch_top1_agreement"] >= 0.97 and metrics["torch_kld_mean"] < 1e-3 and metrics["tokenizer_mismatches"] == 0
    # A random model is far more fragile than a trained one (SmolLM2 Q8_0: KLD 0.004, top-1 95 %).
    assert 0 < metrics["kld_mean"] < 0.5 and metrics["top1_agreement"] >= 0.6
    assert metrics["ppl_reference"] == pytest.approx(metrics["torch_ppl"], rel=0.01)
    assert manifest.runtime.context_length == 512 and manifest.runtime.max_length == 512
    assert manifest.runtime.chat_template.startswith("{% for message in messages %}")
    assert manifest.parameters == 49152 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64


@pytest.mark.slow
def test_failed_gate_exits_1_and_keeps_the_bundle_aside(llama_smollm_dir, tmp_path):  # noqa: F811
    recipe = gguf_recipe(tmp_path / "tiny.yaml", {"path": str(llama_smollm_dir)},
                         [{"format": "gguf", "name": "q2", "quant": "Q2_K",
                           "gates": {"max_kld": 0.0001, "min_top1_agreement": 0.9999}}])
    done = run_cli("export", str(recipe), "--out", str(tmp_path / "out"), "--json")
    assert done.returncode == 1, done.stderr
    assert "quality gates failed for tiny-chat-q2" in done.stderr
    [row] = json.loads(done.stdout)
    assert row["passed"] is False
    assert {g["gate"]: g["passed"] for g in row["gates"]} == {"max_kld": False, "min_top1_agreement": False}
    assert (tmp_path / "out" / "tiny-chat-q2.rejected" / "model.gguf").is_file()
    assert not (tmp_path / "out" / "tiny-chat-q2").exists()


@pytest.fixture(scope="module")
def gguf_sources(tmp_path_factory, llama_smollm_dir) -> Path:  # noqa: F811
    """A directory holding the tiny model as f16 and as Q4_0 GGUF files, like a hub GGUF repository."""
    out = tmp_path_factory.mktemp("gguf-source")
    convert_checkpoint(llama_smollm_dir, out / "tiny.f16.gguf")
    quantize(out / "tiny.f16.gguf", out / "tiny.Q4_0.gguf", "Q4_0")
    return out


def job_for(recipe: Path, source_dir: Path, staging: Path, target: int = 0) -> ExportJob:
    """A build job as export() makes it (source resolution is the pipeline's part and is skipped here)."""
    loaded = load_recipe(recipe)
    staging.mkdir()
    (staging.parent / f"{staging.name}-scratch").mkdir()
    return ExportJob(loaded=loaded, target=loaded.recipe.targets[target],
                     source=ResolvedSource(source_dir, str(source_dir), None, "path"), staging=staging,
                     scratch=staging.parent / f"{staging.name}-scratch", memo={})


@pytest.mark.slow
def test_gguf_source_is_quantized_and_measured_against_it(gguf_sources, tmp_path):
    recipe = gguf_recipe(tmp_path / "r.yaml", {"path": str(gguf_sources), "gguf_file": "tiny.f16.gguf"},
                         [{"format": "gguf", "name": "q4", "quant": "Q4_0"}])
    result = build(job_for(recipe, gguf_sources, tmp_path / "stage"))
    assert result.quantization == "Q4_0"
    assert result.gguf.quant_type == "Q4_0" and result.gguf.requantized_from == "F16"
    # The embedding is 98 % of this model's weights; llama.cpp keeps it at Q6_K, which falls back to Q8_0
    # because 64 columns are not a multiple of 256: 8.5 bits for it, 4.5 for the Q4_0 matrices.
    assert 8.3 < result.gguf.bits_per_weight < 8.5
    # Measured against the f16 source file; 4-bit weights visibly move a random model's distributions.
    assert result.metrics["kld_mean"] > 0.1 and result.metrics["top1_agreement"] < 1 and result.metrics["eval_tokens"] == 254
    assert "torch_top1_agreement" not in result.metrics  # no checkpoint, no PyTorch reference
    assert result.metrics["tokenizer_mismatches"] == 0
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["model.gguf"]


@pytest.mark.slow
def test_low_bit_gguf_source_needs_allow_requantize(gguf_sources, tmp_path):
    source = {"path": str(gguf_sources), "gguf_file": "tiny.Q4_0.gguf"}
    refused = gguf_recipe(tmp_path / "refused.yaml", source, [{"format": "gguf", "name": "q4km", "quant": "Q4_K_M"}])
    with pytest.raises(RecipeError) as caught:
        build(job_for(refused, gguf_sources, tmp_path / "s1"))
    assert "source GGUF is Q4_0" in str(caught.value) and "compounds the quantization error" in str(caught.value)
    assert "allow_requantize: true" in caught.value.hint
    allowed = gguf_recipe(tmp_path / "allowed.yaml", source,
                          [{"format": "gguf", "name": "q4km", "quant": "Q4_K_M", "allow_requantize": True}])
    messages = []
    job = job_for(allowed, gguf_sources, tmp_path / "s2")
    job = ExportJob(loaded=job.loaded, target=job.target, source=job.source, staging=job.staging, scratch=job.scratch,
                    memo={}, progress=messages.append)
    result = build(job)
    assert result.gguf.quant_type == "Q4_K_M" and result.gguf.requantized_from == "Q4_0"
    assert any("quality loss compounds" in m for m in messages)


@pytest.mark.slow
def test_crafted_gguf_source_is_rejected_before_llama_cpp(gguf_sources, tmp_path, monkeypatch):
    import llama_cpp

    crafted = tmp_path / "src"
    crafted.mkdir()
    blob = (gguf_sources / "tiny.f16.gguf").read_bytes()
    (crafted / "cut.gguf").write_bytes(blob[: len(blob) // 2])
    calls = []
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *a: calls.append(a) or 1)
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", lambda *a: calls.append(a))
    recipe = gguf_recipe(tmp_path / "r.yaml", {"path": str(crafted), "gguf_file": "cut.gguf"},
                         [{"format": "gguf", "name": "q", "quant": "Q8_0"}])
    with pytest.raises(SourceError, match="GGUF rejected before llama.cpp opened it: .*extends past the end of the file"):
        build(job_for(recipe, crafted, tmp_path / "stage"))
    assert calls == []


def test_recipe_field_gguf_file_must_be_a_plain_name(tmp_path):
    recipe = gguf_recipe(tmp_path / "r.yaml", {"path": ".", "gguf_file": "../elsewhere/x.gguf"},
                         [{"format": "gguf", "name": "q", "quant": "Q8_0"}])
    with pytest.raises(RecipeError, match="source.gguf_file: String should match pattern"):
        load_recipe(recipe)


def test_shipped_smollm2_recipe_targets():
    recipe = load_recipe(REPO / "recipes/smollm2-135m-instruct.yaml").recipe
    assert recipe.source.id == "HuggingFaceTB/SmolLM2-135M-Instruct" and recipe.task == "text-generation"
    assert [(t.format, t.quant) for t in recipe.targets] == [("gguf", "Q8_0"), ("gguf", "Q4_K_M")]
    assert recipe.validation.text_file == Path("data/eval-text.txt")
    for target in recipe.targets:
        gates = recipe.gates_for(target)
        assert gates.max_kld is not None and gates.min_top1_agreement is not None and gates.max_ppl_increase is not None
