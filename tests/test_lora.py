"""LoRA/DoRA adapters: mlx-lm adapters give mlx-lm's own logits, PEFT adapters give transformers + peft's,
a fused `convert --adapter` equals the unfused load, and adapters that do not fit fail in one line."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load

import mlxedge
from mlxedge.errors import SourceError
from tiny_models import add_tiny_tokenizer, build_tiny

IDS = [1, 5, 9, 200, 30, 40, 17, 42, 99, 123]
KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


@pytest.fixture(autouse=True)
def builtin_kernels(monkeypatch):
    """mlx-lm runs MLX's built-in matmuls; compare against the same path, bit for bit."""
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llama with a tokenizer; rope_theta 1e4 so mlx-lm reads its transformers-5 config right."""
    path = build_tiny("llama", tmp_path_factory.mktemp("lora") / "base", rope_theta=10000.0)
    return add_tiny_tokenizer(path)


@pytest.fixture(scope="module")
def base_q4(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "base-q4"
    mlxedge.convert(base, out, bits=4, group_size=32)
    return out


def _dims(module: str) -> tuple:
    return {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32), "mlp.down_proj": (128, 64)}[module]


def write_mlx_lm_adapter(directory, kind="lora", rank=4, scale=2.0, seed=1, shape_override=None):
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for key in KEYS:
            in_dims, out_dims = shape_override or _dims(key)
            prefix = f"model.layers.{layer}.{key}"
            tensors[f"{prefix}.lora_a"] = mx.array(rng.normal(0, 0.1, (in_dims, rank)).astype(np.float32))
            tensors[f"{prefix}.lora_b"] = mx.array(rng.normal(0, 0.1, (rank, out_dims)).astype(np.float32))
            if kind == "dora":
                tensors[f"{prefix}.m"] = mx.array(rng.uniform(0.5, 1.5, (out_dims,)).astype(np.float32))
    directory.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(directory / "adapters.safetensors"), tensors)
    config = {"fine_tune_type": kind, "num_layers": 2,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": KEYS}}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def _mlx_lm_logits(model_dir, adapter_dir):
    model, _ = mlx_lm_load(str(model_dir), adapter_path=str(adapter_dir))
    return np.array(model(mx.array(IDS)[None])[0].astype(mx.float32))


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("which", ["float", "q4"])
def test_mlx_lm_adapter_logits_equal_mlx_lm(base, base_q4, tmp_path, kind, which):
    model_dir = base if which == "float" else base_q4
    adapter = write_mlx_lm_adapter(tmp_path / "adapter", kind=kind)
    model = mlxedge.load(model_dir, adapter=adapter, dtype="float32")
    assert model.info["adapter"] == {"path": str(adapter), "format": "mlx-lm", "type": kind, "modules": 6, "rank": 4}
    ours = model.logits(IDS)
    theirs = _mlx_lm_logits(model_dir, adapter)
    assert np.array_equal(ours, theirs)
    plain = mlxedge.load(model_dir, dtype="float32").logits(IDS)
    assert np.abs(ours - plain).max() > 1e-2  # the adapter changes the numbers


def _peft_adapter(base, directory, use_dora=False, use_rslora=False):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        use_dora=use_dora, use_rslora=use_rslora, alpha_pattern={"down_proj": 6})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT starts B at zero; random B makes the update visible
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.normal_(0.0, 0.1)
            if "lora_magnitude_vector" in name:
                p.uniform_(0.5, 1.5)
    peft_model.eval()
    with torch.no_grad():
        reference = peft_model(torch.tensor([IDS])).logits[0].numpy()
    peft_model.save_pretrained(directory)
    return directory, reference


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_peft_adapter_logits_match_transformers_peft(base, tmp_path, variant):
    adapter, reference = _peft_adapter(base, tmp_path / "peft", use_dora=variant == "dora",
                                       use_rslora=variant == "rslora")
    assert (adapter / "adapter_model.safetensors").is_file()
    model = mlxedge.load(base, adapter=adapter, dtype="float32")
    assert model.info["adapter"]["format"] == "peft"
    ours = model.logits(IDS)
    assert np.abs(ours - reference).max() < 1e-4
    plain = mlxedge.load(base, dtype="float32").logits(IDS)
    assert np.abs(plain - reference).max() > 1e-2


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_convert_equals_unfused_load(base, tmp_path, kind):
    adapter = write_mlx_lm_adapter(tmp_path / "adapter", kind=kind)
    out = tmp_path / "fused"
    mlxedge.convert(base, out, bits=None, adapter=adapter)
    fused = mlxedge.load(out, dtype="float32").logits(IDS)
    unfused = mlxedge.load(base, adapter=adapter, dtype="float32").logits(IDS)
    assert np.abs(fused - unfused).max() < 1e-4


def test_fused_convert_of_a_quantized_base_equals_mlx_lm_fuse(base_q4, tmp_path):
    """On a quantized base the merged weight is re-quantized at the stored settings, as mlx-lm's fuse does."""
    from mlx.utils import tree_flatten, tree_unflatten

    adapter = write_mlx_lm_adapter(tmp_path / "adapter")
    out = tmp_path / "fused"
    mlxedge.convert(base_q4, out, bits=None, adapter=adapter)
    theirs, _ = mlx_lm_load(str(base_q4), adapter_path=str(adapter))
    fused = [(n, m.fuse()) for n, m in theirs.named_modules() if hasattr(m, "fuse") and hasattr(m, "lora_a")]
    theirs.update_modules(tree_unflatten(fused))
    expected = dict(tree_flatten(theirs.parameters()))
    written = mx.load(str(out / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        for part in ("weight", "scales", "biases"):
            assert np.array_equal(np.array(written[f"{name}.{part}"]), np.array(expected[f"{name}.{part}"])), name


def test_adapter_for_another_size_names_the_module(base, tmp_path):
    adapter = write_mlx_lm_adapter(tmp_path / "wrong", shape_override=(96, 64))
    with pytest.raises(SourceError, match=r"module model\.layers\.\d\.\S+ is \d+->\d+ but the adapter's update is 96->64 \(rank 4\)") as e:
        mlxedge.load(base, adapter=adapter)
    assert "\n" not in str(e.value)


def test_adapter_for_another_architecture_names_the_module(base, tmp_path):
    adapter = write_mlx_lm_adapter(tmp_path / "other")
    weights = mx.load(str(adapter / "adapters.safetensors"))
    weights = {k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in weights.items()}
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
    with pytest.raises(SourceError, match=r"names module model\.layers\.\d\.attn\.c_attn, which this model does not have"):
        mlxedge.load(base, adapter=adapter)
    with pytest.raises(SourceError, match=r"model\.layers\.\d\.attn\.c_attn"):
        mlxedge.convert(base, tmp_path / "out", bits=None, adapter=adapter)
    assert not (tmp_path / "out").exists()


def test_pickled_peft_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SourceError, match="never loads"):
        mlxedge.load("unused", adapter=tmp_path)


def test_cli_adapter_flag_errors_in_one_line(base, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    mlxedge_cli = str(Path(sys.executable).with_name("mlxedge"))
    run = subprocess.run([mlxedge_cli, "generate", str(base), "-p", "hi", "--adapter", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'} is not an adapter directory: it has "
                                               "no adapter_config.json (expected an mlx-lm or PEFT LoRA adapter)."]
