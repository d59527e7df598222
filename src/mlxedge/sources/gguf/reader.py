"""Parse and validate a GGUF file's header, metadata and tensor table, as strictly as llama.cpp's reader.

Our own parser on a read-only memory map (the `gguf` package is used only for its public type tables),
so every field is checked before it is used, with Python integers (no fixed-width wrap-around):
  * magic, and version 2 or 3 only (llama.cpp dropped v1; 0 and 4+ do not exist);
  * counts of keys, tensors and array elements bounded by the bytes left in the file;
  * keys unique and UTF-8, string values UTF-8 (errors name the key), `general.alignment` a power of two;
  * tensor names unique, at most 4 dimensions, each dimension in [1, 2^31 - 1] (MLX's int32 shapes), the
    innermost one a whole number of blocks of the tensor's type;
  * tensor data aligned, in file order and exactly contiguous (offset = previous end rounded up to the
    alignment), so no two tensors overlap and a type swapped for another changes the layout and is caught;
  * every tensor inside the file, and nothing after the last one but alignment padding.
Errors are one-line `SourceError`s naming the file and the key or tensor.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ...errors import SourceError, UnsupportedError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1 (room for the terminating NUL)
MAX_DIM = 2**31 - 1  # MLX shapes are int32

# GGUF value types: code -> (struct format, byte size) for scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY, UINT32 = 8, 9, 4


def quote(text: str) -> str:
    """A name read from the file, for a message: quoted, escaped (a newline in it cannot split the line), capped."""
    return repr(text[:100])


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings, kept unread (the tokenizer is built by transformers from the file)."""

    count: int


