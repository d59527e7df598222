"""Every binding decision of the kernel choice, on tiny models, against MLX's built-in path.

A fake native backend (same interface as mlxedge.cpu; it computes through mx.dequantize and a float32
matmul, an independent route to the same numbers, and records each call's kind and row count) stands in
for the extension, so these run whether or not it is built. Checked: quantized layers and the quantized
tied head go native for every row count; gate·up is fused only where the bound path has a fused kernel
and only for decode rows; float Linear layers and a tied float head are swapped for bound stand-ins and
given back as MLX's own classes under a built-in choice; unsupported settings, a missing extension and a
lost `auto` measurement all bind the built-in; nothing about the choice is consulted per call. Where the
backend also has the attention ops (fast_layers binds a BoundAttention), q, k and v quantized alike run
through one `quantized_matmuls` call for decode rows, and through their own bindings beyond.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlxedge
from mlxedge import kernels
from mlxedge.kernels import KernelChoice
from mlxedge.metal import selection
from mlxedge.quant.affine import QuantSpec
from mlxedge.quant.fused_mlp import FusedGatedMLP
from mlxedge.quant.layers import BoundEmbedding, BoundLinear, QuantizedLinear
from tiny_models import build_tiny

PROMPT, NEXT = [1, 17, 42, 99, 7, 230], 64


class FakeNative:
    """mlxedge.cpu's interface, computed independently of mx.quantized_matmul; records (kind, rows)."""

    def __init__(self, available=True, bits=(4, 8), dtypes=(mx.float32,)):
        self._available, self._bits, self._dtypes = available, bits, dtypes
        self.calls = []

    def available(self):
        return self._available

    def describe(self):
        return "fake, 2 threads"

    def supports(self, x_dtype, bits, group_size):
        return x_dtype in self._dtypes and bits in self._bits

    def supports_matmul(self, dtype):
        return dtype in self._dtypes

    def _rows(self, x):
        return x.size // x.shape[-1]

    def quantized_matmul(self, x, w, scales, biases, *, group_size, bits):
        self.calls.append(("qmm", self._rows(x)))
        dense = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
        return (x.astype(mx.float32) @ dense.T).astype(x.dtype)

    def gate_up_silu(self, x, gate, up, *, group_size, bits):
        self.calls.append(("gate_up", self._rows(x)))
        g = x @ mx.dequantize(*gate, group_size=group_size, bits=bits).T
        u = x @ mx.dequantize(*up, group_size=group_size, bits=bits).T
        return g * mx.sigmoid(g) * u

    def matmul(self, x, w):
        self.calls.append(("matmul", self._rows(x)))
        return mx.matmul(x, mx.transpose(w))


class FakeNativeWithOps(FakeNative):
    """FakeNative plus the attention-step ops (MLX's own) and the q·k·v call: attentions get bound."""

    def rms_norm(self, x, weight, eps):
        return mx.fast.rms_norm(x, weight, eps)

    def rope(self, x, dims, *, traditional, base, scale, offset, freqs=None):
        return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs)

    def sdpa(self, q, k, v, *, scale, causal):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)

    def quantized_matmuls(self, x, parts, *, group_size, bits):
        self.calls.append(("qkv", self._rows(x), len(parts)))
        return [(x.astype(mx.float32) @ mx.dequantize(*p, group_size=group_size, bits=bits).astype(mx.float32).T)
                .astype(x.dtype) for p in parts]


class NoMetal:
    device_key = "none"

    def available(self):
        return False


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("kc") / "llama")


@pytest.fixture(scope="module")
def tiny_tied_dir(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("kc") / "tied", tie_word_embeddings=True)


def native(fake=None, mode="native", **kw):
    return KernelChoice(mode, cpu=fake if fake is not None else FakeNative(), metal_runner=NoMetal(), **kw)


def run(model):
    """Prefill logits (6 rows) and one decode step's (1 row), float32 numpy."""
    cache = make_prompt_cache(model.module)
    prefill = model.module(mx.array([PROMPT]), cache=cache)
    step = model.module(mx.array([[NEXT]]), cache=cache)
    return np.array(prefill[0].astype(mx.float32)), np.array(step[0, -1].astype(mx.float32))


def assert_matches(got, want, rtol=1e-4):
    for g, w in zip(got, want):
        scale = np.abs(w).max()
        assert np.abs(g - w).max() <= rtol * scale
        assert (g.argmax(-1) == w.argmax(-1)).all()


def load_builtin(directory, monkeypatch, **kwargs):
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")
    return mlxedge.load(directory, dtype="float32", **kwargs)


