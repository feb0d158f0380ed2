"""Board side: read and sanity-check a GGUF header before llama.cpp is allowed to open the file.

llama.cpp's GGUF parser has had a run of memory-safety bugs driven by crafted headers (huge
tensor/kv counts that make it allocate, string lengths and tensor extents past the end of the
file, integer overflows in size arithmetic; docs/reliability.md case 1). This reader walks the header
with every count and length checked against the bytes that are actually left in the file, so a
hostile or truncated file is rejected with a ``BundleError`` naming the problem while nothing
large has been allocated. It is plain Python over a read-only mmap and loads only ``gguf``'s
constant tables.

Layout (GGUF v2/v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
magic "GGUF", u32 version, u64 tensor count, u64 kv count, the key/value pairs, the tensor
infos (name, u32 n_dims, u64 dims, u32 ggml type, u64 offset), padding to ``general.alignment``,
then the tensor data.
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edgekit.errors import BundleError
from edgekit.schema.manifest import GgufFacts


def _gguf_constants() -> ModuleType:
    """``gguf.constants`` (stdlib-only tables) without running ``gguf/__init__``, which imports numpy and every gguf module:
    0.17 s of each model worker's and bundle verifier's start. The enums are IntEnums, equal to the package's own."""
    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    package = importlib.util.find_spec("gguf")
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError("the gguf package is not installed")
    path = Path(package.submodule_search_locations[0]) / "constants.py"
    spec = importlib.util.spec_from_file_location("edgekit.runtime._gguf_constants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and enums look their module up while it executes
    spec.loader.exec_module(module)
    return module


_constants = _gguf_constants()
GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType = (_constants.GGML_QUANT_SIZES, _constants.GGMLQuantizationType,
                                                          _constants.LlamaFileType)

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT in ggml/include/gguf.h
MAX_DIMS = 4  # GGML_MAX_DIMS
# Absolute caps on top of the "fits in the remaining bytes" checks. Real models stay far below
# them (a 70B llama has ~720 tensors and ~40 keys); the caps bound the work a crafted file causes.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_ARRAY_ITEMS = 1 << 26
# Arrays up to this many items are kept as values; longer ones (token lists, merges) are walked
# and bounds-checked, and kept as their element type and count only.
KEEP_ARRAY_ITEMS = 64
# Smallest encodings, used to reject counts that could not fit in the bytes left.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length + 1-byte key + value type + 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length + 1-byte name + n_dims + 1 dim + type + offset

# GGUF value types (gguf.GGUFValueType): code -> struct format of one scalar.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")  # a string's length prefix


@dataclass(frozen=True)
class GgufArray:
    """A long metadata array, summarised: its element type code and length (contents bounds-checked, not kept)."""

    item_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by the header; ``offset`` is absolute in the file."""

    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (contiguous) first
    ggml_type: str
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        total = 1
        for dim in self.shape:
            total *= dim
        return total


@dataclass(frozen=True)
class GgufHeader:
    """The checked header of a GGUF file."""

    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise BundleError(f"{self.path}: GGUF has no general.architecture string")
        return arch


class _Cursor:
    """Reads little-endian values from a buffer, refusing to go past its end."""

    def __init__(self, buffer, path: Path) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> BundleError:
        return BundleError(f"{self.path}: not a valid GGUF file: {what} (at byte {self.pos} of {self.size})",
                           hint="re-export or re-download the file; it is truncated, corrupted or crafted")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        self.skip(n, what)
        return self.buffer[self.pos - n : self.pos]

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.left:
            raise self.fail(f"{what} needs {n} bytes, only {self.left} left")
        self.pos += n

    def scalar(self, fmt: str, what: str):
        width = struct.calcsize(fmt)
        if width > self.left:
            raise self.fail(f"{what} needs {width} bytes, only {self.left} left")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += width
        return value

    def string_length(self, what: str, limit: int | None = None) -> int:
        length = self.scalar("<Q", f"length of {what}")
        if limit is not None and length > limit:
            raise self.fail(f"{what} is {length} bytes long, more than the {limit} allowed")
        if length > self.left:
            raise self.fail(f"{what} claims {length} bytes, past the end of the file ({self.left} left)")
        return length

    def skip_strings(self, count: int, key: str) -> None:
        """Step over ``count`` length-prefixed strings (a vocabulary: ~50,000 of them, so one tight loop)."""
        buffer, pos, size, length_at = self.buffer, self.pos, self.size, _U64.unpack_from
        for index in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"length of item {index} of {key} needs 8 bytes, only {size - pos} left")
            (length,) = length_at(buffer, pos)
            if length > size - pos - 8:
                self.pos = pos + 8
                raise self.fail(f"item {index} of {key} claims {length} bytes, past the end of the file ({self.left} left)")
            pos += 8 + length
        self.pos = pos

    def text(self, what: str, limit: int | None = None, errors: str = "strict") -> str:
        raw = self.take(self.string_length(what, limit), what)
        try:
            return raw.decode("utf-8", errors=errors)
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8") from exc


def _value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype], f"value of {key}")
    if vtype == _STRING:
        return cur.text(f"string value of {key}")
    if vtype != _ARRAY:
        raise cur.fail(f"key {key!r} has unknown value type {vtype}")
    item_type = cur.scalar("<I", f"array type of {key}")
    count = cur.scalar("<Q", f"array length of {key}")
    if item_type == _ARRAY:
        raise cur.fail(f"key {key!r} is an array of arrays, which llama.cpp does not load")
    if item_type == _STRING:
        smallest = 8
    elif item_type in _SCALARS:
        smallest = struct.calcsize(_SCALARS[item_type])
    else:
        raise cur.fail(f"key {key!r} is an array of unknown type {item_type}")
    if count > MAX_ARRAY_ITEMS or count * smallest > cur.left:
        raise cur.fail(f"array {key!r} claims {count} items, which cannot fit in the {cur.left} bytes left")
    if item_type == _STRING:
        if count <= KEEP_ARRAY_ITEMS:
            return [cur.text(f"item {index} of {key}", errors="replace") for index in range(count)]
        cur.skip_strings(count, key)
        return GgufArray(item_type, count)
    if count > KEEP_ARRAY_ITEMS:
        cur.skip(count * smallest, f"items of {key}")
        return GgufArray(item_type, count)
    return [v for (v,) in struct.iter_unpack(_SCALARS[item_type], cur.take(count * smallest, f"items of {key}"))]


def _tensor_nbytes(cur: _Cursor, name: str, shape: tuple[int, ...], type_code: int) -> tuple[str, int]:
    try:
        ggml_type = GGMLQuantizationType(type_code)
    except ValueError:
        raise cur.fail(f"tensor {name!r} has unknown ggml type {type_code}") from None
    if ggml_type not in GGML_QUANT_SIZES:
        raise cur.fail(f"tensor {name!r} has ggml type {ggml_type.name} without a known block size")
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if shape[0] % block:
        raise cur.fail(f"tensor {name!r}: first dimension {shape[0]} is not a multiple of the {ggml_type.name} block ({block})")
    elements = 1
    for dim in shape:
        elements *= dim
        if elements >= 1 << 62:  # ggml keeps sizes in int64; refuse anything near overflow
            raise cur.fail(f"tensor {name!r} has an absurd shape {list(shape)}")
    return ggml_type.name, elements // block * type_size


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse and check the header of ``path``; any inconsistency is a ``BundleError``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        handle = path.open("rb")
    except OSError as exc:
        raise BundleError(f"{path}: cannot open GGUF file: {exc.strerror}") from exc
    with handle:
        if size < 24:
            raise BundleError(f"{path}: not a valid GGUF file: {size} bytes is shorter than the 24-byte header",
                              hint="the file is truncated or empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse(buffer, path, size)


def _parse(buffer, path: Path, size: int) -> GgufHeader:
    cur = _Cursor(buffer, path)
    if bytes(cur.take(4, "magic")) != MAGIC:
        raise cur.fail("magic is not 'GGUF'")
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"GGUF version {version} is not supported (expected 2 or 3, little-endian)")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "key/value count")
    if n_kv > MAX_KV or n_kv * MIN_KV_BYTES > cur.left:
        raise cur.fail(f"header claims {n_kv} key/value pairs, which cannot fit in the {cur.left} bytes left")
    if n_tensors > MAX_TENSORS or n_tensors * MIN_TENSOR_INFO_BYTES > cur.left:
        raise cur.fail(f"header claims {n_tensors} tensors, which cannot fit in the {cur.left} bytes left")

    metadata: dict[str, Any] = {}
    for index in range(n_kv):
        key = cur.text(f"key {index}", limit=MAX_KEY_BYTES)
        if not key:
            raise cur.fail(f"key {index} is empty")
        if key in metadata:
            raise cur.fail(f"key {key!r} appears twice")
        metadata[key] = _value(cur, cur.scalar("<I", f"value type of {key}"), key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a positive power of two")

    raw_tensors = []
    names: set[str] = set()
    for index in range(n_tensors):
        name = cur.text(f"name of tensor {index}", limit=MAX_KEY_BYTES)
        if not name or name in names:
            raise cur.fail(f"tensor {index} has an empty or duplicate name {name!r}")
        names.add(name)
        n_dims = cur.scalar("<I", f"n_dims of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.scalar("<Q", f"dimension {d} of {name}") for d in range(n_dims))
        if any(dim == 0 for dim in shape):
            raise cur.fail(f"tensor {name!r} has a zero dimension {list(shape)}")
        type_code = cur.scalar("<I", f"type of {name}")
        offset = cur.scalar("<Q", f"offset of {name}")
        type_name, nbytes = _tensor_nbytes(cur, name, shape, type_code)
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        raw_tensors.append((name, shape, type_name, offset, nbytes))

    data_offset = -(-cur.pos // alignment) * alignment
    if data_offset > size:
        raise cur.fail(f"tensor data would start at byte {data_offset}, past the end of the file")
    data_size = size - data_offset
    tensors = []
    end_of_previous = 0
    for name, shape, type_name, offset, nbytes in sorted(raw_tensors, key=lambda t: t[3]):
        if offset < end_of_previous:
            raise cur.fail(f"tensor {name!r} at data offset {offset} overlaps the tensor before it")
        if offset + nbytes > data_size:
            raise cur.fail(
                f"tensor {name!r} ({type_name} {list(shape)}, {nbytes} bytes at data offset {offset}) "
                f"extends past the end of the file ({data_size} data bytes)"
            )
        end_of_previous = offset + nbytes
        tensors.append(TensorInfo(name, shape, type_name, data_offset + offset, nbytes))
    order = {t[0]: i for i, t in enumerate(raw_tensors)}
    tensors.sort(key=lambda t: order[t.name])
    return GgufHeader(path, version, size, alignment, data_offset, metadata, tuple(tensors))


def _int(header: GgufHeader, key: str, *, required: bool = True) -> int | None:
    value = header.get(key)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        value = max(value)  # per-layer values (e.g. head counts): the largest bounds the memory
    if isinstance(value, bool) or not isinstance(value, int):
        if required:
            raise BundleError(f"{header.path}: GGUF metadata {key} is missing or not an integer (got {value!r})")
        return None
    return value


def _file_type_name(header: GgufHeader) -> str:
    code = header.get("general.file_type")
    if isinstance(code, int):
        try:
            name = LlamaFileType(code).name
        except ValueError:
            name = f"file_type_{code}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    # No file_type key: name the most common type among the matrices.
    counts: dict[str, int] = {}
    for tensor in header.tensors:
        if len(tensor.shape) > 1:
            counts[tensor.ggml_type] = counts.get(tensor.ggml_type, 0) + tensor.n_elements
    return max(counts, key=counts.get) if counts else "unknown"


def n_vocab(header: GgufHeader) -> int:
    tokens = header.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GgufArray):
        return tokens.count
    if isinstance(tokens, list):
        return len(tokens)
    vocab = _int(header, f"{header.architecture}.vocab_size", required=False)
    if vocab is None:
        raise BundleError(f"{header.path}: GGUF has neither tokenizer.ggml.tokens nor {header.architecture}.vocab_size")
    return vocab


def bits_per_weight(header: GgufHeader) -> float:
    """Bits of all tensor data per weight (what llama.cpp's loader reports as BPW, without the header)."""
    elements = sum(t.n_elements for t in header.tensors)
    if not elements:
        raise BundleError(f"{header.path}: GGUF has no tensors")
    return 8 * sum(t.nbytes for t in header.tensors) / elements


def gguf_facts(source: Path | GgufHeader) -> GgufFacts:
    """The manifest's GGUF facts, read from a (checked) header."""
    header = source if isinstance(source, GgufHeader) else read_gguf_header(source)
    arch = header.architecture
    n_head = _int(header, f"{arch}.attention.head_count")
    return GgufFacts(
        architecture=arch,
        context_length=_int(header, f"{arch}.context_length"),
        n_layer=_int(header, f"{arch}.block_count"),
        n_head=n_head,
        n_head_kv=_int(header, f"{arch}.attention.head_count_kv", required=False) or n_head,
        n_embd=_int(header, f"{arch}.embedding_length"),
        n_vocab=n_vocab(header),
        quant_type=_file_type_name(header),
        bits_per_weight=round(bits_per_weight(header), 4),
        key_length=_int(header, f"{arch}.attention.key_length", required=False),
        value_length=_int(header, f"{arch}.attention.value_length", required=False),
    )
