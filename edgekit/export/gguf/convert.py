"""Hugging Face checkpoint -> GGUF (f32 / f16 / bf16), one tensor in memory at a time.

The GGUF header (metadata, tokenizer, tensor table) is planned from config.json, the tokenizer
files and the safetensors headers alone; then tensors are read one by one from memory-mapped
safetensors, transformed for llama.cpp (architecture row), cast and appended. Tensor names come
from gguf's ``TensorNameMap`` for the architecture, and every name is checked against the
tensors that architecture declares (``gguf.MODEL_TENSORS``), so nothing unmapped slips through.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_TENSORS,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    get_tensor_name_map,
)

from edgekit.errors import ExportError, SourceError
from edgekit.export.gguf.architectures import ConverterArchitecture, architecture_for
from edgekit.export.gguf.vocab import Vocabulary, build_vocabulary
from edgekit.formats.gguf import FILE_TYPES

Progress = Callable[[str], None]

# Output type of the weight matrices -> (ggml type, llama.cpp file type).
OUTTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    name: (GGMLQuantizationType[t.main_type], LlamaFileType[t.ftype.removeprefix("LLAMA_FTYPE_")])
    for name, t in FILE_TYPES.items() if t.converter_output
}
# safetensors dtype -> numpy dtype holding the raw values (bf16 is read as uint16 bits).
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
F16_MAX = 65504.0
NUMPY_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True)
class SourceTensor:
    """A tensor inside a safetensors file: where its bytes are and what they hold."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    """The tensor table of one safetensors file, with every extent checked against the file size."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise SourceError(f"{path}: truncated safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 << 20):
            raise SourceError(f"{path}: safetensors header length {header_len} is past the end of the file")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{path}: safetensors header is not valid JSON") from exc
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ExportError(f"{path}: tensor {name} has dtype {dtype}; the converter reads F32, F16 and BF16 weights")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if not 0 <= begin <= end or end - begin != expected or data_start + end > size:
            raise SourceError(f"{path}: tensor {name} has inconsistent offsets {begin}..{end} for {dtype} {list(shape)}")
        tensors[name] = SourceTensor(name, dtype, shape, path, data_start + begin, end - begin)
    return tensors


