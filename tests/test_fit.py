"""The fit estimator on golden bundle metadata: sizes, KV cache, compute buffers, verdicts, CI outputs.

Golden manifests (tests/golden/bundles/) are the manifests of real exported bundles (SmolLM2-135M
GGUF Q8_0 / Q4_K_M, all-MiniLM-L6-v2 ONNX int8); their fit reports on a few catalog boards are
checked in as tests/golden/fit-*.json. Regenerate consciously with UPDATE_GOLDEN=1.
Numbers asserted against llama.cpp come from its own logs (llama-cpp-python 0.3.36, this host).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import REPO
from helpers import run_cli as run_in_process

from edgekit.architectures import ARCHITECTURES
from edgekit.bundle import read_manifest
from edgekit.fit import FitSettings, fit, from_manifest, from_recipe, kv_cache_bytes
from edgekit.fit.facts import infer_n_ff
from edgekit.fit.memory import RunSettings, compute_buffer_bytes, estimate_memory, repacked_bytes
from edgekit.fit.quant import definition_data_bytes, definition_tensors
from edgekit.fit.report import github_annotations, junit_xml
from edgekit.schema.device import IsaFeatures, load_catalog
from edgekit.schema.recipe import Recipe

GOLDEN = REPO / "tests" / "golden"
BUNDLES = GOLDEN / "bundles"
Q8, Q4 = BUNDLES / "smollm2-135m-instruct-q8-0", BUNDLES / "smollm2-135m-instruct-q4-k-m"
MINILM = BUNDLES / "all-minilm-l6-v2-int8-dynamic"
MIB = 1 << 20
LLAMA, QWEN2 = ARCHITECTURES["LlamaForCausalLM"], ARCHITECTURES["Qwen2ForCausalLM"]
SMOLLM2 = LLAMA.make_shape(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, head_dim=64, n_vocab=49152,
                           context_length=8192, tied_embeddings=True)
AVX2 = IsaFeatures(avx2=True)
A53 = IsaFeatures(neon=True)
GOLDEN_DEVICES = ["rpi-zero-2w", "rpi-4-2gb", "rpi-5-8gb", "x86-64-avx2-generic"]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in this process (helpers.run_cli), at the width of ``env``'s COLUMNS (default: a pipe's 160)."""
    return run_in_process(*args, env=env, columns=int((env or {}).get("COLUMNS", 160)))


def run_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


# -- sizes: llama.cpp's quantization rules as a table ----------------------------------------------

@pytest.mark.parametrize(("file_type", "tensor_bytes"), [
    # tensor data of the files llama.cpp's quantizer wrote for SmolLM2-135M (summed from their headers)
    ("Q8_0", 143_025_408), ("Q4_K_M", 103_668_480), ("Q4_1", 96_576_768),
])
def test_predicted_tensor_bytes_equal_llama_cpp_files(file_type, tensor_bytes):
    assert LLAMA.parameters(SMOLLM2) == 134_515_008
    assert definition_data_bytes(LLAMA, SMOLLM2, file_type) == tensor_bytes


def test_k_quant_fallbacks_for_576_wide_rows():
    types = {t.name: t.ggml_type for t in definition_tensors(LLAMA, SMOLLM2, "Q4_K_M")}
    assert types["token_embd.weight"] == "Q8_0"  # tied output head, 576 % 256 != 0
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K falls back to Q5_0
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # use_more_bits layer: Q6_K -> Q8_0
    assert types["blk.3.ffn_down.weight"] == "Q4_K"  # 1536-wide rows keep Q4_K
    assert types["blk.29.ffn_down.weight"] == "Q6_K"
    assert sum(t == "Q4_K" for t in types.values()) == 16


def test_manifest_bits_per_weight_agrees_with_prediction():
    manifest = read_manifest(Q4)
    assert manifest.gguf.bits_per_weight == pytest.approx(8 * 103_668_480 / 134_515_008, abs=1e-4)


