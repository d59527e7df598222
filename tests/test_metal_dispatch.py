"""Dispatch: which path each call takes, per mode, shape and device; the per-device measurement cache.

Without Metal every mode ends on MLX's built-in and nothing raises. With the emulator installed as the
kernel runner, `custom` routes decode shapes through the custom kernels (prefill shapes stay built-in), and
`auto` follows a measurement taken once per device and shape and kept on disk.
"""

from __future__ import annotations

import ast
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

from emulator.cases import quantized_weight
from emulator.runner import EmulatorRunner
from mlxedge.metal import dispatch, kernels, selection
from mlxedge.metal.runner import MetalRunner

GROUP, BITS = 64, 4


@pytest.fixture
def weights():
    return quantized_weight(40, 256, BITS, GROUP, mx.float32, seed=3)


@pytest.fixture
def up_weights():
    return quantized_weight(40, 256, BITS, GROUP, mx.float32, seed=4)


@pytest.fixture
def emulated():
    """Install the emulator as the kernel runner (restored afterwards)."""
    runner = EmulatorRunner()
    previous = dispatch.set_kernel_runner(runner)
    yield runner
    dispatch.set_kernel_runner(previous)


@pytest.fixture
def selector(tmp_path):
    """A selection cache in a temp file whose measurement the test decides (never timed here)."""
    verdicts = {"custom_s": 1.0, "builtin_s": 2.0, "agree": True}
    calls = []

    def fake_measure(run_custom, run_builtin):
        calls.append((run_custom, run_builtin))
        return dict(verdicts)

    sel = selection.Selector(path=tmp_path / "selection.json", measure_fn=fake_measure)
    sel.verdicts, sel.calls = verdicts, calls
    previous = dispatch.set_selector(sel)
    yield sel
    dispatch.set_selector(previous)


