"""The real SmolLM2-135M-Instruct: mlxedge against transformers (fp32) and 8-bit against fp32."""

import numpy as np
import pytest
import torch

import mlxedge

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Name three colours of the rainbow and say which one you like best."}]


@pytest.fixture(scope="module")
def fp32_model(smollm2_hf):
    return mlxedge.load(smollm2_hf, dtype="float32")


@pytest.fixture(scope="module")
def reference(smollm2_hf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()


def test_greedy_decoding_equals_transformers(fp32_model, reference):
    prompt_ids = fp32_model.tokenizer.prompt_ids(CHAT)
    result = fp32_model.generate(CHAT, max_tokens=24)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=fp32_model.eos_ids())
    theirs = [t for t in out[0, len(prompt_ids):].tolist() if t not in fp32_model.eos_ids()]
    assert len(result.tokens) >= 20
    assert result.tokens == theirs
    assert result.text == fp32_model.tokenizer.decode(theirs)


def test_chat_prompt_matches_transformers_template(fp32_model, smollm2_hf):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    expected = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert fp32_model.tokenizer.prompt_ids(CHAT) == list(expected["input_ids"])


@pytest.fixture(scope="module")
def prose_ids(fp32_model, prose):
    ids = fp32_model.tokenizer.encode(prose)[:512]
    assert len(ids) == 512
    return ids


@pytest.fixture(scope="module")
def fp32_prose_logits(fp32_model, prose_ids):
    """One 512-token forward pass shared by the tests below (MLX's CPU matmul makes each one costly)."""
    return fp32_model.logits(prose_ids)


def test_fp32_logits_match_transformers_on_prose(reference, prose_ids, fp32_prose_logits):
    with torch.no_grad():
        theirs = reference(torch.tensor([prose_ids[:256]])).logits[0].numpy()
    assert np.abs(fp32_prose_logits[:256] - theirs).max() <= 1e-3  # causal: the first 256 rows stand alone


def test_8bit_top1_agreement_with_fp32(smollm2_hf, prose_ids, fp32_prose_logits):
    q8 = mlxedge.load(smollm2_hf, bits=8, group_size=64)
    assert q8.info["bits"] == 8 and q8.info["quantized_modules"] == 211
    agreement = (q8.logits(prose_ids).argmax(-1) == fp32_prose_logits.argmax(-1)).mean()
    print(f"8-bit g64 top-1 agreement with fp32 over 512 tokens: {agreement:.4f}")
    assert agreement >= 0.98