def test_feed_forward_width_is_recovered_from_parameters():
    assert infer_n_ff(LLAMA, 134_515_008, 30, 576, 9, 3, 64, 49152) == (1536, True)
    # Qwen2.5-0.5B: q/k/v biases, tied, 4864-wide feed-forward
    assert infer_n_ff(QWEN2, 494_032_768, 24, 896, 14, 2, 64, 151936) == (4864, True)
    assert infer_n_ff(LLAMA, 134_515_009, 30, 576, 9, 3, 64, 49152) is None


# -- memory terms ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_ctx", "parallel", "expected"), [
    (512, 1, 11_796_480),  # llama.cpp logs "KV buffer size = 11.25 MiB"
    (8192, 1, 188_743_680),  # "180.00 MiB"
    (1000, 1, 23_592_960),  # context padded to 1024 cells: "22.50 MiB"
    (512, 4, 47_185_920),
])
def test_kv_cache_bytes(n_ctx, parallel, expected):
    facts = from_manifest(read_manifest(Q8))
    # 2 (K, V) x cells x 30 layers x 3 KV heads x 64 dims x 2 bytes (f16)
    assert kv_cache_bytes(facts, n_ctx, parallel) == expected
    assert expected == 2 * -(-n_ctx * parallel // 256) * 256 * 30 * 3 * 64 * 2


@pytest.mark.parametrize(("n_ctx", "flash_attn", "n_outputs", "logged_mib"), [
    # llama-cpp-python's own context: logits reserved for every token of a micro-batch
    (512, False, 512, 98.25), (2048, False, 512, 99.38), (8192, False, 512, 166.38), (8192, True, 512, 98.25),
    # edgekit's engine with 4 slots: n_outputs_max = 8 sequences, flash attention ("sched_reserve: CPU compute buffer")
    (512, True, 8, 14.01), (2048, True, 8, 15.51), (8192, True, 8, 21.51),
])
def test_reserved_compute_buffer_matches_llama_cpp_log(n_ctx, flash_attn, n_outputs, logged_mib):
    facts = from_manifest(read_manifest(Q8))
    settings = RunSettings(n_ctx=n_ctx, n_ubatch=512, flash_attn=flash_attn)
    reserved = compute_buffer_bytes(facts, settings, n_outputs=n_outputs)
    assert reserved / MIB == pytest.approx(logged_mib, rel=0.015)


@pytest.mark.parametrize(("widths", "logged_mib"), [
    # (n_embd, n_ff, n_head) of 2-layer random llama GGUFs; the engine's context (4 slots, flash attention) logs, at
    # n_ctx 512 / 2048 / 8192 (docs/device-facts.md, "Constants edgekit measured itself"):
    ((960, 2560, 15), (23.01, 24.51, 30.51)),  # SmolLM2-360M
    ((896, 4864, 14), (36.01, 37.51, 43.51)),  # Qwen2-0.5B
    ((2048, 5632, 32), (49.51, 51.01, 57.01)),  # TinyLlama-1.1B
    ((2048, 8192, 32), (64.51, 66.01, 72.01)),  # Llama-3.2-1B
])
def test_flash_attention_compute_buffer_of_other_widths(widths, logged_mib):
    from dataclasses import replace

    n_embd, n_ff, n_head = widths
    facts = replace(from_manifest(read_manifest(Q8)), n_embd=n_embd, n_ff=n_ff, n_head=n_head)
    for n_ctx, logged in zip((512, 2048, 8192), logged_mib):
        reserved = compute_buffer_bytes(facts, RunSettings(n_ctx=n_ctx, n_ubatch=512, flash_attn=True), n_outputs=8)
        assert reserved / MIB == pytest.approx(logged, abs=0.02)


def test_reserved_compute_buffer_of_the_served_engine():
    """What fit reports as reserved is what the engine's context asks for: output rows for its sequences only."""
    facts = from_manifest(read_manifest(Q8))
    report = estimate_memory(facts, RunSettings(n_ctx=2048, parallel=4, n_ubatch=512, flash_attn=True))
    assert report.compute_reserved / MIB == pytest.approx(15.51, rel=0.015)
    # one slot: a lone llama-cpp-python context, logits reserved for every row of a micro-batch
    report = estimate_memory(facts, RunSettings(n_ctx=2048, parallel=1, n_ubatch=512, flash_attn=True))
    assert report.compute_reserved / MIB == pytest.approx(98.25, rel=0.015)


def test_work_buffer_for_attention_scores():
    from edgekit.fit.memory import work_buffer_bytes

    facts = from_manifest(read_manifest(Q8))
    # 256 prompt tokens x 8192 KV cells x 9 heads, f16: the measured 36 MiB gap at n_ctx 8192
    assert work_buffer_bytes(facts, RunSettings(n_ctx=8192, n_ubatch=256, flash_attn=False)) == 256 * 8192 * 9 * 2 == 37_748_736
    assert work_buffer_bytes(facts, RunSettings(n_ctx=8192, flash_attn=True)) == 0


def test_repacked_weights_by_isa():
    q4 = from_manifest(read_manifest(Q4))
    assert repacked_bytes(q4, AVX2) == 7_962_624  # llama.cpp: "CPU_REPACK model buffer size = 7.59 MiB"
    assert repacked_bytes(q4, A53) == 0  # no dotprod/i8mm: nothing is repacked
    assert repacked_bytes(from_manifest(read_manifest(Q8)), AVX2) == 0


def test_memory_sum_and_required():
    q4 = from_manifest(read_manifest(Q4))
    mem = estimate_memory(q4, RunSettings(n_ctx=2048, daemon=False), AVX2)
    assert mem.weights == 105_453_856
    assert mem.kv_cache == 47_185_920
    assert mem.total == mem.weights + mem.repacked + mem.kv_cache + mem.compute + mem.runtime + mem.daemon
    assert mem.required == mem.total - mem.repacked and mem.daemon == mem.prompt_cache == 0
    # daemon adds edgekit serve's own process (80 MiB idle RSS, measured) and its worker's saved prompts (serve's
    # --prompt-cache-contexts, default one context's worth of KV cache)
    served = estimate_memory(q4, RunSettings(n_ctx=2048, daemon=True), AVX2)
    assert served.daemon == 80 * MIB and served.prompt_cache == mem.kv_cache
    assert served.total - mem.total == served.daemon + served.prompt_cache
    half = estimate_memory(q4, RunSettings(n_ctx=2048, daemon=True, prompt_cache_contexts=0.5), AVX2)
    assert half.prompt_cache == 23_592_960 and served.total - half.total == 23_592_960
    # generation slots are sequences of one llama.cpp context sharing its KV pool: no more KV cache or vocabulary
    one = estimate_memory(q4, RunSettings(n_ctx=2048, parallel=1, daemon=False), AVX2)
    four = estimate_memory(q4, RunSettings(n_ctx=2048, parallel=4, daemon=False), AVX2)
    assert (four.kv_cache, four.runtime, four.weights) == (one.kv_cache, one.runtime, one.weights) == (
        mem.kv_cache, mem.runtime, mem.weights)
    assert one.compute <= four.compute <= one.compute + 3 * 4 * 49152  # at most one more row of logits per slot


# -- golden reports --------------------------------------------------------------------------------

def _reports(bundle: Path, catalog, settings: FitSettings) -> list[dict]:
    manifest = read_manifest(bundle)
    return [json.loads(fit(manifest, catalog[d], settings, catalog=catalog.values()).model_dump_json()) for d in GOLDEN_DEVICES]


def _assert_close(actual, expected, where="report"):
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{where}: keys differ"
        for key in expected:
            _assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), f"{where}: length differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-6), where
    else:
        assert actual == expected, where


