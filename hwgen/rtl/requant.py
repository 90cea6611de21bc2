"""Accumulator requantizer: AP_RND + AP_SAT, the quantizer's default modes.

Contract
--------
Lane ``l`` maps a signed ``in_width``-bit accumulator code ``c`` to
``hwgen.fixed.requantize(c, frac_in, out_width, frac_out, out_signed,
"AP_RND", "AP_SAT")`` with ``shift = frac_in - frac_out``:

* ``shift > 0``: ``r = (c + 2**(shift-1)) >> shift`` (arithmetic shift: round
  half toward +inf, ap_fixed's AP_RND);
* ``shift == 0``: ``r = c``;  ``shift < 0``: ``r = c * 2**-shift`` (exact);
* then ``r`` saturates to ``[lo, hi]`` of the ``out_width``-bit (un)signed
  output format (AP_SAT).

``shift`` is one int for every lane or a sequence with one int per lane
(per-channel output or weight formats). Combinational by default; with
``registered=True`` the output is a register (latency 1 cycle).

Ports: ``i`` (``In(ArrayLayout(signed(in_width), lanes))``) and ``o``
(``Out(ArrayLayout(signed(out_width) or unsigned(out_width), lanes))``).
"""
from __future__ import annotations

from amaranth import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..contract import MAX_ACC_WIDTH
from .pe_array import RTLError, _is_int, check_positive, check_width

#: largest |shift| supported (codes live in int64 on the software side)
MAX_SHIFT = 62


class Requant(wiring.Component):
    """``lanes`` parallel AP_RND/AP_SAT requantizers (see module docstring)."""

    def __init__(self, in_width: int, shift, out_width: int, out_signed: bool = True,
                 lanes: int = 1, registered: bool = False):
        try:
            self._check(in_width, shift, out_width, out_signed, lanes, registered)
        except RTLError:
            self._MustUse__silence = True  # never built: no "unused elaboratable" warning
            raise
        oshape = signed(out_width) if out_signed else unsigned(out_width)
        super().__init__({
            "i": In(data.ArrayLayout(signed(in_width), lanes)),
            "o": Out(data.ArrayLayout(oshape, lanes)),
        })

    def _check(self, in_width, shift, out_width, out_signed, lanes, registered) -> None:
        self.in_width = check_width("in_width", in_width, MAX_ACC_WIDTH)
        self.out_width = check_width("out_width", out_width, MAX_ACC_WIDTH)
        if not isinstance(out_signed, bool):
            raise RTLError(f"out_signed must be a bool, got {out_signed!r}")
        self.lanes = check_positive("lanes", lanes)
        if not isinstance(registered, bool):
            raise RTLError(f"registered must be a bool, got {registered!r}")
        shifts = [shift] * lanes if _is_int(shift) else list(shift) if isinstance(shift, (list, tuple)) else None
        if shifts is None:
            raise RTLError(f"shift must be an int or a list of {lanes} ints, got {shift!r}")
        if len(shifts) != lanes:
            raise RTLError(f"shift must have one entry per lane ({lanes}), got {len(shifts)}")
        for s in shifts:
            if not _is_int(s) or not -MAX_SHIFT <= s <= MAX_SHIFT:
                raise RTLError(f"shift must be an integer in {-MAX_SHIFT}..{MAX_SHIFT}, got {s!r}")
        self.shifts = shifts
        self.out_signed = out_signed
        self.registered = registered
        if out_signed:
            self.lo, self.hi = -(1 << (out_width - 1)), (1 << (out_width - 1)) - 1
        else:
            self.lo, self.hi = 0, (1 << out_width) - 1

    def elaborate(self, platform):
        m = Module()
        dom = m.d.sync if self.registered else m.d.comb
        for lane, s in enumerate(self.shifts):
            c = self.i[lane]
            if s > 0:
                r = (c + (1 << (s - 1))) >> s   # signed: arithmetic shift
            elif s == 0:
                r = c
            else:
                r = c << -s
            # at least out_width + 1 bits, so the slice below sees the sign extension
            rv = Signal(signed(max(len(r), self.out_width + 1, 2)), name=f"r_{lane}")
            m.d.comb += rv.eq(r)
            dom += self.o[lane].eq(Mux(rv > self.hi, self.hi,
                                         Mux(rv < self.lo, self.lo, rv[:self.out_width])))
        return m


# ----------------------------------------------------------------------------
# run-time shifts
# ----------------------------------------------------------------------------

def shift_pre(shift_min: int) -> tuple[int, int]:
    """``(L, P)``: the constant exact left shift and truncating right shift that
    :class:`ShiftRequant` applies before its run-time shift, for shifts
    ``>= shift_min``. One of them is 0."""
    return max(0, -shift_min), max(0, shift_min - 1)


def shift_code(shift, shift_min: int):
    """The run-time shift code ``t = shift + L - P`` (see :func:`shift_pre`) of a
    requantization shift ``shift = frac_in - frac_out`` (an int or an int array):
    what a :class:`ShiftRequant` lane (and a matmul engine's shift buffer) holds."""
    lft, p = shift_pre(shift_min)
    return shift + lft - p


def shift_code_width(shift_min: int, shift_max: int) -> int:
    """Bits of a shift code for shifts in ``shift_min .. shift_max``."""
    return max(1, int(shift_code(shift_max, shift_min)).bit_length())


