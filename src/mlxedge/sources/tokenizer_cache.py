"""The tokenizer of a GGUF file: built once by transformers, then cached on disk and reloaded in well under a second.

Building a tokenizer from GGUF metadata (vocabulary, merges, special tokens) takes transformers 5-15 s on
a small CPU; loading the same tokenizer from its saved `tokenizer.json` takes a fraction of a second —
and without importing transformers at all where `saved_tokenizer` reproduces the saved class (the usual
case: then a start-up pays ~0.2 s instead of ~1.5 s). So
the first build is saved with `save_pretrained` under `cache_root()/tokenizers/<key>/`, where the key
hashes the GGUF's absolute path, size and modification time and the transformers version: a changed or
replaced file, or another transformers, builds afresh. Writes are atomic (temporary directory, then
rename); a cache that cannot be written (read-only home) is skipped, never an error.

Without torch (the `mlxedge` program keeps it out, and a lean install lacks it), transformers' own GGUF
metadata reader cannot be imported: it imports torch at module level only for its tensor classes. Then
`_metadata_reader` stands in for that module while the tokenizer is built, reading the same metadata
with the `gguf` package (llama.cpp's reader), and lifts the up-front torch check of transformers' GGUF
config reader (which, asked for no tensors, reads metadata only), so transformers' tokenizer
construction runs unchanged. A test builds both ways and compares the tokenizers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Container, Iterator

STAMP = "mlxedge-tokenizer.json"
READER_MODULE = "transformers.integrations.gguf.reader"


def load_gguf_tokenizer(path) -> object:
    """The transformers tokenizer of GGUF file `path`: from the cache when it is there, else built and cached."""
    path = Path(path).resolve()
    cached = _cache_entry(path)
    if (cached / STAMP).is_file():
        try:
            return _load_saved(cached)
        except Exception:  # a damaged entry: rebuild it below
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = _build(path)
    if _save(tokenizer, cached, path):
        try:  # the same object as every later start gets
            return _load_saved(cached)
        except Exception:
            pass
    return tokenizer


def _cache_entry(path: Path) -> Path:
    from ..paths import cache_root

    st = path.stat()
    key = json.dumps([str(path), st.st_size, st.st_mtime_ns, _transformers_version()])
    return cache_root() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "unknown"


def _load_saved(directory: Path):
    from .saved_tokenizer import SavedTokenizer, usable

    if usable(directory):
        return SavedTokenizer(directory)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def _build(path: Path):
    from transformers import AutoTokenizer

    with _metadata_reader():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)


def _save(tokenizer, target: Path, source: Path) -> bool:
    """Save atomically; False when the cache cannot be written (e.g. read-only)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
        try:
            tokenizer.save_pretrained(str(work))
            (work / STAMP).write_text(json.dumps({"gguf": str(source), "bytes": source.stat().st_size}))
            os.replace(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except OSError:
        return False  # e.g. a read-only cache: the next start builds it again
    return True


# ------------------------------------------------------------------------------------------------ torch-free reader

def _torch_importable() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ValueError, ImportError):
        return False


@contextmanager
def _metadata_reader() -> Iterator[None]:
    """Stand in for transformers' GGUF reader module while building, when torch is not importable."""
    if _torch_importable() or sys.modules.get(READER_MODULE) is not None:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as config_reader

    previous = sys.modules.get(READER_MODULE, ...)
    shim = types.ModuleType(READER_MODULE)
    shim.read_gguf_metadata = read_gguf_metadata
    sys.modules[READER_MODULE] = shim
    # its config reader (return_tensors=False) reads metadata only, but refuses up front without torch
    guard = config_reader.is_torch_available
    config_reader.is_torch_available = lambda: True
    try:
        yield
    finally:
        config_reader.is_torch_available = guard
        if previous is ...:
            sys.modules.pop(READER_MODULE, None)
        else:
            sys.modules[READER_MODULE] = previous


def read_gguf_metadata(gguf_path: str, string_arrays: Container[str] = ()) -> tuple:
    """(metadata, tensor names) in transformers' reader's own form, read with the `gguf` package.

    Scalars and strings as Python values; numeric arrays as lists; string arrays as lists when their key
    is in `string_arrays`, else as their length (transformers reads only the vocabulary and merges in full).
    """
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf_path))
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the reader's own header entries (version, counts)
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.ARRAY:
            element = field.types[1] if len(field.types) > 1 else None
            if element == GGUFValueType.STRING:
                metadata[key] = ([bytes(field.parts[i]).decode("utf-8") for i in field.data]
                                 if key in string_arrays else len(field.data))
            else:
                metadata[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif kind == GGUFValueType.STRING:
            metadata[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            metadata[key] = field.parts[field.data[0]].tolist()[0]
    if "general.architecture" not in metadata:
        raise ValueError(f"{gguf_path} has no `general.architecture` in its metadata.")
    return metadata, tuple(t.name for t in reader.tensors)


__all__ = ["load_gguf_tokenizer", "read_gguf_metadata"]
