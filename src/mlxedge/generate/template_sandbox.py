"""A Jinja sandbox for untrusted templates that bounds what they may build and how long they may run.

`Sandbox` is jinja2's ImmutableSandboxedEnvironment, stricter in one way: touching an unsafe attribute
fails at once (a SecurityError) instead of rendering as an empty string. Rendering is bounded, so a
template cannot hang or exhaust the process: `range` is capped at MAX_RANGE items; no string, list or
output may exceed the size limit (MIN_SIZE_LIMIT characters, or SIZE_FACTOR x the size hint, e.g. the size
of the conversation, when that is larger), checked before `*`, `**`, `%`, str.format/center/ljust/... and
replace/join allocate and after every other call, concatenation and buffered block; and a watchdog stops a
render that runs past TIME_LIMIT_S (it raises in the rendering thread at the next bytecode, which reaches
loops that call nothing). Each limit raises LimitExceeded, naming it.

Use: wrap an environment's filters with `bounded_filter`, give it `bounded_range` and `bounded_lipsum`,
compile inside `bounded(0)` (jinja folds constants while compiling), `bound_joins` the compiled template,
then `render_bounded` it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import re
import threading
import time
from typing import Optional

import jinja2
import jinja2.utils
from jinja2.runtime import markup_join as _markup_join
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RANGE = 100_000  # items a template's range() may produce (jinja's own sandbox limit)
MIN_SIZE_LIMIT = 1_000_000  # characters/items any value or the output may reach, at least
SIZE_FACTOR = 4  # ... or this many times the size of the conversation handed to the template
TIME_LIMIT_S = 5.0  # wall-clock time a render may take (ordinary templates take milliseconds)


class LimitExceeded(jinja2.exceptions.SecurityError):
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
        raise LimitExceeded(f"{what} of {size:,} (the limit is {limit:,})")


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


def bounded_range(*args):
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise LimitExceeded(f"a range of {len(rng):,} items (the limit is {MAX_RANGE:,})")
    return rng


def bounded_lipsum(n=5, html=True, min=20, max=100):  # noqa: A002  (jinja's signature)
    _refuse_size(int(n) * 1000, "lipsum text length (about)")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def bounded_filter(fn, name):
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


class Sandbox(ImmutableSandboxedEnvironment):
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
                raise LimitExceeded(f"{left} ** {right} is too large")
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


@contextlib.contextmanager
def bounded(size_hint: int):
    """The limits of one compile or render: size from the conversation's size, time from TIME_LIMIT_S."""
    limits = _Limits(max(MIN_SIZE_LIMIT, SIZE_FACTOR * size_hint), TIME_LIMIT_S)
    token = _LIMITS.set(limits)
    try:
        with _Watchdog(TIME_LIMIT_S):
            yield limits
            _limits()
    except _Timeout:
        raise LimitExceeded(f"rendering took longer than {TIME_LIMIT_S:g} s (a runaway loop?)") from None
    finally:
        _LIMITS.reset(token)


def render_bounded(compiled: jinja2.Template, size_hint: int, **variables) -> str:
    """Render within the limits, streaming the output so that its size is checked as it grows."""
    out, size = [], 0
    with bounded(size_hint) as limits:
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            if size > limits.max_size:
                raise LimitExceeded(f"output longer than {limits.max_size:,} characters (the limit)")
            out.append(chunk)
    return "".join(out)


def bound_joins(compiled: jinja2.Template) -> None:
    """Route a compiled template's `~` and output joins through the size checks (they are globals of the
    compiled module)."""
    namespace = compiled.root_render_func.__globals__
    namespace["str_join"], namespace["markup_join"] = _checked_str_join, _checked_markup_join