class _no_warning:
    """Turn any warning into an error inside the block."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def builtin(x, w, s, b):
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=GROUP, bits=BITS)


def x_rows(rows, k=256, dtype=mx.float32, seed=0):
    return mx.random.normal((rows, k), key=mx.random.key(seed)).astype(dtype)


@pytest.mark.parametrize("mode", ["builtin", "custom", "auto", "nonsense"])
def test_without_metal_every_mode_is_the_builtin_and_never_raises(monkeypatch, weights, up_weights, mode):
    assert not mx.metal.is_available()  # this suite runs where Metal is absent
    monkeypatch.setenv("MLXEDGE_KERNELS", mode)
    monkeypatch.setattr(dispatch, "_warned_modes", set())
    x = x_rows(1)
    with pytest.warns(UserWarning) if mode == "nonsense" else _no_warning():
        assert dispatch.choose_kernel("qmv", x, [weights], group_size=GROUP, bits=BITS) == "builtin"
    y = dispatch.quantized_matmul(x, *weights, group_size=GROUP, bits=BITS)
    assert mx.array_equal(y, builtin(x, *weights))
    h = dispatch.gated_mlp(x, weights, up_weights, group_size=GROUP, bits=BITS)
    g, u = builtin(x, *weights), builtin(x, *up_weights)
    np.testing.assert_allclose(np.array(h), np.array(g * mx.sigmoid(g) * u), rtol=1e-5, atol=1e-5)


def test_kernel_mode_reads_the_environment(monkeypatch):
    for value, mode in [("builtin", "builtin"), (" CUSTOM ", "custom"), ("auto", "auto"), ("", "auto")]:
        monkeypatch.setenv("MLXEDGE_KERNELS", value)
        assert dispatch.kernel_mode() == mode
    monkeypatch.delenv("MLXEDGE_KERNELS")
    assert dispatch.kernel_mode() == "auto"


def test_custom_mode_routes_decode_shapes_through_the_kernel(monkeypatch, emulated, weights):
    monkeypatch.setenv("MLXEDGE_KERNELS", "custom")
    x = x_rows(3).reshape(1, 3, 256)  # leading dims are flattened into kernel rows and restored
    y = dispatch.quantized_matmul(x, *weights, group_size=GROUP, bits=BITS)
    assert [name for name, _ in emulated.calls] == [kernels.QMV.name]
    assert y.shape == (1, 3, 40)
    want = builtin(x, *weights)
    assert float(mx.max(mx.abs(y - want))) <= 1e-4 * float(mx.max(mx.abs(want)))


@pytest.mark.parametrize("why, rows, dtype, bits, group", [
    ("prefill", 9, mx.float32, BITS, GROUP),
    ("prefill", 64, mx.float32, BITS, GROUP),
    ("bits the kernels do not have", 1, mx.float32, 3, GROUP),
    ("activations of another dtype than the scales", 1, mx.float16, BITS, GROUP),
])
def test_custom_mode_leaves_unsupported_calls_on_the_builtin(monkeypatch, emulated, why, rows, dtype, bits, group):
    monkeypatch.setenv("MLXEDGE_KERNELS", "custom")
    w, s, b = mx.quantize(mx.random.normal((16, 256), key=mx.random.key(1)), group_size=group, bits=bits)
    x = x_rows(rows, dtype=dtype)
    assert dispatch.choose_kernel("qmv", x, [(w, s, b)], group_size=group, bits=bits) == "builtin", why
    y = dispatch.quantized_matmul(x, w, s, b, group_size=group, bits=bits)
    assert mx.array_equal(y, mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group, bits=bits))
    assert emulated.calls == []


def test_custom_mode_fuses_gate_and_up(monkeypatch, emulated, weights, up_weights):
    monkeypatch.setenv("MLXEDGE_KERNELS", "custom")
    x = x_rows(2)
    h = dispatch.gated_mlp(x, weights, up_weights, group_size=GROUP, bits=BITS)
    assert [name for name, _ in emulated.calls] == [kernels.GATE_UP.name]
    g, u = builtin(x, *weights), builtin(x, *up_weights)
    want = g * mx.sigmoid(g) * u
    assert float(mx.max(mx.abs(h - want))) <= 1e-4 * float(mx.max(mx.abs(want)))


def test_auto_measures_once_per_device_and_shape_and_keeps_the_verdict(monkeypatch, emulated, selector, weights):
    monkeypatch.setenv("MLXEDGE_KERNELS", "auto")
    x = x_rows(1)
    for _ in range(3):
        dispatch.quantized_matmul(x, *weights, group_size=GROUP, bits=BITS)
    assert len(selector.calls) == 1  # measured on first sight only
    assert [name for name, _ in emulated.calls] == [kernels.QMV.name] * 3
    saved = json.loads(selector.path.read_text())
    assert list(saved) == ["emulator"] and len(saved["emulator"]) == 1
    (entry,) = saved["emulator"].values()
    assert entry["custom"] is True

    # Another shape is another measurement; the measurement's two closures are the two real paths.
    dispatch.quantized_matmul(x_rows(2), *weights, group_size=GROUP, bits=BITS)
    assert len(selector.calls) == 2
    run_custom, run_builtin = selector.calls[-1]
    np.testing.assert_allclose(np.array(run_custom()), np.array(run_builtin()), rtol=1e-4, atol=1e-3)

    # A new process on the same device reads the file and does not measure again.
    fresh = selection.Selector(path=selector.path, measure_fn=lambda *a: pytest.fail("measured again"))
    assert fresh.lookup("emulator", next(iter(saved["emulator"]))) is True
    dispatch.set_selector(fresh)
    dispatch.quantized_matmul(x, *weights, group_size=GROUP, bits=BITS)
    dispatch.set_selector(selector)


def test_auto_keeps_verdicts_apart_per_device(tmp_path):
    seen = []
    sel = selection.Selector(path=tmp_path / "s.json",
                             measure_fn=lambda c, b: seen.append(1) or {"custom_s": 1, "builtin_s": 2, "agree": True})
    assert sel.prefers_custom("Apple M1", "qmv:k", None, None)
    assert sel.prefers_custom("Apple M1", "qmv:k", None, None)
    assert sel.prefers_custom("Apple M4 Max", "qmv:k", None, None)
    assert len(seen) == 2


@pytest.mark.parametrize("verdict", [
    {"custom_s": 2.0, "builtin_s": 1.0, "agree": True},    # slower
    {"custom_s": 0.99, "builtin_s": 1.0, "agree": True},   # within noise: not clearly faster
    {"custom_s": 0.1, "builtin_s": 1.0, "agree": False},   # faster but wrong
])
def test_auto_uses_the_builtin_unless_the_kernel_won(monkeypatch, emulated, selector, weights, verdict):
    monkeypatch.setenv("MLXEDGE_KERNELS", "auto")
    selector.verdicts.clear()
    selector.verdicts.update(verdict)
    x = x_rows(1)
    y = dispatch.quantized_matmul(x, *weights, group_size=GROUP, bits=BITS)
    assert emulated.calls == []
    assert mx.array_equal(y, builtin(x, *weights))


def test_auto_falls_back_when_measurement_fails(monkeypatch, emulated, tmp_path, weights):
    monkeypatch.setenv("MLXEDGE_KERNELS", "auto")

    def broken(run_custom, run_builtin):
        raise RuntimeError("device rejected the kernel")

    previous = dispatch.set_selector(selection.Selector(path=tmp_path / "s.json", measure_fn=broken))
    try:
        with pytest.warns(UserWarning, match="measurement"):
            y = dispatch.quantized_matmul(x_rows(1), *weights, group_size=GROUP, bits=BITS)
    finally:
        dispatch.set_selector(previous)
    assert emulated.calls == [] and y.shape == (1, 40)


def test_measure_compares_outputs_before_timing():
    a = mx.ones((4,))
    assert selection.measure(lambda: a, lambda: a, repetitions=1)["agree"] is True
    assert selection.measure(lambda: a * 2, lambda: a, repetitions=1)["agree"] is False
    assert selection.measure(lambda: a * float("nan"), lambda: a, repetitions=1)["agree"] is False


def test_metal_runner_builds_each_kernel_once_and_reports_no_metal_here():
    runner = MetalRunner()
    assert runner.build(kernels.QMV) is runner.build(kernels.QMV)
    assert runner.build(kernels.GATE_UP) is not runner.build(kernels.QMV)
    assert runner.available() is False


def test_metal_package_imports_only_mlx_and_the_standard_library():
    package = Path(dispatch.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            elif isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            else:
                continue
            for root in roots:
                assert root == "mlx" or root in sys.stdlib_module_names, f"{path.name} imports {root}"


def test_bench_says_there_is_no_metal_and_measures_nothing(capsys):
    from mlxedge.metal import bench

    assert bench.main([]) == 0
    assert "No Metal" in capsys.readouterr().out


def test_bench_rows_compare_both_paths(monkeypatch, emulated):
    from mlxedge.metal import bench

    monkeypatch.setattr(bench, "SHAPES", (("tiny q", 16, 128), ("tiny gate/up", 16, 128)))
    results = bench.bench_rows(4, 64, 2, mx.float32)
    assert [label for label, *_ in results] == ["tiny q", "tiny gate/up"]
    assert all(r["agree"] for _, _, _, r, _ in results)
    assert {name for name, _ in emulated.calls} == {kernels.QMV.name, kernels.GATE_UP.name}


def test_emulator_runner_takes_the_same_call_as_the_metal_runner():
    import inspect

    def keywords(fn):
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]

    assert keywords(EmulatorRunner.__call__) == keywords(MetalRunner.__call__)
