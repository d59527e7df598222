"""Chat templates: render a model's Jinja chat template in a sandbox, the way transformers does.

Templates come with downloaded models, so they are untrusted code: they run in jinja2's
ImmutableSandboxedEnvironment (trim_blocks, lstrip_blocks, loopcontrols, as transformers) with the same
helpers (raise_exception, strftime_now, a JSON `tojson`, a safe `dict` and `namespace`), and see only
plain copies of the messages. Any failure (a syntax error, raise_exception, an unsafe attribute) is a
one-line GenerationError; stricter than transformers, touching an unsafe attribute fails at once
instead of rendering as an empty string. `normalize_messages` turns a prompt string or a message list
into checked messages.

Rendering is bounded, so a template cannot hang or exhaust the process: `range` is capped at MAX_RANGE
items; no string, list or output may exceed the size limit (MIN_SIZE_LIMIT characters, or 4x the size of
the conversation when that is larger), checked before `*`, `**`, `%`, str.format/center/ljust/... and
replace/join allocate and after every other call, concatenation and buffered block; and a watchdog stops a
render that runs past TIME_LIMIT_S (it raises in the rendering thread at the next bytecode, which reaches
loops that call nothing). Any of these is a one-line GenerationError naming the limit.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import json
import re
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.runtime import markup_join as _markup_join
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlxedge.errors import GenerationError

__all__ = ["render_chat", "normalize_messages"]

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

MAX_RANGE = 100_000  # items a template's range() may produce (jinja's own sandbox limit)
MIN_SIZE_LIMIT = 1_000_000  # characters/items any value or the output may reach, at least
SIZE_FACTOR = 4  # ... or this many times the size of the conversation handed to the template
TIME_LIMIT_S = 5.0  # wall-clock time a render may take (ordinary templates take milliseconds)


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


class _LimitExceeded(jinja2.exceptions.SecurityError):
    """A template went past a rendering limit (size, range, time)."""


class _Timeout(BaseException):
    """Raised into the rendering thread by the watchdog (BaseException: no template-level handler eats it)."""


class _Limits:
    """The bounds of one render: a size limit and a deadline (held in a context variable while rendering)."""

    def __init__(self, max_size: int, seconds: float):
        self.max_size = max_size
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds


_LIMITS: contextvars.ContextVar[Optional[_Limits]] = contextvars.ContextVar("mlxedge_template_limits", default=None)
_UNLIMITED = _Limits(1 << 62, 1e12)
_WIDTH = re.compile(r"\d{7,}")  # a number of 7+ digits inside a format spec ('%1000000000s', '{:>1000000000}')


_KIND = {str: "string", list: "list", tuple: "tuple", dict: "dict"}


def _limits() -> _Limits:
    limits = _LIMITS.get() or _UNLIMITED
    if time.monotonic() > limits.deadline:
        raise _Timeout()
    return limits


def _refuse_size(size: int, what: str) -> None:
    limit = _limits().max_size
    if size > limit:
        raise _LimitExceeded(f"{what} of {size:,} (the limit is {limit:,})")


def _checked(value):
    if isinstance(value, (str, list, tuple, dict)):
        _refuse_size(len(value), f"a {_KIND.get(type(value), type(value).__name__)} length")
    return value


def _check_format(fmt: str) -> None:
    for digits in _WIDTH.findall(fmt):
        _refuse_size(int(digits), "a format width")


def _joined_size(parts) -> int:
    return sum(len(p) if isinstance(p, str) else len(str(p)) for p in parts)


def _check_str_call(method: str, text: str, args: tuple, kwargs: dict) -> None:
    """Bound the result of str methods that can build a large string from small arguments."""
    if method in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _refuse_size(args[0], f"str.{method} width")
    elif method == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tabsize, int):
            _refuse_size(len(text) + text.count("\t") * max(tabsize, 0), "str.expandtabs result length")
    elif method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = text.count(args[0]) if args[0] else len(text) + 1
        _refuse_size(len(text) + count * max(len(args[1]) - len(args[0]), 0), "str.replace result length")
    elif method == "join" and args and isinstance(args[0], (list, tuple)):
        _refuse_size(_joined_size(args[0]) + len(text) * len(args[0]), "str.join result length")
    elif method in ("format", "format_map"):
        _check_format(text)


def _checked_str_join(seq) -> str:  # `a ~ b`
    parts = [str(x) for x in seq]
    _refuse_size(_joined_size(parts), "a string length")
    return "".join(parts)


def _checked_markup_join(seq) -> str:
    parts = list(seq)
    _refuse_size(_joined_size(parts), "a string length")
    return _markup_join(parts)


def _range(*args):
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise _LimitExceeded(f"a range of {len(rng):,} items (the limit is {MAX_RANGE:,})")
    return rng


def _lipsum(n=5, html=True, min=20, max=100):  # noqa: A002  (jinja's signature)
    _refuse_size(int(n) * 1000, "lipsum text length (about)")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _bounded_filter(fn, name):
    passes_context = getattr(fn, "jinja_pass_arg", None) is not None  # then args[0] is a context, not the value

    def bounded(*args, **kwargs):
        _limits()
        values = args[1:] if passes_context else args
        if name in ("center", "indent") and len(values) > 1 and isinstance(values[1], int):
            _refuse_size(values[1], f"{name} width")
        elif name == "format" and values and isinstance(values[0], str):
            _check_format(values[0])
        elif name == "replace" and len(values) >= 3 and all(isinstance(a, str) for a in values[:3]):
            _check_str_call("replace", values[0], values[1:3], {})
        elif name == "join" and values and not isinstance(values[0], (str, dict)):
            items = list(values[0])  # a generator cannot be measured without running it
            args = args[:len(args) - len(values)] + (items,) + tuple(values[1:])
            sep = values[1] if len(values) > 1 else kwargs.get("d", "")
            if isinstance(sep, str):
                _check_str_call("join", sep, (items,), {})
        return _checked(fn(*args, **kwargs))

    bounded.__name__ = getattr(fn, "__name__", name)
    for attr in ("jinja_pass_arg",):  # keep @pass_environment / @pass_context markers
        if hasattr(fn, attr):
            setattr(bounded, attr, getattr(fn, attr))
    return bounded


class _Sandbox(ImmutableSandboxedEnvironment):
    """Refuse unsafe attribute access at once. (jinja's sandbox, like transformers, returns an Undefined
    that a bare `{{ f.__globals__ }}` prints as ""; we would rather fail loudly.) Bound what operators,
    calls, concatenation and buffered blocks may build (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        _limits()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and not isinstance(n, bool):
                    _refuse_size(len(seq) * n, f"a {_KIND[type(seq)]} length")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if abs(left).bit_length() * right > 1 << 16:
                raise _LimitExceeded(f"{left} ** {right} is too large")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return _checked(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_format(obj)
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):  # `'...'['format']` reaches str.format too
        if isinstance(obj, str) and argument in ("format", "format_map"):
            _check_format(obj)
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja's signature)
        _limits()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            method = getattr(__obj, "__name__", "")
            if method == "join" and len(args) == 1 and not isinstance(args[0], (str, list, tuple, dict)):
                args = (list(args[0]),)  # a generator cannot be measured without running it
            _check_str_call(method, owner, args, kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def concat(self, parts):  # buffered blocks: {% set x %}...{% endset %}, macros, call blocks
        parts = list(parts)
        _refuse_size(_joined_size(parts), "a block length")
        return "".join(parts)


class _Watchdog:
    """Raises _Timeout in the calling thread if the `with` body runs past `seconds` (CPython's
    PyThreadState_SetAsyncExc; a pending one is withdrawn when the body finishes in time)."""

    def __init__(self, seconds: float):
        self.thread = threading.get_ident()
        self.lock = threading.Lock()
        self.finished = self.fired = False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self):
        with self.lock:
            if not self.finished:
                self.fired = True
                _set_async_exc(self.thread, _Timeout)

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        with self.lock:
            self.finished = True
            self.timer.cancel()
            if self.fired:
                _set_async_exc(self.thread, None)  # not raised yet: withdraw it
        return False


def _set_async_exc(thread_id: int, exc) -> None:
    try:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                                   ctypes.py_object(exc) if exc is not None else None)
    except AttributeError:  # not CPython: the deadline checks in the sandbox's hooks still apply
        pass


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name in list(env.filters):
        env.filters[name] = _bounded_filter(env.filters[name], name)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals["range"] = _range
    env.globals["lipsum"] = _lipsum
    with _bounded(0):  # jinja folds constant expressions (filters included) while compiling
        compiled = env.from_string(template)
    namespace = compiled.root_render_func.__globals__  # the compiled module's globals: `~` joins through these
    namespace["str_join"], namespace["markup_join"] = _checked_str_join, _checked_markup_join
    return compiled


@contextlib.contextmanager
def _bounded(size_hint: int):
    """The limits of one compile or render: size from the conversation's size, time from TIME_LIMIT_S."""
    limits = _Limits(max(MIN_SIZE_LIMIT, SIZE_FACTOR * size_hint), TIME_LIMIT_S)
    token = _LIMITS.set(limits)
    try:
        with _Watchdog(TIME_LIMIT_S):
            yield limits
            _limits()
    except _Timeout:
        raise _LimitExceeded(f"rendering took longer than {TIME_LIMIT_S:g} s (a runaway loop?)") from None
    finally:
        _LIMITS.reset(token)


def _render_bounded(compiled: jinja2.Template, size_hint: int, **variables) -> str:
    """Render within the limits, streaming the output so that its size is checked as it grows."""
    out, size = [], 0
    with _bounded(size_hint) as limits:
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            if size > limits.max_size:
                raise _LimitExceeded(f"output longer than {limits.max_size:,} characters (the limit)")
            out.append(chunk)
    return "".join(out)


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
    except _LimitExceeded as e:
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
        return _render_bounded(compiled, size_hint, messages=chat, add_generation_prompt=add_generation_prompt,
                               **variables)
    except _LimitExceeded as e:
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
