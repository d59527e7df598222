"""Import an mlx-lm architecture module (`mlx_lm.models.<name>`) without running mlx-lm's package __init__.

`import mlx_lm.models.llama` first executes `mlx_lm/__init__.py`, which imports mlx-lm's convert, generate
and tokenizer utilities and, through them, transformers: about a second of CPU before the model class,
a few hundred lines of MLX, is even read. mlxedge needs only the architecture modules. So when mlx_lm is
not imported yet, its package is put in place *uninitialised*, with a module `__getattr__` that runs the
real `__init__` on first use of any package-level name (`mlx_lm.load`, `from mlx_lm import generate`):
code that wants the whole of mlx-lm still gets it, unchanged, just later.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def import_architecture(model_type: str):
    """The `mlx_lm.models.<model_type>` module."""
    _lazy_package("mlx_lm")
    return importlib.import_module(f"mlx_lm.models.{model_type}")


def _lazy_package(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed as a regular package: let the ordinary import report it
    package = importlib.util.module_from_spec(spec)
    state = {"initialised": False}

    def initialise_on_first_use(attr: str):
        if state["initialised"] or attr.startswith("__"):
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        state["initialised"] = True
        del package.__getattr__
        spec.loader.exec_module(package)  # the real __init__, in the same module object
        return getattr(package, attr)

    package.__getattr__ = initialise_on_first_use
    sys.modules[name] = package


def classes_by_name(rows) -> dict:
    """{class: value} for rows of (module name, class name, value) whose module imports and has the class
    (tables of known mlx-lm classes: an architecture missing from this mlx-lm is simply not in the result)."""
    table = {}
    for module_name, class_name, value in rows:
        _lazy_package(module_name.split(".")[0])  # as import_architecture: no mlx-lm package init for a class
        try:
            table[getattr(importlib.import_module(module_name), class_name)] = value
        except (ImportError, AttributeError):
            continue
    return table
