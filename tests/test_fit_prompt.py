"""Prompt speed per kernel family and prompt length, and time to first token (`edgekit fit --prompt-tokens N`).

Numbers come from the recipe library's architecture facts and the device catalog's published points
(devices/*.yaml, devices/kernels/prompt.yaml; sources in docs/device-facts.md); nothing is timed here
(scripts/bench_fit.py compares the model with measurements of this host).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, run_cli

from edgekit.fit import FitSettings, fit, from_recipe, speed
from edgekit.runtime.llama_params import PREFILL_CHUNK
from edgekit.schema.device import load_catalog, load_kernel_families
from edgekit.schema.recipe import load_recipe

LLAMA_1B = REPO / "recipes" / "llama-3.2-1b-instruct.yaml"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def llama_1b_q4():
    recipe = load_recipe(LLAMA_1B).recipe
    return from_recipe(recipe, next(t for t in recipe.targets if t.quant == "Q4_K_M"))


def run_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, env=dict(os.environ))


def _pi5_points(catalog):
    return [p for p in catalog["rpi-5-8gb"].calibration if p.prompt_tok_s and speed.current_kernels(p, catalog["rpi-5-8gb"])]


def test_pi5_pp512_of_a_1b_q4_k_m_lies_in_the_band_of_its_published_points(catalog, llama_1b_q4):
    # The Pi 5 points (llama.cpp PRs #19356/#19360, repacked dot-product kernels) sustain 2 x parameters x pp512
    # operations per second within a band; a 1B model's pp512 is that band over its own matrix work.
    points = _pi5_points(catalog)
    assert len(points) == 4
    rates = [2 * p.parameters * p.prompt_tok_s for p in points]
    work = 2 * llama_1b_q4.matrix_parameters
    low, high = min(rates) / work, max(rates) / work
    assert (round(low, 1), round(high, 1)) == (53.7, 64.3)
    report = fit(llama_1b_q4, catalog["rpi-5-8gb"], FitSettings(), catalog.values())
    assert low <= report.prompt_tok_s <= high
    assert report.prompt_tok_s == pytest.approx(58.4, abs=0.5)
    # the 2024 llama.cpp point (TinyLlama Q8_0 at 35 tok/s) ran the earlier kernels and calibrates nothing
    assert report.calibration["prompt"]["scope"] == "device"
    assert not any("TinyLlama" in label for label in report.calibration["prompt"]["points"])


def test_each_published_prompt_point_is_reproduced_by_its_kernel_row(catalog):
    for device in (catalog["rpi-5-8gb"], catalog["rpi-4-8gb"]):
        for p in device.calibration:
            if p.prompt_tok_s and speed.current_kernels(p, device):
                assert speed.point_ratio(p, device, "prompt") == pytest.approx(1.0, abs=0.3), p.model


def test_kernel_family_sets_the_prompt_efficiency(catalog):
    families = load_kernel_families()
    assert set(families) == {"neon", "neon-dotprod", "avx2"}
    pi5, pi4, n100 = catalog["rpi-5-8gb"], catalog["rpi-4-8gb"], catalog["intel-n100-16gb"]
    assert speed.prompt_efficiency(pi5, "Q4_K") == 0.26  # repacked dot-product GEMM
    assert speed.prompt_efficiency(pi5, "Q5_0") == 0.10  # no repacked layout: per-row vec_dot
    assert speed.prompt_efficiency(pi4, "Q4_K") == 0.067  # no dot product, no repacking
    assert speed.prompt_efficiency(n100, "Q4_K") == 0.15
    assert all(p.build and p.build_date for d in catalog.values() for p in d.calibration if p.prompt_tok_s)


def test_ttft_grows_with_the_prompt_and_short_prompts_run_slower_than_pp512(catalog, llama_1b_q4):
    pi5 = catalog["rpi-5-8gb"]
    reports = {n: fit(llama_1b_q4, pi5, FitSettings(prompt_tokens=n), catalog.values()) for n in (1, 8, 32, 128, 256, 512, 2048)}
    ttfts = [r.ttft_s for r in reports.values()]
    assert ttfts == sorted(ttfts) and len(set(ttfts)) == len(ttfts)
    pp512 = reports[128].prompt_tok_s
    assert {r.prompt_tok_s for r in reports.values()} == {pp512}  # pp512 does not depend on the chat prompt
    assert reports[8].prompt_tok_s_chat < reports[32].prompt_tok_s_chat < pp512  # weights streamed for few tokens
    assert reports[2048].prompt_tok_s_chat < reports[256].prompt_tok_s_chat  # attention over a long prompt
    # TTFT = prefill + one decode step at that depth
    r = reports[128]
    assert r.ttft_s == pytest.approx(128 / r.prompt_tok_s_chat + 1 / r.decode_tok_s_short, rel=0.02)
    assert r.assumptions["prompt_tokens"] == 128 and r.assumptions["n_ubatch"] == PREFILL_CHUNK


def test_prefill_terms_add_one_weight_pass_per_batch(catalog, llama_1b_q4):
    work, pi5 = speed.workload_of(llama_1b_q4), catalog["rpi-5-8gb"]
    one = speed.prefill_terms(work, pi5, n_tokens=512, n_ubatch=512)
    two = speed.prefill_terms(work, pi5, n_tokens=512, n_ubatch=256)
    assert two.weight_pass_s == pytest.approx(2 * one.weight_pass_s) and two.compute_s == one.compute_s
    decode = speed.decode_terms(work, pi5)
    assert one.weight_pass_s == pytest.approx(decode.memory_s + decode.compute_s)  # a pass costs what a decode step's weights cost
    assert decode.memory_s == pytest.approx(work.streamed_bytes / (pi5.memory_bandwidth.gb_s * 1e9))


def test_encoders_have_no_ttft(catalog):
    recipe = load_recipe(REPO / "recipes" / "all-minilm-l6-v2.yaml").recipe
    report = fit(from_recipe(recipe, recipe.targets[0]), catalog["rpi-5-8gb"], FitSettings(), catalog.values())
    assert report.ttft_s is None and report.prompt_tok_s_chat is None and report.latency_ms > 0


def test_cli_prompt_tokens_in_json_and_the_ttft_gate():
    done = run_process("fit", "--recipe", str(LLAMA_1B), "-d", "rpi-5-8gb", "-d", "rpi-4-4gb", "--prompt-tokens", "8", "--json")
    assert done.returncode == 0, done.stderr
    reports = json.loads(done.stdout)
    assert {r["assumptions"]["prompt_tokens"] for r in reports} == {8}
    by_board = {(r["device"], r["quant"]): r for r in reports}
    pi5, pi4 = by_board[("rpi-5-8gb", "Q4_K_M")], by_board[("rpi-4-4gb", "Q4_K_M")]
    assert 0 < pi5["ttft_s"] < pi4["ttft_s"] and pi5["prompt_tok_s_chat"] < pi5["prompt_tok_s"]
    limit = (pi5["ttft_s"] + pi4["ttft_s"]) / 2
    gated = run_cli("fit", "--recipe", str(LLAMA_1B), "-d", "rpi-5-8gb", "-d", "rpi-4-4gb", "--prompt-tokens", "8",
                    "--max-ttft-s", f"{limit:.3f}", "--json")
    assert gated.returncode == 1
    checks = {(r["device"], r["quant"]): {c["name"]: c["verdict"] for c in r["checks"]} for r in json.loads(gated.stdout)}
    assert checks[("rpi-4-4gb", "Q4_K_M")]["ttft"] == "fail" and checks[("rpi-5-8gb", "Q4_K_M")]["ttft"] != "fail"


def test_cli_rejects_a_prompt_of_no_tokens():
    done = run_cli("fit", "--recipe", str(LLAMA_1B), "-d", "rpi-5-8gb", "--prompt-tokens", "0")
    assert done.returncode == 2 and "--prompt-tokens 0" in done.stderr


def test_plan_takes_a_ttft_ceiling(catalog):
    done = run_cli("plan", str(LLAMA_1B), "-d", "rpi-5-8gb", "--max-ttft-s", "0.5", "--json")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["best"] is None
    assert all(any(c["name"] == "ttft" and c["verdict"] == "fail" for c in cand["report"]["checks"])
               for cand in result["candidates"])
