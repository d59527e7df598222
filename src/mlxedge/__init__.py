"""mlxedge: on-device LLM runtime on MLX. The public API and nothing else (see DESIGN.md's contract).

Names are imported on first use (module `__getattr__`), so `import mlxedge` and the CLI's `--help`
stay instant: MLX, mlx-lm and transformers load only when a model is planned, built or converted.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "load": ".api", "plan": ".api",
    "convert": ".convert",
    "pull": ".sources.registry", "list_models": ".sources.registry",
    "Model": ".model",
    "GenerationResult": ".generate.stats", "GenerationStats": ".generate.stats", "StreamEvent": ".generate.stats",
    "MlxedgeError": ".errors", "SourceError": ".errors", "UnsupportedError": ".errors",
    "QuantizationError": ".errors", "MemoryBudgetError": ".errors", "GenerationError": ".errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlxedge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