@pytest.mark.parametrize(("bundle", "settings"), [
    (Q8, FitSettings(n_ctx=2048)),
    (Q4, FitSettings(n_ctx=8192, min_tok_s=20)),
    (MINILM, FitSettings(parallel=8)),
], ids=["q8-0-ctx2048", "q4-k-m-ctx8192-floor20", "minilm-batch8"])
def test_golden_fit_reports(bundle, settings, catalog, request):
    golden = GOLDEN / f"fit-{request.node.callspec.id}.json"
    reports = _reports(bundle, catalog, settings)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(reports, indent=2, sort_keys=True) + "\n")
    _assert_close(reports, json.loads(golden.read_text()))


def test_golden_verdicts_and_numbers(catalog):
    q8 = read_manifest(Q8)
    zero, pi5 = catalog["rpi-zero-2w"], catalog["rpi-5-8gb"]
    tight = fit(q8, zero, FitSettings(n_ctx=1024), catalog.values())
    assert tight.verdict == "warn" and tight.memory["required"] == 355_066_656
    assert tight.memory["daemon"] == 80 * MIB and tight.memory["kv_cache"] == tight.memory["prompt_cache"] == 23_592_960
    uncached = fit(q8, zero, FitSettings(n_ctx=1024, prompt_cache_contexts=0), catalog.values())
    assert uncached.memory["required"] == 331_473_696 and uncached.memory["prompt_cache"] == 0
    assert tight.usable_ram_bytes == (512 - 170) * MIB
    failing = fit(q8, zero, FitSettings(n_ctx=8192), catalog.values())
    assert failing.verdict == "fail" and "short" in failing.reason
    roomy = fit(q8, pi5, FitSettings(n_ctx=2048), catalog.values())
    assert roomy.verdict == "pass" and roomy.ram_share < 0.06
    assert roomy.calibration["decode"]["scope"] == "device"
    slow = fit(q8, pi5, FitSettings(n_ctx=2048, min_tok_s=1000), catalog.values())
    assert slow.verdict == "fail" and [c.name for c in slow.checks if c.verdict == "fail"] == ["speed"]
    near = fit(q8, pi5, FitSettings(n_ctx=2048, min_tok_s=roomy.decode_tok_s * 0.9), catalog.values())
    assert near.verdict == "warn"
    beyond = fit(q8, pi5, FitSettings(n_ctx=16384), catalog.values())
    assert any(c.name == "context" and c.verdict == "warn" for c in beyond.checks)


