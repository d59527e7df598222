"""The public API's contract for callers in other languages (the bridge, a Swift app): one type per info key,
keyword arguments spelled out, and every bad argument an MlxedgeError — never a bare TypeError/ValueError."""

from __future__ import annotations

import inspect
import json

import pytest

import mlxedge
from mlxedge.errors import GenerationError, MlxedgeError, UnsupportedError
from mlxedge.generate.session import Session
from mlxedge.model import Model
from tiny_chat import tiny_chat, tiny_chat_loaded  # noqa: F401  (fixtures)
from tiny_models import build_tiny


# ------------------------------------------------------------------------------------------------ info

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("types") / "tiny")


def _quantization_types(info: dict) -> None:
    assert info["bits"] is None or type(info["bits"]) is int
    assert info["group_size"] is None or type(info["group_size"]) is int
    assert isinstance(info["quantization"], list)
    for spec in info["quantization"]:
        assert set(spec) == {"bits", "group_size", "modules"} and all(type(v) is int for v in spec.values())
    assert json.loads(json.dumps(info, default=str))["quantization"] == info["quantization"]


def test_float_model_info_has_null_bits_and_an_empty_breakdown(tiny):
    info = mlxedge.load(tiny, dtype="float32").info
    _quantization_types(info)
    assert (info["bits"], info["group_size"], info["quantization"]) == (None, None, [])


def test_uniform_model_info_has_int_bits_and_one_spec(tiny):
    info = mlxedge.load(tiny, bits=8, group_size=64, dtype="float32").info
    _quantization_types(info)
    assert (info["bits"], info["group_size"]) == (8, 64)
    assert info["quantization"] == [{"bits": 8, "group_size": 64, "modules": info["quantized_modules"]}]


def test_mixed_model_info_keeps_int_bits_and_lists_every_spec(tiny):
    """A K-quant recipe mixes 4- and 6-bit modules: bits is the predominant one, the mix is in the breakdown."""
    info = mlxedge.load(tiny, recipe="q4_k_m", group_size=32, dtype="float32").info
    _quantization_types(info)
    specs = info["quantization"]
    assert len({s["bits"] for s in specs}) > 1, "the recipe should mix bit widths on this model"
    assert (info["bits"], info["group_size"]) == (specs[0]["bits"], specs[0]["group_size"])
    assert [s["modules"] for s in specs] == sorted((s["modules"] for s in specs), reverse=True)
    assert sum(s["modules"] for s in specs) == info["quantized_modules"]


def test_front_ends_show_a_mixed_model_as_mixed():
    from mlxedge.cli.output import format_quantization
    from mlxedge.server.ollama_api import _details

    mixed = {"bits": 4, "group_size": 32, "dtype": "float32", "architecture": "llama", "parameters": 10,
             "quantization": [{"bits": 4, "group_size": 32, "modules": 9}, {"bits": 6, "group_size": 32, "modules": 2}]}
    assert format_quantization(mixed, short=True) == "4/6-bit g32"
    assert _details(mixed)["quantization_level"] == "mixed"
    uniform = {**mixed, "quantization": mixed["quantization"][:1]}
    assert format_quantization(uniform) == "4-bit affine, group size 32"
    assert _details(uniform)["quantization_level"] == "Q4"
    assert _details({**mixed, "bits": None, "group_size": None, "quantization": []})["quantization_level"] == "F32"


# ------------------------------------------------------------------------------------------------ signatures

def _parameters(function) -> dict:
    return {name: (p.kind, p.default) for name, p in inspect.signature(function).parameters.items()}


@pytest.mark.parametrize("pair", [(Model.generate, Model.stream), (Session.send, Session.stream)],
                         ids=["Model", "Session"])
def test_generation_calls_spell_out_their_keywords(pair):
    whole, streamed = pair
    for function in pair:
        kinds = {kind for kind, _ in _parameters(function).values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
    assert _parameters(whole) == _parameters(streamed)  # generate/send take exactly what stream takes
    expected = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                "repetition_penalty": 1.0, "seed": None, "stop": None}  # DESIGN.md's contract
    assert {k: v for k, (_, v) in _parameters(whole).items() if k in expected} == expected


# ------------------------------------------------------------------------------------------------ bad arguments

