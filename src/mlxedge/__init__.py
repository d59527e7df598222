"""mlxedge: on-device LLM runtime on MLX. The public API and nothing else (see DESIGN.md's contract)."""

from .api import load, plan
from .convert import convert
from .errors import GenerationError, MemoryBudgetError, MlxedgeError, QuantizationError, SourceError, UnsupportedError
from .generate.stats import GenerationResult, GenerationStats, StreamEvent
from .generate.session import Session
from .model import Model

__all__ = [
    "load", "plan", "convert", "Model", "Session", "GenerationResult", "GenerationStats", "StreamEvent",
    "MlxedgeError", "SourceError", "UnsupportedError", "QuantizationError", "MemoryBudgetError", "GenerationError",
]
