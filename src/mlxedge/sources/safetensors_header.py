"""Read safetensors headers (names, shapes, dtypes, byte ranges) without touching tensor data.

Used to plan memory before loading and to refuse truncated or malformed files with a clear message.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import SourceError
from .checkpoint import TensorInfo

# safetensors dtype codes -> numpy-style names
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}

MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Return name -> TensorInfo for one .safetensors file, checking the file holds every byte it declares."""
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
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot read safetensors header of {path}: {e}; re-download the file.") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} has a malformed safetensors header; re-download it.")
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            dtype = DTYPE_NAMES[entry["dtype"]]
            start, end = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: malformed header entry for tensor {name!r}; re-download the file.") from None
        infos[name] = TensorInfo(shape=shape, dtype=dtype, nbytes=int(end) - int(start))
        data_end = max(data_end, int(end))
    if 8 + header_len + data_end > size:
        missing = 8 + header_len + data_end - size
        raise SourceError(f"{path} is truncated: {missing} bytes of tensor data are missing; re-download it.")
    return infos
