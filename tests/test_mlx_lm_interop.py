"""Files round-trip with mlx-lm: what mlxedge writes mlx-lm loads, and what mlx-lm writes mlxedge loads."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import convert as mlx_lm_convert
from mlx_lm import load as mlx_lm_load

import mlxedge
from tiny_models import build_tiny, reference_logits

IDS = [1, 5, 9, 200, 300, 4000, 17, 42, 99, 1234]


def _tiny(directory, tokenizer_dir, rope_theta):
    from transformers import AutoTokenizer

    path = build_tiny("llama", directory, vocab_size=49152, hidden_size=128, intermediate_size=256,
                      rope_theta=rope_theta)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def builtin_kernels(monkeypatch):
    """Bit-identical logits are a property of the files on the same kernels: bind MLX's built-ins, as mlx-lm."""
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, smollm2_hf):
    """A tiny random llama carrying SmolLM2's real tokenizer (mlx-lm refuses a model without one).

    rope_theta is llama's standard 1e4: mlx-lm misreads a transformers-5 config's rope_parameters and falls
    back to that default (DESIGN.md), so only with it does mlx-lm itself compute the right numbers.
    """
    return _tiny(tmp_path_factory.mktemp("interop") / "tiny", smollm2_hf, 10000.0)


def _mlx_lm_logits(path):
    model, _ = mlx_lm_load(str(path))
    return np.array(model(mx.array(IDS)[None])[0].astype(mx.float32))


@pytest.mark.parametrize("bits", [4, 8])
def test_mlxedge_files_load_in_mlx_lm_with_identical_logits(tiny_with_tokenizer, tmp_path, bits):
    out = tmp_path / "ours"
    mlxedge.convert(tiny_with_tokenizer, out, bits=bits, group_size=64)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits}
    ours = mlxedge.load(out).logits(IDS)
    on_the_fly = mlxedge.load(tiny_with_tokenizer, bits=bits, group_size=64).logits(IDS)
    assert np.array_equal(ours, on_the_fly)
    assert np.array_equal(_mlx_lm_logits(out), ours)


def test_mlx_lm_files_load_in_mlxedge_with_identical_logits(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "theirs"
    mlx_lm_convert(str(tiny_with_tokenizer), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=64)
    model = mlxedge.load(out)
    assert model.info["source_kind"] == "mlx" and model.info["bits"] == 4
    theirs = _mlx_lm_logits(out)
    assert np.array_equal(model.logits(IDS), theirs)
    # the same quantization done by mlxedge while loading gives the same numbers
    assert np.array_equal(mlxedge.load(tiny_with_tokenizer, bits=4, group_size=64, dtype=model.info["dtype"])
                          .logits(IDS), theirs)


def _dequantized_checkpoint(mlx_dir, source, dest):
    """A transformers checkpoint (source's config) of the weights an mlx-lm directory holds, quantized ones
    dequantized by mx.dequantize: the independent reference for what that directory computes."""
    quantization = json.loads((mlx_dir / "config.json").read_text()).get("quantization")
    weights = {}
    for file in sorted(mlx_dir.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    out = {}
    for name, value in weights.items():
        prefix = name[: -len(".weight")]
        if name.endswith((".scales", ".biases")):
            continue
        if f"{prefix}.scales" in weights:
            value = mx.dequantize(value, weights[f"{prefix}.scales"], weights[f"{prefix}.biases"],
                                  group_size=quantization["group_size"], bits=quantization["bits"])
        out[name] = value.astype(mx.float32)
    dest.mkdir()
    shutil.copy(source / "config.json", dest / "config.json")
    mx.save_safetensors(str(dest / "model.safetensors"), out, metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("bits", [None, 8])
def test_mlx_lm_files_with_transformers5_rope_are_read_correctly(tmp_path, smollm2_hf, bits):
    """mlx-lm copies the config as transformers 5 wrote it (rope_theta only inside rope_parameters): mlxedge
    reads its rope_theta and agrees with transformers on the same weights; mlx-lm falls back to 1e4 and does not."""
    source = _tiny(tmp_path / "odd_rope", smollm2_hf, 313.0)
    out = tmp_path / "theirs"
    mlx_lm_convert(str(source), mlx_path=str(out), quantize=bits is not None, q_bits=bits, q_group_size=64,
                   dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 313.0 and config.get("rope_theta") is None
    reference = reference_logits(_dequantized_checkpoint(out, source, tmp_path / "reference") if bits else source,
                                 IDS).numpy()
    ours = mlxedge.load(out, dtype="float32")
    assert ours.info["bits"] == bits
    assert np.abs(ours.logits(IDS) - reference).max() <= 1e-3
    assert np.abs(_mlx_lm_logits(out) - reference).max() > 0.1  # a misread rope_theta shows at this tolerance