BAD = [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"), ({"max_tokens": "8"}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"min_p": 1.0}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"seed": -1}, "seed"), ({"stop": 7}, "stop"),
    ({"stop": ["ok", 3]}, "stop"), ({"cancel": "soon"}, "cancel"), ({"num_draft_tokens": 0}, "num_draft_tokens"),
    ({"draft": "guess"}, "draft"), ({"max_token": 8}, "'max_tokens'"), ({"temprature": 0.5}, "'temperature'"),
    ({"nonsense": 1}, "nonsense"),
]
MODEL_ONLY = [({"raw": "yes"}, "raw"), ({"ignore_eos": 1}, "ignore_eos"), ({"cache": 3}, "cache"),
              ({"kv_bits": 5}, "kv_bits")]


def _refused(call, needle):
    with pytest.raises(MlxedgeError) as excinfo:
        result = call()
        list(result) if not isinstance(result, mlxedge.GenerationResult) else None
    assert not isinstance(excinfo.value, (TypeError, ValueError))
    message = str(excinfo.value)
    assert needle in message and "\n" not in message
    return excinfo.value


@pytest.mark.parametrize("kwargs,needle", BAD + MODEL_ONLY, ids=lambda v: str(v) if isinstance(v, dict) else "")
@pytest.mark.parametrize("call", ["generate", "stream"])
def test_model_refuses_bad_arguments_with_an_mlxedge_error(tiny_chat_loaded, call, kwargs, needle):
    _refused(lambda: getattr(tiny_chat_loaded, call)("Hello", **{"max_tokens": 2, **kwargs}), needle)


@pytest.mark.parametrize("kwargs,needle", BAD, ids=lambda v: str(v) if isinstance(v, dict) else "")
@pytest.mark.parametrize("call", ["send", "stream"])
def test_session_refuses_bad_arguments_with_an_mlxedge_error(tiny_chat_loaded, call, kwargs, needle):
    session = tiny_chat_loaded.session()
    _refused(lambda: getattr(session, call)("Hello", **{"max_tokens": 2, **kwargs}), needle)
    assert session.messages == []  # a refused turn leaves no trace


def test_an_unknown_keyword_names_the_closest_one(tiny_chat_loaded):
    error = _refused(lambda: tiny_chat_loaded.generate("Hello", max_token=2), "did you mean 'max_tokens'")
    assert isinstance(error, GenerationError)


@pytest.mark.parametrize("prompt,ids,needle", [
    (None, None, "give a prompt"), ("Hello", [1, 2], "not both"), (None, [], "empty"), (None, "12", "list"),
    (None, [1.5], "integers"), (None, [10**9], "outside the vocabulary"), (42, None, "string or a list"),
])
def test_prompt_and_ids_are_checked(tiny_chat_loaded, prompt, ids, needle):
    _refused(lambda: tiny_chat_loaded.generate(prompt, ids=ids, max_tokens=2), needle)


def test_load_refuses_a_bad_kv_overflow_with_an_mlxedge_error(tiny):
    with pytest.raises(UnsupportedError, match="kv_overflow"):
        mlxedge.load(tiny, kv_overflow="wrap")


# ------------------------------------------------------------------------------------------------ ids

def test_ids_give_what_the_same_tokens_as_text_give(tiny_chat_loaded):
    model = tiny_chat_loaded
    ids = model.tokenizer.encode("The quick brown fox")
    by_text = model.generate("The quick brown fox", raw=True, max_tokens=6)
    by_ids = model.generate(ids=ids, max_tokens=6)
    assert by_ids.tokens == by_text.tokens and by_ids.stats["prompt_tokens"] == len(ids)


def test_ignore_eos_runs_past_end_of_sequence(tiny_chat_loaded, monkeypatch):
    model = tiny_chat_loaded
    ids = model.tokenizer.encode("The quick brown fox")
    first = model.generate(ids=ids, max_tokens=1).tokens[0]
    monkeypatch.setattr(model, "eos_ids", lambda: [first])  # the model's next token is now its EOS
    stopped = model.generate(ids=ids, max_tokens=5)
    assert stopped.finish_reason == "stop" and stopped.tokens == []
    kept = model.generate(ids=ids, max_tokens=5, ignore_eos=True)
    assert kept.finish_reason in ("length", "repeating") and kept.tokens[0] == first


def test_logits_rows_are_the_rows_of_the_full_sequence(tiny):
    import numpy as np

    model = mlxedge.load(tiny, dtype="float32")
    ids = [1, 17, 93, 200, 5, 42, 7]
    full = model.logits(ids)
    assert full.shape == (len(ids), model.vocab_size)
    assert np.array_equal(model.logits(ids, start=3, stop=6), full[3:6])
    for start, stop in [(-1, None), (3, 3), (0, 8), (2.0, None)]:
        with pytest.raises(GenerationError, match="start"):
            model.logits(ids, start=start, stop=stop)
    with pytest.raises(GenerationError, match="empty"):
        model.logits([])
