"""GGUF files checked as llama.cpp's reader checks them: version, tensor table layout, sizes against types,
dimensions, metadata encoding and value kinds, non-finite scales. Each case is one line naming the file,
key or tensor; none loads silently and none ends in an exception that is not an MlxedgeError."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import mlxedge
from fuzz_harness import gguf_fields
from gguf_tiny import TINY, tiny_model, write_gguf
from mlxedge.errors import MlxedgeError, SourceError, UnsupportedError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_gguf(tiny_model("llama"), tmp_path_factory.mktemp("v") / "tiny.gguf", TINY["llama"]["types"])


@pytest.fixture(scope="module")
def layout(good):
    """(bytes, header fields, tensor names in table order, data section offset)."""
    from gguf import GGUFReader

    data = good.read_bytes()
    fields, _ = gguf_fields(data)
    reader = GGUFReader(good)
    return data, fields, [t.name for t in reader.tensors], int(reader.data_offset)


def _field(layout, kind, tensor=None):
    _, fields, names, _ = layout
    return next(f for f in fields if f.kind == kind and (tensor is None or names[f.extra] == tensor))


def _patched(tmp_path, layout, *edits) -> str:
    buf = bytearray(layout[0])
    for pos, raw in edits:
        buf[pos:pos + len(raw)] = raw
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(buf))
    return str(path)


def _set(layout, kind, value, tensor=None):
    f = _field(layout, kind, tensor)
    return f.pos, int(value).to_bytes(f.size, "little")


def _load_error(path, cls=MlxedgeError) -> str:
    with pytest.raises(cls) as e:
        mlxedge.load(path, dtype="float32", context_length=64)
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def _metadata_value_pos(data: bytes, key: str) -> int:
    """Byte position of a metadata entry's value (after key, type and, for strings, the length)."""
    raw = key.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    vtype = struct.unpack_from("<I", data, at)[0]
    return at + 4 + (8 if vtype == 8 else 0)


@pytest.mark.parametrize("version", [0, 1, 4])
def test_unsupported_versions_are_named(tmp_path, layout, version):
    message = _load_error(_patched(tmp_path, layout, _set(layout, "version", version)), UnsupportedError)
    assert f"unsupported GGUF version {version}" in message and "truncated" not in message


def test_offset_near_2_64_does_not_wrap_onto_the_header(tmp_path, layout):
    """uint64 arithmetic would wrap data_offset + offset to byte 0 and read the header as weights."""
    offset = 2**64 - layout[3]  # aligned, and data_offset + offset = 2^64 = 0 (mod 2^64)
    message = _load_error(_patched(tmp_path, layout, _set(layout, "t_offset", offset, "blk.0.attn_q.weight")), SourceError)
    assert "'blk.0.attn_q.weight'" in message and "offset" in message


@pytest.mark.parametrize("how", ["misaligned", "overlapping", "out_of_order", "gap"])
def test_tensor_table_layout(tmp_path, layout, how):
    name = "blk.0.attn_k.weight"
    own = _field(layout, "t_offset", name).value
    previous = _field(layout, "t_offset", "blk.0.attn_q.weight").value
    later = _field(layout, "t_offset", "blk.0.attn_v.weight").value
    edits = {"misaligned": [_set(layout, "t_offset", own + 1, name)],
             "overlapping": [_set(layout, "t_offset", previous, name)],
             "out_of_order": [_set(layout, "t_offset", later, name), _set(layout, "t_offset", own, "blk.0.attn_v.weight")],
             "gap": [_set(layout, "t_offset", own + 32, name)]}[how]
    message = _load_error(_patched(tmp_path, layout, *edits), SourceError)
    assert f"'{name}'" in message or "'blk.0.attn_v.weight'" in message


def test_f16_declared_over_q4_0_data_is_caught_by_the_size_check(tmp_path, layout):
    from gguf import GGMLQuantizationType as T

    message = _load_error(_patched(tmp_path, layout, _set(layout, "t_type", T.F16, "blk.0.attn_q.weight")), SourceError)
    assert "'blk.0.attn_k.weight'" in message  # the next tensor no longer starts where the table says


def test_last_tensor_shrunk_by_its_type_is_caught(tmp_path, layout):
    """output.weight is last: F16 -> Q8_0 leaves most of its bytes after the end, which padding cannot explain."""
    from gguf import GGMLQuantizationType as T

    message = _load_error(_patched(tmp_path, layout, _set(layout, "t_type", T.Q8_0, "output.weight")), SourceError)
    assert "'output.weight'" in message and "bytes follow" in message


@pytest.mark.parametrize("dim", [0, 2**31, 2**40, 2**64 - 1])
def test_dimensions_must_be_positive_and_fit_int32(tmp_path, layout, dim):
    f = next(f for f in layout[1] if f.kind == "t_dim" and layout[2][f.extra] == "blk.0.attn_norm.weight")
    message = _load_error(_patched(tmp_path, layout, (f.pos, dim.to_bytes(8, "little"))), SourceError)
    assert "'blk.0.attn_norm.weight'" in message and "dimensions" in message


def test_block_size_must_divide_the_rows(tmp_path, layout):
    f = next(f for f in layout[1] if f.kind == "t_dim" and layout[2][f.extra] == "blk.0.attn_q.weight")
    message = _load_error(_patched(tmp_path, layout, (f.pos, (16).to_bytes(8, "little"))), SourceError)
    assert "'blk.0.attn_q.weight'" in message and "block size 32" in message


