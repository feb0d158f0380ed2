"""docs/reliability.md case 1: crafted or truncated GGUF files are rejected by the header check, before llama.cpp sees them."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import SMOLLM_GGUF

from edgekit.errors import BundleError
from edgekit.runtime.gguf_file import GgufArray, bits_per_weight, gguf_facts, read_gguf_header

ALIGN = 32


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + payload


def gguf_bytes(*, n_tensors: int | None = None, n_kv: int | None = None, version: int = 3, kvs: list[bytes] | None = None,
               tensors: list[tuple[str, tuple[int, ...], int, int]] | None = None, data: bytes | None = None) -> bytes:
    """A GGUF file assembled field by field, so tests know where every number sits.

    Default: architecture 'llama' with the usual hyper-parameters and two F32 tensors (4 and 8 floats).
    """
    if kvs is None:
        kvs = [
            _kv("general.architecture", 8, _string("llama")),
            _kv("llama.context_length", 4, struct.pack("<I", 256)),
            _kv("llama.block_count", 4, struct.pack("<I", 1)),
            _kv("llama.attention.head_count", 4, struct.pack("<I", 2)),
            _kv("llama.embedding_length", 4, struct.pack("<I", 8)),
            _kv("llama.vocab_size", 4, struct.pack("<I", 4)),
            _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 4) + b"".join(_string(t) for t in "abcd")),
        ]
    if tensors is None:
        tensors = [("a.weight", (4,), 0, 0), ("b.weight", (4, 2), 0, 32)]
    if data is None:
        data = np.arange(4, dtype=np.float32).tobytes().ljust(32, b"\0") + np.arange(8, dtype=np.float32).tobytes()
    n_tensors = len(tensors) if n_tensors is None else n_tensors
    n_kv = len(kvs) if n_kv is None else n_kv
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)
    body = b"".join(kvs)
    for name, shape, ggml_type, offset in tensors:
        body += _string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        body += struct.pack("<IQ", ggml_type, offset)
    header = head + body
    header += b"\0" * (-len(header) % ALIGN)
    return header + data


def long_vocabulary() -> bytes:
    """A file whose only key is a 100-token vocabulary ("t00" ... "t99"), longer than the arrays the reader keeps."""
    tokens = b"".join(_string(f"t{i:02}") for i in range(100))
    return gguf_bytes(kvs=[_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 100) + tokens)])


def write(tmp_path: Path, blob: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def test_well_formed_file_parses_and_matches_gguf_reader(tmp_path):
    from gguf import GGUFReader

    path = write(tmp_path, gguf_bytes())
    header = read_gguf_header(path)
    reader = GGUFReader(str(path))
    assert [(t.name, t.shape, t.nbytes) for t in header.tensors] == [("a.weight", (4,), 16), ("b.weight", (4, 2), 32)]
    ours = [(t.name, t.offset, t.nbytes) for t in header.tensors]
    assert [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors] == ours
    assert header.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c", "d"]
    facts = gguf_facts(header)
    assert (facts.architecture, facts.context_length, facts.n_head, facts.n_head_kv, facts.n_vocab) == ("llama", 256, 2, 2, 4)
    assert facts.bits_per_weight == 32.0


# Each crafted file, and a fragment the error must contain.
HOSTILE = {
    "tensor count 2^32": (lambda: gguf_bytes(n_tensors=1 << 32), "claims 4294967296 tensors"),
    "tensor count 2^64-1": (lambda: gguf_bytes(n_tensors=(1 << 64) - 1), "tensors, which cannot fit"),
    "kv count 2^32": (lambda: gguf_bytes(n_kv=1 << 32), "claims 4294967296 key/value pairs"),
    # The tensor table is then read as a key/value pair, which cannot be parsed consistently.
    "one kv more than present": (lambda: gguf_bytes(n_kv=8), "not a valid GGUF file"),
    "key length past EOF": (lambda: gguf_bytes(kvs=[struct.pack("<Q", 500) + b"general"]), "claims 500 bytes, past the end"),
    "key length 2^40": (lambda: gguf_bytes(kvs=[struct.pack("<Q", 1 << 40) + b"general"]), "more than the 65536 allowed"),
    "string value past EOF": (
        lambda: gguf_bytes(kvs=[_string("general.architecture") + struct.pack("<IQ", 8, 1 << 31) + b"llama"]), "past the end"),
    "array of 2^40 strings": (
        lambda: gguf_bytes(kvs=[_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 40)]),
        "claims 1099511627776 items"),
    "array of arrays": (lambda: gguf_bytes(kvs=[_string("x") + struct.pack("<IIQ", 9, 9, 1)]), "array of arrays"),
    "unknown value type": (lambda: gguf_bytes(kvs=[_string("x") + struct.pack("<I", 99)]), "unknown value type 99"),
    "tensor offset past EOF": (lambda: gguf_bytes(tensors=[("a.weight", (4,), 0, 1 << 40)]), "extends past the end of the file"),
    "tensor size past EOF": (lambda: gguf_bytes(tensors=[("a.weight", (4096, 4096), 0, 0)]), "extends past the end of the file"),
    "overflowing shape": (lambda: gguf_bytes(tensors=[("a.weight", (1 << 40, 1 << 40), 0, 0)]), "absurd shape"),
    "misaligned offset": (lambda: gguf_bytes(tensors=[("a.weight", (4,), 0, 3)]), "not aligned"),
    "overlapping tensors": (lambda: gguf_bytes(tensors=[("a.weight", (4,), 0, 0), ("b.weight", (4, 2), 0, 0)]), "overlaps"),
    "duplicate tensor name": (
        lambda: gguf_bytes(tensors=[("a.weight", (4,), 0, 0), ("a.weight", (4,), 0, 32)]), "duplicate name"),
    "five dimensions": (lambda: gguf_bytes(tensors=[("a.weight", (1, 1, 1, 1, 4), 0, 0)]), "5 dimensions"),
    "unknown ggml type": (lambda: gguf_bytes(tensors=[("a.weight", (4,), 77, 0)]), "unknown ggml type 77"),
    "Q4_0 row not a block multiple": (lambda: gguf_bytes(tensors=[("a.weight", (4,), 2, 0)]), "not a multiple of the Q4_0 block"),
    "bad magic": (lambda: b"GGML" + gguf_bytes()[4:], "magic is not 'GGUF'"),
    "version 1": (lambda: gguf_bytes(version=1), "version 1 is not supported"),
    "big-endian version": (lambda: gguf_bytes(version=3 << 24), "is not supported"),
    "truncated in the header": (lambda: gguf_bytes()[:60], "header claims 7 key/value pairs, which cannot fit in the 36 bytes"),
    "truncated in a token string": (lambda: gguf_bytes()[:330], "item 3 of tokenizer.ggml.tokens claims 1 bytes, past the end"),
    # A vocabulary longer than the kept arrays is stepped over, not decoded (its items start at byte 69, 11 bytes
    # each); a string past the end is still caught.
    "truncated in a long vocabulary": (
        lambda: long_vocabulary()[:69 + 11 * 80 + 8 + 2],
        "item 80 of tokenizer.ggml.tokens claims 3 bytes, past the end of the file (2 left)"),
    "a long vocabulary ends mid-length": (
        lambda: long_vocabulary()[:69 + 11 * 85 + 5],
        "length of item 85 of tokenizer.ggml.tokens needs 8 bytes, only 5 left"),
    "truncated in the tensor table": (lambda: gguf_bytes()[:400], "dimension 1 of b.weight needs 8 bytes, only 1 left"),
    "truncated before the data": (lambda: gguf_bytes()[:440], "tensor data would start at byte 448, past the end"),
    "truncated in the tensor data": (lambda: gguf_bytes()[:-8], "extends past the end of the file"),
    "empty file": (lambda: b"", "shorter than the 24-byte header"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_rejected_with_a_clear_error(tmp_path, case):
    make, expected = HOSTILE[case]
    path = write(tmp_path, make())
    tracemalloc.start()
    try:
        with pytest.raises(BundleError) as caught:
            read_gguf_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)
    assert caught.value.exit_code == 1
    # Absurd counts and lengths never turn into allocations: the check stays within 1 MB.
    assert peak < 1 << 20


def test_every_prefix_of_a_valid_file_is_rejected(tmp_path):
    """Truncation at any byte is an error, never a crash or a partial header."""
    blob = gguf_bytes()
    rejected = 0
    for cut in range(len(blob)):
        path = write(tmp_path, blob[:cut], f"cut{cut}.gguf")
        with pytest.raises(BundleError):
            read_gguf_header(path)
        rejected += 1
    assert rejected == len(blob) == 512


def test_missing_file_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="cannot open GGUF file"):
        read_gguf_header(tmp_path / "absent.gguf")


def test_llama_cpp_never_sees_a_rejected_file(tmp_path, monkeypatch):
    """The board-side order: header check first; a crafted file raises before any llama_cpp loader is called."""
    import llama_cpp

    calls = []
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", lambda *a: calls.append(a))
    path = write(tmp_path, gguf_bytes(n_tensors=1 << 32))
    with pytest.raises(BundleError):
        read_gguf_header(path)
    assert calls == []


@pytest.mark.slow
def test_upstream_smollm2_header(sample_store):
    path = sample_store / SMOLLM_GGUF / "SmolLM2-135M-Instruct.Q4_1.gguf"
    header = read_gguf_header(path)
    assert header.version == 3
    assert len(header.tensors) == 272
    assert header.data_offset == 1785664
    assert isinstance(header.metadata["tokenizer.ggml.tokens"], GgufArray)
    assert header.metadata["tokenizer.ggml.tokens"].count == 49152
    assert header.metadata["tokenizer.ggml.pre"] == "smollm"
    facts = gguf_facts(path)
    assert facts.model_dump(exclude={"bits_per_weight"}) == {
        "architecture": "llama", "context_length": 8192, "n_layer": 30, "n_head": 9, "n_head_kv": 3, "n_embd": 576,
        "n_vocab": 49152, "quant_type": "Q4_1", "key_length": None, "value_length": None, "requantized_from": None,
    }
    # Q4_1 is 5 bits per weight; the Q8_0 embedding (a fifth of the weights) and f32 norms raise it.
    assert facts.bits_per_weight == pytest.approx(bits_per_weight(header), abs=1e-4)
    assert 5.7 < facts.bits_per_weight < 5.8
    assert header.file_size - header.data_offset == sum(t.nbytes for t in header.tensors) + sum(
        -t.nbytes % 32 for t in header.tensors[:-1])
