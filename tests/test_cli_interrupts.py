"""The start-up Ctrl-C guards (cli/interrupts.py), in process: each place where Python would swallow a
KeyboardInterrupt is reproduced and the guard must still deliver exactly one KeyboardInterrupt."""

import gc
import signal
import sys
import weakref

import pytest

from mlxedge.cli import interrupts


class _Thing:
    pass


@pytest.fixture(autouse=True)
def pythons_own_ctrl_c_handler():
    """These tests need SIGINT handled the way Python starts a program. A suite launched in the background
    (`make test &` from a script: bash ignores SIGINT in such jobs) inherits SIG_IGN, and the guards rightly leave
    an ignored Ctrl-C alone, so every test here would fail without this."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_swallowed_by_a_weakref_callback_is_raised_when_the_load_ends(capsys):
    thing = _Thing()
    _ = weakref.ref(thing, lambda ref: signal.raise_signal(signal.SIGINT) or sum(range(10)))
    ran_on = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.interrupts_remembered():
            del thing  # the callback runs here: its KeyboardInterrupt is "ignored" by Python
            gc.collect()
            ran_on.append(True)
    assert ran_on == [True], "the interrupt was not swallowed, so this test shows nothing"
    assert "KeyboardInterrupt" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_turned_into_another_error_is_reported_as_the_ctrl_c():
    class Field:
        def __set_name__(self, owner, name):
            signal.raise_signal(signal.SIGINT)
            sum(range(10))

    with pytest.raises(KeyboardInterrupt) as caught:
        with interrupts.interrupts_remembered():
            type("Recipe", (), {"specs": Field()})  # Python wraps the KeyboardInterrupt in a RuntimeError
    assert caught.type is KeyboardInterrupt


def test_without_a_ctrl_c_the_load_is_untouched():
    with interrupts.interrupts_remembered():
        value = sum(range(10))
    assert value == 45 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(ValueError):
        with interrupts.interrupts_remembered():
            raise ValueError("a load's own failure stays itself")


def test_a_ctrl_c_during_a_native_init_is_held_until_it_returns():
    order = []

    def init():  # stands for Python code that a native module's init runs
        signal.raise_signal(signal.SIGINT)
        order.append("init went on")

    with pytest.raises(KeyboardInterrupt):
        with interrupts.sigint_held():
            init()
            order.append("init finished")
    assert order == ["init went on", "init finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_hook_holds_sigint_while_a_native_module_loads(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    interrupts.hold_interrupts_in_native_imports()
    interrupts.hold_interrupts_in_native_imports()
    assert sum(isinstance(f, interrupts._HoldingFinder) for f in sys.meta_path) == 1
    import mlx

    spec = sys.meta_path[0].find_spec("mlx.core", mlx.__path__)
    assert isinstance(spec.loader, interrupts._HoldingLoader)
    assert spec.loader.get_filename("mlx.core").endswith(".so")  # the real loader's other methods
    assert sys.meta_path[0].find_spec("json", None) is None  # pure-Python modules are not touched
