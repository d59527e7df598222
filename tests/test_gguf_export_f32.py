"""GGUF export at F32 (the file llama.cpp's own quantizer starts from) and of gemma3: the exported file holds
exactly the source's weights, read back by gguf-py (an independent reader) and by mlxedge."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import mlxedge
from mlxedge.errors import UnsupportedError
from gguf_tiny import TINY, tiny_model, write_gguf

IDS = [int(x) for x in np.random.default_rng(7).integers(3, 256, 24)]  # longer than gemma3's window (4)


def _tensors(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                     .reshape(-1)) for t in reader.tensors}


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_f32_export_of_a_quantized_gguf_holds_its_exact_weights(tmp_path, model_type):
    """Every tensor of the F32 export equals gguf's dequantization of the source's blocks (same GGUF name,
    same layout: llama's q/k permutation and gemma3's `w + 1` norms re-applied as llama.cpp stores them)."""
    model = tiny_model(model_type)
    source = write_gguf(model, tmp_path / "src.gguf", TINY[model_type]["types"])
    out = tmp_path / "f32.gguf"
    summary = mlxedge.convert(str(source), out, bits=32)
    assert summary["gguf_type"] == "f32"
    src, exported = _tensors(source), _tensors(out)
    assert set(exported) == set(src)
    for name, (qtype, values) in exported.items():
        assert qtype == gguf.GGMLQuantizationType.F32, name
        assert np.array_equal(values, src[name][1]), name
    # and mlxedge runs the export as the source's exact model
    want = mlxedge.load(str(source), dequantize=True).logits(IDS)
    assert np.array_equal(mlxedge.load(str(out)).logits(IDS), want)


def test_gemma3_export_writes_llama_cpps_gemma3_keys(tmp_path):
    model = tiny_model("gemma3_text")
    source = write_gguf(model, tmp_path / "src.gguf", {})
    out = tmp_path / "q8.gguf"
    mlxedge.convert(str(source), out, bits=8)
    fields = gguf.GGUFReader(str(out)).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "gemma3"
    assert value("gemma3.attention.sliding_window") == 4
    assert value("gemma3.attention.key_length") == value("gemma3.attention.value_length") == 256
    assert value("gemma3.rope.freq_base") == 500000.0
    back = mlxedge.load(str(out), dequantize=True).logits(IDS)
    want = mlxedge.load(str(source)).logits(IDS)
    assert np.abs(back - want).max() < 0.05 * np.abs(want).max()  # Q8_0 rounding only


def test_gemma3_with_a_pattern_llama_cpp_does_not_run_is_refused(tmp_path):
    model = tiny_model("gemma3_text", layer_types=["sliding_attention", "full_attention"] * 3 + ["sliding_attention"])
    source = write_gguf(model, tmp_path / "src.gguf", {})
    # the GGUF reader takes llama.cpp's fixed pattern; a directory states its own
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(UnsupportedError, match="5 local layers per global one"):
        mlxedge.convert(str(tmp_path / "hf"), tmp_path / "x.gguf", bits=32)
    assert not (tmp_path / "x.gguf").exists()
    assert source.exists()