def test_decode_slows_as_context_fills(catalog):
    report = fit(read_manifest(Q8), catalog["rpi-5-8gb"], FitSettings(n_ctx=8192), catalog.values())
    assert report.decode_tok_s < report.decode_tok_s_short


# -- before download: recipe predictions -----------------------------------------------------------

def _smollm2_recipe() -> Recipe:
    return Recipe.model_validate({
        "name": "smollm2-135m-instruct", "source": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "task": "text-generation",
        "targets": [{"format": "gguf", "name": "q8-0", "quant": "Q8_0"}, {"format": "gguf", "name": "q4-k-m", "quant": "Q4_K_M"}],
        "architecture": {"source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json",
                         "parameters": 134_515_008, "n_layer": 30, "hidden_size": 576, "intermediate_size": 1536,
                         "n_head": 9, "n_head_kv": 3, "vocab_size": 49152, "context_length": 8192, "tie_word_embeddings": True},
    })


@pytest.mark.parametrize(("index", "bundle"), [(0, Q8), (1, Q4)])
def test_recipe_prediction_is_within_a_tenth_of_a_percent_of_the_bundle(index, bundle, catalog):
    recipe = _smollm2_recipe()
    predicted = from_recipe(recipe, recipe.targets[index])
    measured = read_manifest(bundle)
    assert abs(predicted.bundle_bytes - measured.total_bytes) / measured.total_bytes < 0.001
    report = fit(measured, catalog["rpi-4-2gb"], FitSettings(n_ctx=2048), catalog.values(), predicted=predicted)
    assert report.origin == "bundle"
    assert abs(report.disk_prediction_error) < 0.001


