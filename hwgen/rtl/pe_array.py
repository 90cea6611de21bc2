"""Output-stationary broadcast PE array: ``C[rows x cols] = A[rows x K] @ B[K x cols]``.

Contract
--------
Every cycle with ``i.valid`` high the array takes one *beat* on ``i``: a
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
Both streams are ``always_ready``: the array takes a beat whenever ``i.valid``
is high and presents each output row for exactly one cycle, with no
back-pressure anywhere. That is what lets it run free, with no clock enable
on any register: a global enable (or stall) would fan out to every product
and accumulator register, and that net, not the arithmetic, limited the
clock of larger arrays (measured on ECP5: 105 MHz at 8 x 8). Cycles with
``i.valid`` low are bubbles (their B row is zeroed at stage 0, so they add
0; or by the producer, ``zero_bubbles=False``); the producer may insert them
anywhere.

Seven register stages lead to the accumulators, built for FPGA timing closure
(DESIGN.md, Known traps: registered operands and products, DSP registers):
stage 0 registers the operands (one register per row of A and column of B)
and the flags; stages 1 and 2 (``FANOUT_LEVELS``) fan the operands out in a
tree of kept register copies, one per 4 PEs of a row (A) or a column (B),
then one per ``FANOUT_GROUP`` (2), so no operand net spans the whole array (a
16 x 16 array covers most of an LFE5U-85F: the DSP blocks sit in rows across
the die); stages 3..6 are the multiplier's registers (:class:`MULT18X18D`
with its input and output registers plus two in fabric, so that the route
from the DSP block to the accumulator gets a register at each end; its
behavioural twin :class:`RegisteredMul`; or the pipelined :class:`FabricMul`
in logic, per :class:`PEMapping`); stage 7 adds the product into the
accumulator; stage 8 copies a finished tile from the accumulator registers
into the output bank (the bank never sees the adder: on a 8 x 8 array the
accumulator's carry chain into the bank was the critical path, 6.6 ns).
The ``first``/``last`` flags travel beside the products through a fan-out
tree of registers (single copies until stage 4, one per row at
stage 5, one per PE at stage 6; each copy carries a ``keep`` attribute, which
:mod:`hwgen.impl` turns into kept cells so synthesis does not merge the
copies), so no control net drives more than one PE's registers. ``PIPE``
(7) registers sit in front of the accumulators and ``LATENCY = PIPE + 2``.
Measured placed on an LFE5U-85F (16 x 16, before the second fan-out level
and the fourth multiplier register): half of the DSP output bits travelled
more than 40 tiles to their fabric register, the operand copies up to 94.
Counting cycle 0 as the one in which beat 0 is taken, with no bubbles:

* beats are taken in cycles ``0 .. K-1``;
* the tile is in the accumulators at the end of cycle ``K - 1 + PIPE`` and
  copied into the output bank at the end of the next;
* row ``r`` of C is valid on ``o`` in cycle ``K - 1 + LATENCY + r``;
* so one tile takes exactly ``cycles(K, rows) = K + rows + LATENCY - 1``
  cycles from its first beat to its last output row (``LATENCY`` from the
  last beat to row 0).

The output bank is a second register set that shifts up one row per cycle,
so the next tile streams in while the previous one drains. The one rule for
the producer (:attr:`PEArray.min_tile_gap` = ``rows``): a tile's ``last``
beat comes at least ``rows`` cycles after the previous tile's ``last`` beat.
Tiles of ``K >= rows`` beats sent back to back satisfy it, so they follow
each other with no gap (one tile every K cycles); shorter tiles need bubbles
after them. A ``last`` beat that comes sooner would overwrite rows still
draining: the array then raises ``overrun`` (sticky until reset) and those
results are lost.
"""
from __future__ import annotations

from dataclasses import dataclass

from amaranth import C, ClockSignal, Instance, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..contract import MAX_ACC_WIDTH
from ..contract import acc_width as contract_acc_width
from .pipeline import delayed, fanout_tree


