"""Output-stationary broadcast PE array: ``C[rows x cols] = A[rows x K] @ B[K x cols]``.

Contract
--------
Every cycle the array takes one *beat* on ``i`` (a valid/ready stream): a
column ``a[0..rows-1]`` of A (``a_width``-bit signed codes) and a row
``b[0..cols-1]`` of B (``b_width``-bit signed codes), plus two flags:

``first``  this beat starts a new tile: the accumulators restart from its
           products (the *clear*; no separate clear cycle is spent).
``last``   this beat ends the tile: once it is accumulated, the tile's
           ``rows x cols`` sums are copied into an output bank and drained on
           ``o``, one row of C per beat, row 0 first, ``last`` set on row
           ``rows - 1``.

A tile of K beats has ``first`` on beat 0 and ``last`` on beat K-1 (both on
the beat when K = 1). PE (i, j) adds ``a[i] * b[j]`` to its ``acc_width``-bit
signed accumulator: one MAC per PE per cycle while beats arrive back to back.
The result is exactly ``hwgen.contract.matmul_int(A, B)``: ``acc_width``
should come from :func:`hwgen.contract.acc_width` for the operand formats and
K (:meth:`PEArray.for_formats` does that), which bounds every partial sum, so
no accumulator ever wraps; with a narrower ``acc_width`` sums wrap modulo
``2**acc_width`` (two's complement), as a plain register would.

Pipeline and timing
-------------------
Two stages: the products ``a[i] * b[j]`` are registered (stage 1), then added
into the accumulators (stage 2); registered products are what moves Fmax on
FPGA DSPs (DESIGN.md, Known traps). Counting cycle 0 as the one in which
beat 0 is accepted, with beats back to back and ``o.ready`` held high:

* beats are accepted in cycles ``0 .. K-1``;
* the tile is copied into the output bank at the end of cycle ``K``;
* row ``r`` of C is valid on ``o`` in cycle ``K + 1 + r``;
* so one tile takes exactly ``K + rows + 1`` cycles from its first accepted
  beat to its last output row (``latency`` from the last beat to row 0: 2).

The output bank is a second register set, so the next tile streams in while
the previous one drains: tiles can follow each other with no gap (one tile
every K cycles) when ``K >= rows + 1`` and ``o.ready`` stays high. For
shorter tiles, or under output backpressure, a ``last`` beat that reaches
stage 2 while the bank still drains waits there, and ``i.ready`` falls
until the bank frees: nothing is lost or reordered. ``i.ready`` depends on
registered state only (no combinational path from ``o.ready``).
"""
from __future__ import annotations

from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..contract import MAX_ACC_WIDTH
from ..contract import acc_width as contract_acc_width


