"""Delay lines: values carried through a chain of registers beside a pipeline."""
from __future__ import annotations

from amaranth import Module, Signal
from amaranth.lib import data


def delayed(m: Module, values, stages: int, names, reset_less: bool = False) -> list:
    """``values`` (Signals, layout views or expressions) each through ``stages``
    registers of ``m``'s sync domain, loaded every cycle; returns the last
    stage's registers (``values`` themselves when ``stages`` is 0). The
    registers of value ``i`` are named ``{names[i]}_d{stage}``; a Signal's (or
    a view's) register copies its shape and initial value, an expression's is
    unsigned of its width."""
    out = list(values)
    for st in range(stages):
        nxt = [Signal.like(v, name=f"{n}_d{st}", reset_less=reset_less) if isinstance(v, (Signal, data.View))
               else Signal(len(v), name=f"{n}_d{st}", reset_less=reset_less)
               for v, n in zip(out, names, strict=True)]
        m.d.sync += [q.eq(v) for q, v in zip(nxt, out)]
        out = nxt
    return out
