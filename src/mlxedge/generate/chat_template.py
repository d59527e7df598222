"""Chat templates: render a model's Jinja chat template in a sandbox, the way transformers does.

Templates come with downloaded models, so they are untrusted code: they run in a bounded, sandboxed
environment (template_sandbox.py: jinja2's ImmutableSandboxedEnvironment with size, range and time limits)
configured as transformers configures its own (trim_blocks, lstrip_blocks, loopcontrols) with the same
helpers (raise_exception, strftime_now, a JSON `tojson`, a safe `dict` and `namespace`), and see only
plain copies of the messages. Any failure (a syntax error, raise_exception, an unsafe attribute, a
rendering limit) is a one-line GenerationError; stricter than transformers, touching an unsafe attribute
fails at once instead of rendering as an empty string. `normalize_messages` turns a prompt string or a
message list into checked messages.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils

from mlxedge.errors import GenerationError

from .template_sandbox import (LimitExceeded, Sandbox, bound_joins, bounded, bounded_filter, bounded_lipsum,
                               bounded_range, render_bounded)

__all__ = ["render_chat", "normalize_messages"]

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; templates expect plain JSON (as in transformers)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore names so templates cannot reach interpreter internals."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _GenerationBlock(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (training templates mark assistant text with it)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name in list(env.filters):
        env.filters[name] = bounded_filter(env.filters[name], name)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals["range"] = bounded_range
    env.globals["lipsum"] = bounded_lipsum
    with bounded(0):  # jinja folds constant expressions (filters included) while compiling
        compiled = env.from_string(template)
    bound_joins(compiled)  # `~` and output joins: through the size checks too
    return compiled


def _plain(value: Any) -> Any:
    """A copy made only of JSON-like types, so the template cannot reach methods of caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) could carry extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)) and not getattr(value, "shape", ()):
        return _plain(value.item())  # numpy scalars (np.int64 is no int)
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    # as transformers: fill `reasoning_content` (and `thinking`) from whichever reasoning field is set
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _limit_error(e: Exception) -> GenerationError:
    return GenerationError(f"chat template stopped at a rendering limit: {_one_line(e)}; the template is broken "
                           "or hostile (fix it, or send a plain prompt with raw=True / --raw)")


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """Render `messages` with a Jinja chat template; same text as transformers' apply_chat_template(tokenize=False).

    `extra` reaches the template as variables (e.g. tools=[...], documents=[...], enable_thinking=False);
    `tools` and `documents` are None unless given, as in transformers."""
    if not isinstance(template, str) or not template.strip():
        raise GenerationError("the chat template is empty; pass a plain prompt string instead of messages.")
    try:
        compiled = _compile(template)
    except LimitExceeded as e:
        raise _limit_error(e) from e
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise GenerationError(f"chat template has a syntax error at line {e.lineno}: {_one_line(e.message)}") from e
    except jinja2.exceptions.TemplateError as e:
        raise GenerationError(f"chat template cannot be compiled: {_one_line(e)}") from e
    variables = {"tools": None, "documents": None, "bos_token": bos_token, "eos_token": eos_token}
    variables.update(_plain(extra))
    chat = [_alias_reasoning(m) if isinstance(m, dict) else m for m in _plain(list(messages))]
    size_hint = len(json.dumps([chat, variables], default=str, ensure_ascii=False))
    try:
        return render_bounded(compiled, size_hint, messages=chat, add_generation_prompt=add_generation_prompt,
                               **variables)
    except LimitExceeded as e:
        raise _limit_error(e) from e
    except jinja2.exceptions.SecurityError as e:
        raise GenerationError(f"chat template refused: it tried unsafe access ({_one_line(e)})") from e
    except jinja2.exceptions.TemplateError as e:
        raise GenerationError(f"chat template rejected the conversation: {_one_line(e)}") from e
    except Exception as e:  # a template bug (TypeError on None + str, a bad index, ...)
        raise GenerationError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from e


def normalize_messages(prompt_or_messages) -> list[dict]:
    """A prompt string becomes one user message; a list of messages is checked and copied.

    Each message is a dict with a non-empty string "role" and a "content" that is a string or a list
    of content parts (None only for an assistant message carrying "tool_calls")."""
    if isinstance(prompt_or_messages, str):
        return [{"role": "user", "content": prompt_or_messages}]
    if isinstance(prompt_or_messages, Mapping):
        prompt_or_messages = [prompt_or_messages]
    if not isinstance(prompt_or_messages, (list, tuple)):
        raise GenerationError(f"prompt must be a string or a list of messages, got {type(prompt_or_messages).__name__}")
    if not prompt_or_messages:
        raise GenerationError("the message list is empty; pass at least one {'role': ..., 'content': ...} message")
    out = []
    for i, message in enumerate(prompt_or_messages):
        if not isinstance(message, Mapping):
            raise GenerationError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise GenerationError(f"message {i} needs a non-empty string 'role' (e.g. 'user'), got {role!r}")
        if "content" not in message:
            raise GenerationError(f"message {i} ({role}) has no 'content'")
        content = message["content"]
        if content is None and not message.get("tool_calls"):
            raise GenerationError(f"message {i} ({role}) has content None and no tool_calls")
        if content is not None and not isinstance(content, (str, list)):
            raise GenerationError(f"message {i} ({role}) content must be a string or a list of parts, "
                                  f"got {type(content).__name__}")
        out.append(dict(message))
    return out
