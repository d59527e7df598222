"""Every user-facing failure of mlxedge: one base class and a few kinds a caller may want to tell apart.

Messages name the problem and, where there is one, the fix, in one line; the CLI prints them as they are.
"""


class MlxedgeError(Exception):
    """Base class: anything mlxedge refuses or cannot do, explained for a person."""


class SourceError(MlxedgeError):
    """The model source is missing, unreadable, truncated or malformed."""


class UnsupportedError(MlxedgeError):
    """The source is well formed but asks for something mlxedge does not support (architecture, block type)."""


class QuantizationError(MlxedgeError):
    """Invalid quantization settings (bits, group size)."""


class MemoryBudgetError(MlxedgeError):
    """The model would not fit the memory budget; the message lists settings that would."""


class GenerationError(MlxedgeError):
    """Bad generation arguments or a generation that cannot continue (e.g. context exhausted)."""