def test_onnx_recipe_prediction_close_to_bundle():
    from edgekit.schema.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "all-minilm-l6-v2.yaml").recipe
    target = next(t for t in recipe.targets if t.name == "int8-dynamic")
    predicted = from_recipe(recipe, target)
    measured = read_manifest(MINILM)
    assert abs(predicted.weights_bytes - measured.onnx.initializer_bytes) / measured.onnx.initializer_bytes < 0.03
    assert abs(predicted.bundle_bytes - measured.total_bytes) / measured.total_bytes < 0.03


def test_every_recipe_has_facts_that_add_up(catalog):
    from edgekit.schema.recipe import load_recipe

    for path in sorted((REPO / "recipes").glob("*.yaml")):
        recipe = load_recipe(path).recipe
        if recipe.architecture is None:
            continue
        for target in recipe.targets:
            facts = from_recipe(recipe, target)
            layout_notes = [n for n in facts.notes if "add up" in n]
            if recipe.name.startswith("phi-3"):
                continue  # fused qkv / gate_up tensors: layout differs by design, noted in the report
            assert not layout_notes, f"{path.name}: {layout_notes}"
        for device in recipe.devices:
            assert device in catalog, f"{path.name}: unknown device {device}"


# -- CI outputs ------------------------------------------------------------------------------------

def test_junit_xml_parses_and_counts_failures(catalog):
    q8 = read_manifest(Q8)
    reports = [fit(q8, catalog[d], FitSettings(n_ctx=8192), catalog.values()) for d in GOLDEN_DEVICES]
    root = ET.fromstring(junit_xml(reports))
    suite = root.find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == GOLDEN_DEVICES
    assert cases[0].find("failure") is not None and "rpi-zero-2w" in cases[0].find("failure").get("message")
    props = {p.get("name"): p.get("value") for p in cases[1].find("properties")}
    assert int(props["required_ram_bytes"]) == reports[1].memory["required"]


def test_github_annotations(catalog):
    q8 = read_manifest(Q8)
    reports = [fit(q8, catalog[d], FitSettings(n_ctx=n), catalog.values()) for d, n in
               (("rpi-zero-2w", 8192), ("rpi-zero-2w", 1024), ("rpi-5-8gb", 2048))]
    lines = github_annotations(reports)
    assert len(lines) == 2
    assert lines[0].startswith("::error title=edgekit fit%3A smollm2-135m-instruct-q8-0 on rpi-zero-2w::needs ")
    assert lines[1].startswith("::warning title=")