def _tensor_bytes(layout, name):
    _, fields, names, data_offset = layout
    return data_offset + _field(layout, "t_offset", name).value


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_q4_0_scale_is_refused_naming_the_tensor(tmp_path, layout, value):
    at = _tensor_bytes(layout, "blk.1.attn_v.weight") + 18 * 5  # block 5's d (float16)
    message = _load_error(_patched(tmp_path, layout, (at, np.float16(value).tobytes())), SourceError)
    assert "model.layers.1.self_attn.v_proj" in message and "NaN or infinite" in message


@pytest.mark.parametrize("name,hf", [("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")])
def test_non_finite_float_tensor_is_refused_naming_it(tmp_path, layout, name, hf):
    value = np.float32(np.nan) if name.endswith("norm.weight") else np.float16(np.inf)
    at = _tensor_bytes(layout, name) + 3 * value.itemsize
    message = _load_error(_patched(tmp_path, layout, (at, value.tobytes())), SourceError)
    assert f"'{hf}'" in message and "NaN or infinite" in message


def test_invalid_utf8_metadata_string_names_the_key(tmp_path, layout):
    at = _metadata_value_pos(layout[0], "general.name")
    message = _load_error(_patched(tmp_path, layout, (at, b"\xff\xfe")), SourceError)
    assert "'general.name'" in message and "UTF-8" in message


def test_invalid_utf8_metadata_key_is_one_line(tmp_path, layout):
    raw = b"general.name"
    at = layout[0].index(struct.pack("<Q", len(raw)) + raw) + 8
    message = _load_error(_patched(tmp_path, layout, (at, b"\xc3\x28")), SourceError)
    assert "metadata key #" in message and "UTF-8" in message


def test_duplicate_metadata_key(tmp_path, layout):
    raw = b"llama.rope.freq_base"  # same length as llama.context_length, which the file already has
    at = layout[0].index(struct.pack("<Q", len(raw)) + raw) + 8
    message = _load_error(_patched(tmp_path, layout, (at, b"llama.context_length")), SourceError)
    assert "duplicate metadata key 'llama.context_length'" in message


def test_permuted_heads_that_do_not_divide_the_rows(tmp_path, layout):
    """head_count 6 (q has 64 rows): unpermute_rows used to fail with a numpy reshape ValueError."""
    at = _metadata_value_pos(layout[0], "llama.attention.head_count")
    message = _load_error(_patched(tmp_path, layout, (at, struct.pack("<I", 6))), SourceError)
    assert "'blk.0.attn_q.weight'" in message and "rotary heads" in message


@pytest.mark.parametrize("key,value", [("llama.attention.head_count_kv", 0), ("llama.attention.head_count", 0),
                                       ("llama.embedding_length", 0)])
def test_zero_counts_name_the_key(tmp_path, layout, key, value):
    """These used to divide by zero in the block codec or while building layers."""
    at = _metadata_value_pos(layout[0], key)
    message = _load_error(_patched(tmp_path, layout, (at, struct.pack("<I", value))), SourceError)
    assert f"'{key}'" in message


def test_wrong_kind_of_metadata_value_names_the_key(tmp_path, layout):
    raw = b"llama.block_count"
    at = layout[0].index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    # uint32 -> float32 (same size): 2 becomes 2.8e-45
    message = _load_error(_patched(tmp_path, layout, (at, struct.pack("<I", 6))), SourceError)
    assert "'llama.block_count'" in message


def test_absurd_layer_count_is_refused_at_once(tmp_path, layout):
    """block_count 10^9 used to be a MemoryError in the KV-cache plan (a list per layer) or minutes of building."""
    at = _metadata_value_pos(layout[0], "llama.block_count")
    message = _load_error(_patched(tmp_path, layout, (at, struct.pack("<I", 10**9))), SourceError)
    assert "num_hidden_layers" in message and "1000000000" in message and "model.layers.2" in message


def test_absurd_plan_arithmetic_is_instant():
    from mlxedge.memory.plan import kv_cache_plan

    cfg = {"num_hidden_layers": 10**12, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64,
           "hidden_size": 512, "sliding_window": 128, "sliding_window_pattern": 6}
    plan = kv_cache_plan(cfg, 4096, 2)
    assert plan["sliding_layers"] == 10**12 - 10**12 // 6 and plan["bytes"] > 10**18


def test_tensor_count_beyond_the_file_is_refused(tmp_path, layout):
    message = _load_error(_patched(tmp_path, layout, _set(layout, "n_tensors", 2**63)), SourceError)
    assert "declares" in message and "tensors" in message


@pytest.mark.parametrize("command", ["plan", "generate"])
def test_cli_gives_one_error_line_for_a_corrupt_gguf(tmp_path, layout, monkeypatch, command):
    from click.testing import CliRunner

    from mlxedge.cli import main

    path = _patched(tmp_path, layout, _set(layout, "t_offset", 2**64 - layout[3], "blk.0.attn_q.weight"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["plan", path] if command == "plan" else ["generate", path, "-p", "hi", "-n", "1", "--dtype", "float32"]
    result = CliRunner().invoke(main, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "'blk.0.attn_q.weight'" in errors[0], result.output
    assert "Traceback" not in result.output and list(work.iterdir()) == []


def test_array_where_a_string_belongs_names_the_key(tmp_path, good):
    """A chat template stored as an array of strings (the value type swapped) is one line, not a TypeError."""
    import gguf

    reader = gguf.GGUFReader(good)
    path = tmp_path / "array-template.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama."):
            value = field.contents()
            w.add_float32(key, value) if isinstance(value, float) else w.add_uint32(key, int(value))
    w.add_array("tokenizer.chat_template", ["{{ a }}", "{{ b }}"])
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    message = _load_error(str(path), SourceError)
    assert "'tokenizer.chat_template' is an array of 2 strings, expected a string" in message