@dataclass
class GGUFTensor:
    """One tensor-table entry: name, dims (GGUF order, innermost first), type, absolute byte range."""

    name: str
    dims: Tuple[int, ...]
    qtype: T
    offset: int  # absolute, in the file
    nbytes: int
    _file: "GGUFFile" = field(repr=False)

    @property
    def rows_first(self) -> Tuple[int, ...]:
        """The shape in numpy order (outermost first)."""
        return tuple(reversed(self.dims))

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes, memory-mapped: float types as their dtype in numpy order, BF16 as uint16,
        quantized types as uint8 rows [..., bytes per row]."""
        raw = self._file.mmap[self.offset:self.offset + self.nbytes]
        shape = self.rows_first
        if self.qtype == T.F32:
            return raw.view("<f4").reshape(shape)
        if self.qtype == T.F16:
            return raw.view("<f2").reshape(shape)
        if self.qtype == T.BF16:
            return raw.view("<u2").reshape(shape)
        block, size = GGML_QUANT_SIZES[self.qtype]
        return raw.reshape(*shape[:-1], shape[-1] // block * size)


@dataclass
class GGUFFile:
    """A validated GGUF file: version, metadata (key -> value) and tensor table, data memory-mapped."""

    path: Path
    version: int
    fields: Dict[str, Any]
    tensors: List[GGUFTensor]
    alignment: int
    data_offset: int
    mmap: np.ndarray = field(repr=False)


class _Cursor:
    """Bounds-checked reads from the memory map; running past the end is a truncation error."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def skip(self, n: int, what: str) -> int:
        """Advance past n bytes; return where they start."""
        start = self.pos
        if n < 0 or start + n > self.size:
            raise SourceError(f"{self.path} is truncated or corrupt: {what} at byte {start} needs {n} bytes "
                              f"but the file has {self.size}; download the file again")
        self.pos = start + n
        return start

    def take(self, n: int, what: str) -> bytes:
        start = self.skip(n, what)
        return self.buf[start:start + n]

    def scalar(self, code: int, what: str):
        fmt, size = _SCALARS[code]
        return struct.unpack_from(fmt, self.buf, self.skip(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"{self.path}: {what} is not valid UTF-8 ({raw[:40]!r}); the file is corrupt") from None

    def remaining(self) -> int:
        return self.size - self.pos


def read_gguf(path: Path) -> GGUFFile:
    """Open and validate `path`; raise a one-line SourceError/UnsupportedError on anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}; check the path")
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    cur = _Cursor(buf, path)
    magic = buf[:4]
    if magic != MAGIC:
        raise SourceError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
                          "pass a .gguf model file")
    cur.pos = 4
    version = cur.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        if swapped in SUPPORTED_VERSIONS:
            raise UnsupportedError(f"{path} is a big-endian GGUF file; mlxedge reads little-endian GGUFs "
                                   "(convert it with llama.cpp's gguf tools)")
        raise UnsupportedError(f"{path}: unsupported GGUF version {version}; mlxedge reads GGUF versions "
                               f"{' and '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata count")
    # every key/value takes at least 13 bytes (8 key length, 4 type, 1 value) and every tensor entry 25
    if n_kv * 13 > cur.remaining():
        raise SourceError(f"{path} is corrupt: it declares {n_kv} metadata entries, more than its {cur.size} "
                          "bytes can hold; download the file again")
    if n_tensors * 25 > cur.remaining():
        raise SourceError(f"{path} is corrupt: it declares {n_tensors} tensors, more than its {cur.size} "
                          "bytes can hold; download the file again")
    fields = _read_metadata(cur, n_kv)
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise SourceError(f"{path}: metadata 'general.alignment' is {alignment!r}, expected a power of two; "
                          "the file is corrupt")
    entries = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    data_offset = _pad(cur.pos, alignment)
    tensors = _check_layout(path, entries, data_offset, alignment, cur.size)
    file = GGUFFile(path, version, fields, [], alignment, data_offset, np.frombuffer(buf, dtype=np.uint8))
    file.tensors = [GGUFTensor(name, dims, qtype, offset, nbytes, file) for name, dims, qtype, offset, nbytes in tensors]
    return file


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _read_metadata(cur: _Cursor, n_kv: int) -> Dict[str, Any]:
    fields: Dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in fields:
            raise SourceError(f"{cur.path}: duplicate metadata key {quote(key)}; the file is corrupt")
        code = cur.u32(f"the type of metadata {quote(key)}")
        if code == ARRAY:
            fields[key] = _read_array(cur, key)
        elif code == STRING:
            fields[key] = cur.string(f"metadata {quote(key)}")
        elif code in _SCALARS:
            value = cur.scalar(code, f"metadata {quote(key)}")
            if key == "general.alignment" and code != UINT32:
                raise SourceError(f"{cur.path}: metadata 'general.alignment' has value type #{code}, "
                                  "expected uint32; the file is corrupt")
            fields[key] = value
        else:
            raise SourceError(f"{cur.path}: metadata {quote(key)} has unknown value type #{code}; the file is corrupt")
    return fields


def _read_array(cur: _Cursor, key: str):
    code = cur.u32(f"the element type of metadata {quote(key)}")
    count = cur.u64(f"the length of metadata {quote(key)}")
    item = 8 if code == STRING else _SCALARS[code][1] if code in _SCALARS else None
    if item is None:
        raise SourceError(f"{cur.path}: metadata array {quote(key)} has element type #{code}, which GGUF does not "
                          "allow in arrays; the file is corrupt")
    if count * item > cur.remaining():
        raise SourceError(f"{cur.path} is truncated or corrupt: metadata array {quote(key)} declares {count} elements, "
                          f"more than the {cur.remaining()} bytes left; download the file again")
    if code != STRING:
        values = np.frombuffer(cur.buf, dtype=_NUMPY[code], count=count, offset=cur.skip(count * item, f"metadata {quote(key)}"))
        return values.astype(bool) if code == 7 else values
    _skip_strings(cur, key, count)
    return StringArray(count)


def _skip_strings(cur: _Cursor, key: str, count: int) -> None:
    """Walk `count` length-prefixed strings without decoding them (a vocabulary: 50k-260k of them, so the loop
    is kept tight: bounds are checked per element, messages are built only for the error)."""
    buf, pos, size, unpack = cur.buf, cur.pos, cur.size, struct.Struct("<Q").unpack_from
    for j in range(count):
        if pos + 8 > size:
            cur.pos = pos
            cur.u64(f"the length of element {j} of metadata {quote(key)}")  # raises the truncation error
        (n,) = unpack(buf, pos)
        pos += 8
        if pos + n > size:
            cur.pos = pos
            cur.skip(n, f"element {j} of metadata {quote(key)}")  # raises the truncation error
        pos += n
    cur.pos = pos


def _read_tensor_info(cur: _Cursor, i: int):
    name = cur.string(f"the name of tensor #{i}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise SourceError(f"{cur.path}: tensor #{i} has a {len(name.encode())}-byte name, longer than GGUF's "
                          f"{MAX_NAME_BYTES}; the file is corrupt")
    n_dims = cur.u32(f"the dimension count of tensor {quote(name)}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise SourceError(f"{cur.path}: tensor {quote(name)} has {n_dims} dimensions, expected 1 to {MAX_DIMS}; "
                          "the file is corrupt")
    dims = tuple(cur.u64(f"dimension {d} of tensor {quote(name)}") for d in range(n_dims))
    code = cur.u32(f"the type of tensor {quote(name)}")
    offset = cur.u64(f"the data offset of tensor {quote(name)}")
    return name, dims, code, offset


def _check_layout(path: Path, entries, data_offset: int, alignment: int, size: int):
    """Validate each entry and the data layout; return (name, dims, qtype, absolute offset, nbytes) tuples."""
    seen = set()
    expected = 0  # llama.cpp: each tensor starts where the previous one ended, rounded up to the alignment
    out = []
    for name, dims, code, offset in entries:
        if name in seen:
            raise SourceError(f"{path}: duplicate tensor name {quote(name)}; the file is corrupt")
        seen.add(name)
        if any(not 1 <= d <= MAX_DIM for d in dims):
            raise SourceError(f"{path}: tensor {quote(name)} has dimensions {list(dims)}, expected each in 1..{MAX_DIM}; "
                              "the file is corrupt")
        try:
            qtype = T(code)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise UnsupportedError(f"tensor {quote(name)} in {path.name} has unknown block type #{code}; the file is "
                                   "corrupt or newer than mlxedge") from None
        if dims[0] % block:
            raise SourceError(f"{path}: tensor {quote(name)} of type {qtype.name} has {dims[0]} elements per row, not a "
                              f"multiple of its block size {block}; the file is corrupt")
        numel = 1
        for d in dims:
            numel *= d
        nbytes = numel // block * type_size
        if offset % alignment:
            raise SourceError(f"{path}: tensor {quote(name)} starts at data offset {offset}, not a multiple of the "
                              f"alignment {alignment}; the file is corrupt")
        if offset != expected:
            raise SourceError(f"{path}: tensor {quote(name)} starts at data offset {offset} but the previous tensors "
                              f"end at {expected}; the tensor table is corrupt (overlapping, out of order, or a "
                              "type or shape that does not match the data)")
        end = data_offset + offset + nbytes
        if end > size:
            raise SourceError(f"{path} is truncated: tensor {quote(name)} needs bytes up to {end} but the file has "
                              f"{size}; download the file again")
        out.append((name, dims, qtype, data_offset + offset, nbytes))
        expected = _pad(offset + nbytes, alignment)
    # writers pad the last tensor to the alignment and stop: more is a tensor whose type or shape shrank
    tail = size - (out[-1][3] + out[-1][4]) if out else 0
    if out and tail >= alignment:
        raise SourceError(f"{path}: {tail} bytes follow the last tensor {quote(out[-1][0])}, more than the alignment "
                          f"padding ({alignment}); its type or shape does not match the data, the file is corrupt")
    return out
