"""Streaming detokenizer: deltas are whole characters and add up to a full decode, for byte-level BPE
(the real SmolLM2 tokenizer) and a SentencePiece-style BPE with byte fallback built here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxedge.generate.detokenizer import StreamingDetokenizer, decode_tokens

TEXTS = {
    "korean": "안녕하세요, 세계! 오늘 날씨가 정말 좋네요. 한국어 토크나이저는 바이트 단위로 나뉩니다.",
    "emoji": "Hi 👋🏽 family 👩‍👩‍👧‍👦 flags 🇰🇷🇫🇷 math 𝔘𝔫𝔦 ✓ — done 🎉",
    "code": "def f(x):\n    return x ** 2  # 제곱 ✓\n\n\tprint('héllo', {\"k\": [1, 2]})  \n",
    "mixed": "  leading spaces, café naïve 日本語テキスト and Ελληνικά; end.",
}


@pytest.fixture(scope="module")
def smol(smollm2_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf)


def stream(tokenizer, ids, **kwargs):
    detok = StreamingDetokenizer(tokenizer, **kwargs)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.finalize())
    assert detok.text == "".join(deltas)
    return deltas


def assert_clean_stream(tokenizer, ids, reference, **kwargs):
    deltas = stream(tokenizer, ids, **kwargs)
    for d in deltas:
        assert "\ufffd" not in d, deltas
        d.encode("utf-8")  # no lone surrogates: every delta is valid UTF-8
    assert "".join(deltas) == reference
    return deltas


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_smollm2_stream_equals_full_decode(smol, name):
    ids = smol.encode(TEXTS[name], add_special_tokens=False)
    reference = smol.decode(ids, skip_special_tokens=False)
    assert reference == TEXTS[name]
    assert decode_tokens(smol, ids) == reference
    deltas = assert_clean_stream(smol, ids, reference)
    if name in ("korean", "emoji"):
        assert "" in deltas[:-1]  # some characters span several tokens and were held back


def test_smollm2_stream_on_prose(smol, prose):
    ids = smol.encode(prose, add_special_tokens=False)
    assert_clean_stream(smol, ids, smol.decode(ids))


@pytest.mark.parametrize("skip", [False, True])
def test_special_tokens_follow_the_flag(smol, skip):
    messages = [{"role": "user", "content": "안녕 👋"}, {"role": "assistant", "content": "Hello!"}]
    ids = smol.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    reference = smol.decode(ids, skip_special_tokens=skip)
    assert ("<|im_start|>" in reference) is not skip
    assert_clean_stream(smol, ids, reference, skip_special_tokens=skip)


def test_random_token_sequences_keep_the_invariant(smol):
    """Arbitrary ids, including byte fragments that never form a character: still equal to a full decode."""
    rng = np.random.default_rng(0)
    vocab = len(smol)
    for _ in range(20):
        ids = rng.integers(0, vocab, 60).tolist()
        assert "".join(stream(smol, ids)) == decode_tokens(smol, ids)


def test_incomplete_character_is_held_then_flushed(smol):
    ids = smol.encode("🎉", add_special_tokens=False)
    assert len(ids) >= 2
    detok = StreamingDetokenizer(smol)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.text == ""
    tail = detok.finalize()
    assert tail == smol.decode(ids[:-1]) and tail.endswith("\ufffd")
    assert detok.finalize() == ""


class CountingDecoder:
    """A tokenizer wrapper that records how many ids each decode call received."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids, skip_special_tokens=False):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_short_window_not_the_whole_sequence(smol, prose):
    ids = smol.encode(prose, add_special_tokens=False)[:800]
    counting = CountingDecoder(smol)
    deltas = stream(counting, ids)
    assert "".join(deltas) == smol.decode(ids)
    assert max(counting.sizes) <= 8, max(counting.sizes)
    assert len(counting.sizes) <= 2 * len(ids) + 1


def sentencepiece_style_tokenizer():
    """A Llama-style BPE: '▁' word marks, byte fallback tokens <0x00>..<0xFF>, a decoder that strips the
    first space. Trained on a tiny corpus so Korean and emoji fall back to bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "def main(): return 0",
              "한국어 문장입니다"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte tokens are ordinary vocabulary entries, as in SentencePiece models
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def spm():
    from transformers import PreTrainedTokenizerFast

    raw = sentencepiece_style_tokenizer()
    return raw, PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


SPM_TEXTS = ["hello world 세계 👋 the fox  jumps", "  two leading spaces and trailing  ", "한국어 문장입니다 🇰🇷!",
             "def main():\n\treturn 0", "x"]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_byte_fallback_stream_equals_full_decode(spm, text):
    raw, hf = spm
    ids = raw.encode(text).ids
    pieces = raw.encode(text).tokens
    if any(ord(c) > 0x3000 for c in text):
        assert any(p.startswith("<0x") for p in pieces)  # really goes through byte fallback
    for tokenizer in (raw, hf):
        reference = tokenizer.decode(ids)
        assert reference == text
        assert_clean_stream(tokenizer, ids, reference)


@pytest.mark.parametrize("skip", [False, True])
def test_sentencepiece_with_special_tokens_inside(spm, skip):
    """Special tokens mid-stream (shown, or skipped and so textless) must not cost the next word its space."""
    raw, hf = spm
    bos, eos = raw.token_to_id("<s>"), raw.token_to_id("</s>")
    ids = [bos] + raw.encode("hello world").ids + [eos, bos] + raw.encode(" the fox 세계").ids
    for tokenizer in (raw, hf):
        reference = tokenizer.decode(ids, skip_special_tokens=skip)
        assert ("<s>" in reference) is not skip
        assert_clean_stream(tokenizer, ids, reference, skip_special_tokens=skip)
