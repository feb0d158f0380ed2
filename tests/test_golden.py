"""Golden checks: recorded by the real exporter with the board-side runtime, rerun by edgekit.runtime.golden.

The GGUF bundle is the shipped SmolLM2 recipe's Q4_K_M target, exported once per session (quality measured
on the first 1,024 tokens of the eval text, as tests/test_gguf_smollm2.py does). The ONNX bundles are the
serving tests' fixtures (MiniLM int8 exported for real, tiny random classifiers).
"""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from unittest import mock

import numpy as np
import pytest
from helpers import REPO
from serve_fixtures import Q4KM, RARE_TOKEN

from edgekit.bundle import MANIFEST_NAME, read_manifest
from edgekit.schema.manifest import EncoderGolden, GreedyGolden, Manifest

GOLDEN_BUNDLES = REPO / "tests" / "golden" / "bundles"
@pytest.fixture(scope="module")
def q4km_model(smollm2_q4km):
    from edgekit.runtime.golden import load_model

    model = load_model(smollm2_q4km, read_manifest(smollm2_q4km))
    yield model
    model.llm.close()


@pytest.fixture(scope="module")
def golden_check(q4km_model):
    """check_golden on the Q4_K_M model, reusing this module's earlier teacher-forced runs of the same prompt ids and fed
    tokens: a record with one prompt edited reruns that prompt only (a whole check is ~0.7 s of CPU on one core).

    A run's output depends only on those ids (one model, teacher-forced): the reused arrays are the ones the check would
    compute. The first check of the module runs all three prompts (test_the_same_machine_reproduces_the_record_exactly).
    """
    from edgekit.runtime import golden

    real, runs = golden.greedy_logprobs, {}

    def remembered(model, prompt_ids, steps, feed=None, *, reuse=False):
        key = (tuple(prompt_ids), steps, None if feed is None else tuple(feed))
        if key not in runs:
            runs[key] = real(model, prompt_ids, steps, feed, reuse=reuse)
        return runs[key]

    def run(manifest: Manifest):
        with mock.patch.object(golden, "greedy_logprobs", remembered):
            return golden.check_golden(manifest, q4km_model)

    return run


def with_prompt(manifest: Manifest, index: int, **changes) -> Manifest:
    """``manifest`` with prompt ``index`` (0-based) of its golden record changed."""
    prompts = list(manifest.golden.prompts)
    prompts[index] = prompts[index].model_copy(update=changes)
    return manifest.model_copy(update={"golden": manifest.golden.model_copy(update={"prompts": prompts})})


# -- pure functions --------------------------------------------------------------------------------

def test_binned_kld_is_the_kl_divergence_of_the_recorded_bins():
    from edgekit.runtime.golden import binned_kld

    board = np.log(np.array([0.05, 0.5, 0.3, 0.15]))
    recorded = {1: math.log(0.7), 2: math.log(0.2)}  # token 0 and 3 share the rest: 0.1 recorded, 0.2 on the board
    expected = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert binned_kld(recorded, board) == pytest.approx(expected, abs=1e-12) == pytest.approx(0.085123, abs=1e-6)
    assert binned_kld({1: math.log(0.5), 2: math.log(0.3)}, board) == pytest.approx(0.0, abs=1e-12)
    # Rounded log-probs summing past 1 are renormalized, never negative.
    assert binned_kld({1: -0.0004, 2: math.log(0.01)}, np.log(np.array([0.0, 0.995, 0.005, 0.0]) + 1e-30)) >= 0


def test_float16_outputs_round_trip():
    from edgekit.runtime.golden import pack_f16, unpack_f16

    values = np.linspace(-1, 1, 384, dtype=np.float32)
    text = pack_f16(values)
    assert len(text) == 1024  # 768 bytes in base64
    restored = unpack_f16(text, [384])
    assert np.abs(restored - values).max() < 1e-3
    assert float(np.dot(restored, values) / np.linalg.norm(restored) / np.linalg.norm(values)) > 0.999999


@pytest.mark.slow
def test_no_record_is_not_a_failure(smollm2_q4km, q4km_model):
    from edgekit.runtime.golden import check_golden

    manifest = read_manifest(smollm2_q4km).model_copy(update={"golden": None})
    report = check_golden(manifest, q4km_model)
    assert (report.recorded, report.passed, report.reason, report.checks) == (False, True, "", [])


