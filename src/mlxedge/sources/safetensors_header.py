"""Read and validate safetensors headers (names, shapes, dtypes, byte ranges) without touching tensor data.

Validation follows the safetensors library (safetensors/src/tensor.rs `validate`): a little-endian u64
header length that fits the file, a UTF-8 JSON object without duplicate keys, each entry a known dtype,
a shape of non-negative integers and data offsets [begin, end) with end - begin = elements x item size,
and offsets that tile the data section exactly (sorted, from 0, no gap, overlap or alias) up to the end
of the file (no trailing bytes). Used to plan memory before loading; errors are one line naming the file
and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ..errors import SourceError, UnsupportedError
from .checkpoint import TensorInfo

# safetensors dtype codes -> (numpy-style name, item size)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
DTYPE_NAMES = {code: name for code, (name, _) in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's limit


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(Exception):
    pass


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Return name -> TensorInfo for one .safetensors file, refusing any header the safetensors library would."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SourceError(f"{path} is truncated or not a safetensors file ({size} bytes); re-download it.")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise SourceError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes "
                                  f"in a {size}-byte file); re-download it.")
            raw = f.read(header_len)
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise SourceError(f"{path}: the safetensors header names {str(e.args[0])[:80]!r} twice; the file is corrupt, "
                          "re-download it.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SourceError(f"cannot read safetensors header of {path}: {reason}; re-download the file.") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} has a malformed safetensors header (not a JSON object); re-download it.")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise SourceError(f"{path}: the safetensors '__metadata__' is not an object; re-download the file.")
    infos: dict[str, TensorInfo] = {}
    ranges = []
    for name, entry in header.items():
        begin, end, info = _entry(path, name, entry)
        infos[name] = info
        ranges.append((begin, end, name))
    _check_tiling(path, ranges, size - 8 - header_len)
    return infos


def _entry(path: Path, name: str, entry) -> tuple:
    shown = repr(name[:80])
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise SourceError(f"{path}: malformed header entry for tensor {shown} (expected dtype, shape and "
                          "data_offsets); re-download the file.")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise UnsupportedError(f"{path}: tensor {shown} has dtype {str(dtype)[:20]!r}, which mlxedge does not read "
                               f"(known: {', '.join(DTYPES)}).")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SourceError(f"{path}: tensor {shown} has shape {str(shape)[:60]}, expected a list of non-negative "
                          "integers; re-download the file.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise SourceError(f"{path}: tensor {shown} has data_offsets {str(offsets)[:60]}, expected [begin, end] "
                          "with 0 <= begin <= end; re-download the file.")
    name_np, item = DTYPES[dtype]
    nbytes = math.prod(shape) * item
    begin, end = offsets
    if end - begin != nbytes:
        raise SourceError(f"{path}: tensor {shown} ({dtype} {shape}) needs {nbytes} bytes but its data_offsets "
                          f"[{begin}, {end}] span {end - begin}; the file is corrupt, re-download it.")
    return begin, end, TensorInfo(shape=tuple(shape), dtype=name_np, nbytes=nbytes)


def _check_tiling(path: Path, ranges: list, data_size: int) -> None:
    """The tensors' byte ranges, sorted, must cover [0, data_size) exactly: no gap, overlap, alias or tail."""
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            kind = "overlaps or aliases the previous tensor" if begin < position else "leaves a gap before it"
            raise SourceError(f"{path}: tensor {name[:80]!r} starts at data byte {begin}, expected {position} "
                              f"(it {kind}); the file is corrupt, re-download it.")
        position = end
    if position > data_size:
        raise SourceError(f"{path} is truncated: {position - data_size} bytes of tensor data are missing; "
                          "re-download it.")
    if position < data_size:
        raise SourceError(f"{path} has {data_size - position} bytes after its last tensor, which the safetensors "
                          "format does not allow; the file is corrupt, re-download it.")
