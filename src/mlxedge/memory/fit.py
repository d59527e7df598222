"""Fit policy: which settings fit the budget, best quality first, and what `load` does when the asked one does not.

`check_plan` is what `load` calls before reading any weight: the plan if it fits; with auto_fit the best plan
that fits (its `note` says which); otherwise a MemoryBudgetError naming up to three settings that would.
Candidates keep the asked context as long as possible and, at each context, the highest precision not above
the one asked for (8-bit then 4-bit; float first when no bits were asked); contexts halve down to 512.
"""

from __future__ import annotations

from typing import Mapping, Optional

from ..errors import MemoryBudgetError
from ..quant.affine import LOAD_BITS
from .plan import MemoryPlan, make_plan
from .units import format_bytes

SUGGESTED_BITS = tuple(sorted(LOAD_BITS, reverse=True))  # what the loader quantizes to, best first
MIN_SUGGESTED_CONTEXT = 512


def _candidates(bits: Optional[int], context_length: int, prequantized: bool) -> list:
    """(bits, context) settings to try, best first: keep the asked context as long as possible, and at each
    context the highest precision that is not above the one asked for."""
    if prequantized and bits is None:
        bit_options = [None]  # keep as stored; mlxedge does not requantize unless asked
    else:
        ceiling = bits if bits is not None else 16
        bit_options = ([None] if bits is None else []) + [b for b in SUGGESTED_BITS if b <= ceiling]
    contexts = [int(context_length)]
    while contexts[-1] // 2 >= MIN_SUGGESTED_CONTEXT:
        contexts.append(contexts[-1] // 2)
    return [(b, c) for c in contexts for b in bit_options]


def suggest_fitting(config: dict, tensor_infos: Mapping, *, bits: Optional[int], group_size: int, dtype_bytes: int,
                    context_length: int, budget, **kwargs) -> list:
    """Settings that fit the budget, best quality first:
    [{"bits", "context_length", "total_bytes", "stored_quantized"}, ...].

    Tries the asked context, then halves it down to 512; at each context 8-bit then 4-bit (or, when no bits
    were asked, float first), never above the precision asked for. The asked setting itself is included
    when it fits.
    """
    out = []
    prequantized = bool(kwargs.get("quantized"))
    for b, c in _candidates(bits, context_length, prequantized):
        plan = make_plan(config, tensor_infos, bits=b, group_size=group_size, dtype_bytes=dtype_bytes,
                         context_length=c, budget=budget, **kwargs)
        if plan.fits:
            out.append({"bits": b, "context_length": c, "total_bytes": plan.total_bytes,
                        "stored_quantized": plan.settings["stored_quantized"]})
    return out


def _describe_setting(s: dict) -> str:
    bits = f"bits={s['bits']}" if s["bits"] is not None else (
        "bits=None (as stored)" if s.get("stored_quantized") else "bits=None (float)")
    return f"{bits} context_length={s['context_length']} ({format_bytes(s['total_bytes'])})"


def _chosen_plan(asked: MemoryPlan, best: dict, config: dict, tensor_infos: Mapping, **kwargs) -> MemoryPlan:
    plan = make_plan(config, tensor_infos, bits=best["bits"], context_length=best["context_length"], **kwargs)
    plan.note = (f"auto-fit: chose {_describe_setting(best)} instead of the asked "
                 f"{asked.summary().split(':')[0]} "
                 f"({format_bytes(asked.total_bytes)}), to fit the {format_bytes(plan.budget_bytes)} budget "
                 f"({plan.budget_source}).")
    return plan


def _refusal(plan: MemoryPlan, fitting: list, limit: int = 3) -> str:
    msg = (f"the model needs {plan.summary()}, but the memory budget is {format_bytes(plan.budget_bytes)} "
           f"({plan.budget_source}); ")
    if fitting:
        msg += ("settings that fit: " + "; ".join(_describe_setting(s) for s in fitting[:limit])
                + ". Pass one of them, or auto_fit=True (--auto-fit) to pick the best.")
    else:
        msg += ("nothing down to 4-bit and a 512-token context fits; free memory or raise memory_budget "
                "(--memory-budget).")
    return msg


def check_plan(config: dict, tensor_infos: Mapping, *, bits: Optional[int], group_size: int, dtype_bytes: int,
               context_length: int, budget, auto_fit: bool = False, **kwargs) -> MemoryPlan:
    """What `load` calls before reading any weight: the plan if it fits; with auto_fit the best plan that
    fits (its `note` says which); otherwise MemoryBudgetError naming the settings that would fit."""
    common = dict(group_size=group_size, dtype_bytes=dtype_bytes, budget=budget, **kwargs)
    plan = make_plan(config, tensor_infos, bits=bits, context_length=context_length, **common)
    if plan.fits:
        return plan
    fitting = suggest_fitting(config, tensor_infos, bits=bits, context_length=context_length, **common)
    if auto_fit and fitting:
        return _chosen_plan(plan, fitting[0], config, tensor_infos, **common)
    raise MemoryBudgetError(_refusal(plan, fitting))