# -- GGUF ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_records_greedy_tokens_and_top_logprobs(smollm2_q4km):
    manifest = read_manifest(smollm2_q4km)
    golden = manifest.golden
    assert isinstance(golden, GreedyGolden)
    assert golden.recorded_on == f"{platform.machine()}, llama_cpp_python {metadata.version('llama_cpp_python')}"
    assert (golden.min_top1_agreement, golden.max_kld) == (0.5, 0.02)
    assert [p.prompt for p in golden.prompts] == ["Write a short story about a robot who learns to paint.",
                                                 "Explain how a bicycle works.", "Give three tips for learning a new language."]
    for prompt in golden.prompts:
        assert len(prompt.ids) == len(prompt.top_logprobs) == 16
        # SmolLM2's template adds its default system turn: <|im_start|>system\n ... <|im_start|>assistant\n
        assert prompt.prompt_ids[:3] == [1, 9690, 198] and prompt.prompt_ids[-4:] == [1, 520, 9531, 198]
        for token, top in zip(prompt.ids, prompt.top_logprobs):
            assert 1 <= len(top) <= 4 and next(iter(top)) == token  # the greedy token is the most likely one
            assert all(lp >= math.log(0.01) - 1e-3 for lp in list(top.values())[1:])
    size = len(json.dumps(json.loads((smollm2_q4km / MANIFEST_NAME).read_text())["golden"], separators=(",", ":")))
    assert 2_000 < size < 5_000  # a few KB of data (indented in manifest.json: about twice that)


@pytest.mark.slow
def test_the_same_machine_reproduces_the_record_exactly(smollm2_q4km, golden_check):
    report = golden_check(read_manifest(smollm2_q4km))
    assert report.recorded and report.passed and report.reason == ""
    assert [c.name for c in report.checks] == ["prompt 1", "prompt 2", "prompt 3"]
    for check in report.checks:
        assert check.prompt_ids_equal and check.ids_equal and check.first_difference is None
        assert check.top1_agreement == 1.0 and check.kld < 1e-4  # only the record's 3-decimal rounding


@pytest.mark.slow
def test_one_differing_step_passes_within_the_bound(smollm2_q4km, golden_check):
    """The last recorded id replaced: 15 of 16 steps agree (0.9375 >= 0.5), the KLD is unchanged (< 0.02)."""
    manifest = read_manifest(smollm2_q4km)
    ids = list(manifest.golden.prompts[0].ids)
    report = golden_check(with_prompt(manifest, 0, ids=ids[:15] + [RARE_TOKEN]))
    check = report.checks[0]
    assert report.passed and check.passed
    assert (check.ids_equal, check.first_difference, check.top1_agreement) == (False, 15, 0.9375)
    assert check.kld < 1e-4
    assert check.detail.startswith(f"greedy tokens differ from step 15 (this machine {ids[15]}, recorded {RARE_TOKEN}); "
                                   "teacher-forced top-1 0.938 (bound >= 0.5), KLD ")


@pytest.mark.slow
def test_nine_differing_steps_fail_the_top1_floor(smollm2_q4km, golden_check):
    """The last 9 ids replaced by a token the model never picks: 7 of 16 steps agree, 0.4375 < 0.5."""
    manifest = read_manifest(smollm2_q4km)
    ids = list(manifest.golden.prompts[1].ids)
    report = golden_check(with_prompt(manifest, 1, ids=ids[:7] + [RARE_TOKEN] * 9))
    assert not report.passed
    assert [c.passed for c in report.checks] == [True, False, True]
    check = report.checks[1]
    assert (check.first_difference, check.top1_agreement) == (7, 0.4375)
    assert report.reason.startswith(f"golden check failed for {Q4KM}: prompt 2: greedy tokens differ from step 7 (this machine "
                                    f"{ids[7]}, recorded {RARE_TOKEN}); teacher-forced top-1 0.438 (bound >= 0.5)")
    assert report.reason.endswith(": outside the bound")


