"""The decode speed model: kernel costs per instruction set and weight type, and how calibration uses points.

Numbers come from the golden bundles' metadata (SmolLM2-135M Q8_0 / Q4_K_M tensor types) and the device
catalog; nothing is timed here (scripts/bench_fit.py compares the model with measurements).
"""

from __future__ import annotations

import pytest

from edgekit.bundle import read_manifest
from edgekit.fit import from_manifest, speed
from edgekit.schema.device import load_catalog
from tests.conftest import REPO

BUNDLES = REPO / "tests" / "golden" / "bundles"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def works():
    return {q: speed.workload_of(from_manifest(read_manifest(BUNDLES / f"smollm2-135m-instruct-{q}")))
            for q in ("q8-0", "q4-k-m")}


def test_kernel_family_follows_the_isa(catalog):
    families = {d.id: speed.kernel_family(d) for d in catalog.values()}
    assert families["x86-64-avx2-generic"] == families["intel-n150-16gb"] == "avx2"
    assert families["rpi-5-8gb"] == families["jetson-orin-nano-8gb"] == "neon-dotprod"
    assert families["rpi-4-8gb"] == families["rpi-zero-2w"] == "neon"


def test_block_cycles(catalog):
    x86, pi4, zero = catalog["x86-64-avx2-generic"], catalog["rpi-4-8gb"], catalog["rpi-zero-2w"]
    assert speed.block_cycles("Q8_0", x86) == 4.0  # one FMA accumulator: latency-bound, not issue-bound
    assert speed.block_cycles("Q5_0", x86) == pytest.approx(27 / 5)
    assert speed.block_cycles("Q4_K", x86) == pytest.approx(10 / 5)  # repacked 8x8 gemv
    assert speed.block_cycles("Q8_0", pi4) == pytest.approx(11.0)  # emulated SDOT on Cortex-A72
    assert speed.block_cycles("Q5_0", zero) == pytest.approx(42 / 0.8)


def test_weights_by_type_from_the_bundle(works):
    assert dict(works["q8-0"].weights_by_type) == {"Q8_0": 134_479_872}
    assert dict(works["q4-k-m"].weights_by_type) == {"Q4_K": 14_155_776, "Q5_0": 78_077_952, "Q6_K": 12_386_304,
                                                     "Q8_0": 29_859_840}


def test_q4_k_m_gains_less_than_its_bytes_on_avx2(catalog, works):
    """SmolLM2 Q4_K_M streams 0.72x the bytes of Q8_0, but its Q5_0 fallback matrices cost more kernel time."""
    x86 = catalog["x86-64-avx2-generic"]
    q8, q4 = (speed.decode_terms(works[q], x86, threads=1) for q in ("q8-0", "q4-k-m"))
    assert q4.memory_s / q8.memory_s == pytest.approx(103_527_936 / 142_884_864)
    assert q8.compute_s == pytest.approx(134_479_872 / 32 * 4.0 / 2.45e9)
    assert q4.compute_s / q8.compute_s == pytest.approx(1.1275, rel=1e-3)
    speedup = speed.roofline_decode_tok_s(works["q4-k-m"], x86, 1) / speed.roofline_decode_tok_s(works["q8-0"], x86, 1)
    assert speedup == pytest.approx(1.0815, rel=1e-3)  # bandwidth alone would say 1.38


def test_attention_adds_kv_bytes_and_kernel_time(catalog, works):
    x86 = catalog["x86-64-avx2-generic"]
    short, deep = (speed.decode_terms(works["q8-0"], x86, 1, n_past) for n_past in (0, 8000))
    assert deep.memory_s - short.memory_s == pytest.approx(8000 * 23_040 / 20e9)
    per_head_ops = 2 * 16 * 64 / 32 + speed.VEC_DOT_CALL_OPS + speed.SOFTMAX_OPS
    assert deep.compute_s - short.compute_s == pytest.approx(30 * 9 * 8000 * per_head_ops / 5.0 / 2.45e9)


def test_a_board_calibrated_on_its_only_point_reproduces_it(catalog):
    board = catalog["rpi-5-16gb"]
    (point,) = board.calibration
    calibration = speed.calibrate(board, "decode", catalog.values())
    assert calibration.scope == "device"
    assert speed.point_prediction(point, board, "decode", calibration) == pytest.approx(point.decode_tok_s)


def test_leave_one_out_never_uses_the_point(catalog):
    board = catalog["rpi-5-16gb"]
    (point,) = board.calibration
    calibration = speed.calibrate(board, "decode", catalog.values(), exclude=point)
    assert calibration.scope == "core"
    assert "rpi-5-16gb: Llama 3.2 3B Q4_K_M" not in calibration.points
    assert "rpi-5-8gb: Llama 3.2 3B Q4_K_M" in calibration.points


def test_point_hidden_size_selects_the_fallback_type(catalog):
    (point,) = catalog["rpi-zero-2w"].calibration
    assert point.hidden_size == 960
    assert speed.workload_of_point(point).weights_by_type == (("Q5_0", point.parameters),)
    (llama,) = catalog["rpi-5-16gb"].calibration
    assert speed.workload_of_point(llama).weights_by_type == (("Q4_K", llama.parameters),)
