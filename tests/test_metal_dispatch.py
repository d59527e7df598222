"""The Metal side of the kernel choice: which callable a quantized layer binds, per mode, shape and device,
and the per-device measurement cache that `auto` keeps.

Platform-neutral: a runner that reports no Metal stands for a machine without it, and the g++ emulator of
Metal (tests/emulator) stands for one with it, so these run alike on Linux and on a Mac. With the emulator,
`custom` binds decode rows (1..8) to the custom kernels and leaves prefill rows on MLX's built-in; `auto`
follows a chained measurement taken once per device and shape and kept on disk. Checks that only hold
where Metal is absent are marked requires_no_metal.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import mlx.core as mx

from emulator.cases import quantized_weight
from emulator.runner import EmulatorRunner
from mlxedge.kernels import KernelChoice, read_mode
from mlxedge.metal import kernels, selection
from mlxedge.metal.runner import MetalRunner
from mlxedge.quant.affine import QuantSpec
from mlxedge.quant.fused_mlp import FusedGatedMLP
from mlxedge.quant.layers import QuantizedLinear

GROUP, BITS = 64, 4
requires_no_metal = pytest.mark.skipif(mx.metal.is_available(), reason="checks a machine without Metal")


class NoMetal:
    """A runner on a machine without Metal."""

    device_key = "none"

    def available(self):
        return False

    def __call__(self, *args, **kwargs):
        raise AssertionError("no kernel may launch without Metal")


@pytest.fixture
def weights():
    return quantized_weight(40, 256, BITS, GROUP, mx.float32, seed=3)


@pytest.fixture
def up_weights():
    return quantized_weight(40, 256, BITS, GROUP, mx.float32, seed=4)


@pytest.fixture
def emulated():
    return EmulatorRunner()


@pytest.fixture
def selector(tmp_path):
    """A selection cache in a temp file whose measurement the test decides (never timed here)."""
    verdicts = {"custom_s": 1.0, "builtin_s": 2.0, "agree": True}
    calls = []

    def fake_measure(run_custom, run_builtin):
        calls.append((run_custom, run_builtin))
        return dict(verdicts)

    sel = selection.Selector(path=tmp_path / "selection.json", measure_fn=fake_measure, quiet=lambda: True)
    sel.verdicts, sel.calls = verdicts, calls
    return sel


def layer(w, s, b, bits=BITS, group=GROUP):
    q = QuantizedLinear(w.shape[1] * 32 // bits, w.shape[0], False, QuantSpec(bits, group), s.dtype)
    q.weight, q.scales, q.biases = w, s, b
    return q


def bound(choice, w, s, b, bits=BITS, group=GROUP):
    q = layer(w, s, b, bits, group)
    q.bind(choice.quantized(w, s, b, group_size=group, bits=bits))
    return q


def builtin(x, w, s, b, bits=BITS, group=GROUP):
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group, bits=bits)


def x_rows(rows, k=256, dtype=mx.float32, seed=0):
    return mx.random.normal((rows, k), key=mx.random.key(seed)).astype(dtype)


@pytest.mark.parametrize("mode", ["builtin", "custom", "auto", "metal", "nonsense"])
def test_without_metal_every_mode_binds_the_builtin_and_never_raises(weights, up_weights, mode):
    expect_warning = mode in ("nonsense", "metal")  # unknown mode; Metal named but absent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = KernelChoice(mode, metal_runner=NoMetal(), cpu=None)
    assert bool(caught) == expect_warning
    assert choice.candidate is None and choice.backend == "mlx built-in"
    binding = choice.quantized(*weights, group_size=GROUP, bits=BITS)
    assert (binding.backend, binding.prefill_backend) == ("builtin", "builtin")
    assert choice.gate_up(weights, up_weights, group_size=GROUP, bits=BITS) is None
    x = x_rows(1)
    assert mx.array_equal(bound(choice, *weights)(x), builtin(x, *weights))


@requires_no_metal
def test_the_default_runner_reports_no_metal_here():
    assert MetalRunner().available() is False
    with pytest.warns(UserWarning, match="not available"):
        assert KernelChoice("metal", cpu=None).candidate is None


def test_read_mode_reads_the_environment_once_per_choice(monkeypatch):
    for value, mode in [("builtin", "builtin"), (" CUSTOM ", "custom"), ("auto", "auto"), ("", "auto"),
                        ("cpu", "native"), ("native", "native")]:
        monkeypatch.setenv("MLXEDGE_KERNELS", value)
        assert read_mode() == mode
    monkeypatch.delenv("MLXEDGE_KERNELS")
    assert read_mode() == "auto"
    with pytest.warns(UserWarning, match="not one of"):
        assert read_mode("fastest") == "auto"


def test_custom_binds_decode_rows_to_the_kernel(emulated, weights):
    q = bound(KernelChoice("custom", metal_runner=emulated, cpu=None), *weights)
    x = x_rows(3).reshape(1, 3, 256)  # leading dims are flattened into kernel rows and restored
    y = q(x)
    assert [name for name, _ in emulated.calls] == [kernels.QMV.name]
    assert y.shape == (1, 3, 40)
    want = builtin(x, *weights)
    assert float(mx.max(mx.abs(y - want))) <= 1e-4 * float(mx.max(mx.abs(want)))


def test_the_choice_is_made_at_bind_time_not_per_call(monkeypatch, emulated, weights):
    monkeypatch.setenv("MLXEDGE_KERNELS", "custom")
    q = bound(KernelChoice(metal_runner=emulated, cpu=None), *weights)
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")  # read once, at bind: changing it now changes nothing
    q(x_rows(1))
    assert [name for name, _ in emulated.calls] == [kernels.QMV.name]


@pytest.mark.parametrize("why, rows, dtype, bits, group", [
    ("prefill", 9, mx.float32, BITS, GROUP),
    ("prefill", 64, mx.float32, BITS, GROUP),
    ("bits the kernels do not have", 1, mx.float32, 3, GROUP),
    ("activations of another dtype than the scales", 1, mx.float16, BITS, GROUP),
])
def test_custom_leaves_unsupported_calls_on_the_builtin(emulated, why, rows, dtype, bits, group):
    w, s, b = mx.quantize(mx.random.normal((16, 256), key=mx.random.key(1)), group_size=group, bits=bits)
    q = bound(KernelChoice("custom", metal_runner=emulated, cpu=None), w, s, b, bits, group)
    x = x_rows(rows, dtype=dtype)
    y = q(x)
    assert mx.array_equal(y, mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group, bits=bits)), why
    assert emulated.calls == []


def test_custom_fuses_gate_and_up_for_decode_rows(emulated, weights, up_weights):
    binding = KernelChoice("custom", metal_runner=emulated, cpu=None).gate_up(weights, up_weights,
                                                                               group_size=GROUP, bits=BITS)
    assert (binding.backend, binding.decode_rows) == ("metal", kernels.MAX_ROWS)
    mlp = FusedGatedMLP(_mlp(weights, up_weights))
    mlp.bind(binding)
    x = x_rows(2)
    h = mlp(x)
    assert [name for name, _ in emulated.calls] == [kernels.GATE_UP.name]
    g, u = builtin(x, *weights), builtin(x, *up_weights)
    want = g * mx.sigmoid(g) * u
    assert float(mx.max(mx.abs(h - want))) <= 1e-4 * float(mx.max(mx.abs(want)))
    emulated.calls.clear()
    mlp(x_rows(kernels.MAX_ROWS + 1))  # prefill: gate and up through their own (unbound: built-in) layers
    assert emulated.calls == []


def _mlp(gate, up):
    """A gated-silu MLP over two quantized layers whose down projection passes h through."""
    import mlx.nn as nn

    class PassThrough(nn.Module):
        def __call__(self, h):
            return h

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = layer(*gate), layer(*up), PassThrough()

        def __call__(self, x):
            return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))

    return MLP()


def test_auto_measures_once_per_device_and_shape_and_keeps_the_verdict(emulated, selector, weights):
    choice = KernelChoice("auto", metal_runner=emulated, cpu=None, selector=selector)
    layers = [bound(choice, *weights) for _ in range(3)]  # three layers of one shape: one measurement
    assert len(selector.calls) == 1
    x = x_rows(1)
    for q in layers:
        q(x)
    assert [name for name, _ in emulated.calls] == [kernels.QMV.name] * 3
    saved = json.loads(selector.path.read_text())
    assert list(saved) == ["emulator"] and len(saved["emulator"]) == 1
    (entry,) = saved["emulator"].values()
    assert entry["custom"] is True

    # Another shape is another measurement; the measurement's two closures are the two real paths.
    other = quantized_weight(24, 128, BITS, GROUP, mx.float32, seed=5)
    bound(choice, *other)
    assert len(selector.calls) == 2
    run_custom, run_builtin = selector.calls[-1]
    np.testing.assert_allclose(np.array(run_custom()), np.array(run_builtin()), rtol=1e-4, atol=1e-3)

    # A new load on the same device reads the file and does not measure again.
    fresh = selection.Selector(path=selector.path, measure_fn=lambda *a: pytest.fail("measured again"),
                               quiet=lambda: True)
    again = KernelChoice("auto", metal_runner=emulated, cpu=None, selector=fresh)
    assert again.quantized(*weights, group_size=GROUP, bits=BITS).backend == "metal"


def test_a_busy_verdict_is_kept_provisionally_and_replaced_by_the_first_quiet_measurement(tmp_path):
    path = tmp_path / "s.json"
    seen = []

    def selector(quiet: bool, custom_s: float):
        return selection.Selector(path=path, quiet=lambda: quiet, measure_fn=lambda c, b: seen.append(quiet) or
                                  {"custom_s": custom_s, "builtin_s": 2, "agree": True})

    busy = selector(False, 1)
    assert busy.prefers_custom("cpu", "qmm:k", None, None) and busy.prefers_custom("cpu", "qmm:k", None, None)
    assert seen == [False] and (busy.measured, busy.reused) == (1, 0)
    assert json.loads(path.read_text())["cpu"]["qmm:k"]["quiet"] is False  # on disk, marked provisional

    again_busy = selector(False, 3)  # a later start on a busy machine: reuses it, measures nothing
    assert again_busy.prefers_custom("cpu", "qmm:k", None, None) is True
    assert seen == [False] and (again_busy.measured, again_busy.reused) == (0, 1)

    quiet = selector(True, 3)  # the first quiet start measures once more and keeps that for good
    assert quiet.prefers_custom("cpu", "qmm:k", None, None) is False and seen == [False, True]
    saved = json.loads(path.read_text())["cpu"]["qmm:k"]
    assert saved["custom"] is False and saved["quiet"] is True

    later = selector(False, 1)
    assert later.prefers_custom("cpu", "qmm:k", None, None) is False and seen == [False, True]


def test_verdicts_saved_by_another_process_meanwhile_are_kept(tmp_path):
    path = tmp_path / "s.json"
    verdict = {"custom_s": 1, "builtin_s": 2, "agree": True}
    first = selection.Selector(path=path, quiet=lambda: True, measure_fn=lambda c, b: dict(verdict))
    second = selection.Selector(path=path, quiet=lambda: True, measure_fn=lambda c, b: dict(verdict))
    assert second.lookup("cpu", "a") is None  # second has read the file before first saves "a"
    first.prefers_custom("cpu", "a", None, None)
    second.prefers_custom("cpu", "b", None, None)
    first.prefers_custom("cpu", "c", None, None)
    assert sorted(json.loads(path.read_text())["cpu"]) == ["a", "b", "c"]


def test_auto_keeps_verdicts_apart_per_device(tmp_path):
    seen = []
    sel = selection.Selector(path=tmp_path / "s.json", quiet=lambda: True,
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
def test_auto_binds_the_builtin_unless_the_kernel_won(emulated, selector, weights, up_weights, verdict):
    selector.verdicts.clear()
    selector.verdicts.update(verdict)
    choice = KernelChoice("auto", metal_runner=emulated, cpu=None, selector=selector)
    q = bound(choice, *weights)
    assert choice.gate_up(weights, up_weights, group_size=GROUP, bits=BITS) is None
    x = x_rows(1)
    assert mx.array_equal(q(x), builtin(x, *weights))
    assert emulated.calls == []


def test_auto_falls_back_when_measurement_fails(emulated, tmp_path, weights):
    def broken(run_custom, run_builtin):
        raise RuntimeError("device rejected the kernel")

    sel = selection.Selector(path=tmp_path / "s.json", measure_fn=broken)
    with pytest.warns(UserWarning, match="measurement"):
        q = bound(KernelChoice("auto", metal_runner=emulated, cpu=None, selector=sel), *weights)
    assert q(x_rows(1)).shape == (1, 40) and emulated.calls == []


def test_measure_compares_outputs_and_times_chains_of_launches():
    a = mx.ones((4,))
    assert selection.measure(lambda: a, lambda: a, repetitions=1)["agree"] is True
    assert selection.measure(lambda: a * 2, lambda: a, repetitions=1)["agree"] is False
    assert selection.measure(lambda: a * float("nan"), lambda: a, repetitions=1)["agree"] is False
    launches = []

    def counted():
        launches.append(1)
        return a + 1

    result = selection.measure(counted, lambda: a + 1, repetitions=2)
    # a warm-up, one sizing launch, then two chains of `chain` launches each, evaluated at once
    assert launches == [1] * (2 + 2 * result["chain"])
    assert selection.MIN_CHAIN <= result["chain"] <= selection.MAX_CHAIN
    assert selection.chain_length(1e-6) == selection.MAX_CHAIN  # a few-µs kernel: a long chain
    assert selection.chain_length(1.0) == selection.MIN_CHAIN   # a slow one: sync latency is negligible


def test_measure_takes_single_launches_when_they_already_decide(monkeypatch):
    """A path whose one launch lasts CHAIN_TARGET_S and loses by DECIDED_RATIO or more is not timed in chains
    (MLX's float16 CPU matmul at a 49152-row head: 1.3 s a launch); a close or a fast pair still is."""
    timed, run = fake_timed_measure(monkeypatch)
    slow = selection.CHAIN_TARGET_S * 2
    result = run({"custom": slow / selection.DECIDED_RATIO, "builtin": slow})
    assert timed == [("custom", 1), ("builtin", 1)] and result["chain"] == 1
    assert result["custom_s"] < result["builtin_s"] == slow
    result = run({"custom": slow, "builtin": slow / selection.DECIDED_RATIO})  # either way round
    assert timed == [("custom", 1), ("builtin", 1)] and result["builtin_s"] < result["custom_s"]
    run({"custom": slow / 3, "builtin": slow})  # slow but close: chains
    assert len(timed) == 2 + 2 * 2 and timed[2][1] >= selection.MIN_CHAIN
    run({"custom": selection.CHAIN_TARGET_S / 1000, "builtin": selection.CHAIN_TARGET_S / 10})  # far apart, fast
    assert len(timed) == 2 + 2 * 2  # one launch is mostly sync latency there: chains


def test_measure_sizes_each_paths_chain_by_its_own_launch(monkeypatch):
    """The slower path runs about CHAIN_TARGET_S of its own launches, not as many as the faster one needs
    (MLX's float16 576x576 CPU matmul, 15 ms a launch, was run in chains of 50 sized by a 20 us kernel)."""
    timed, run = fake_timed_measure(monkeypatch)
    fast, slow = selection.CHAIN_TARGET_S / 1000, selection.CHAIN_TARGET_S / 10
    result = run({"custom": fast, "builtin": slow})
    assert timed[2:4] == [("custom", selection.MAX_CHAIN), ("builtin", selection.chain_length(slow))]
    assert (result["chain"], result["builtin_chain"]) == (selection.MAX_CHAIN, selection.chain_length(slow))
    assert selection.chain_length(slow) < selection.MAX_CHAIN


def fake_timed_measure(monkeypatch):
    """(timed, run): run(seconds) calls selection.measure(repetitions=2) with each path's launches taking
    seconds["custom"] / seconds["builtin"]; timed lists the (path, chain length) of every timed chain."""
    a = mx.ones((4,))
    custom, builtin = (lambda: a), (lambda: a)
    timed = []

    def run(seconds):
        def fake_time_chain(fn, length):
            path = "custom" if fn is custom else "builtin"
            timed.append((path, length))
            return seconds[path]
        monkeypatch.setattr(selection, "_time_chain", fake_time_chain)
        timed.clear()
        return selection.measure(custom, builtin, repetitions=2)

    return timed, run


def test_metal_runner_builds_each_kernel_once():
    runner = MetalRunner()
    assert runner.build(kernels.QMV) is runner.build(kernels.QMV)
    assert runner.build(kernels.GATE_UP) is not runner.build(kernels.QMV)


@requires_no_metal
def test_bench_says_there_is_no_metal_and_measures_nothing(capsys):
    from mlxedge.metal import bench

    assert bench.main([]) == 0
    assert "No Metal" in capsys.readouterr().out


def test_bench_rows_compare_both_paths(monkeypatch, emulated):
    from mlxedge.metal import bench

    monkeypatch.setattr(bench, "SHAPES", (("tiny q", 16, 128), ("tiny gate/up", 16, 128)))
    results = bench.bench_rows(4, 64, 2, mx.float32, runner=emulated)
    assert [label for label, *_ in results] == ["tiny q", "tiny gate/up"]
    assert all(r["agree"] for _, _, _, r, _ in results)
    assert {name for name, _ in emulated.calls} == {kernels.QMV.name, kernels.GATE_UP.name}


def test_emulator_runner_takes_the_same_call_as_the_metal_runner():
    import inspect

    def keywords(fn):
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]

    assert keywords(EmulatorRunner.__call__) == keywords(MetalRunner.__call__)


def test_agreement_is_judged_against_the_reference_a_builtin_carries(tmp_path):
    """Half precision: MLX's CPU quantized matmul accumulates in bfloat16 and misses a float32-accumulating
    kernel by ~10%; the kernel choice then hands the built-in a float32 reference (WithReference), and the
    candidate is judged against that, so an accurate kernel is not refused for the built-in's error."""
    exact = mx.arange(8, dtype=mx.float32)
    sloppy = exact * 1.1
    result = selection.measure(lambda: exact, selection.WithReference(lambda: sloppy, lambda: exact), repetitions=1)
    assert result["agree"]
    assert not selection.measure(lambda: exact, lambda: sloppy, repetitions=1)["agree"]
    assert not selection.measure(lambda: sloppy, selection.WithReference(lambda: exact, lambda: exact),
                                 repetitions=1)["agree"]
