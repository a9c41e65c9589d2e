"""A GGUF file's metadata and tensor directory, read without parsing its vocabulary.

gguf-py's GGUFReader builds numpy views of every element of every metadata array, so opening the
bundled SmolLM2 file (49,152 tokens and 48,900 merges as strings) took 2.7 s of a 9.7 s `conserve
chat`. The engine needs none of those strings (the tokenizer is built by `transformers` and cached,
see tokenizer_cache.py), only their count; here arrays longer than MAX_METADATA_ARRAY are stepped over
and only their length kept. Tensors are numpy views of a read-only memory map, laid out as GGUFReader
lays them out, so gguf-py's `quants.dequantize` takes them as they are.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3, little-endian)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Longer arrays are vocabularies, merge lists and token types: counted, not read.
MAX_METADATA_ARRAY = 1024

# GGUF value types: struct format of each scalar type (8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Tensor types numpy reads as plain elements (gguf-py's choice too); every other type is raw bytes.
_PLAIN_TENSOR_DTYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
                        28: np.float64}


@dataclass
class GGUFTensor:
    """One tensor's directory entry; the attribute names are GGUFReader's ReaderTensor's."""
    name: str
    tensor_type: Any             # gguf.GGMLQuantizationType
    shape: tuple[int, ...]       # GGUF order: fastest-varying dimension first
    data: np.ndarray             # view of the memory map: elements, or bytes for quantised types


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]                 # key -> value; arrays longer than MAX_METADATA_ARRAY left out
    array_lengths: dict[str, int]            # every array's length, read or not
    tensors: list[GGUFTensor] = field(default_factory=list)


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, size: int) -> None:
        if self.pos + size > len(self.buf):
            raise ModelLoadError(f"GGUF file {self.path} is truncated at byte {self.pos}")

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        raw = self.raw_string()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"GGUF file {self.path}: a string at byte {self.pos} is not UTF-8") from e

    def raw_string(self) -> bytes:
        n = self.unpack("<Q")
        self.need(n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw

    def skip_strings(self, count: int) -> None:
        buf, pos = self.buf, self.pos
        try:
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + n
        except struct.error:
            pos = len(buf) + 1
        if pos > len(buf):
            raise ModelLoadError(f"GGUF file {self.path} is truncated in a string array")
        self.pos = pos

    def value(self, kind: int, key: str) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        raise ModelLoadError(f"GGUF file {self.path}: metadata {key!r} has unknown value type {kind}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor directory of a GGUF file; raises ModelLoadError for anything unreadable."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    path = Path(path)
    try:
        mapped = np.memmap(path, mode="r")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
    cur = _Cursor(memoryview(mapped), path)
    if len(mapped) < 4 or bytes(mapped[:4]) != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in SUPPORTED_VERSIONS:
        swapped = "; it looks big-endian, which is not supported" if version & 0xFFFF == 0 else ""
        raise ModelLoadError(f"GGUF file {path} has version {version}{swapped}; supported: 2, 3")
    tensor_count, kv_count = cur.unpack("<Q"), cur.unpack("<Q")

    header = GGUFHeader({}, {})
    for _ in range(kv_count):
        key = cur.string()
        kind = cur.unpack("<I")
        if kind != _ARRAY:
            header.metadata[key] = cur.value(kind, key)
            continue
        item_kind, count = cur.unpack("<I"), cur.unpack("<Q")
        header.array_lengths[key] = count
        if item_kind == _STRING:
            if count > MAX_METADATA_ARRAY:
                cur.skip_strings(count)
            else:
                header.metadata[key] = [cur.string() for _ in range(count)]
        elif item_kind in _SCALARS:
            fmt = _SCALARS[item_kind]
            size = struct.calcsize(fmt)
            cur.need(size * count)
            if count <= MAX_METADATA_ARRAY:
                header.metadata[key] = [v for (v,) in struct.iter_unpack(fmt, cur.buf[cur.pos:cur.pos + size * count])]
            cur.pos += size * count
        else:  # nested arrays: no Llama metadata uses them
            raise ModelLoadError(f"GGUF file {path}: metadata {key!r} is an array of type {item_kind}, not supported")

    infos = []
    for _ in range(tensor_count):
        name = cur.string()
        dims = tuple(cur.unpack("<Q") for _ in range(cur.unpack("<I")))
        infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"GGUF file {path}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment

    seen = set()
    for name, dims, type_id, offset in infos:
        if name in seen:
            raise ModelLoadError(f"GGUF file {path} lists tensor {name!r} twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(type_id)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelLoadError(f"GGUF file {path}: tensor {name!r} has unknown type {type_id}") from None
        n_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
        np_dims = tuple(reversed(dims))
        if type_id in _PLAIN_TENSOR_DTYPES:
            dtype, count = np.dtype(_PLAIN_TENSOR_DTYPES[type_id]), n_elems
        else:
            dtype, count = np.dtype(np.uint8), n_elems * type_size // block_size
            np_dims = quant_shape_to_byte_shape(np_dims, qtype)
        start = data_start + offset
        end = start + count * dtype.itemsize
        if end > len(mapped):
            raise ModelLoadError(f"GGUF file {path} is truncated: tensor {name!r} ends past the file")
        data = mapped[start:end].view(dtype).reshape(np_dims)
        header.tensors.append(GGUFTensor(name, qtype, dims, data))
    return header
