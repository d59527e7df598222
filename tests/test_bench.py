"""mlxedge.bench and `mlxedge bench`: bytes per token against the checkpoint's headers and mlx-lm's KV cache, the
cached bandwidth probe, variant parsing, the JSON schema of `bench --json --compare mlx-lm` (both sides in one
compute dtype, the kernels named), and --plot's missing-extra error. Speeds are only checked for being positive numbers: no timed asserts."""

from __future__ import annotations

import json
import math
import sys

import time
import pytest

from mlxedge.bench import bench, device, roofline, variants, views
from mlxedge.errors import MlxedgeError


@pytest.fixture
def small_probe(monkeypatch, tmp_path):
    """Bandwidth cache in a fresh MLXEDGE_HOME and a 16 MiB probe, so tests stay quick."""
    monkeypatch.setenv("MLXEDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(device, "BANDWIDTH_PROBE_BYTES", 16 << 20)
    monkeypatch.setattr(device, "BANDWIDTH_REPS", 2)
    return tmp_path / "home"


def test_parse_variants():
    labels = [v.label for v in variants.parse_variants("16,8,4", 32)]
    assert labels == ["bf16", "q8 g32", "q4 g32"]
    assert variants.parse_variants(None)[0].load_kwargs() == {"bits": None, "group_size": None, "dtype": None}
    assert variants.parse_variants("32,16", dtype="float16")[1].dtype == "float16"
    for bad in ("7", "four", ","):
        with pytest.raises(MlxedgeError):
            variants.parse_variants(bad)


def test_weight_bytes_per_token_against_the_checkpoint(tiny_llama_tok, tmp_path):
    """Untied: the embedding table is read one row per token; tied: the lm_head reads all of it."""
    import mlxedge
    from tiny_models import build_tiny
    from safetensors import safe_open

    def header_bytes(directory):
        with safe_open(str(directory / "model.safetensors"), "np") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}

    shapes = header_bytes(tiny_llama_tok)
    total = sum(4 * int(math.prod(s)) for s in shapes.values())
    embed = shapes["model.embed_tokens.weight"]
    model = mlxedge.load(tiny_llama_tok)
    assert roofline.weight_bytes_per_token(model.module) == total - 4 * embed[0] * embed[1] + 4 * embed[1]

    tied = build_tiny("llama", tmp_path / "tied", vocab_size=512, tie_word_embeddings=True)
    shapes = header_bytes(tied)
    assert "lm_head.weight" not in shapes
    assert roofline.weight_bytes_per_token(mlxedge.load(tied).module) == sum(
        4 * int(math.prod(s)) for s in shapes.values())


def test_kv_bytes_per_position_against_mlx_lm_cache(tiny_llama_tok):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    import mlxedge

    model = mlxedge.load(tiny_llama_tok, dtype="bfloat16")
    cache = make_prompt_cache(model.module)
    model.module(mx.array([[5, 6, 7, 8, 9, 10, 11]]), cache=cache)
    held = sum(c.keys[..., :c.offset, :].nbytes + c.values[..., :c.offset, :].nbytes for c in cache)
    assert all(c.offset == 7 for c in cache)
    assert roofline.kv_bytes_per_position(model.config, roofline.kv_dtype_bytes(model.module)) * 7 == held


def test_bandwidth_is_measured_once_and_cached(small_probe):
    first = device.device_bandwidth()
    assert first["cached"] is False and first["bytes_per_s"] > 0
    assert (small_probe / "bench" / device.BANDWIDTH_CACHE_NAME).is_file()
    again = device.device_bandwidth()
    assert again["cached"] is True and again["bytes_per_s"] == first["bytes_per_s"]
    assert device.device_bandwidth(remeasure=True)["cached"] is False


def test_a_figure_from_an_older_probe_is_measured_again(small_probe):
    import json

    device.device_bandwidth()
    path = small_probe / "bench" / device.BANDWIDTH_CACHE_NAME
    cache = json.loads(path.read_text())
    for entry in cache.values():
        entry["method"], entry["bytes_per_s"] = "MLX copy y = x + 1", 1.0
    path.write_text(json.dumps(cache))
    fresh = device.device_bandwidth()
    assert fresh["cached"] is False and fresh["method"] == device._method_here() and fresh["bytes_per_s"] > 1.0


def test_the_cpu_probe_reads_with_one_numpy_slice_per_core(small_probe, monkeypatch):
    """On MLX's CPU backend the ceiling is numpy summing one slice per core in parallel (MLX's sum runs on one
    thread, far below what the memory gives the multi-threaded native kernels); on a GPU it is MLX's sum."""
    import mlx.core as mx

    result = device.measure_bandwidth(nbytes=64 << 20, reps=2)
    if mx.default_device().type == mx.DeviceType.cpu:
        assert result["method"] == device.CPU_BANDWIDTH_METHOD and result["threads"] == device._cores()
        sliced = []
        import numpy as np

        monkeypatch.setattr(np, "array_split", lambda x, k: sliced.append(k) or [x[i::k] for i in range(k)])
        device.measure_bandwidth(nbytes=8 << 20, reps=1)
        assert sliced == [device._cores()]
    else:
        assert result["method"] == device.BANDWIDTH_METHOD
    assert result["bytes_per_s"] > 0 and math.isfinite(result["bytes_per_s"])