#: registers of every multiplier: operands, product, and two fabric registers after it
MUL_STAGES = 4

#: PEs fed by one operand register copy (the last level of the fan-out tree)
FANOUT_GROUP = 2

#: levels of the operands' fan-out tree after stage 0: one copy per
#: ``FANOUT_GROUP * 2 ** (FANOUT_LEVELS - 1 - l)`` PEs at level l
FANOUT_LEVELS = 2

#: pipeline registers in front of the accumulators: stage 0 (operands, flags),
#: the operands' fan-out tree and the multiplier's
PIPE = 1 + FANOUT_LEVELS + MUL_STAGES

#: widest operand of one MULT18X18D (signed)
DSP_WIDTH = 18


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

    Ports: ``i`` (``In(stream.Signature(in_layout(...), always_ready=True))``:
    fields ``a``, ``b``, ``first``, ``last``), ``o`` (``Out(stream.Signature(
    out_layout(...), always_ready=True))``: fields ``data``, ``row``, ``last``)
    and ``overrun`` (``Out(1)``: a ``last`` beat came less than
    :attr:`min_tile_gap` cycles after the previous one; sticky until reset).

    ``zero_bubbles``: True (the default) zeroes the B row of every cycle with
    ``valid`` low, so bubbles may come anywhere; False leaves that to the
    producer, which must present ``b`` all zero whenever ``valid`` is low
    inside a tile (:class:`~hwgen.rtl.matmul.MatmulEngine` does, from
    per-column flag registers): then no net runs from ``valid`` to every B bit.

    ``mapping`` (a :class:`PEMapping`) chooses DSP or fabric multipliers per PE;
    without it the ``platform`` attribute ``pe_mapping`` is used (how
    :mod:`hwgen.impl` synthesizes an engine that contains the array), and
    without either every PE is the behavioural :class:`RegisteredMul`.
    """

    #: cycles from accepting a tile's last beat to its row 0 appearing on ``o``
    LATENCY = PIPE + 2

    def __init__(self, rows: int, cols: int, a_width: int, b_width: int, acc_width: int,
                 mapping: "PEMapping | None" = None, zero_bubbles: bool = True):
        try:
            self._check(rows, cols, a_width, b_width, acc_width)
            if mapping is not None and not isinstance(mapping, PEMapping):
                raise RTLError(f"mapping must be a PEMapping or None, got {mapping!r}")
            if not isinstance(zero_bubbles, bool):
                raise RTLError(f"zero_bubbles must be a bool, got {zero_bubbles!r}")
            self.mapping = mapping
            self.zero_bubbles = zero_bubbles
        except RTLError:
            self._MustUse__silence = True  # never built: no "unused elaboratable" warning
            raise
        super().__init__({
            "i": In(stream.Signature(in_layout(rows, cols, a_width, b_width), always_ready=True)),
            "o": Out(stream.Signature(out_layout(rows, cols, acc_width), always_ready=True)),
            "overrun": Out(1),
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

    @property
    def min_tile_gap(self) -> int:
        """Fewest cycles between two ``last`` beats (the output bank drains one
        row per cycle): tiles of at least this many beats stream with no gap."""
        return self.rows

    @classmethod
    def for_formats(cls, rows: int, cols: int, a_fmt, b_fmt, k: int,
                    zero_bubbles: bool = True) -> "PEArray":
        """An array for ``a_fmt`` x ``b_fmt`` (:class:`hwgen.fixed.FixedType`)
        operands over tiles of at most ``k`` beats, with the contract's
        never-overflowing accumulator width (:func:`hwgen.contract.acc_width`).
        Unsigned operand formats get one extra (sign) bit on the port."""
        check_positive("k", k)
        return cls(rows, cols, a_fmt.width + (not a_fmt.signed), b_fmt.width + (not b_fmt.signed),
                   contract_acc_width(a_fmt, b_fmt, k), zero_bubbles=zero_bubbles)

    @staticmethod
    def cycles(k: int, rows: int) -> int:
        """Cycles of one isolated tile, first beat to last output row."""
        return k + rows + PEArray.LATENCY - 1

    def elaborate(self, platform):
        m = Module()
        R, N, W = self.rows, self.cols, self.acc_width
        i_, o_ = self.i, self.o
        mapping = self.mapping or getattr(platform, "pe_mapping", None)
        kinds = pe_kinds(R, N, self.a_width, self.b_width, mapping)
        instances = bool(mapping is not None and mapping.instances)
        keep = {"keep": 1}

        # stage 0: operand registers (one per row of A / column of B) and the flags;
        # a bubble's B row is zeroed so that its products add 0 (no enable anywhere),
        # unless the producer zeroes it (zero_bubbles=False: no net from `valid` to
        # every B bit)
        a0 = [Signal(signed(self.a_width), name=f"a0_{i}", reset_less=True) for i in range(R)]
        b0 = [Signal(signed(self.b_width), name=f"b0_{j}", reset_less=True) for j in range(N)]
        first0, last0 = Signal(), Signal()
        m.d.sync += [first0.eq(i_.valid & i_.payload.first), last0.eq(i_.valid & i_.payload.last)]
        m.d.sync += [a0[i].eq(i_.payload.a[i]) for i in range(R)]
        m.d.sync += [b0[j].eq(Mux(i_.valid, i_.payload.b[j], 0) if self.zero_bubbles else i_.payload.b[j])
                     for j in range(N)]

        # stages 1 .. FANOUT_LEVELS: the operands' fan-out tree, kept register copies;
        # at the last level one copy per FANOUT_GROUP PEs of a row (A) or a column (B),
        # each level halving the PEs a copy serves, so no operand net spans the array
        serves = [FANOUT_GROUP << (FANOUT_LEVELS - 1 - lv) for lv in range(FANOUT_LEVELS)]

        def tree(src, n, name):
            return fanout_tree(m, src, n, serves, [f"{name}_l{lv + 1}_" for lv in range(FANOUT_LEVELS)],
                               reset_less=True)
        a1 = [tree(a0[i], N, f"a_{i}") for i in range(R)]
        b1 = [tree(b0[j], R, f"b_{j}") for j in range(N)]

        # the flags' fan-out tree: a delay line until the multipliers' input stage,
        # then one copy per row, then one per PE. The copies have no reset (a reset
        # net reaching every PE across the die was the 16 x 16's critical path): they
        # steer only the accumulators and the bank, which a tile's own first and last
        # beats overwrite, while the output's valid (`commit`) comes from the reset
        # delay line itself
        first2, last2 = delayed(m, [first0, last0], FANOUT_LEVELS + MUL_STAGES - 2, ("first", "last"))
        first3 = [Signal(name=f"first_r{i}", attrs=keep, reset_less=True) for i in range(R)]
        last3 = [Signal(name=f"last_r{i}", attrs=keep, reset_less=True) for i in range(R)]
        m.d.sync += [first3[i].eq(first2) for i in range(R)]
        m.d.sync += [last3[i].eq(last2) for i in range(R)]
        first4 = [[Signal(name=f"first_pe{i}_{j}", attrs=keep, reset_less=True) for j in range(N)]
                  for i in range(R)]
        last4 = [[Signal(name=f"last_pe{i}_{j}", attrs=keep, reset_less=True) for j in range(N)]
                 for i in range(R)]
        m.d.sync += [first4[i][j].eq(first3[i]) for i in range(R) for j in range(N)]
        m.d.sync += [last4[i][j].eq(last3[i]) for i in range(R) for j in range(N)]
        # stage 8's flags: whether the accumulator now holds a finished tile (last4 a
        # cycle later, one per PE), and the drain control's own copy of it
        last5 = [[Signal(name=f"done_pe{i}_{j}", attrs=keep, reset_less=True) for j in range(N)]
                 for i in range(R)]
        m.d.sync += [last5[i][j].eq(last4[i][j]) for i in range(R) for j in range(N)]
        commit, = delayed(m, [last2], 3, ("commit",))

        # stages 3..6: one product per PE, MUL_STAGES registers deep (MULT18X18D
        # with its registers, its twin, or a pipelined fabric multiplier), never held
        prod = [[None] * N for _ in range(R)]
        for i in range(R):
            for j in range(N):
                name = f"pe_{i}_{j}"
                if kinds[i][j] == "dsp" and instances:
                    mul = MULT18X18D(self.a_width, self.b_width)
                elif kinds[i][j] == "dsp":
                    mul = RegisteredMul(self.a_width, self.b_width)
                else:
                    mul = FabricMul(self.a_width, self.b_width)
                m.submodules[name] = mul
                m.d.comb += [mul.a.eq(a1[i][j // FANOUT_GROUP]), mul.b.eq(b1[j][i // FANOUT_GROUP])]
                prod[i][j] = mul.p

        # stage 7: accumulators; stage 8: the output bank (a row shift register, drained
        # on `o`) copies a finished tile from the accumulator registers, so no adder
        # sits between the accumulator and the bank
        acc = [[Signal(signed(W), name=f"acc_{i}_{j}", reset_less=True) for j in range(N)]
               for i in range(R)]
        bank = [[Signal(signed(W), name=f"bank_{i}_{j}", reset_less=True) for j in range(N)]
                for i in range(R)]
        for i in range(R):
            for j in range(N):
                m.d.sync += acc[i][j].eq(Mux(first4[i][j], prod[i][j], acc[i][j] + prod[i][j]))
                # commit the finished tile, else shift up one row
                m.d.sync += bank[i][j].eq(Mux(last5[i][j], acc[i][j],
                                              bank[i + 1][j] if i + 1 < R else 0))

        bank_busy = Signal()
        row = Signal(out_layout(R, N, W).members["row"])
        m.d.comb += [
            o_.valid.eq(bank_busy),
            o_.payload.row.eq(row),
            o_.payload.last.eq(row == R - 1),
        ]
        m.d.comb += [o_.payload.data[j].eq(bank[0][j]) for j in range(N)]
        with m.If(commit):
            m.d.sync += [bank_busy.eq(1), row.eq(0)]
            with m.If(bank_busy & (row != R - 1)):
                m.d.sync += self.overrun.eq(1)
        with m.Elif(bank_busy):
            m.d.sync += row.eq(row + 1)
            with m.If(row == R - 1):
                m.d.sync += [bank_busy.eq(0), row.eq(0)]
        return m


# ----------------------------------------------------------------------------
# the multipliers: two registers deep, one clock enable
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PEMapping:
    """How :class:`PEArray` builds its multipliers, passed as the ``platform``
    attribute ``pe_mapping`` (``amaranth.back.verilog.convert(..., platform=p)``).

    ``dsp``: how many PEs (row-major, first ones) get a DSP multiplier; the rest
    get a pipelined fabric multiplier (:class:`FabricMul`). ``instances``: True
    instantiates the ECP5 ``MULT18X18D`` primitive with its input and output
    registers (for synthesis); False its behavioural twin :class:`RegisteredMul`
    (same registers, same clock enable: what simulation runs). Without a mapping
    (plain simulation or Verilog) every PE is a :class:`RegisteredMul`.
    """

    dsp: int
    instances: bool = True

    def __post_init__(self):
        if not _is_int(self.dsp) or self.dsp < 0:
            raise RTLError(f"PEMapping.dsp must be an integer >= 0, got {self.dsp!r}")
        if not isinstance(self.instances, bool):
            raise RTLError(f"PEMapping.instances must be a bool, got {self.instances!r}")


def pe_kinds(rows: int, cols: int, a_width: int, b_width: int, mapping) -> list[list[str]]:
    """``"dsp"`` or ``"fabric"`` per PE under ``mapping`` (see :class:`PEMapping`);
    operands wider than one MULT18X18D stay behavioural (``"dsp"``: yosys splits them)."""
    budget = rows * cols if mapping is None else mapping.dsp
    if max(a_width, b_width) > DSP_WIDTH:
        budget = rows * cols
    return [["dsp" if i * cols + j < budget else "fabric" for j in range(cols)]
            for i in range(rows)]


def _mul_ports(a_width: int, b_width: int) -> dict:
    return {"a": In(signed(a_width)), "b": In(signed(b_width)),
            "p": Out(signed(a_width + b_width))}


class RegisteredMul(wiring.Component):
    """``p = a * b`` ``MUL_STAGES`` (4) cycles later: ``a``, ``b`` registered
    (stage 1), the product registered (stage 2) and registered twice more (stages 3, 4),
    every cycle (no enable); registers without reset. The behavioural twin of
    :class:`MULT18X18D` (same registers)."""

    def __init__(self, a_width: int, b_width: int):
        self.a_width, self.b_width = a_width, b_width
        super().__init__(_mul_ports(a_width, b_width))

    def elaborate(self, platform):
        m = Module()
        pw = self.a_width + self.b_width
        a1 = Signal(signed(self.a_width), reset_less=True)
        b1 = Signal(signed(self.b_width), reset_less=True)
        p2 = Signal(signed(pw), reset_less=True)
        p3 = Signal(signed(pw), reset_less=True)
        p4 = Signal(signed(pw), reset_less=True)
        m.d.sync += [a1.eq(self.a), b1.eq(self.b), p2.eq(a1 * b1), p3.eq(p2), p4.eq(p3)]
        m.d.comb += self.p.eq(p4)
        return m


class MULT18X18D(wiring.Component):
    """The ECP5 ``MULT18X18D`` primitive, signed x signed, with its input
    registers (``REG_INPUTA/B_CLK``, stage 1) and output register
    (``REG_OUTPUT_CLK``, stage 2) on the ``sync`` clock, CE0 tied high, then
    two fabric registers (stages 3, 4): the route out of the DSP block is not
    part of the accumulator's adder path, and a DSP far from its accumulator
    gets a register at each end of the route; the same four-register pipeline
    as :class:`RegisteredMul`. Operands are sign-extended to 18 bits; ``p`` is the
    low ``a_width + b_width`` bits of the 36-bit product (exact: the product fits). Synthesis only: Amaranth's
    simulator cannot run it (simulation uses :class:`RegisteredMul`)."""

    def __init__(self, a_width: int, b_width: int):
        if max(a_width, b_width) > DSP_WIDTH:
            raise RTLError(f"MULT18X18D operands are at most {DSP_WIDTH} bits, got "
                           f"{a_width} x {b_width}")
        self.a_width, self.b_width = a_width, b_width
        super().__init__(_mul_ports(a_width, b_width))

    def elaborate(self, platform):
        m = Module()
        a18 = Signal(signed(DSP_WIDTH))
        b18 = Signal(signed(DSP_WIDTH))
        p36 = Signal(signed(2 * DSP_WIDTH))
        p3 = Signal(signed(self.a_width + self.b_width), reset_less=True)
        p4 = Signal(signed(self.a_width + self.b_width), reset_less=True)
        m.d.comb += [a18.eq(self.a), b18.eq(self.b), self.p.eq(p4)]
        m.d.sync += [p3.eq(p36[:self.a_width + self.b_width]), p4.eq(p3)]
        ports = {}
        for k in range(DSP_WIDTH):
            ports[f"i_A{k}"] = a18[k]
            ports[f"i_B{k}"] = b18[k]
            ports[f"i_C{k}"] = C(0, 1)
        ports.update({f"o_P{k}": p36[k] for k in range(2 * DSP_WIDTH)})
        for k in range(4):
            ports[f"i_CLK{k}"] = ClockSignal("sync") if k == 0 else C(0, 1)
            ports[f"i_CE{k}"] = C(int(k == 0), 1)
            ports[f"i_RST{k}"] = C(0, 1)
        regs = {f"p_REG_{r}_{x}": v for r in ("INPUTA", "INPUTB", "OUTPUT")
                for x, v in (("CLK", "CLK0"), ("CE", "CE0"), ("RST", "RST0"))}
        m.submodules.dsp = Instance(
            "MULT18X18D", **regs, p_GSR="DISABLED",
            i_SIGNEDA=C(1, 1), i_SIGNEDB=C(1, 1), i_SOURCEA=C(0, 1), i_SOURCEB=C(0, 1),
            **ports)
        return m


class FabricMul(wiring.Component):
    """``p = a * b`` ``MUL_STAGES`` (4) cycles later in logic (no DSP): the
    partial products ``b[k] ? a << k : 0``, the sign bit's subtracted (two's
    complement ``b``: its top bit weighs ``-2**(wb-1)``; a subtraction is one
    carry chain, like an addition), summed by a balanced adder tree whose levels
    are spread over the registered stages; when the tree has fewer levels than
    ``MUL_STAGES`` the first stage registers the operands next to the
    multiplier (then one adder level per stage for 8-bit ``b``; for 4-bit ``b``
    the last stage is a plain register); every stage loads each cycle;
    registers without reset. Same
    ports and timing as :class:`RegisteredMul`. Written without
    ``*`` so synthesis never maps it to a DSP."""

    def __init__(self, a_width: int, b_width: int):
        self.a_width, self.b_width = a_width, b_width
        super().__init__(_mul_ports(a_width, b_width))

    def elaborate(self, platform):
        m = Module()
        pw = self.a_width + self.b_width
        wb = self.b_width
        levels = (wb - 1).bit_length()          # adder-tree depth over wb partial products
        a, b = self.a, self.b
        stages = MUL_STAGES
        if levels < MUL_STAGES:
            # a spare stage: the operands are registered next to the multiplier first,
            # so the route from the fan-out tree's copy ends in a register, not in
            # the partial products and a carry chain
            a, b = (Signal.like(v, name=f"{n}_in", reset_less=True) for v, n in ((self.a, "a"), (self.b, "b")))
            m.d.sync += [a.eq(self.a), b.eq(self.b)]
            stages -= 1
        # (value, subtracted): the sign row is the last term, subtracted where the
        # tree first pairs it (its value is kept positive until then)
        terms = [(Mux(b[k], a, 0) << k, False) for k in range(wb - 1)]
        terms.append((Mux(b[wb - 1], a, 0) << (wb - 1), True))
        if len(terms) == 1:                     # 1-bit b: p = -(b ? a : 0)
            terms = [(-terms[0][0], False)]

        def pair(x, y):
            return (x[0] - y[0] if y[1] else x[0] + y[0], x[1])

        per_stage = [levels // stages + (x < levels % stages) for x in range(stages)]
        vals = terms
        for st, n in enumerate(per_stage, start=MUL_STAGES - stages):
            for _ in range(n):
                vals = [pair(vals[x], vals[x + 1]) if x + 1 < len(vals) else vals[x]
                        for x in range(0, len(vals), 2)]
            regs = [Signal(signed(pw + 1), name=f"s{st + 1}_{x}", reset_less=True)
                    for x in range(len(vals))]
            m.d.sync += [r.eq(v) for r, (v, _) in zip(regs, vals)]
            vals = [(r, neg) for r, (_, neg) in zip(regs, vals)]
        assert not vals[0][1]
        m.d.comb += self.p.eq(vals[0][0])
        return m
