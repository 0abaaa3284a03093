"""Open a GGUF file: its metadata as plain Python values, its tensors as views of a memory map.

The ``gguf`` package's ``GGUFReader`` builds a numpy view for every part of
every metadata value: ~250k views for a 49k-token vocabulary and its merges,
4-5 s of a server's start. This reader walks the same header with
``struct`` over one read-only ``mmap`` and decodes string arrays in a plain
loop (~0.1 s). It reads what the engine needs and nothing else; the ``gguf``
package still owns the format's constants (value and tensor types, block
sizes) and writes files in the tests.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count
u64, metadata count u64; metadata entries (key string, value type u32, value);
tensor infos (name, n_dims u32, dims u64 fastest first, type u32, offset u64);
padding to ``general.alignment`` (32 by default); the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
# Plain tensor types keep their element dtype; block-quantized ones are raw bytes.
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor of the file. ``shape`` is in torch order (rows first; the file
    lists dims fastest first). ``data`` is a read-only view of the file: typed
    for plain types, ``[rows, bytes per row]`` uint8 for block-quantized ones."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """``fields``: metadata key -> value (str, int, float, bool, or a list of them).
    ``tensors``: in file order; ``tensor(name)`` finds one. The memory map stays
    open while any tensor view is alive."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise ValueError(f"{self.path} is not a GGUF file (it is empty)") from None
        try:
            self.fields, self.tensors = _parse(self._map, self.path)
        except struct.error:
            raise ValueError(f"{self.path} is truncated: its GGUF header ends early") from None
        self._by_name = {tensor.name: tensor for tensor in self.tensors}

    def tensor(self, name: str) -> GGUFTensor | None:
        return self._by_name.get(name)


def _parse(buf: mmap.mmap, path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    if buf[:4] != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    version, tensor_count, field_count = struct.unpack_from("<IQQ", buf, 4)
    if version not in _VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        reason = "big-endian GGUF files are not supported" if swapped in _VERSIONS else \
            f"GGUF version {version} is not supported (supported: {', '.join(map(str, _VERSIONS))})"
        raise ValueError(f"{path}: {reason}")
    cursor = _Cursor(buf, 24)
    fields: dict[str, Any] = {}
    for _ in range(field_count):
        key = cursor.string()
        fields[key] = cursor.value(_value_type(cursor.scalar("<I"), key))
    infos = [_tensor_info(cursor) for _ in range(tensor_count)]
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a positive multiple of 8")
    data_start = -(-cursor.offset // alignment) * alignment
    return fields, [_tensor(buf, path, data_start, *info) for info in infos]


class _Cursor:
    """Reads values in order from ``buf``, starting at ``offset``."""

    def __init__(self, buf: mmap.mmap, offset: int):
        self.buf, self.offset = buf, offset

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        end = self.offset + length
        if end > len(self.buf):
            raise struct.error("string past the end of the file")
        text = self.buf[self.offset:end].decode("utf-8")
        self.offset = end
        return text

    def value(self, kind: GGUFValueType) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            return self.array()
        return self.scalar(_SCALARS[kind])

    def array(self) -> list[Any]:
        kind = _value_type(self.scalar("<I"), "array element")
        count = self.scalar("<Q")
        if kind == GGUFValueType.STRING:
            return self.strings(count)
        if kind == GGUFValueType.ARRAY:
            return [self.array() for _ in range(count)]
        dtype = np.dtype(_SCALARS[kind])
        if self.offset + count * dtype.itemsize > len(self.buf):
            raise struct.error("array past the end of the file")
        values = np.frombuffer(self.buf, dtype, count, self.offset).tolist()
        self.offset += count * dtype.itemsize
        return values

    def strings(self, count: int) -> list[str]:
        # The vocabulary and merges: ~100k strings, so the loop stays tight.
        buf, offset, unpack, out = self.buf, self.offset, struct.Struct("<Q").unpack_from, []
        for _ in range(count):
            (length,) = unpack(buf, offset)
            offset += 8
            out.append(buf[offset:offset + length].decode("utf-8"))
            offset += length
        if offset > len(buf):
            raise struct.error("string array past the end of the file")
        self.offset = offset
        return out


def _value_type(raw: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ValueError(f"GGUF metadata {what!r} has an unknown value type {raw}") from None


def _tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string()
    n_dims = cursor.scalar("<I")
    dims = tuple(cursor.scalar("<Q") for _ in range(n_dims))
    raw_type = cursor.scalar("<I")
    return name, dims, raw_type, cursor.scalar("<Q")


def _tensor(buf: mmap.mmap, path: Path, data_start: int, name: str, dims: tuple[int, ...],
            raw_type: int, offset: int) -> GGUFTensor:
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise ValueError(f"{path}: tensor {name!r} has an unknown type {raw_type}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if dims and dims[0] % block_size:
        raise ValueError(f"{path}: tensor {name!r} has rows of {dims[0]} values, "
                         f"not a multiple of {qtype.name}'s block of {block_size}")
    nbytes = count // block_size * type_size
    start = data_start + offset
    if start + nbytes > len(buf):
        raise ValueError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
    shape = tuple(reversed(dims))
    dtype = _ELEMENT_DTYPES.get(qtype)
    if dtype is not None:
        data = np.frombuffer(buf, dtype, count, start).reshape(shape)
    else:
        row_bytes = (dims[0] if dims else 1) // block_size * type_size
        data = np.frombuffer(buf, np.uint8, nbytes, start).reshape(-1, row_bytes)
    return GGUFTensor(name, qtype, shape, data)