def test_roofline_arithmetic():
    r = roofline.roofline_fields(50.0, 10**9, 200e9)
    assert r["roofline_tps"] == pytest.approx(200.0) and r["roofline_pct"] == pytest.approx(25.0)
    assert roofline.roofline_fields(50.0, 10**9, None)["roofline_pct"] is None


def test_bench_json_schema_with_mlx_lm_compare(tiny_llama_tok, small_probe):
    from click.testing import CliRunner

    from mlxedge.cli.evaluation import bench_command

    result = CliRunner().invoke(bench_command, [str(tiny_llama_tok), "--bits", "16,4", "--group-size", "32",
                                                "--n-prompt", "8", "--n-gen", "4", "-r", "2", "--compare", "mlx-lm", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"model", "device", "settings", "variants"}
    device = data["device"]
    assert {"chip", "backend", "memory_bytes", "line", "mlx_version", "bandwidth_bytes_per_s"} <= set(device)
    assert device["backend"] in ("cpu", "metal", "gpu") and device["bandwidth_bytes_per_s"] > 0
    assert data["settings"] == {"prompt_tokens": 8, "gen_tokens": 4, "repetitions": 2, "compare": "mlx-lm",
                                "warmup": True, "tests": "pp8, tg4"}
    assert [v["label"] for v in data["variants"]] == ["bf16", "q4 g32"]
    for v in data["variants"]:
        for key in ("pp_tps_mean", "pp_tps_stdev", "tg_tps_mean", "tg_tps_stdev", "ttft_s_mean", "load_s",
                    "bits_per_weight", "roofline_tps", "roofline_pct"):
            assert isinstance(v[key], float) and v[key] >= 0.0, key
        assert len(v["pp_tps"]) == len(v["tg_tps"]) == 2 and min(v["tg_tps"]) > 0
        assert isinstance(v["bytes"], int) and v["peak_memory_bytes"] >= v["bytes"]
        assert v["weight_bytes_per_token"] > 0 and v["kv_bytes_per_token"] > 0
        theirs = v["mlx_lm"]
        ratios = [k for k in theirs if "ratio" in k]
        assert {"pp_ratio", "tg_ratio", "tg_ratio_paired_median"} <= set(ratios)
        assert all(theirs[k] > 0 for k in ratios)
        assert len(theirs["tg_tps"]) == 2 and theirs["tg_tps_mean"] > 0
        assert theirs["dtype"] == v["dtype"]  # like with like: mlx-lm computes in our dtype
        assert isinstance(v["kernels"], str) and v["kernels"]
    # the q4 row asked for no dtype: mlxedge picks its compute dtype, and mlx-lm's copy is written in it
    assert data["variants"][0]["dtype"] == "bfloat16"
    assert data["variants"][1]["mlx_lm"]["dtype"] == data["variants"][1]["dtype"]
    q4 = data["variants"][1]
    scale_bits = 32 if q4["dtype"] == "float32" else 16  # one scale and one bias per group of 32
    assert q4["bits"] == 4 and abs(q4["bits_per_weight"] - (4 + 2 * scale_bits / 32)) < 0.05


def test_bench_table_and_markdown(tiny_llama_tok, small_probe):
    result = bench(tiny_llama_tok, variants.parse_variants(None), p=4, n=3, reps=1)
    text, md = views.format_table(result), views.format_table(result, markdown=True)
    assert "measured bandwidth" in text and "pp4 t/s" in text and "roofline %" in text
    assert md.splitlines()[-1].startswith("| as stored | float32 | 25.5 MB | 32.00 |")
    assert f"kernels: {result['variants'][0]['kernels']}" in text


def test_plot_without_matplotlib_names_the_extra(tiny_llama_tok, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from mlxedge.cli.evaluation import bench_command

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = CliRunner().invoke(bench_command, [str(tiny_llama_tok), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --plot needs matplotlib: pip install 'mlxedge[plot]'"


def test_plot_draws_the_variants(tmp_path):
    row = {"pp_tps_mean": 100.0, "pp_tps_stdev": 2.0, "tg_tps_mean": 20.0, "tg_tps_stdev": 1.0}
    result = {"model": "m", "device": {"line": "cpu"}, "settings": {"prompt_tokens": 8, "gen_tokens": 4,
                                                                    "compare": "mlx-lm"},
              "variants": [{"label": "bf16", **row, "mlx_lm": row}, {"label": "q4 g64", **row, "mlx_lm": row}]}
    path = views.plot(result, tmp_path / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