class RTLError(ValueError):
    """An RTL generator parameter outside what the component supports."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_positive(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise RTLError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_width(name: str, value, hi: int = MAX_ACC_WIDTH) -> int:
    if not _is_int(value) or not 1 <= value <= hi:
        raise RTLError(f"{name} must be an integer in 1..{hi}, got {value!r}")
    return value


def in_layout(rows: int, cols: int, a_width: int, b_width: int) -> data.StructLayout:
    """Payload of one input beat: a column of A, a row of B, tile flags."""
    return data.StructLayout({
        "a": data.ArrayLayout(signed(a_width), rows),
        "b": data.ArrayLayout(signed(b_width), cols),
        "first": 1,
        "last": 1,
    })


def out_layout(rows: int, cols: int, acc_width: int) -> data.StructLayout:
    """Payload of one output beat: one row of C, its index, last-row flag."""
    return data.StructLayout({
        "data": data.ArrayLayout(signed(acc_width), cols),
        "row": unsigned(max(1, (rows - 1).bit_length())),
        "last": 1,
    })


class PEArray(wiring.Component):
    """``rows x cols`` output-stationary array of signed MACs (see the module
    docstring for the stream protocol and the exact cycle counts).

    Ports: ``i`` (``In(stream.Signature(in_layout(...)))``: fields ``a``,
    ``b``, ``first``, ``last``) and ``o`` (``Out(stream.Signature(
    out_layout(...)))``: fields ``data``, ``row``, ``last``).
    """

    #: cycles from accepting a tile's last beat to its row 0 appearing on ``o``
    LATENCY = 2

    def __init__(self, rows: int, cols: int, a_width: int, b_width: int, acc_width: int):
        try:
            self._check(rows, cols, a_width, b_width, acc_width)
        except RTLError:
            self._MustUse__silence = True  # never built: no "unused elaboratable" warning
            raise
        super().__init__({
            "i": In(stream.Signature(in_layout(rows, cols, a_width, b_width))),
            "o": Out(stream.Signature(out_layout(rows, cols, acc_width))),
        })

    def _check(self, rows, cols, a_width, b_width, acc_width) -> None:
        self.rows = check_positive("rows", rows)
        self.cols = check_positive("cols", cols)
        self.a_width = check_width("a_width", a_width)
        self.b_width = check_width("b_width", b_width)
        self.acc_width = check_width("acc_width", acc_width)
        if acc_width < a_width + b_width:
            raise RTLError(f"acc_width must be at least a_width + b_width = {a_width + b_width} "
                           f"(one product), got {acc_width}")

    @classmethod
    def for_formats(cls, rows: int, cols: int, a_fmt, b_fmt, k: int) -> "PEArray":
        """An array for ``a_fmt`` x ``b_fmt`` (:class:`hwgen.fixed.FixedType`)
        operands over tiles of at most ``k`` beats, with the contract's
        never-overflowing accumulator width (:func:`hwgen.contract.acc_width`).
        Unsigned operand formats get one extra (sign) bit on the port."""
        check_positive("k", k)
        return cls(rows, cols, a_fmt.width + (not a_fmt.signed), b_fmt.width + (not b_fmt.signed),
                   contract_acc_width(a_fmt, b_fmt, k))

    @staticmethod
    def cycles(k: int, rows: int) -> int:
        """Cycles of one isolated tile, first accepted beat to last output row."""
        return k + rows + 1

    def elaborate(self, platform):
        m = Module()
        R, N, W = self.rows, self.cols, self.acc_width
        pw = self.a_width + self.b_width
        i_, o_ = self.i, self.o

        # stage 1: registered products and flags
        prod = [[Signal(signed(pw), name=f"p_{i}_{j}") for j in range(N)] for i in range(R)]
        s1_valid = Signal()
        s1_first = Signal()
        s1_last = Signal()
        # stage 2: accumulators; output bank (a row shift register) drained on `o`
        acc = [[Signal(signed(W), name=f"acc_{i}_{j}") for j in range(N)] for i in range(R)]
        bank = [[Signal(signed(W), name=f"bank_{i}_{j}") for j in range(N)] for i in range(R)]
        bank_busy = Signal()
        row = Signal(out_layout(R, N, W).members["row"])

        # stage 2 advances unless a `last` beat must wait for the bank
        s1_adv = Signal()
        m.d.comb += s1_adv.eq(s1_valid & ~(s1_last & bank_busy))
        m.d.comb += i_.ready.eq(~s1_valid | s1_adv)

        with m.If(i_.ready):
            m.d.sync += s1_valid.eq(i_.valid)
        with m.If(i_.valid & i_.ready):
            m.d.sync += [s1_first.eq(i_.payload.first), s1_last.eq(i_.payload.last)]
            for i in range(R):
                for j in range(N):
                    m.d.sync += prod[i][j].eq(i_.payload.a[i] * i_.payload.b[j])

        nxt = [[Signal(signed(W), name=f"nxt_{i}_{j}") for j in range(N)] for i in range(R)]
        for i in range(R):
            for j in range(N):
                m.d.comb += nxt[i][j].eq(Mux(s1_first, prod[i][j], acc[i][j] + prod[i][j]))

        with m.If(s1_adv):
            m.d.sync += [acc[i][j].eq(nxt[i][j]) for i in range(R) for j in range(N)]

        # drain: row 0 of the bank on `o`; rows shift up as they are taken
        m.d.comb += [
            o_.valid.eq(bank_busy),
            o_.payload.row.eq(row),
            o_.payload.last.eq(row == R - 1),
        ]
        m.d.comb += [o_.payload.data[j].eq(bank[0][j]) for j in range(N)]
        with m.If(o_.valid & o_.ready):
            m.d.sync += [bank[i][j].eq(bank[i + 1][j]) for i in range(R - 1) for j in range(N)]
            m.d.sync += row.eq(row + 1)
            with m.If(row == R - 1):
                m.d.sync += [bank_busy.eq(0), row.eq(0)]
        # commit (only while the bank is free, so never together with a drain step)
        with m.If(s1_adv & s1_last):
            m.d.sync += [bank[i][j].eq(nxt[i][j]) for i in range(R) for j in range(N)]
            m.d.sync += [bank_busy.eq(1), row.eq(0)]
        return m
