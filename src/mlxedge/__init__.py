"""mlxedge: on-device LLM runtime on MLX. The public API and nothing else (see DESIGN.md's contract).

The names below are imported on first use (PEP 562), so `import mlxedge` (and the CLI's start-up, where a
Ctrl-C must stay one line) does not load MLX, mlx-lm and transformers before they are needed.
"""

import sys as _sys
import types as _types
from importlib import import_module as _import_module
from typing import TYPE_CHECKING

from .errors import GenerationError, MemoryBudgetError, MlxedgeError, QuantizationError, SourceError, UnsupportedError

_LAZY = {"load": ".api", "plan": ".api", "convert": ".convert", "Model": ".model", "Session": ".generate.session",
         "pull": ".sources.registry", "list_models": ".sources.registry",
         "GenerationResult": ".generate.stats", "GenerationStats": ".generate.stats", "StreamEvent": ".generate.stats"}

__all__ = [
    "load", "plan", "convert", "pull", "list_models", "Model", "Session", "GenerationResult", "GenerationStats",
    "StreamEvent",
    "MlxedgeError", "SourceError", "UnsupportedError", "QuantizationError", "MemoryBudgetError", "GenerationError",
]

if TYPE_CHECKING:  # static tools see the eager imports
    from .api import load, plan
    from .convert import convert
    from .generate.stats import GenerationResult, GenerationStats, StreamEvent
    from .model import Model
    from .sources.registry import list_models, pull


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'mlxedge' has no attribute {name!r}")
    value = getattr(_import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """Keeps `mlxedge.convert` the function: importing the submodule of the same name must not rebind it."""

    def __setattr__(self, name, value):
        if name == "convert" and isinstance(value, _types.ModuleType):
            return  # the module stays reachable as sys.modules["mlxedge.convert"]
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
