"""Bad GGUF input gives one clear, one-line error: wrong magic, truncation, unknown architecture, block type."""

from __future__ import annotations

import numpy as np
import pytest

import mlxedge
from mlxedge.errors import SourceError, UnsupportedError
from mlxedge.sources.gguf import open_gguf
from gguf_tiny import add_byte_tokenizer, tiny_model, write_gguf


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "tiny.gguf"
    return write_gguf(tiny_model("llama"), path, {"self_attn": "Q4_0"})


def _rewrite(src, dst, replace=None, keep_tokenizer=True):
    """Copy a llama GGUF's llama.* metadata and tensors to dst; replace(name, tensor) may return (data, type)."""
    import gguf

    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama."):
            value = field.contents()
            w.add_float32(key, value) if isinstance(value, float) else w.add_uint32(key, int(value))
    if keep_tokenizer:
        add_byte_tokenizer(w)
    for t in reader.tensors:
        data, qtype = (replace(t.name, t) if replace else None) or (np.asarray(t.data), t.tensor_type)
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and len(message) < 400
    return message


def test_the_good_file_loads(good):
    assert mlxedge.load(str(good), dtype="float32").info["architecture"] == "llama"


def test_wrong_magic(tmp_path, good):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + good.read_bytes()[4:])
    with pytest.raises(SourceError) as e:
        mlxedge.load(str(bad))
    assert "not a GGUF file" in _one_line(e) and "model.gguf" in str(e.value)


@pytest.mark.parametrize("keep", [0.002, 0.5, 0.999], ids=["header", "middle", "last-bytes"])
def test_truncated_file(tmp_path, good, keep):
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(SourceError) as e:
        mlxedge.load(str(cut))
    assert "truncated" in _one_line(e)


def test_unknown_architecture(tmp_path):
    import gguf

    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError) as e:
        mlxedge.load(str(path))
    message = _one_line(e)
    assert "'bert'" in message and "llama" in message


def test_unsupported_block_type_names_the_tensor(tmp_path, good):
    from gguf import GGMLQuantizationType as T

    def iq4(name, t):
        if name == "blk.1.ffn_down.weight":  # rows of 128 -> 4 IQ4_NL blocks of 18 bytes
            return np.zeros((t.data.shape[0], 4 * 18), dtype=np.uint8), T.IQ4_NL
        return None

    path = _rewrite(good, tmp_path / "iq.gguf", iq4)
    with pytest.raises(UnsupportedError) as e:
        mlxedge.load(str(path))
    message = _one_line(e)
    assert "'blk.1.ffn_down.weight'" in message and "IQ4_NL" in message


def test_missing_file(tmp_path):
    with pytest.raises(SourceError) as e:
        open_gguf(tmp_path / "absent.gguf", "absent.gguf")
    assert "not found" in _one_line(e)


def test_gguf_without_tokenizer_says_so(tmp_path, good):
    path = _rewrite(good, tmp_path / "without.gguf", keep_tokenizer=False)
    ck = open_gguf(path, str(path))  # the weights alone open fine
    with pytest.raises(SourceError) as e:
        ck.load_tokenizer()
    assert "no tokenizer" in _one_line(e)
