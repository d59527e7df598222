"""Build a transformers tokenizer for a model directory or GGUF file, never running code from it.

transformers runs a model's own `tokenization_*.py` / `configuration_*.py` when its JSON files name one
(`auto_map`), and on a terminal asks "Do you wish to run the custom code? [y/N]" unless told not to.
mlxedge refuses such a model in one line before transformers is called, and passes
`trust_remote_code=False` anyway, so no answer typed ahead on stdin can turn it on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import SourceError, UnsupportedError

# file -> whether any auto_map entry counts (tokenizer files) or only the AutoTokenizer one (model configs,
# where e.g. Phi-3's auto_map names modeling code mlxedge never uses)
_AUTO_MAP_FILES = {"tokenizer_config.json": True, "config.json": False}


def refuse_remote_code(path: Path) -> None:
    """Raise UnsupportedError if the directory asks transformers to import tokenizer code from it."""
    for name, any_entry in _AUTO_MAP_FILES.items():
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # unreadable configs are reported by whoever reads them for their content
        if not isinstance(data, dict):
            continue
        auto_map = data.get("auto_map")
        if isinstance(auto_map, dict) and not any_entry:
            auto_map = {k: v for k, v in auto_map.items() if k == "AutoTokenizer"}
        if auto_map:
            target = next(iter(auto_map.values()), auto_map) if isinstance(auto_map, dict) else auto_map
            raise UnsupportedError(f"{file} names custom code ({str(target)[:80]}) through 'auto_map'; mlxedge never "
                                   "runs code from a model directory: use a model whose tokenizer transformers "
                                   "provides")


def load_tokenizer(path: Path, gguf_file: Optional[str] = None):
    """A transformers tokenizer for `path` (a directory, with `gguf_file` a GGUF inside it); one-line errors."""
    refuse_remote_code(path)
    from transformers import AutoTokenizer

    what = gguf_file or str(path)
    try:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    except Exception as e:  # transformers raises many kinds here
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        if gguf_file:
            raise UnsupportedError(f"transformers could not build a tokenizer from {what} "
                                   f"({type(e).__name__}: {first})") from None
        raise SourceError(f"{what}: no usable tokenizer ({type(e).__name__}: {first}); "
                          "add tokenizer.json / tokenizer_config.json to the checkpoint.") from None
