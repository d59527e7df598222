"""Metal availability faked on: MLX reports a Metal device and every custom-kernel launch runs in the emulator.

`pytest --fake-metal` (or MLXEDGE_FAKE_METAL=1) installs this for the whole run (tests/conftest.py), so the
suite can show here that no test depends on this machine lacking Metal: what mlxedge decides from
`mx.metal.is_available()` (the loader's default compute dtype, the kernel dispatch, the wired limit) takes
its Mac branch, `requires_metal` tests run with the emulator standing in for the GPU, and
`requires_no_metal` tests are skipped. MLX itself still computes on the CPU; only mlxedge's custom kernels
go through the emulator. Subprocesses a test starts (the CLI) see the real machine.

`auto` mode still measures each shape once, and still refuses a kernel whose output disagrees with the
built-in's, but the emulator never wins on time: timing a CPU emulator says nothing about a GPU (it can
beat MLX's slow half-precision CPU path, and would then put every decode step through a subprocess).
"""

from __future__ import annotations

import os
import tempfile

import mlx.core as mx

ENV_VAR = "MLXEDGE_FAKE_METAL"
OPTION = "--fake-metal"


_active = None  # the installed FakeMetal, if any


def active() -> bool:
    """Whether Metal is faked in this process right now."""
    return _active is not None


def requested(config=None) -> bool:
    """Whether this run asked for faked Metal (pytest option or environment)."""
    if os.environ.get(ENV_VAR, "").strip() not in ("", "0"):
        return True
    return bool(config is not None and config.getoption(OPTION, default=False))


def agreement_only(run_custom, run_builtin) -> dict:
    """selection.measure's agreement check, with the built-in declared the winner on time."""
    from mlxedge.metal.selection import measure

    result = measure(run_custom, run_builtin, repetitions=1)
    result["custom_s"] = max(result["custom_s"], result["builtin_s"])
    return result


class FakeMetal:
    """Installs and removes the fake; `real_metal` is what MLX said before it was installed."""

    def __init__(self):
        self.real_metal = bool(mx.metal.is_available())
        self.runner = None
        self._saved = None

    def install(self) -> "FakeMetal":
        from mlxedge import kernels
        from mlxedge.metal.selection import Selector

        from .runner import EmulatorRunner

        self.runner = EmulatorRunner()
        self._tmp = tempfile.TemporaryDirectory(prefix="mlxedge-fake-metal")
        selector = Selector(path=os.path.join(self._tmp.name, "kernel-selection.json"), measure_fn=agreement_only)
        # a Mac's kernel choice: the GPU's runner (here the emulator) and no native CPU kernels (MLX runs on
        # the GPU there, so the CPU extension is never the candidate)
        self._saved = (mx.metal.is_available, kernels.MetalRunner, kernels._native_module, kernels._selector,
                       os.environ.get("MLXEDGE_KERNEL_CACHE"))
        runner = self.runner
        kernels.MetalRunner = lambda: runner
        kernels._native_module = lambda: None
        kernels._selector = selector
        mx.metal.is_available = lambda: True
        global _active
        _active = self
        # any other Selector made during the run also keeps its verdicts out of the user's cache
        os.environ["MLXEDGE_KERNEL_CACHE"] = os.path.join(self._tmp.name, "kernel-selection.json")
        return self

    def uninstall(self) -> None:
        from mlxedge import kernels

        if self._saved is None:
            return
        is_available, runner_class, native_module, selector, cache = self._saved
        mx.metal.is_available = is_available
        kernels.MetalRunner, kernels._native_module, kernels._selector = runner_class, native_module, selector
        if cache is None:
            os.environ.pop("MLXEDGE_KERNEL_CACHE", None)
        else:
            os.environ["MLXEDGE_KERNEL_CACHE"] = cache
        self._tmp.cleanup()
        self._saved = None
        global _active
        _active = None
