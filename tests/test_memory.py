"""The memory plan against independent references, the budget probes on faked devices, and the guards.

References: the byte sizes MLX itself gives to `mx.quantize` outputs and to an mlx-lm Llama quantized with
`nn.quantize`; the KV arrays mlx-lm's caches actually allocate; hand-computed figures for the rest.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from mlxedge.errors import GenerationError, MemoryBudgetError, MlxedgeError
from mlxedge.generate.guards import check_generation_context, wired_limit
from mlxedge.memory.budget import Budget, current_rss_bytes, device_budget, linux_probe
from mlxedge.memory.fit import check_plan, suggest_fitting
from mlxedge.memory.plan import (DEFAULT_CONTEXT, RUNTIME_BASE_BYTES, activation_plan, default_context_length,
                                 kv_cache_plan, make_plan, quantized_bytes, runtime_overhead_bytes, weight_plan)
from mlxedge.memory.units import parse_size
from mlxedge.sources.checkpoint import TensorInfo
from mlxedge.cli.plan import plan_rows
from rss import peak_rss_bytes

MB = 10**6
GiB = 1 << 30

# ------------------------------------------------------------------------------------------ parse_size


@pytest.mark.parametrize("text,expected", [
    ("6GB", 6 * 10**9), ("6GiB", 6 * GiB), ("6G", 6 * GiB), ("512MiB", 512 << 20), ("512MB", 512 * MB),
    ("1.5 GB", 1_500_000_000), ("4096", 4096), (" 2 kib ", 2048), (12345, 12345),
])
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "six GB", "6 XB", "GB", "-1GB", "0", 0, -5, True, None, [1], "1e9"])
def test_parse_size_refuses_garbage_with_one_line(bad):
    with pytest.raises(MlxedgeError) as err:
        parse_size(bad)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ weight bytes (exact)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_quantized_bytes_equals_mx_quantize_outputs(bits, group_size, dtype):
    w = mx.zeros((96, 384), dtype=dtype)
    q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    actual = q.nbytes + scales.nbytes + biases.nbytes
    assert quantized_bytes(w.shape, bits, group_size, dtype.size) == actual


def test_four_bit_group_64_fp16_is_four_and_a_half_bits_per_weight():
    assert quantized_bytes((4096, 4096), 4, 64, 2) * 8 / (4096 * 4096) == 4.5


def _tiny_llama_args(tied: bool, intermediate: int = 200, **extra) -> dict:
    # intermediate 200: no group divides it, so down_proj stays float, as in the loader
    return dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=intermediate,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=320,
                tie_word_embeddings=tied, max_position_embeddings=4096, **extra)


def _tiny_llama(config: dict, dtype=mx.bfloat16):
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def _infos(params: dict) -> dict:
    names = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32", mx.uint32: "uint32"}
    return {k: TensorInfo(tuple(v.shape), names[v.dtype], v.nbytes) for k, v in params.items()}


def _quantize_like_mlx_lm(model, bits, group_size):
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0)
    return dict(tree_flatten(model.parameters()))


def _nbytes(params: dict) -> int:
    return sum(v.nbytes for v in params.values())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 64), (4, 32), (8, 128)])
def test_weight_bytes_equal_an_mlx_quantized_llama(tied, bits, group_size):
    config = _tiny_llama_args(tied)
    model = _tiny_llama(config)
    infos = _infos(dict(tree_flatten(model.parameters())))
    # What a Hugging Face checkpoint also carries: a stored tied head and rotary buffers, which never load.
    if tied:
        infos["lm_head.weight"] = infos["model.embed_tokens.weight"]
    infos["model.layers.0.self_attn.rotary_emb.inv_freq"] = TensorInfo((16,), "float32", 64)
    expected = _nbytes(_quantize_like_mlx_lm(model, bits, group_size))
    plan = make_plan(config, infos, bits=bits, group_size=group_size, dtype_bytes=2, context_length=512,
                            budget="100GB")
    assert plan.weight_bytes == expected
    # down_proj (input 200) stays float, every other matrix is quantized
    counts = plan.breakdown["weights"]
    assert counts["quantized_tensors"] == (1 if tied else 2) + 2 * 6
    # bf16: two layers' down_proj (128 × 200) and two norms each (128), plus the final norm
    assert counts["float_bytes"] == 2 * (128 * 200 * 2) + 2 * 2 * (128 * 2) + 128 * 2


def test_float_plan_counts_every_tensor_at_the_compute_dtype():
    config = _tiny_llama_args(tied=False)
    model = _tiny_llama(config, dtype=mx.float32)
    infos = _infos(dict(tree_flatten(model.parameters())))
    model.set_dtype(mx.float16)
    plan = make_plan(config, infos, bits=None, group_size=64, dtype_bytes=2, context_length=512,
                            budget="100GB")
    assert plan.weight_bytes == _nbytes(dict(tree_flatten(model.parameters())))
    assert plan.breakdown["weights"]["quantized_tensors"] == 0


def test_prequantized_checkpoint_counts_as_stored_and_requantizes_when_asked():
    config = _tiny_llama_args(tied=True, intermediate=256)
    stored = _quantize_like_mlx_lm(_tiny_llama(config), 4, 64)
    infos = _infos(stored)
    as_stored = make_plan(config, infos, bits=None, group_size=64, dtype_bytes=2, context_length=512,
                                 budget="100GB", quantized={"group_size": 64, "bits": 4})
    assert as_stored.weight_bytes == _nbytes(stored)
    assert as_stored.settings["stored_quantized"] and "as stored" in as_stored.summary()
    # Without the config's quantization entry the bits and group are read off the shapes.
    guessed = make_plan(config, infos, bits=None, group_size=64, dtype_bytes=2, context_length=512,
                               budget="100GB")
    assert guessed.weight_bytes == _nbytes(stored)
    requantized = make_plan(config, infos, bits=8, group_size=32, dtype_bytes=2, context_length=512,
                                   budget="100GB", quantized={"group_size": 64, "bits": 4})
    assert requantized.weight_bytes == _nbytes(_quantize_like_mlx_lm(_tiny_llama(config), 8, 32))


def test_keep_restricts_the_count_to_what_the_architecture_keeps():
    config = _tiny_llama_args(tied=False)
    infos = _infos(dict(tree_flatten(_tiny_llama(config).parameters())))
    infos["model.vision_tower.patch.weight"] = TensorInfo((128, 128), "bfloat16", 128 * 128 * 2)
    everything = weight_plan(config, infos, bits=None, group_size=64, dtype_bytes=2)
    kept = weight_plan(config, infos, bits=None, group_size=64, dtype_bytes=2,
                              keep=set(infos) - {"model.vision_tower.patch.weight"})
    assert everything["bytes"] - kept["bytes"] == 128 * 128 * 2


# ------------------------------------------------------------------------------------------- KV cache


def test_kv_cache_hand_computed():
    config = _tiny_llama_args(tied=True)
    kv = kv_cache_plan(config, 1000, 2)
    # 2 layers × (K and V) × 2 kv heads × head_dim 32 × 1024 tokens (1000 rounded up to 256) × 2 bytes
    assert kv["bytes"] == 2 * 2 * 2 * 32 * 1024 * 2
    assert kv_cache_plan({**config, "head_dim": 64}, 1024, 4)["bytes"] == 2 * 2 * 2 * 64 * 1024 * 4
    no_gqa = {k: v for k, v in config.items() if k != "num_key_value_heads"}
    assert kv_cache_plan(no_gqa, 256, 2)["bytes"] == 2 * 2 * 4 * 32 * 256 * 2


def _cache_bytes(cache) -> int:
    return sum(c.keys.nbytes + c.values.nbytes for c in cache)


def _prefill(model, cache, n_tokens, chunk=512):
    tokens = mx.zeros((1, n_tokens), dtype=mx.int32)
    peak = 0
    for start in range(0, n_tokens, chunk):
        model(tokens[:, start:start + chunk], cache=cache)
        mx.eval([c.state for c in cache])
        peak = max(peak, _cache_bytes(cache))
    return peak


def test_kv_cache_equals_what_mlx_lm_allocates():
    config = _tiny_llama_args(tied=True)
    model = _tiny_llama(config, dtype=mx.float16)
    peak = _prefill(model, make_prompt_cache(model), 1000)
    assert kv_cache_plan(config, 1000, 2)["bytes"] == peak


def test_sliding_window_layers_peak_at_window_plus_chunk_like_mlx_lm():
    config = _tiny_llama_args(tied=True, layer_types=["sliding_attention", "full_attention"], sliding_window=256)
    model = _tiny_llama(config, dtype=mx.float16)
    peak = _prefill(model, make_prompt_cache(model), 1024)  # two whole chunks: the sliding layer holds 255 + 512
    kv = kv_cache_plan(config, 1024, 2)
    assert kv["sliding_layers"] == 1
    assert kv["bytes"] == peak
    # a ragged last chunk holds fewer: the plan is then an upper bound
    assert kv_cache_plan(config, 1000, 2)["bytes"] >= _prefill(model, make_prompt_cache(model), 1000)
    assert kv["bytes"] < kv_cache_plan({**config, "layer_types": None}, 1000, 2)["bytes"]


def test_gemma3_sliding_window_pattern_hand_computed():
    config = {"model_type": "gemma3_text", "num_hidden_layers": 6, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 256, "hidden_size": 640, "sliding_window": 512,
              "sliding_window_pattern": 6}
    kv = kv_cache_plan(config, 8192, 2, prefill_chunk=512)
    per_token = 2 * 1 * 256 * 2
    assert kv["sliding_layers"] == 5  # layers 0-4 slide, layer 5 is global
    assert kv["bytes"] == per_token * (5 * (512 - 1 + 512) + 8192)
    nested = {"model_type": "gemma3", "text_config": config}
    assert kv_cache_plan(nested, 8192, 2)["bytes"] == kv["bytes"]


# ---------------------------------------------------------------------------------- activations, plan


def test_activation_workspace_hand_computed():
    config = _tiny_llama_args(tied=True)
    act = activation_plan(config, 2048, 2, prefill_chunk=512)
    residual = 3 * 512 * 128 * 2
    scores = 4 * 512 * 2048 * 4
    attention = 512 * (2 * 4 + 2 * 2) * 32 * 2 + scores
    mlp = 3 * 512 * 200 * 2
    logits = 320 * 512 * 4
    assert act["bytes"] == residual + max(attention, mlp) + logits
    assert activation_plan(config, 100, 2)["chunk"] == 100  # a short context is one chunk


def test_plan_totals_fits_and_plain_dict():
    config = _tiny_llama_args(tied=True)
    infos = _infos(dict(tree_flatten(_tiny_llama(config).parameters())))
    plan = make_plan(config, infos, bits=4, group_size=64, dtype_bytes=2, context_length=2048,
                            budget=Budget(10**9, "test"), overhead_bytes=123)
    assert plan.total_bytes == plan.weight_bytes + plan.kv_cache_bytes + plan.activation_bytes + 123
    assert plan.fits and plan.budget_source == "test"
    tight = make_plan(config, infos, bits=4, group_size=64, dtype_bytes=2, context_length=2048,
                             budget=plan.total_bytes - 1, overhead_bytes=123)
    assert not tight.fits
    d = plan.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["settings"] == {"bits": 4, "group_size": 64, "dtype_bytes": 2, "context_length": 2048,
                             "prefill_chunk": 512, "stored_quantized": False}
    assert dict(plan_rows(d))["fits"] == "yes"


def _torch_states():
    """Ways torch can look to the process: importable, imported, blocked (the program's `sys.modules` None
    entry, cli/startup.py), and not installed at all."""
    import importlib.util
    import sys
    import types

    real = importlib.util.find_spec

    def apply(monkeypatch, state):
        monkeypatch.delitem(sys.modules, "torch", raising=False)
        if state == "imported":
            monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
        elif state == "blocked":
            monkeypatch.setitem(sys.modules, "torch", None)
        finder = {"absent": lambda name, *a: None if name == "torch" else real(name, *a),
                  "installed": lambda name, *a: object() if name == "torch" else real(name, *a)}
        monkeypatch.setattr(importlib.util, "find_spec", finder["absent" if state == "absent" else "installed"])

    return apply, ("absent", "installed", "imported", "blocked")


def test_whether_torch_is_importable_changes_neither_the_total_nor_the_verdict(monkeypatch):
    """The program keeps torch out (cli/startup.py), so its presence must not make a model fit or not."""
    config = _tiny_llama_args(tied=True)
    infos = _infos(dict(tree_flatten(_tiny_llama(config).parameters())))
    apply, states = _torch_states()
    apply(monkeypatch, "absent")
    edge = make_plan(config, infos, bits=4, group_size=64, dtype_bytes=2, context_length=2048,
                     budget="100GB").total_bytes  # the default runtime overhead, counted without torch
    seen = {}
    for state in states:
        apply(monkeypatch, state)
        plan = make_plan(config, infos, bits=4, group_size=64, dtype_bytes=2, context_length=2048, budget=edge)
        check_plan(config, infos, bits=4, group_size=64, dtype_bytes=2, context_length=2048, budget=edge)
        seen[state] = (plan.total_bytes, plan.overhead_bytes, plan.fits)
    assert set(seen.values()) == {(edge, RUNTIME_BASE_BYTES, True)}, seen
    assert runtime_overhead_bytes() == RUNTIME_BASE_BYTES


def test_default_context_is_the_models_own_capped():
    assert default_context_length({"max_position_embeddings": 131072}) == DEFAULT_CONTEXT
    assert default_context_length({"max_position_embeddings": 2048}) == 2048
    assert default_context_length({"text_config": {"max_position_embeddings": 1024}}) == 1024


# ------------------------------------------------------------------------------ suggestions, refusal


@pytest.fixture()
def bigger_llama():
    """A 4-layer model with a large vocabulary, so the settings differ by megabytes."""
    config = dict(_tiny_llama_args(tied=False, intermediate=1024), hidden_size=512, vocab_size=32000,
                  num_hidden_layers=4)
    infos = {}
    for name, shape in [("model.embed_tokens.weight", (32000, 512)), ("lm_head.weight", (32000, 512)),
                        ("model.norm.weight", (512,))]:
        infos[name] = TensorInfo(shape, "float32", 4 * shape[0] * (shape[1] if len(shape) > 1 else 1))
    for i in range(4):
        for proj, shape in [("self_attn.q_proj", (512, 512)), ("self_attn.k_proj", (256, 512)),
                            ("self_attn.v_proj", (256, 512)), ("self_attn.o_proj", (512, 512)),
                            ("mlp.gate_proj", (1024, 512)), ("mlp.up_proj", (1024, 512)),
                            ("mlp.down_proj", (512, 1024))]:
            infos[f"model.layers.{i}.{proj}.weight"] = TensorInfo(shape, "float32", 4 * shape[0] * shape[1])
    return config, infos


def _plan_total(config, infos, bits, context):
    return make_plan(config, infos, bits=bits, group_size=64, dtype_bytes=2, context_length=context,
                            budget=1, overhead_bytes=0).total_bytes


def test_suggestions_best_quality_first_and_only_fitting(bigger_llama):
    config, infos = bigger_llama
    budget = _plan_total(config, infos, 8, 4096) - 1  # 8-bit at 4k just misses
    got = suggest_fitting(config, infos, bits=None, group_size=64, dtype_bytes=2, context_length=4096,
                                 budget=budget, overhead_bytes=0)
    settings = [(s["bits"], s["context_length"]) for s in got]
    assert settings[0] == (4, 4096)
    assert (None, 4096) not in settings and (8, 4096) not in settings
    assert all(s["total_bytes"] <= budget for s in got)
    contexts = [c for _, c in settings]
    assert contexts == sorted(contexts, reverse=True) and min(contexts) == 512
    # never suggest more bits than asked for
    four = suggest_fitting(config, infos, bits=4, group_size=64, dtype_bytes=2, context_length=4096,
                                  budget=budget, overhead_bytes=0)
    assert {s["bits"] for s in four} == {4}


def test_check_plan_refuses_naming_what_fits_and_auto_fit_picks_it(bigger_llama):
    config, infos = bigger_llama
    budget = _plan_total(config, infos, 8, 4096) - 1
    kwargs = dict(bits=8, group_size=64, dtype_bytes=2, context_length=4096, budget=budget, overhead_bytes=0)
    with pytest.raises(MemoryBudgetError) as err:
        check_plan(config, infos, **kwargs)
    message = str(err.value)
    assert "bits=4 context_length=4096" in message and "auto_fit" in message and "\n" not in message
    plan = check_plan(config, infos, auto_fit=True, **kwargs)
    assert plan.fits and plan.settings["bits"] == 4 and plan.settings["context_length"] == 4096
    assert "auto-fit" in plan.note and "bits=4" in plan.note
    roomy = check_plan(config, infos, **{**kwargs, "budget": budget * 2})
    assert roomy.settings["bits"] == 8 and roomy.note == ""


def test_refusal_when_nothing_fits(bigger_llama):
    config, infos = bigger_llama
    kwargs = dict(bits=None, group_size=64, dtype_bytes=2, context_length=4096, budget="1MB", overhead_bytes=0)
    for auto in (False, True):
        with pytest.raises(MemoryBudgetError, match="nothing down to 4-bit"):
            check_plan(config, infos, auto_fit=auto, **kwargs)


# ---------------------------------------------------------------------------------------------- budget

MEMINFO = "MemTotal:       24683656 kB\nMemFree:        23912024 kB\nMemAvailable:   20000000 kB\n"


def test_override_wins_without_probing():
    def probe():
        raise AssertionError("the probe must not run when overridden")

    budget = device_budget("6GB", probe=probe)
    assert (budget.bytes, budget.source) == (6 * 10**9, "override")


def test_macos_budget_is_the_recommended_working_set():
    info = {"memory_size": 16 * GiB, "max_recommended_working_set_size": 11 * GiB}
    budget = device_budget(probe=lambda: {"platform": "darwin", "device_info": info})
    assert (budget.bytes, budget.source) == (11 * GiB, "metal recommended working set")
    fallback = device_budget(probe=lambda: {"platform": "darwin", "device_info": {}, "memory_size": 8 * GiB})
    assert fallback.bytes == 6 * GiB and "total memory" in fallback.source
    with pytest.raises(MlxedgeError, match="memory_budget"):
        device_budget(probe=lambda: {"platform": "darwin", "device_info": {}})


def test_linux_budget_from_memavailable_plus_own_rss():
    budget = device_budget(probe=lambda: {"platform": "linux", "meminfo": MEMINFO, "rss": 300 * MB,
                                                 "cgroup": None})
    assert (budget.bytes, budget.source) == (20000000 * 1024 + 300 * MB, "MemAvailable")


def test_linux_budget_takes_the_tighter_cgroup():
    cg = {"version": 2, "limit": 4 * GiB, "usage": 1 * GiB, "stat": "anon 600\ninactive_file 268435456\n"}
    budget = device_budget(probe=lambda: {"platform": "linux", "meminfo": MEMINFO, "rss": 300 * MB,
                                                 "cgroup": cg})
    assert budget.source == "cgroup memory.max"
    assert budget.bytes == 4 * GiB - 1 * GiB + 268435456 + 300 * MB
    unlimited_usage = dict(cg, usage=None)
    b2 = device_budget(probe=lambda: {"platform": "linux", "meminfo": MEMINFO, "rss": 0,
                                             "cgroup": unlimited_usage})
    assert b2.bytes == 4 * GiB


def _fake_fs(tmp_path, proc_cgroup: str, files: dict):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(MEMINFO)
    (tmp_path / "proc/self/cgroup").write_text(proc_cgroup)
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_linux_probe_reads_cgroup_v2_and_a_parents_tighter_limit(tmp_path):
    root = _fake_fs(tmp_path, "0::/user.slice/app.scope\n", {
        "sys/fs/cgroup/user.slice/app.scope/memory.max": "max\n",
        "sys/fs/cgroup/user.slice/app.scope/memory.current": "100\n",
        "sys/fs/cgroup/user.slice/memory.max": "2147483648\n",
        "sys/fs/cgroup/user.slice/memory.current": "1073741824\n",
        "sys/fs/cgroup/user.slice/memory.stat": "inactive_file 0\n",
    })
    facts = linux_probe(root)
    assert facts["cgroup"]["limit"] == 2 * GiB and facts["cgroup"]["usage"] == GiB
    facts["rss"] = 0
    budget = device_budget(probe=lambda: facts)
    assert (budget.bytes, budget.source) == (GiB, "cgroup memory.max")


def test_linux_probe_reads_cgroup_v1_and_ignores_unlimited(tmp_path):
    v1 = "4:memory:/process_api/abc\n3:cpuset:/\n"
    root = _fake_fs(tmp_path, v1, {
        "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": "3221225472\n",
        "sys/fs/cgroup/memory/process_api/abc/memory.usage_in_bytes": "1073741824\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
    })
    facts = linux_probe(root)
    assert facts["cgroup"]["version"] == 1 and facts["cgroup"]["limit"] == 3 * GiB
    unlimited = _fake_fs(tmp_path / "u", v1, {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert linux_probe(unlimited)["cgroup"] is None


def test_real_probe_gives_a_positive_budget():
    budget = device_budget()
    assert budget.bytes > current_rss_bytes() and budget.source


# ------------------------------------------------------------------------------------ context guard


def test_generation_context_guard():
    assert check_generation_context(1000, 1048, 2048).mode == "full"
    with pytest.raises(GenerationError, match=r"max_tokens=1048 or less.*context_length=2049"):
        check_generation_context(1000, 1049, 2048)
    with pytest.raises(GenerationError, match="the prompt has 3000 tokens"):
        check_generation_context(3000, 10, 2048)
    rotating = check_generation_context(3000, 10, 2048, rotating=True)
    assert (rotating.mode, rotating.window, rotating.tokens_needed) == ("rotating", 2048, 3010)


# ---------------------------------------------------------------------------------------- wired limit


class FakeMetal:
    def __init__(self, available=True, recommended=8 * GiB, previous=0, refuse=False):
        self.available, self.recommended, self.limit, self.refuse = available, recommended, previous, refuse
        self.calls = []

    def is_available(self):
        return self.available

    def device_info(self):
        return {"memory_size": 16 * GiB, "max_recommended_working_set_size": self.recommended}

    def set_wired_limit(self, limit):
        self.calls.append(("set", limit))
        if self.refuse:
            raise RuntimeError("[metal::set_wired_limit] Setting a wired limit larger than the system limit")
        previous, self.limit = self.limit, limit
        return previous

    def synchronize(self):
        self.calls.append(("sync",))


def test_wired_limit_sets_the_plan_and_restores():
    metal = FakeMetal(previous=123)
    with wired_limit(3 * GiB, metal=metal) as limit:
        assert limit == 3 * GiB and metal.limit == 3 * GiB
    assert metal.calls == [("set", 3 * GiB), ("sync",), ("set", 123)]
    assert metal.limit == 123


def test_wired_limit_is_capped_at_the_recommended_working_set_and_restored_on_error():
    metal = FakeMetal(recommended=8 * GiB)
    with pytest.raises(ValueError):
        with wired_limit(20 * GiB, metal=metal):
            assert metal.limit == 8 * GiB
            raise ValueError("generation failed")
    assert metal.calls[0] == ("set", 8 * GiB) and metal.calls[-1] == ("set", 0) and metal.limit == 0


def test_wired_limit_is_a_no_op_without_metal_or_when_refused():
    absent = FakeMetal(available=False)
    with wired_limit(GiB, metal=absent) as limit:
        assert limit is None
    assert absent.calls == []
    refused = FakeMetal(refuse=True)
    with wired_limit(GiB, metal=refused) as limit:
        assert limit is None
    assert refused.calls == [("set", GiB)]


def test_wired_limit_drives_mlx_through_its_real_adapter_on_a_fake_metal_device(monkeypatch):
    """No fake adapter: MLX itself reports a Metal device, and its setter sees the capped plan, then the
    previous limit back once the block ends (after a synchronize)."""
    calls, state = [], {"limit": 123}

    def set_wired_limit(limit):
        calls.append(("set", limit))
        previous, state["limit"] = state["limit"], limit
        return previous

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"memory_size": 16 * GiB,
                                                    "max_recommended_working_set_size": 8 * GiB})
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    monkeypatch.setattr(mx, "synchronize", lambda *args: calls.append(("sync",)))
    with wired_limit(20 * GiB) as limit:
        assert limit == 8 * GiB and state["limit"] == 8 * GiB
    assert calls == [("set", 8 * GiB), ("sync",), ("set", 123)] and state["limit"] == 123
    calls.clear()
    with wired_limit(3 * GiB) as limit:
        assert limit == 3 * GiB  # under the working set: the plan itself
    assert calls == [("set", 3 * GiB), ("sync",), ("set", 123)]


def test_wired_limit_on_this_machine_wires_only_with_metal_and_puts_the_old_limit_back(monkeypatch):
    """The real MLX here: without Metal (MLX's CPU build) the setter is never called; with Metal it is called
    twice, with the capped plan and then with the limit that was there before."""
    real, calls = mx.set_wired_limit, []

    def spy(limit):
        previous = real(limit)
        calls.append((limit, previous))
        return previous

    monkeypatch.setattr(mx, "set_wired_limit", spy)
    with wired_limit(GiB) as limit:
        inside = list(calls)
    if not mx.metal.is_available():
        assert limit is None and calls == []
        return
    recommended = mx.device_info().get("max_recommended_working_set_size")
    assert limit == (min(GiB, recommended) if recommended else GiB)
    assert len(inside) == 1 and inside[0][0] == limit and len(calls) == 2
    assert calls[1] == (inside[0][1], limit)  # the previous limit restored, replacing ours


# -------------------------------------------------------------------------------------------- RSS


def test_rss_helpers_see_an_allocation():
    before = current_rss_bytes()
    block = bytearray(200 * MB)  # zero-filled by calloc: touch the pages so they are resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert current_rss_bytes() - before > 150 * MB
    assert peak_rss_bytes() >= current_rss_bytes()
    del block
    assert peak_rss_bytes() - before > 150 * MB  # the peak remembers what the current figure forgets
