"""A Ctrl-C while the program starts and loads a model always ends it with one line and exit 130.

Python runs the SIGINT handler at the next bytecode, wherever that is, and two places there eat the
KeyboardInterrupt it raises:

- a native library's module init: MLX's `mlx.core` (nanobind), the Rust `tokenizers` (PyO3) and our own
  `mlxedge.cpu._ext` run Python code from inside their init (nanobind builds its enums with `enum`). A
  KeyboardInterrupt raised there is swallowed (the command runs on as if no Ctrl-C came: about 1 run in 12
  when the signal lands right after libmlx is mapped) or aborts the process (SIGABRT, exit -6).
  `hold_interrupts_in_native_imports` imports those modules with SIGINT only recorded, and re-delivers it to
  the handler in place as soon as the module exists.
- a weakref callback or `__del__` (the import system's module locks are weakref'd): Python prints
  "Exception ignored in ..." and goes on. `interrupts_remembered()` (around the whole load) installs a
  handler that remembers the Ctrl-C as well as raising it, keeps such a KeyboardInterrupt off stderr, and
  raises it again when the load finishes. Python also turns one raised inside `__set_name__` into a
  RuntimeError: any failure of a load that saw a Ctrl-C is reported as the Ctrl-C.

Only the main thread can change signal handlers; elsewhere both go ahead unchanged. Only the program
installs the import hook (`mlxedge` itself, like `keep_torch_out`), never a library import.
"""

from __future__ import annotations

import importlib.abc
import signal
import sys
import threading
from contextlib import contextmanager

NATIVE_MODULES = frozenset({"mlx.core", "tokenizers.tokenizers", "mlxedge.cpu._ext"})


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigint_held():
    """Inside: SIGINT is only recorded. On leaving: the previous handler is back and gets any recorded one."""
    if not _in_main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


@contextmanager
def interrupts_remembered():
    """Inside: a Ctrl-C raises KeyboardInterrupt as usual and is remembered; if something swallowed it, it is
    raised again on leaving. Its "Exception ignored" report (weakref callbacks, __del__) is kept off stderr."""
    if not _in_main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # someone else's handler (an embedding program, a streaming reply): theirs to keep
        return
    received = []

    def remember_and_raise(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def quiet_about_ours(unraisable):
        if not (received and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous_hook(unraisable)

    signal.signal(signal.SIGINT, remember_and_raise)
    sys.unraisablehook = quiet_about_ours
    try:
        yield
    except BaseException:
        if received:  # whatever it became on the way (e.g. the RuntimeError wrapping one in __set_name__)
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
    if received:
        raise KeyboardInterrupt


class _HoldingLoader(importlib.abc.Loader):
    """Delegates to the real loader, with SIGINT held while the module is created and initialised."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # anything else (get_filename, is_package, ...) is the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        with sigint_held():
            return self._loader.create_module(spec)

    def exec_module(self, module):
        with sigint_held():
            self._loader.exec_module(module)


class _HoldingFinder(importlib.abc.MetaPathFinder):
    """Finds NATIVE_MODULES through the other finders and hands back their spec with a holding loader."""

    def find_spec(self, name, path, target=None):
        if name not in NATIVE_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _HoldingLoader(spec.loader)
                return spec
        return None


def hold_interrupts_in_native_imports() -> None:
    """Install the finder (first on sys.meta_path; once). Modules already imported are not affected."""
    if not any(isinstance(f, _HoldingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _HoldingFinder())