def test_quantized_layers_go_native_for_every_row_count_and_gate_up_fuses_for_decode(tiny_dir, monkeypatch):
    model = load_builtin(tiny_dir, monkeypatch, bits=4, group_size=64)
    want = run(model)
    fake = FakeNative()
    info = model.use_kernels(native(fake))
    assert info == {"mode": "native", "backend": "native cpu (fake, 2 threads)",
                    "layers": {"quantized": {"native": 15}, "gate_up_fused": {"native": 2}}}
    assert all(isinstance(layer.mlp, FusedGatedMLP) for layer in model.module.model.layers)
    got = run(model)
    assert_matches(got, want)
    rows = len(PROMPT)
    # the 6-row prefill is within the fused kernel's decode rows: q k v o down native, gate·up fused
    prefill, step = fake.calls[: len(fake.calls) // 2], fake.calls[len(fake.calls) // 2:]
    assert sorted(set(prefill)) == [("gate_up", rows), ("qmm", rows)]
    assert sorted(set(step)) == [("gate_up", 1), ("qmm", 1)]
    assert prefill.count(("gate_up", rows)) == 2 and prefill.count(("qmm", rows)) == 2 * 5 + 1


def test_prefill_past_the_decode_rows_runs_gate_and_up_unfused(tiny_dir, monkeypatch):
    model = load_builtin(tiny_dir, monkeypatch, bits=4, group_size=64)
    ids = list(range(1, kernels.DECODE_ROWS + 4))
    want = model.logits(ids)
    fake = FakeNative()
    model.use_kernels(native(fake))
    got = model.logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert ("gate_up", len(ids)) not in fake.calls
    assert fake.calls.count(("qmm", len(ids))) == 2 * 7 + 1  # every projection native, gate and up apart


def test_float_layers_and_the_tied_head_bind_native_and_come_back_as_mlx_classes(tiny_tied_dir, monkeypatch):
    model = load_builtin(tiny_tied_dir, monkeypatch)
    assert "lm_head" not in model.module
    want = run(model)
    fake = FakeNative()
    info = model.use_kernels(native(fake))
    assert info["layers"] == {"linear": {"native": 14}, "tied_head": {"native": 1}}
    attn = model.module.model.layers[0].self_attn
    assert type(attn.q_proj) is BoundLinear and type(model.module.model.embed_tokens) is BoundEmbedding
    assert "gate_up_fused" not in info["layers"]  # float gate and up: no fused kernel, mlx-lm's MLP stays
    assert_matches(run(model), want)
    assert ("matmul", 1) in fake.calls and ("matmul", len(PROMPT)) in fake.calls

    info = model.use_kernels(KernelChoice("builtin"))
    assert info["layers"] == {"linear": {"builtin": 14}, "tied_head": {"builtin": 1}}
    assert type(attn.q_proj) is not BoundLinear
    assert type(model.module.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.module.model.embed_tokens) is nn.Embedding
    for got, w in zip(run(model), want):
        assert np.array_equal(got, w)  # MLX's own classes again: bit for bit the built-in path


def test_unsupported_settings_stay_builtin(tiny_dir, monkeypatch):
    model = load_builtin(tiny_dir, monkeypatch, bits=8, group_size=64)
    want = run(model)
    fake = FakeNative(bits=(4,))  # the backend declines 8-bit
    assert model.use_kernels(native(fake))["layers"] == {"quantized": {"builtin": 15}}
    assert all(type(layer.mlp).__name__ == "MLP" for layer in model.module.model.layers)
    got = run(model)
    assert fake.calls == [] and all(np.array_equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("mode", ["auto", "custom", "native"])
def test_an_unavailable_extension_binds_the_builtin(tiny_dir, monkeypatch, mode):
    model = load_builtin(tiny_dir, monkeypatch, bits=4, group_size=64)
    fake = FakeNative(available=False)
    if mode == "native":
        with pytest.warns(UserWarning, match="not available"):
            choice = native(fake, mode)
    else:
        choice = native(fake, mode)
    info = model.use_kernels(choice)
    assert info["backend"] == "mlx built-in" and info["layers"] == {"quantized": {"builtin": 15}}
    run(model)
    assert fake.calls == []


def test_auto_keeps_native_only_where_it_measured_faster(tiny_dir, tmp_path, monkeypatch):
    model = load_builtin(tiny_dir, monkeypatch, bits=4, group_size=64)
    measured = []

    def verdict(run_candidate, run_builtin):
        out = run_candidate()
        measured.append(out.shape[-1])
        wins = out.shape[-1] != 256  # the native kernel "loses" on the 256-wide head only
        return {"custom_s": 1.0 if wins else 3.0, "builtin_s": 2.0, "agree": True}

    sel = selection.Selector(path=tmp_path / "sel.json", measure_fn=verdict)
    fake = FakeNative()
    info = model.use_kernels(native(fake, "auto", selector=sel))
    # shapes measured once each: q/o (64x64), k/v (32x64: 2 kv heads), gate/up, down, head, fused gate·up
    assert sorted(measured) == sorted([64, 32, 128, 64, 256, 128])
    assert info["layers"] == {"quantized": {"native": 14, "builtin": 1}, "gate_up_fused": {"native": 2}}
    assert info["verdicts"] == {"measured": 6, "reused": 0}
    again = load_builtin(tiny_dir, monkeypatch, bits=4, group_size=64).use_kernels(native(fake, "auto", selector=sel))
    assert again["verdicts"] == {"measured": 0, "reused": 6} and len(measured) == 6  # a second load measures nothing
    assert isinstance(model.module.lm_head, QuantizedLinear)
    assert model.module.lm_head._backends == ("builtin", "builtin")


def test_native_wins_on_the_cpu_over_an_available_metal_runner(monkeypatch):
    from emulator.runner import EmulatorRunner

    assert mx.default_device().type == mx.DeviceType.cpu
    assert KernelChoice("custom", cpu=FakeNative(), metal_runner=EmulatorRunner()).candidate == "native"
    assert KernelChoice("metal", cpu=FakeNative(), metal_runner=EmulatorRunner()).candidate == "metal"
    assert KernelChoice("builtin", cpu=FakeNative(), metal_runner=EmulatorRunner()).candidate is None


def test_nothing_about_the_choice_is_consulted_per_call(tiny_dir, monkeypatch):
    model = load_builtin(tiny_dir, monkeypatch, bits=4, group_size=64)
    fake = FakeNative()
    model.use_kernels(native(fake))

    def forbidden(*args, **kwargs):
        raise AssertionError("consulted per call")

    for name in ("quantized", "gate_up", "projections", "linear", "_wins", "_wins_with", "_find_candidate"):
        monkeypatch.setattr(KernelChoice, name, forbidden)
    monkeypatch.setattr(kernels, "read_mode", forbidden)
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")
    run(model)
    assert ("qmm", 1) in fake.calls and ("gate_up", 1) in fake.calls


def test_q_k_v_run_in_one_call_for_decode_rows_and_apart_beyond(tiny_dir, monkeypatch):
    model = load_builtin(tiny_dir, monkeypatch, bits=4, group_size=64)
    want = run(model)
    ids = list(range(1, kernels.DECODE_ROWS + 4))
    want_long = model.logits(ids)
    fake = FakeNativeWithOps()
    info = model.use_kernels(native(fake))
    assert info["layers"]["qkv_fused"] == {"native": 2} and info["layers"]["attention"] == {"native": 2}
    fake.calls.clear()  # binding probed the attentions through the projections' own bindings
    assert_matches(run(model), want)
    # prefill (6 rows, within the decode rows) and the decode step: one call per layer for q, k and v
    assert fake.calls.count(("qkv", len(PROMPT), 3)) == 2 and fake.calls.count(("qkv", 1, 3)) == 2
    assert fake.calls.count(("qmm", 1)) == 2 * 2 + 1  # o_proj and down_proj per layer, and the head
    fake.calls.clear()
    got = model.logits(ids)
    assert np.abs(got - want_long).max() <= 1e-4 * np.abs(want_long).max()
    assert not [c for c in fake.calls if c[0] == "qkv"]
    assert fake.calls.count(("qmm", len(ids))) == 2 * 7 + 1

    info = model.use_kernels(KernelChoice("builtin"))  # and back: mlx-lm's attention, one call per projection
    assert "qkv_fused" not in info["layers"]
    for got, w in zip(run(model), want):
        assert np.array_equal(got, w)


def test_q_k_v_stay_apart_where_they_are_not_quantized_alike(tiny_dir, monkeypatch):
    from mlxedge.quant.binding import bind_kernels

    model = load_builtin(tiny_dir, monkeypatch, bits=4, group_size=64)
    attn = model.module.model.layers[0].self_attn
    v = attn.v_proj
    dense = mx.dequantize(v["weight"], v["scales"], v["biases"], group_size=64, bits=4)
    other = QuantizedLinear(dense.shape[1], dense.shape[0], False, QuantSpec(bits=4, group_size=32), mx.float32)
    other.weight, other.scales, other.biases = mx.quantize(dense, group_size=32, bits=4)  # another group size
    attn.v_proj = other
    report = bind_kernels(model.module, native(FakeNativeWithOps()))
    assert report["qkv_fused"] == {"native": 1} and report["attention"] == {"native": 2}


def test_auto_fuses_q_k_v_only_where_the_one_call_measured_faster(tiny_dir, tmp_path, monkeypatch):
    model = load_builtin(tiny_dir, monkeypatch, bits=4, group_size=64)

    def verdict(run_candidate, run_builtin):
        wins = run_candidate().shape[-1] != 64 + 32 + 32  # the joined q·k·v output "loses"
        return {"custom_s": 1.0 if wins else 3.0, "builtin_s": 2.0, "agree": True}

    sel = selection.Selector(path=tmp_path / "sel.json", measure_fn=verdict)
    info = model.use_kernels(native(FakeNativeWithOps(), "auto", selector=sel))
    assert "qkv_fused" not in info["layers"] and info["layers"]["attention"] == {"native": 2}


def test_load_reports_the_backend_in_info(tiny_dir, monkeypatch):
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")
    info = mlxedge.load(tiny_dir, bits=4, group_size=64, dtype="float32").info
    assert info["kernels"]["mode"] == "builtin" and info["kernels"]["backend"] == "mlx built-in"
    assert info["fused_mlps"] == 0


def test_mlxedge_info_names_the_kernels(tiny_llama_tok, monkeypatch):
    from click.testing import CliRunner

    from mlxedge.cli.models import info_command

    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")
    result = CliRunner().invoke(info_command, [str(tiny_llama_tok)])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("kernels")]
    assert line.split(None, 1)[1].startswith("mlx built-in; mode builtin; linear: builtin ")
