"""ap_fixed requantization as Amaranth logic, for every rounding and overflow mode.

Contract
--------
:func:`requant_value` builds combinational logic that maps an integer code
``c`` (any Amaranth value, signed or unsigned) with ``frac_in`` fractional
bits to the code of ``fmt`` (a :class:`hwgen.fixed.FixedType`), exactly as
``hwgen.fixed.requantize(c, frac_in, fmt.width, fmt.frac_bits, fmt.signed,
fmt.q, fmt.o)`` (ap_fixed assignment) does. ``shift = frac_in -
fmt.frac_bits`` is a Python int fixed at elaboration:

* ``shift > 0``: ``floor = c >> shift`` (arithmetic), ``qb`` the half bit
  (bit ``shift - 1``), ``r`` any bit below it, ``neg`` the sign; the rounding
  increment per mode is the one of :func:`hwgen.fixed.round_shift` (AP_TRN,
  AP_TRN_ZERO, AP_RND, AP_RND_ZERO, AP_RND_MIN_INF, AP_RND_INF, AP_RND_CONV);
* ``shift <= 0``: ``c * 2**-shift`` (exact);
* then the overflow mode (AP_WRAP: low ``width`` bits; AP_SAT: clip;
  AP_SAT_ZERO: 0 when out of range; AP_SAT_SYM: signed formats wider than one
  bit clip to ``[-max, max]``, as :mod:`hwgen.fixed` and the headers do).

Shifts longer than the code are exact (the code is sign-extended first).
No registers: callers place the pipeline registers.
"""
from __future__ import annotations

from amaranth import Module, Mux, Shape, Signal, signed, unsigned
from amaranth.hdl import Value

from ..fixed import OVERFLOW_MODES, QUANT_MODES, FixedType, round_increment
from .pe_array import RTLError


def fmt_shape(fmt: FixedType) -> Shape:
    """The Amaranth shape of one code of ``fmt``."""
    return signed(fmt.width) if fmt.signed else unsigned(fmt.width)


def check_modes(what: str, fmt: FixedType) -> None:
    if fmt.q not in QUANT_MODES or fmt.o not in OVERFLOW_MODES:
        raise RTLError(f"{what} format {fmt} has modes ({fmt.q}, {fmt.o}) that hwgen.fixed does "
                       "not define")


def _limits(fmt: FixedType) -> tuple[int, int, int]:
    """(lo, hi, lowest value not counted as underflow) of ``fmt``'s codes."""
    lo, hi = fmt.min_code, fmt.max_code
    lo_eff = -hi if (fmt.o == "AP_SAT_SYM" and fmt.signed and fmt.width > 1) else lo
    return lo, hi, lo_eff


def requant_value(m: Module, c: Value, frac_in: int, fmt: FixedType, name: str) -> Value:
    """Logic for ``requantize(c, frac_in, fmt)`` (see module docstring); returns
    a signal of :func:`fmt_shape` (``fmt``)."""
    check_modes(name, fmt)
    c = Value.cast(c)
    w = len(c)
    shift = frac_in - fmt.frac_bits
    if shift > 0:
        ext = Signal(signed(max(w, shift) + 2), name=f"{name}_ext")
        m.d.comb += ext.eq(c)
        floor = ext >> shift
        qb = ext[shift - 1]
        r = ext[:shift - 1].any() if shift >= 2 else 0
        neg = ext[-1]
        inc = 0 if fmt.q == "AP_TRN" else round_increment(fmt.q, qb, r, neg, floor[0])
        rounded = floor + inc
    elif shift == 0:
        rounded = c
    else:
        rounded = c << -shift
    rv = Signal(signed(max(len(rounded), fmt.width) + 2), name=f"{name}_r")
    m.d.comb += rv.eq(rounded)
    out = Signal(fmt_shape(fmt), name=name)
    wrapped = rv[:fmt.width].as_signed() if fmt.signed else rv[:fmt.width]
    if fmt.o == "AP_WRAP":
        m.d.comb += out.eq(wrapped)
        return out
    lo, hi, lo_eff = _limits(fmt)
    over, under = rv > hi, rv < lo_eff
    if fmt.o == "AP_SAT_ZERO":
        m.d.comb += out.eq(Mux(over | under, 0, wrapped))
    else:  # AP_SAT, AP_SAT_SYM
        m.d.comb += out.eq(Mux(over, hi, Mux(under, lo_eff, wrapped)))
    return out