@pytest.mark.slow
def test_a_distribution_far_from_the_record_fails_the_kld_bound(smollm2_q4km, q4km_model, golden_check):
    """Top-1 within its bound (one step differs) but the record says every step's top token had p = 0.5."""
    from edgekit.runtime.golden import binned_kld, greedy_logprobs, prompt_tokens

    manifest = read_manifest(smollm2_q4km)
    prompt = manifest.golden.prompts[2]
    flat = [{token: round(math.log(0.5), 3)} for token in prompt.ids]
    report = golden_check(with_prompt(manifest, 2, ids=prompt.ids[:15] + [RARE_TOKEN], top_logprobs=flat))
    check = report.checks[2]
    steps = greedy_logprobs(q4km_model, prompt_tokens(q4km_model, prompt.prompt, manifest.runtime), 16,
                            feed=prompt.ids[:15] + [RARE_TOKEN])
    expected = float(np.mean([binned_kld(top, lp) for top, lp in zip(flat, steps)]))
    assert check.top1_agreement == 0.9375 and check.kld == pytest.approx(expected, rel=1e-6)
    assert check.kld > 0.02 and not check.passed and not report.passed
    assert report.reason.startswith(f"golden check failed for {Q4KM}: prompt 3: ")


@pytest.mark.slow
def test_a_prompt_that_tokenizes_differently_fails(smollm2_q4km, golden_check):
    manifest = read_manifest(smollm2_q4km)
    report = golden_check(with_prompt(manifest, 0, prompt="Write a short story about a robot who learns to dance."))
    check = report.checks[0]
    assert not report.passed and check.prompt_ids_equal is False
    assert "prompt 1: the prompt tokenizes differently from the record (first difference at token" in report.reason


@pytest.mark.slow
def test_checked_in_golden_manifests_pass_on_this_machine(smollm2_q4km, golden_check):
    """tests/golden/bundles/ hold the same files' records (same sha256): a board's view of an x86 record."""
    checked_in = read_manifest(GOLDEN_BUNDLES / Q4KM)
    assert checked_in.files == read_manifest(smollm2_q4km).files
    report = golden_check(checked_in)
    assert report.passed, report.reason
    assert read_manifest(GOLDEN_BUNDLES / "smollm2-135m-instruct-q8-0").golden is not None


# -- ONNX ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_records_three_embeddings_and_reproduces_them(minilm_bundle):  # noqa: F811
    from edgekit.runtime.golden import check_bundle

    golden = read_manifest(minilm_bundle).golden
    assert isinstance(golden, EncoderGolden)
    assert (golden.min_cosine, golden.max_probability_diff) == (0.99, None)
    assert len(golden.texts) == 3 and all(t.shape == [384] and t.labels == [] for t in golden.texts)
    lengths = [len(t.text) for t in golden.texts]
    assert lengths[1] == min(lengths) and lengths[2] == max(lengths)  # first, shortest, longest validation sentence
    report = check_bundle(minilm_bundle)
    assert report.passed and [c.name for c in report.checks] == ["text 1", "text 2", "text 3"]
    assert all(c.cosine > 0.99999 for c in report.checks)


@pytest.mark.slow
def test_checked_in_minilm_manifest_passes_on_this_machine(minilm_bundle):  # noqa: F811
    from edgekit.runtime.golden import check_golden, load_model

    checked_in = read_manifest(GOLDEN_BUNDLES / "all-minilm-l6-v2-int8-dynamic")
    fresh = read_manifest(minilm_bundle)
    assert checked_in.files == fresh.files
    report = check_golden(checked_in, load_model(minilm_bundle, fresh))
    assert report.recorded and report.passed, report.reason


@pytest.mark.slow
def test_a_different_embedding_fails_the_cosine_bound(minilm_bundle):  # noqa: F811
    from edgekit.runtime.golden import check_golden, load_model, unpack_f16

    manifest = read_manifest(minilm_bundle)
    texts = list(manifest.golden.texts)
    first, second = (unpack_f16(t.output, t.shape) for t in texts[:2])
    cosine = float(np.dot(first, second) / np.linalg.norm(first) / np.linalg.norm(second))
    texts[1] = texts[1].model_copy(update={"output": texts[0].output})
    tampered = manifest.model_copy(update={"golden": manifest.golden.model_copy(update={"texts": texts})})
    report = check_golden(tampered, load_model(minilm_bundle, manifest))
    assert not report.passed and [c.passed for c in report.checks] == [True, False, True]
    assert report.checks[1].cosine == pytest.approx(cosine, abs=1e-3) and cosine < 0.9
    assert report.reason == (f"golden check failed for all-minilm-l6-v2-int8-dynamic: text 2: cosine {report.checks[1].cosine:.6f} "
                             "(bound >= 0.99): outside the bound")


