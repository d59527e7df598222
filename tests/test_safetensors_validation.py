"""safetensors files checked as the safetensors library checks them, and shard indexes that stay inside the
model directory. Every case is one line naming the file and the tensor; none loads silently."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

import mlxedge
from mlxedge.errors import MlxedgeError, SourceError, UnsupportedError
from tiny_models import build_tiny


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("st") / "good")


def _split(path):
    data = (path / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _write(dest, header_text: str, body: bytes, length_delta: int = 0):
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    (dest / "model.safetensors").write_bytes(struct.pack("<Q", len(raw) + length_delta) + raw + body)


def _copy(good, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(good, dest)
    return dest


def _ordered(header):
    """Tensor names in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _error(path, cls=MlxedgeError) -> str:
    with pytest.raises(cls) as e:
        mlxedge.load(str(path), dtype="float32", context_length=64)
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_the_good_checkpoint_loads(good):
    model = mlxedge.load(str(good), dtype="float32", context_length=64)
    assert np.isfinite(model.logits([1, 2, 3])).all()


@pytest.mark.parametrize("how", ["alias", "overlap"])
def test_overlapping_or_aliased_offsets(good, tmp_path, how):
    dest = _copy(good, tmp_path)
    _, header, body = _split(dest)
    names = [n for n in _ordered(header) if header[n]["shape"] == [32, 64]]  # k_proj / v_proj: same size
    a, b = names[0], names[1]
    if how == "alias":  # b reads a's bytes; b's own bytes become a gap
        header[b]["data_offsets"] = list(header[a]["data_offsets"])
    else:  # b starts 4 bytes early, overlapping the end of whatever precedes it
        header[b]["data_offsets"] = [o - 4 for o in header[b]["data_offsets"]]
    _write(dest, json.dumps(header), body)
    message = _error(dest, SourceError)
    assert "overlaps or aliases" in message and "model.safetensors" in message


def test_gap_between_tensors(good, tmp_path):
    dest = _copy(good, tmp_path)
    _, header, body = _split(dest)
    order = _ordered(header)
    cut = header[order[3]]["data_offsets"][0]
    for name in order[3:]:
        header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
    _write(dest, json.dumps(header), body[:cut] + b"\0" * 4 + body[cut:])
    message = _error(dest, SourceError)
    assert "leaves a gap" in message and repr(order[3]) in message


def test_duplicate_keys(good, tmp_path):
    dest = _copy(good, tmp_path)
    _, header, body = _split(dest)
    first = _ordered(header)[0]
    text = json.dumps(header)
    text = text[:-1] + ", " + json.dumps({first: header[first]})[1:-1] + "}"  # the same entry twice
    _write(dest, text, body)
    assert f"names {first!r} twice" in _error(dest, SourceError)


@pytest.mark.parametrize("delta", [-1, 1, -8])
def test_header_length_off_by_a_little(good, tmp_path, delta):
    """One byte short: the JSON still parses (the header is space-padded) but the data would start a byte early."""
    dest = _copy(good, tmp_path)
    n, header, body = _split(dest)
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(struct.pack("<Q", n + delta) + data[8:])
    _error(dest, SourceError)


def test_trailing_garbage(good, tmp_path):
    dest = _copy(good, tmp_path)
    with open(dest / "model.safetensors", "ab") as f:
        f.write(b"\0" * 12)
    assert "12 bytes after its last tensor" in _error(dest, SourceError)


def test_size_must_match_shape_and_dtype(good, tmp_path):
    dest = _copy(good, tmp_path)
    _, header, body = _split(dest)
    name = _ordered(header)[0]
    header[name]["dtype"] = "F16"  # half the bytes the range spans
    _write(dest, json.dumps(header), body)
    message = _error(dest, SourceError)
    assert repr(name) in message and "needs" in message


@pytest.mark.parametrize("field,value,needle", [("dtype", "F8_E9M9", "dtype"), ("shape", [-1, 64], "shape"),
                                                ("shape", [64.5], "shape"), ("data_offsets", [10, 2], "data_offsets"),
                                                ("data_offsets", [0], "data_offsets")])
def test_malformed_entries_name_the_tensor(good, tmp_path, field, value, needle):
    dest = _copy(good, tmp_path)
    _, header, body = _split(dest)
    name = _ordered(header)[1]
    header[name][field] = value
    _write(dest, json.dumps(header), body)
    message = _error(dest)
    assert repr(name) in message and needle in message


@pytest.mark.parametrize("text", ["[1, 2]", "\"x\""])
def test_header_that_is_not_an_object(good, tmp_path, text):
    dest = _copy(good, tmp_path)
    _write(dest, text, b"")
    assert "not a JSON object" in _error(dest, SourceError)


def test_header_with_invalid_utf8(good, tmp_path):
    dest = _copy(good, tmp_path)
    data = bytearray((dest / "model.safetensors").read_bytes())
    data[10] = 0xFF
    (dest / "model.safetensors").write_bytes(bytes(data))
    assert "safetensors header" in _error(dest, SourceError)


# ------------------------------------------------------------------------------------------- shard index

def _indexed(good, tmp_path, target_name: str):
    dest = _copy(good, tmp_path)
    _, header, _ = _split(dest)
    weight_map = {name: "model.safetensors" for name in header if name != "__metadata__"}
    weight_map[_ordered(header)[0]] = target_name
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_index_cannot_leave_the_model_directory(good, tmp_path, kind):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(good / "model.safetensors", outside / "secret.safetensors")
    name = {"absolute": str(outside / "secret.safetensors"), "dotdot": "../elsewhere/secret.safetensors",
            "symlink": "link.safetensors"}[kind]
    dest = _indexed(good, tmp_path, name)
    if kind == "symlink":
        (dest / "link.safetensors").symlink_to(outside / "secret.safetensors")
    message = _error(dest, SourceError)
    assert "outside" in message and "model.safetensors.index.json" in message


def test_hub_snapshot_links_into_blobs_are_inside(good, tmp_path):
    """A hub cache snapshot links its files to ../../blobs/: that is still the model's own storage."""
    repo = tmp_path / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in good.iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(f"../../blobs/{f.name}")
    _, header, _ = _split(good)
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "model.safetensors" for name in header if name != "__metadata__"}}))
    assert np.isfinite(mlxedge.load(str(snapshot), dtype="float32", context_length=64).logits([1, 2])).all()


def test_unknown_dtype_is_unsupported_not_corrupt(good, tmp_path):
    dest = _copy(good, tmp_path)
    _, header, body = _split(dest)
    header[_ordered(header)[0]]["dtype"] = "F8_E4M3"
    _write(dest, json.dumps(header), body)
    assert "F8_E4M3" in _error(dest, UnsupportedError)