class CheckpointTensors:
    """All tensors of a checkpoint directory (safetensors, or opted-in pickle), loaded one at a time as float32."""

    def __init__(self, source: Path, *, allow_pickle: bool = False) -> None:
        self.source = source
        files = sorted(source.glob("*.safetensors"))
        self._maps: dict[Path, np.memmap] = {}
        self._pickled: dict[str, object] = {}
        self.tensors: dict[str, SourceTensor] = {}
        if files:
            for path in files:
                self.tensors.update(read_safetensors_header(path))
            return
        pickles = sorted(p for pattern in ("pytorch_model*.bin", "*.pt", "*.pth") for p in source.glob(pattern))
        if not pickles:
            raise SourceError(f"{source}: no weights found (*.safetensors)", hint="check the source id or path")
        if not allow_pickle:
            raise SourceError(
                f"{source}: only pickle weights ({', '.join(p.name for p in pickles)}); loading pickle can execute code",
                hint="use a safetensors revision of the model, or set source.allow_pickle: true if you trust it",
            )
        import torch

        for path in pickles:
            # weights_only: the restricted unpickler (tensors and plain containers only).
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                self._pickled[name] = tensor
                self.tensors[name] = SourceTensor(name, str(tensor.dtype), tuple(tensor.shape), path, 0, 0)

    def load(self, name: str) -> np.ndarray:
        if name in self._pickled:
            return self._pickled[name].float().numpy()
        entry = self.tensors[name]
        if entry.file not in self._maps:
            self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
        raw = self._maps[entry.file][entry.start : entry.start + entry.nbytes].view(SAFETENSORS_DTYPES[entry.dtype])
        if entry.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry.shape)
        return raw.astype(np.float32).reshape(entry.shape)


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (NaN kept NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def cast(name: str, values: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    if ggml_type == GGMLQuantizationType.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type == GGMLQuantizationType.BF16:
        return to_bf16_bits(values)
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak > F16_MAX:
        raise ExportError(f"tensor {name} holds {peak:.4g}, beyond float16's range", hint="use quant: BF16 or F32 for this model")
    return values.astype(np.float16)


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name, numpy-order shape, type, and how to produce its float32 values."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    produce: Callable[[], np.ndarray]


@dataclass(frozen=True)
class ConversionReport:
    """What the converter wrote."""

    path: Path
    architecture: str
    outtype: str
    n_tensors: int
    parameters: int
    seconds: float
    vocabulary: Vocabulary


def _output_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> GGMLQuantizationType:
    # Vectors (norms, biases) and rope factors stay float32, as llama.cpp's kernels expect.
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32
    return OUTTYPES[outtype][0]


def plan_tensors(arch: ConverterArchitecture, tensors: CheckpointTensors, outtype: str) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its GGUF name, or fail naming the ones that do not map.

    The result must be exactly the tensors (names and shapes) the architecture definition lists, so the
    fit estimator, which reads the same definition, predicts what is written here.
    """
    name_map = get_tensor_name_map(arch.arch, arch.shape.n_layer)
    allowed = {TENSOR_NAMES[kind] for kind in MODEL_TENSORS[arch.arch]}
    planned, unmapped = [], []
    for hf_name, entry in tensors.tensors.items():
        if arch.skipped(hf_name):
            continue
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or re.sub(r"\.\d+\.", ".{bid}.", found[1]).rsplit(".", 1)[0] not in allowed:
            unmapped.append(hf_name)
            continue
        gguf_name = found[1]
        if arch.shape.tied_embeddings and gguf_name == "output.weight":
            continue  # llama.cpp reuses token_embd when output is absent

        def produce(hf_name=hf_name, gguf_name=gguf_name):
            return arch.transform(gguf_name, tensors.load(hf_name))

        planned.append(PlannedTensor(gguf_name, entry.shape, _output_type(gguf_name, entry.shape, outtype), produce))
    if unmapped:
        raise ExportError(
            f"{tensors.source}: {len(unmapped)} tensors have no {arch.gguf_name} GGUF counterpart: {', '.join(unmapped[:8])}",
            hint="the checkpoint is not a plain decoder of this architecture (adapters, vision towers?)",
        )
    for gguf_name, values in arch.extra_tensors().items():
        planned.append(PlannedTensor(gguf_name, values.shape, GGMLQuantizationType.F32, lambda values=values: values))
    names = [t.name for t in planned]
    if "token_embd.weight" not in names:
        raise ExportError(f"{tensors.source}: no token embedding found among the checkpoint's tensors")
    expected = {t.name: tuple(t.shape) for t in arch.definition.tensors(arch.shape)}
    got = {t.name: tuple(t.shape) for t in planned}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        reshaped = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
        raise ExportError(
            f"{tensors.source}: the checkpoint's tensors differ from the {arch.definition.name} definition "
            f"(missing {missing[:4]}, unexpected {extra[:4]}, other shape {reshaped[:4]})",
            hint="config.json and the weights disagree, or the checkpoint is a variant this definition does not describe",
        )
    return planned


def _gguf_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    width = 4 if ggml_type == GGMLQuantizationType.F32 else 2
    return int(np.prod(shape, dtype=np.int64)) * width


@contextmanager
def _writer(path: Path, arch: str) -> Iterator[GGUFWriter]:
    writer = GGUFWriter(path, arch)
    try:
        yield writer
    finally:
        writer.close()


def convert_checkpoint(
    source: Path,
    out_path: Path,
    *,
    outtype: str = "F16",
    name: str | None = None,
    allow_pickle: bool = False,
    progress: Progress = lambda message: None,
) -> ConversionReport:
    """Write ``source`` (a Hugging Face checkpoint directory) as a GGUF file at ``out_path``."""
    if outtype not in OUTTYPES:
        raise ExportError(f"conversion output type {outtype!r} unknown; use one of {', '.join(OUTTYPES)}")
    started = time.perf_counter()
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    arch = architecture_for(config)
    tensors = CheckpointTensors(source, allow_pickle=allow_pickle)
    vocabulary = build_vocabulary(source, arch.shape.n_vocab)
    planned = plan_tensors(arch, tensors, outtype)

    with _writer(out_path, arch.gguf_name) as writer:
        writer.add_type("model")
        writer.add_name(name or config.get("_name_or_path") or source.name)
        arch.hparams(writer)
        writer.add_file_type(OUTTYPES[outtype][1])
        writer.add_quantization_version(GGML_QUANT_VERSION)
        vocabulary.write(writer)
        for tensor in planned:
            raw_dtype = tensor.ggml_type if tensor.ggml_type == GGMLQuantizationType.BF16 else None
            numpy_dtype = NUMPY_TYPES.get(tensor.ggml_type, np.uint16)  # bf16 travels as raw uint16
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(numpy_dtype), _gguf_nbytes(tensor.shape, tensor.ggml_type),
                                   raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        step = max(1, len(planned) // 10)
        for index, tensor in enumerate(planned, 1):
            values = tensor.produce()
            if tuple(values.shape) != tuple(tensor.shape):
                raise ExportError(f"tensor {tensor.name}: produced shape {values.shape}, planned {tensor.shape}")
            writer.write_tensor_data(cast(tensor.name, values, tensor.ggml_type))
            if index % step == 0 or index == len(planned):
                progress(f"converting to {outtype}: {index}/{len(planned)} tensors")
    parameters = sum(int(np.prod(t.shape, dtype=np.int64)) for t in planned if not t.name.startswith("rope_"))
    seconds = time.perf_counter() - started
    return ConversionReport(out_path, arch.gguf_name, outtype, len(planned), parameters, seconds, vocabulary)
