"""The decode speed model: kernel costs per instruction set and weight type, and how calibration uses points.

Numbers come from the golden bundles' metadata (SmolLM2-135M Q8_0 / Q4_K_M tensor types) and the device
catalog; nothing is timed here (scripts/bench_fit.py compares the model with measurements).
"""

from __future__ import annotations

import pytest
from helpers import REPO

from edgekit.bundle import read_manifest
from edgekit.fit import from_manifest, speed
from edgekit.schema.device import load_catalog

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
    assert (deep.memory_s, deep.compute_s) == (short.memory_s, short.compute_s)  # the weights' part
    assert short.attention_s == 0
    per_head_ops = 2 * 16 * 64 / 32 + speed.VEC_DOT_CALL_OPS + speed.SOFTMAX_OPS
    kv_read = 8000 * 23_040 / 20e9
    assert deep.attention_s == pytest.approx(kv_read + 30 * 9 * 8000 * per_head_ops / 5.0 / 2.45e9)


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


def test_onnx_scheme_follows_the_quantization_label():
    schemes = speed.ONNX_SCHEMES
    assert speed.onnx_scheme("int8-dynamic-block128") is schemes["int8-dynamic-block"]
    assert speed.onnx_scheme("int8-dynamic-per-channel") is schemes["int8-dynamic"]
    assert speed.onnx_scheme("int8-dynamic") is schemes["int8-dynamic"]
    assert speed.onnx_scheme("int8-static-per-channel") is schemes["int8-static"]
    assert speed.onnx_scheme("fp32") is schemes["fp32"]


def test_encoder_latency_is_a_call_pass_plus_per_token_work(catalog):
    x86 = catalog["x86-64-avx2-generic"]
    int8, fp32 = x86.calibration  # all-MiniLM-L6-v2, published side by side
    weights = 12 * 6 * 384**2
    for point, int8_path, call, efficiency in ((int8, True, 0.42, 0.24), (fp32, False, 0.92, 0.71)):
        peak = 128 if int8_path else 32
        cycles = weights * call + 12 * 2 * weights / (peak * efficiency)
        expected = 1e3 * cycles / (2 * 2.45e9) + 600 / 2.45 / 1e3
        work = speed.workload_of_point(point)
        assert work.streamed_bytes == pytest.approx(point.weights_bytes * weights / point.parameters)
        assert speed.roofline_encoder_ms(work, x86, 12, 1, 2) == pytest.approx(expected)


def test_the_fp32_point_calibrates_the_int8_point_left_out(catalog):
    x86 = catalog["x86-64-avx2-generic"]
    int8, fp32 = x86.calibration
    calibration = speed.calibrate(x86, "encoder", catalog.values(), exclude=int8)
    assert calibration.scope == "device"
    assert calibration.points == ("x86-64-avx2-generic: all-MiniLM-L6-v2 fp32",)
    assert calibration.factor == pytest.approx(speed.point_prediction(fp32, x86, "encoder") / fp32.latency_ms)
    predicted = speed.point_prediction(int8, x86, "encoder", calibration)
    assert predicted == pytest.approx(1.912, abs=1e-3)  # published 2.22 ms


def _with_points(device, *points):
    return device.model_copy(update={"calibration": list(points)})


def test_a_deep_point_sets_the_attention_factor_and_only_that(catalog, works):
    """A decode point measured 2,000 tokens into the context prices attention; the short point prices the weights."""
    from edgekit.schema.device import CalibrationPoint

    x86 = catalog["x86-64-avx2-generic"]
    shape = dict(model="SmolLM2-135M", quant="Q8_0", parameters=134_515_008, weights_bytes=144_810_784, n_layer=30,
                 threads=1, measured_on="test", source="tests")
    short = CalibrationPoint(**shape, decode_tok_s=40.0)
    base = speed.calibrate(_with_points(x86, short), "decode")
    assert base.attention_scale == base.factor and base.attention_points == ()
    work = speed.workload_of_point(short)
    # The speed at depth the short point's factor predicts, and a board where attention is 2x slower than that.
    deep_shape = dict(shape, n_head=9, n_head_kv=3, head_dim=64, context_tokens=2000)
    attention_work = speed.workload_of_point(CalibrationPoint(**deep_shape, decode_tok_s=1.0))
    assert attention_work.kv_bytes_per_token == works["q8-0"].kv_bytes_per_token == 23_040
    t = speed.decode_terms(attention_work, x86, 1, 2000)
    slow = 1.0 / ((t.memory_s + t.compute_s) / base.factor + 2 * t.attention_s / base.factor + t.overhead_s)
    deep = CalibrationPoint(**deep_shape, decode_tok_s=slow)
    board = _with_points(x86, short, deep)
    calibration = speed.calibrate(board, "decode")
    assert calibration.factor == pytest.approx(base.factor)
    assert calibration.attention_scale == pytest.approx(base.factor / 2)
    assert calibration.attention_points == ("x86-64-avx2-generic: SmolLM2-135M Q8_0 at 2000 tokens of context",)
    assert speed.point_prediction(deep, board, "decode", calibration) == pytest.approx(slow)
    assert speed.roofline_decode_tok_s(work, board, 1, 0, calibration) == pytest.approx(40.0)  # short speed unchanged
    # Left out, the deep point prices nothing; the short one left out, the deep one prices everything.
    without_deep = speed.calibrate(board, "decode", exclude=deep)
    assert (without_deep.factor, without_deep.attention_scale, without_deep.attention_points) == (base.factor, base.factor, ())
    deep_only = speed.calibrate(board, "decode", exclude=short)
    assert deep_only.scope == "device" and deep_only.attention_points == ()
    assert deep_only.attention_scale == deep_only.factor
    assert speed.point_prediction(deep, board, "decode", deep_only) == pytest.approx(slow)
    # A deep point where attention is a sliver of the time (timing noise) is not used to price it.
    noisy = CalibrationPoint(**dict(deep_shape, context_tokens=20), decode_tok_s=40.5)
    assert speed.calibrate(_with_points(x86, short, noisy), "decode").attention_points == ()


def test_a_deep_point_needs_the_attention_shape():
    from pydantic import ValidationError

    from edgekit.schema.device import CalibrationPoint

    with pytest.raises(ValidationError, match="context_tokens needs n_head, n_head_kv, head_dim"):
        CalibrationPoint(model="m", quant="Q8_0", parameters=1, n_layer=30, decode_tok_s=5.0, context_tokens=2000,
                         measured_on="test", source="tests")