def check_shift_range(shift_min, shift_max) -> tuple[int, int]:
    for name, v in (("shift_min", shift_min), ("shift_max", shift_max)):
        if not _is_int(v) or not -MAX_SHIFT <= v <= MAX_SHIFT:
            raise RTLError(f"{name} must be an integer in {-MAX_SHIFT}..{MAX_SHIFT}, got {v!r}")
    if shift_min > shift_max:
        raise RTLError(f"shift_min ({shift_min}) must not exceed shift_max ({shift_max})")
    return shift_min, shift_max


class ShiftRequant(wiring.Component):
    """``lanes`` pipelined AP_RND/AP_SAT requantizers with a *run-time* shift per
    lane: the same function as :class:`Requant` (module docstring) for every
    ``shift`` in ``shift_min .. shift_max``.

    Ports: ``i`` (``In(StructLayout({"c": ArrayLayout(signed(in_width), lanes),
    "t": ArrayLayout(unsigned(shift_code_width(...)), lanes)}))``): the
    accumulator codes and each lane's shift *code* ``t = shift_code(shift,
    shift_min)``; ``o`` (``Out(ArrayLayout(signed/unsigned(out_width), lanes))``).
    A code outside ``shift_code(shift_min .. shift_max)`` gives an undefined result.

    How: with ``(L, P) = shift_pre(shift_min)``, ``u = (c << L) >> P``
    (exact left shift, or a floor right shift by ``P = shift_min - 1``, which
    commutes with the floor of the rounding below), then
    ``r = (u + ((1 << t) >> 1)) >> t`` (arithmetic shift: round half up), then
    saturation. Timing: three register stages (``LATENCY = 3``: the rounding
    add, the variable shift, the saturation): ``o`` shows the result for the
    ``i`` presented three cycles earlier; no enable, no stall, and no reset (data
    registers only: a reset net to every lane spans the die on a wide engine).
    """

    #: cycles from ``i`` to ``o``
    LATENCY = 3

    def __init__(self, in_width: int, shift_min: int, shift_max: int, out_width: int,
                 out_signed: bool = True, lanes: int = 1):
        try:
            self.in_width = check_width("in_width", in_width, MAX_ACC_WIDTH)
            self.shift_min, self.shift_max = check_shift_range(shift_min, shift_max)
            self.out_width = check_width("out_width", out_width, MAX_ACC_WIDTH)
            if not isinstance(out_signed, bool):
                raise RTLError(f"out_signed must be a bool, got {out_signed!r}")
            self.lanes = check_positive("lanes", lanes)
        except RTLError:
            self._MustUse__silence = True  # never built: no "unused elaboratable" warning
            raise
        self.out_signed = out_signed
        self.t_width = shift_code_width(shift_min, shift_max)
        if out_signed:
            self.lo, self.hi = -(1 << (out_width - 1)), (1 << (out_width - 1)) - 1
        else:
            self.lo, self.hi = 0, (1 << out_width) - 1
        oshape = signed(out_width) if out_signed else unsigned(out_width)
        super().__init__({
            "i": In(self.in_layout(in_width, shift_min, shift_max, lanes)),
            "o": Out(data.ArrayLayout(oshape, lanes)),
        })

    @staticmethod
    def in_layout(in_width: int, shift_min: int, shift_max: int, lanes: int) -> data.StructLayout:
        return data.StructLayout({
            "c": data.ArrayLayout(signed(in_width), lanes),
            "t": data.ArrayLayout(unsigned(shift_code_width(shift_min, shift_max)), lanes),
        })

    def elaborate(self, platform):
        m = Module()
        lft, p = shift_pre(self.shift_min)
        t_max = int(shift_code(self.shift_max, self.shift_min))
        uw = max(self.in_width + lft - p, 1) + 1        # + the rounding constant's carry
        rw = max(uw, self.out_width + 1, 2)
        for lane in range(self.lanes):
            c, t = self.i.c[lane], self.i.t[lane]
            u = Signal(signed(uw), name=f"u_{lane}")
            rc = Signal(max(t_max, 1), name=f"rc_{lane}")   # (1 << t) >> 1
            m.d.comb += [u.eq((c << lft) >> p), rc.eq((Const(1, t_max + 1) << t) >> 1)]
            # data registers: no reset (the lanes carry no control)
            v = Signal(signed(max(uw, t_max + 1) + 1), name=f"v_{lane}", reset_less=True)
            t1 = Signal.like(t, name=f"t1_{lane}", reset_less=True)
            m.d.sync += [v.eq(u + rc), t1.eq(t)]                  # stage 1: rounding add
            r = Signal(signed(rw), name=f"r_{lane}", reset_less=True)
            m.d.sync += r.eq(v >> t1)                             # stage 2: shift
            # stage 3: saturate. r fits the output iff its bits above the output's
            # (from its sign bit when signed) are all equal (signed) or all zero
            # (unsigned; r's own sign bit among them): reduction trees, no compare
            upper = r[self.out_width - 1:] if self.out_signed else r[self.out_width:]
            fits = (upper.all() | ~upper.any()) if self.out_signed else ~upper.any()
            q = Signal.like(self.o[lane], name=f"q_{lane}", reset_less=True)
            m.d.sync += q.eq(Mux(fits, r[:self.out_width], Mux(r[-1], self.lo, self.hi)))
            m.d.comb += self.o[lane].eq(q)
        return m