def test_cli_fit_exit_codes_json_junit_github(tmp_path):
    junit = tmp_path / "fit.xml"
    done = run_process("fit", str(Q8), "--device", "rpi-zero-2w", "--device", "rpi-5-8gb", "--ctx", "8192", "--json",
                       "--junit", str(junit))
    assert done.returncode == 1, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["device"], r["verdict"]) for r in rows] == [("rpi-zero-2w", "fail"), ("rpi-5-8gb", "pass")]
    assert ET.parse(junit).getroot().find("testsuite").get("failures") == "1"
    assert "1 of 2 fit checks failed" in done.stderr

    summary = tmp_path / "summary.md"
    done = run_cli("fit", str(Q8), "-d", "rpi-zero-2w", "--ctx", "8192", "--github", env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert done.returncode == 1
    assert done.stdout.startswith("::error title=edgekit fit%3A smollm2-135m-instruct-q8-0 on rpi-zero-2w::")
    assert "| smollm2-135m-instruct-q8-0 | rpi-zero-2w |" in summary.read_text()

    done = run_cli("fit", str(Q8), "-d", "rpi-5-8gb", "--ctx", "2048", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["verdict"] == "pass"

    done = run_cli("fit", str(Q8), "-d", "no-such-board")
    assert done.returncode == 2 and "unknown device 'no-such-board'" in done.stderr


def test_cli_fit_recipe_offline_then_with_bundle(tmp_path):
    recipe = REPO / "recipes" / "all-minilm-l6-v2.yaml"
    done = run_cli("fit", "--recipe", str(recipe), "--bundles-dir", str(tmp_path), "--json",
                   env={"HF_HUB_OFFLINE": "1", "EDGEKIT_HOME": str(tmp_path / "home")})
    rows = json.loads(done.stdout)
    assert {r["origin"] for r in rows} == {"recipe"}
    assert {r["device"] for r in rows} == {"rpi-zero-2w", "rpi-4-2gb", "rpi-5-4gb", "orange-pi-5-8gb"}
    assert len(rows) == 8  # 2 targets x 4 devices
    # the zero's 342 MiB cannot hold serve's default encoder batches (2,048 texts a request): told what fits
    assert done.returncode == 1 and {r["device"] for r in rows if r["verdict"] == "fail"} == {"rpi-zero-2w"}
    assert all("fits with --batch-max-tokens" in r["reason"] for r in rows if r["verdict"] == "fail")

    shutil.copytree(MINILM, tmp_path / MINILM.name)
    done = run_cli("fit", "--recipe", str(recipe), "--bundles-dir", str(tmp_path), "--json", "-d", "rpi-4-2gb")
    assert done.returncode == 0, done.stderr
    measured = next(r for r in json.loads(done.stdout) if r["subject"] == MINILM.name)
    assert measured["origin"] == "bundle"
    assert measured["disk_bytes"] == read_manifest(MINILM).total_bytes
    assert abs(measured["disk_prediction_error"]) < 0.03


def test_cli_plan_picks_best_quant_that_fits():
    done = run_cli("plan", str(REPO / "recipes" / "llama-3.2-3b-instruct.yaml"), "-d", "rpi-5-4gb", "--ctx", "2048",
                   "--min-tok-s", "3", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    verdicts = [(c["report"]["quant"], c["report"]["verdict"]) for c in plan["candidates"]]
    best = plan["best"]["quant"]
    # highest quality first; the best is the first that passes outright
    assert verdicts[0][0] == "Q8_0"
    assert best == next(q for q, v in verdicts if v == "pass")

    done = run_cli("plan", str(REPO / "recipes" / "phi-3.5-mini-instruct.yaml"), "-d", "rpi-zero-2w", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["best"] is None
    assert "nothing fits rpi-zero-2w" in done.stderr


def test_cli_plan_ranks_every_recipe_of_a_task(tmp_path):
    import yaml

    mine = yaml.safe_load((REPO / "recipes" / "smollm2-135m-instruct.yaml").read_text())
    mine["name"] = "my-smollm2"
    (tmp_path / "my-smollm2.yaml").write_text(yaml.safe_dump(mine))
    done = run_cli("plan", "--device", "rpi-4-2gb", "--task", "text-generation", "--min-tok-s", "5",
                   "--recipes", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    ranked, dropped = result["ranked"], result["dropped"]
    assert ranked and all(r["verdict"] in ("pass", "warn") and r["decode_tok_s"] >= 5 for r in ranked)
    assert all(r["verdict"] == "fail" and r["reason"] for r in dropped)
    # every target of every text-generation recipe (library + --recipes), each either ranked or dropped
    generative = [p for p in (REPO / "recipes").glob("*.yaml") if yaml.safe_load(p.read_text())["task"] == "text-generation"]
    names = {r["recipe"] for r in ranked + dropped}
    assert names == {yaml.safe_load(p.read_text())["name"] for p in generative} | {"my-smollm2"}
    assert len(ranked) + len(dropped) == 7 * len(names)  # each recipe's targets plus the quant ladder: 7 quant types
    # best first: passes before warnings, then larger models, then higher-quality quants
    keys = [(r["verdict"] != "pass", -r["parameters"]) for r in ranked]
    assert keys == sorted(keys)
    assert ranked[0]["verdict"] == "pass"
    assert {r["recipe"] for r in dropped if "misses the limit 5 tok/s" in r["reason"]} >= {"llama-3.2-1b-instruct"}

    nothing = run_cli("plan", "-d", "rpi-zero-2w", "--task", "text-generation", "--min-tok-s", "500")
    assert nothing.returncode == 1 and "no text-generation recipe fits rpi-zero-2w" in nothing.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (("plan", "-d", "rpi-4-2gb"), "give a RECIPE, or --task TASK"),
    (("plan", "-d", "rpi-4-2gb", "--task", "text-generaton"), "did you mean 'text-generation'?"),
    (("plan", "-d", "rpi-4-2gb", "-d", "rpi-5-8gb", "--task", "text-generation"), "plan takes one --device, got 2"),
    (("plan", "--task", "text-generation"), "Missing option '--device' / '-d': the board to plan for"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_cli_plan_library_usage_errors(args, expected):
    done = run_cli(*args, env={"COLUMNS": "200"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert expected in done.stderr


# -- the fit table a person reads -------------------------------------------------------------------

def test_fit_table_is_readable_at_80_columns():
    done = run_cli("fit", str(Q8), str(Q4), str(MINILM), "-d", "rpi-zero-2w", "-d", "rpi-4-2gb", "-d", "rpi-5-8gb",
                   "-d", "jetson-orin-nano-8gb", env={"COLUMNS": "80"})
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in done.stdout
    boards = {"rpi-zero-2w", "rpi-4-2gb", "rpi-5-8gb"}
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0] in boards]
    assert len(rows) == 9  # one line per bundle x board: ids and verdicts whole, never wrapped
    assert sum("jetson-orin-nano-8gb" in line.split() for line in lines) == 3  # the longest id, whole
    headers = [line.strip() for line in lines if line.strip() in (Q8.name, Q4.name, MINILM.name)]
    assert headers == sorted([MINILM.name, Q4.name, Q8.name], key=[Q8.name, Q4.name, MINILM.name].index)
    assert [r[-1] for r in rows] == ["FAIL", "pass", "pass"] * 3
    assert len(lines) < 45
    text = " ".join(done.stdout.split())
    for assumption in ("context 4,096 tokens shared by 4 slot(s)", "start of a conversation / 2,048 tokens deep",
                       "latency of one 32-token input at batch 1", "16 x 256 tokens",
                       "edgekit serve's own process (80 MiB)", "fits at --ctx 1792"):
        assert assumption in text, assumption
    assert " MB" not in done.stdout and "MiB" in done.stdout

    wide = run_cli("fit", str(Q8), "-d", "rpi-zero-2w", "--wide", env={"COLUMNS": "80"})
    assert "usable MiB" in wide.stdout and "reason" in wide.stdout and "tok/s short / deep" in wide.stdout


def test_boards_with_one_soc_show_one_band(catalog):
    q4 = read_manifest(Q4)
    reports = [fit(q4, catalog[d], FitSettings(), catalog.values()) for d in ("rpi-5-4gb", "rpi-5-8gb", "rpi-5-16gb")]
    bands = {tuple(r.decode_tok_s_band) for r in reports}
    assert len(bands) == 1
    (low, high), = bands
    assert all(low <= r.decode_tok_s <= high for r in reports)
    assert low == pytest.approx(min(r.decode_tok_s for r in reports)) and high == pytest.approx(max(r.decode_tok_s for r in reports))
    assert fit(q4, catalog["rpi-zero-2w"], FitSettings(), catalog.values()).decode_tok_s_band is None  # no sibling


def test_an_encoder_that_does_not_fit_is_told_the_batch_that_does(catalog):
    report = fit(read_manifest(MINILM), catalog["rpi-zero-2w"], FitSettings(), catalog.values())
    assert report.verdict == "fail" and report.suggested_n_ctx is None
    tokens, texts = report.suggested_batch_max_tokens, report.suggested_max_embedding_inputs
    assert tokens and texts and f"fits with --batch-max-tokens {tokens} --max-embedding-inputs {texts}" in report.reason
    zero = catalog["rpi-zero-2w"]
    assert fit(read_manifest(MINILM), zero, FitSettings(batch_max_tokens=tokens, max_embedding_inputs=texts)).verdict != "fail"
    # the micro-batch is kept as large as it can be: one more input of 256 tokens does not fit with any request size
    assert fit(read_manifest(MINILM), zero, FitSettings(batch_max_tokens=tokens + 256, max_embedding_inputs=1)).verdict == "fail"
