"""Bad GGUF input gives one clear, one-line error: wrong magic, truncation, unknown architecture, block type."""

from __future__ import annotations

import numpy as np
import pytest

import mlxedge
from mlxedge.errors import SourceError, UnsupportedError
from mlxedge.sources.gguf import open_gguf
from gguf_tiny import tiny_model, write_gguf


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "tiny.gguf"
    return write_gguf(tiny_model("llama"), path, {"self_attn": "Q4_0"})


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
    import gguf
    from gguf import GGMLQuantizationType as T

    reader = gguf.GGUFReader(good)
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama."):
            value = field.contents()
            if isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_uint32(key, int(value))
    for t in reader.tensors:
        if t.name == "blk.1.ffn_down.weight":  # rows of 128 -> 4 IQ4_NL blocks of 18 bytes
            rows = t.data.shape[0]
            w.add_tensor(t.name, np.zeros((rows, 4 * 18), dtype=np.uint8), raw_dtype=T.IQ4_NL)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError) as e:
        mlxedge.load(str(path))
    message = _one_line(e)
    assert "'blk.1.ffn_down.weight'" in message and "IQ4_NL" in message


def test_missing_file(tmp_path):
    with pytest.raises(SourceError) as e:
        open_gguf(tmp_path / "absent.gguf", "absent.gguf")
    assert "not found" in _one_line(e)