@pytest.mark.slow
def test_classifier_records_labels_and_probabilities(classifier_bundles):  # noqa: F811
    from edgekit.runtime.golden import check_bundle, check_golden, load_model, pack_f16, unpack_f16

    for task, bundle in classifier_bundles.items():
        manifest = read_manifest(bundle)
        golden = manifest.golden
        assert isinstance(golden, EncoderGolden) and golden.max_probability_diff == 0.02 and golden.min_cosine is None
        labels = set(manifest.runtime.labels)
        for text in golden.texts:
            assert set(text.labels) <= labels
            assert len(text.labels) == (1 if task == "text-classification" else text.shape[0])
        report = check_bundle(bundle)
        assert report.passed and all(c.max_probability_diff < 1e-3 and c.labels_equal for c in report.checks)

    bundle = classifier_bundles["text-classification"]
    manifest = read_manifest(bundle)
    model = load_model(bundle, manifest)
    text = manifest.golden.texts[0]
    probabilities = unpack_f16(text.output, text.shape)
    shifted = text.model_copy(update={"output": pack_f16(probabilities + np.array([0.05, -0.05], dtype=np.float32))})
    report = check_golden(manifest.model_copy(update={"golden": manifest.golden.model_copy(update={"texts": [shifted]})}), model)
    assert not report.passed and report.checks[0].max_probability_diff == pytest.approx(0.05, abs=1e-3)
    # A swapped label passes only when the recorded top two are within twice the bound (0.04): a near tie.
    other = [label for label in manifest.runtime.labels if label != text.labels[0]]
    swapped = text.model_copy(update={"labels": other})
    report = check_golden(manifest.model_copy(update={"golden": manifest.golden.model_copy(update={"texts": [swapped]})}), model)
    margin = float(abs(probabilities[0] - probabilities[1]))
    assert report.checks[0].labels_equal is False
    assert report.passed == (margin < 0.04)


def test_prompts_after_the_first_reuse_the_shared_prefix_with_the_same_results(smollm2_q4km, q4km_model):
    from edgekit.runtime.golden import greedy_logprobs

    prompts = read_manifest(smollm2_q4km).golden.prompts
    first, second = prompts[0].prompt_ids, prompts[1].prompt_ids
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= 20  # the chat template's system turn
    greedy_logprobs(q4km_model, first, 4)
    reused = greedy_logprobs(q4km_model, second, 8, reuse=True)
    assert q4km_model.llm.n_tokens == len(second) + 7
    fresh = greedy_logprobs(q4km_model, second, 8)
    assert [int(r.argmax()) for r in reused] == [int(f.argmax()) for f in fresh]
    assert max(float(np.abs(r - f).max()) for r, f in zip(reused, fresh)) < 1e-3


def test_a_worker_runs_its_golden_checks_on_a_thread_that_ends_with_them(smollm2_q4km, tmp_path, monkeypatch):
    """Not on the worker's main thread: an OpenMP team started there would outlive the checks beside the decode
    thread's, and libgomp would cap every barrier's spin at 1,000 turns (test_serve_unit.py counts the threads)."""
    import asyncio

    from serve_fixtures import TESTS_DIR

    from edgekit.serve.protocol import WorkerConfig
    from edgekit.serve.workers import WorkerProcess

    probe = tmp_path / "probe"
    monkeypatch.setenv("EDGEKIT_GOLDEN_PROBE", str(probe))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p))
    config = WorkerConfig(n_ctx=512, threads=1, batch_max=1, batch_max_tokens=64, max_prompt_chars=10_000,
                          plugins=["golden_thread_probe"])

    async def start() -> str:
        worker = WorkerProcess("q4km", smollm2_q4km, config, on_exit=lambda _: None)
        ready = await worker.start(timeout=300)
        await worker.stop(grace=5)
        return ready.task

    assert asyncio.run(start()) == "text-generation"  # Ready: the golden checks passed
    name, on_main = probe.read_text().split()
    assert on_main == "False" and name.startswith("golden")
