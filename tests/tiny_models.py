"""Tiny random Hugging Face checkpoints of every supported architecture, built with transformers."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

# rope_theta far from every architecture's default: a config that mlx-lm misreads (DESIGN.md) shows up as
# a logit mismatch instead of passing by coincidence
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_theta=313.0)

ARCHITECTURES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"query_pre_attn_scalar": 16}),
    # sliding window shorter than the test sequence, so the local/global layer pattern is exercised
    "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
                    {"query_pre_attn_scalar": 16, "sliding_window": 8, "rope_local_base_freq": 77.0,
                     "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"head_dim": None, "partial_rotary_factor": 0.5}),
}


def build_tiny(arch: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised fp32 model of `arch` to `directory` (safetensors) and return it."""
    config_class, model_class, extra = ARCHITECTURES[arch]
    kwargs = {**BASE, **extra, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    torch.manual_seed(seed)
    model = model_class(config_class(**kwargs)).float().eval()
    with torch.no_grad():  # larger weights than the default init, so logits differ token to token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    return directory


def reference_logits(directory: Path, ids: list) -> "torch.Tensor":
    model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def add_tiny_tokenizer(directory: Path, vocab_size: int = 256) -> Path:
    """Save a small byte-level BPE tokenizer, trained on the spot, next to a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    raw.train_from_iterator(["a tiny corpus for a tiny tokenizer, with a few words"] * 4, trainer)
    T.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    return directory
