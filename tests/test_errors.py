"""Bad input: each case raises an MlxedgeError whose one-line message names the problem."""

import json
import shutil

import pytest

import mlxedge
from mlxedge.errors import MlxedgeError, QuantizationError, SourceError, UnsupportedError
from tiny_models import build_tiny


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("err") / "good")


def _copy(good, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(good, dest)
    return dest


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 300
    return message


def test_missing_config_json(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(SourceError) as e:
        mlxedge.load(path)
    assert "no config.json" in _one_line(e)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_truncated_safetensors(good, tmp_path, keep_fraction):
    path = _copy(good, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(SourceError) as e:
        mlxedge.load(path)
    assert "truncated" in _one_line(e) and "model.safetensors" in str(e.value)


def test_header_only_garbage(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(SourceError) as e:
        mlxedge.load(path)
    _one_line(e)


def test_unsupported_model_type(good, tmp_path):
    path = _copy(good, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "wavenet9000"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError) as e:
        mlxedge.load(path)
    assert "wavenet9000" in _one_line(e) and "llama" in str(e.value)


def test_config_that_disagrees_with_weights(good, tmp_path):
    path = _copy(good, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError) as e:
        mlxedge.load(path)
    assert "shape" in _one_line(e)


def test_missing_tensor(good, tmp_path):
    path = _copy(good, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError) as e:
        mlxedge.load(path)
    assert "model.layers.2" in _one_line(e)


@pytest.mark.parametrize("bits,group_size,needle", [(3, 64, "bits=3"), (4, 48, "group_size=48")])
def test_bad_quantization_settings(good, bits, group_size, needle):
    with pytest.raises(QuantizationError) as e:
        mlxedge.load(good, bits=bits, group_size=group_size)
    assert needle in _one_line(e)


def test_unknown_source_name():
    with pytest.raises(MlxedgeError) as e:
        mlxedge.load("/nonexistent/place/for/a/model")
    assert "not found" in _one_line(e)


def test_existing_convert_destination_is_refused(good, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(MlxedgeError) as e:
        mlxedge.convert(good, dest, bits=4)
    assert "already exists" in _one_line(e)


def test_failed_convert_leaves_nothing_behind(good, tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(MlxedgeError):  # the tiny model has no tokenizer: the write fails at the last step
        mlxedge.convert(good, dest, bits=4)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_hub_repo_is_one_line():
    with pytest.raises(SourceError) as e:  # no such repo online, and no network here: either way one line
        mlxedge.load("mlxedge-tests/no-such-model-exists-here")
    assert "could not be fetched" in _one_line(e) or "not installed" in str(e.value)
