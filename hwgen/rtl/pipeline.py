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


def fanout_tree(m: Module, src, n: int, serves, prefixes, reset_less: bool = False) -> list:
    """``src`` fanned out to ``n`` sinks through levels of register copies, each
    carrying a ``keep`` attribute (so synthesis keeps them apart): at level ``l``
    one copy per ``serves[l]`` sinks (each a multiple of the next), named
    ``{prefixes[l]}{g}``, loaded from the level before (the first from ``src``).
    Returns the last level's copies; sink ``s`` reads copy ``s // serves[-1]``."""
    level, prev = [src], None
    for per, prefix in zip(serves, prefixes, strict=True):
        copies = []
        for g in range(-(-n // per)):
            q = Signal.like(src, name=f"{prefix}{g}", reset_less=reset_less, attrs={"keep": 1})
            m.d.sync += q.eq(level[g * per // prev] if prev else src)
            copies.append(q)
        level, prev = copies, per
    return level
