"""Linear-layer engine: ``Y[M x N] = requant(X[M x K] @ W[K x N] + bias)`` on a
:class:`~hwgen.rtl.pe_array.PEArray`, fed from on-chip buffers (``lib.memory``).

Arithmetic
----------
Exactly :func:`hwgen.contract.linear` (what the golden model runs for a
``linear`` node): the integer product of the codes, accumulated without
overflow (the PE accumulators are :func:`hwgen.contract.acc_width` wide for the
operand formats and K), plus the bias codes (the sum is ``acc_width(..., bias_lo,
bias_hi)`` wide: the node's ``acc_bits``), then per column ``n`` the
requantization by ``shift[n] = x_frac + w_frac[n] - out_frac[n]`` with AP_RND
and AP_SAT (:class:`~hwgen.rtl.requant.ShiftRequant`). Per-channel input
formats need nothing here: the quantizer folded them into the weight rows.

Tiling
------
M is tiled by ``rows`` (``MT = ceil(m / rows)`` M-tiles, ``m`` given at run
time, ``1 <= m <= max_m``), N by ``cols`` (``NT = ceil(n / cols)``), K by
blocks of ``block_k`` rows of W (``KB = ceil(k / block_k)``; the last block
has ``k - (KB - 1) * block_k`` rows). Missing rows and columns are zero
padding (nothing is issued for them). For each M-tile, for each N-tile, the
engine streams one PE-array tile: one beat per K row of every *occupied*
weight block of that N-tile (the block-sparsity bitmap: ``(KB, NT)`` 0/1, block
``(kb, nt)`` = rows ``kb*block_k ..`` x columns ``nt*cols ..`` of W, as
:func:`hwgen.prune.linear_bitmap` with ``block_n = cols``; an empty block
issues no beat and costs no cycle). A tile has at least
``min_beats = rows`` beats (:attr:`PEArray.min_tile_gap`: the array's output
bank drains one row per cycle, and the array has no back-pressure): a shorter
tile is completed with beats whose weight row is forced to zero (exact: they
add 0), so tiles follow each other with no gap and the cycle count is a
closed formula.

Buffers (word formats; the host-side packing below is their one definition)
--------------------------------------------------------------------------
``a``      activations, ``MT_max * k`` words of ``ArrayLayout(x code, rows)``:
           word ``mt * k + kk`` = ``x[mt*rows : mt*rows + rows, kk]`` (a column of
           an A tile; rows past ``m`` are zero).
``w``      weights, ``w_blocks * block_k`` words (``w_blocks``: default ``NT * KB``)
           of ``ArrayLayout(w code, cols)``:
           the occupied blocks packed in (N-tile, block) order, each ``block_k``
           words: word ``b * block_k + j`` = row ``kb * block_k + j`` of W,
           columns ``nt*cols .. nt*cols + cols - 1``, of the ``b``-th occupied block.
``ent``    the block list, ``NT * KB + 1`` words: word 0 is the header
           (:attr:`MatmulSpec.ent_header_layout`: ``n_ent``, the number of entries),
           words ``1 .. n_ent`` are entries (:attr:`MatmulSpec.ent_layout`): one
           entry per occupied block in the same order -- ``k0`` = ``kb * block_k``
           (its first K row), ``w0`` = ``b * block_k`` (its first word in ``w``),
           ``len_m1`` = its K rows - 1 -- one ``empty`` entry (other fields 0) for
           an N-tile without any occupied block, ``tile_last`` on an N-tile's last
           entry, ``list_last`` on the final one. (Addresses are precomputed by
           the host, so the issue stage has adders only, no multipliers.)
``bias``   ``NT`` words of ``ArrayLayout(signed(bias_width), cols)``: accumulator codes.
``shift``  ``NT`` words of ``ArrayLayout(unsigned(shift_code_width), cols)``: per-column
           shift *codes* (:func:`hwgen.rtl.requant.shift_code`).
``out``    results, ``MT_max * rows * NT`` words of ``ArrayLayout(out code, cols)``: word
           ``r * NT + nt`` = ``y[r, nt*cols .. nt*cols + cols - 1]`` for rows ``r < m``
           (rows ``>= m`` are not written).

:meth:`MatmulSpec.pack_weights` / :meth:`MatmulSpec.pack_x` build these images
(lists of word integers, element ``e`` of a word at bits ``e*w .. e*w + w - 1``),
:meth:`MatmulSpec.unpack_out` reads the ``out`` image back into codes. The
cocotb bench and the host driver use exactly these.

Loading: every input buffer has a write port on the component (``a_wr``,
``w_wr``, ``ent_wr``, ``bias_wr``, ``shift_wr``: ``addr``, ``data``, ``en``, one
word per cycle, written at the clock edge) for host DMA, used while the engine
is idle; ``out`` has a read port ``o_rd`` (``addr``, ``en``, ``data``
``MatmulSpec.read_latencies["out"]`` cycles later; a buffer's read latency
grows with its size, :func:`hwgen.rtl.buffer.read_latency`). A write port
delays its writes by the same front registers as its buffer's read port, so
``done`` and ``o_rd`` keep their order. For simulation, images can instead be baked in as
initial contents (``MatmulEngine(spec, init={"a": [...], ...})``, which also
lands in the generated Verilog), or set in Amaranth's simulator through
``engine.mem[name]`` (``lib.memory`` ``MemoryData``: ``ctx.set(engine.mem["a"][i], word)``).

Control and timing
------------------
``start`` (in): sampled while ``busy`` is low; the engine latches ``m`` (in,
``1 <= m <= max_m``: 0 runs one M-tile and writes nothing, ``m > max_m`` is
undefined; the host side checks it, :meth:`MatmulSpec.check_m`) and raises
``busy``. ``done`` (out) is high for exactly one cycle when the last result is
in ``out``; ``busy`` falls in that same cycle, and a new ``start`` is accepted
from then on. Counting the
cycle in which ``start`` is sampled as cycle 0, ``done`` is high in cycle
:meth:`MatmulSpec.cycles` ``(m, bitmap)`` =

    ``issue_latency + B - 1 + PEArray.LATENCY + rows - 1 + out_latency``

with ``B = MT * sum_nt max(T(nt), min_beats)`` beats, ``T(nt)`` = the K rows of
N-tile ``nt``'s occupied blocks: the first beat is accepted by the array in
cycle ``issue_latency``, beats follow back to back with no gap, the last
tile's last row leaves the array ``PEArray.LATENCY + rows - 1`` cycles after
its last beat, and the output pipeline takes ``out_latency`` cycles from
there to ``done``. Both latencies are :class:`MatmulSpec` properties computed
from the buffers' read latencies (``L_ent``, ``L_op`` of ``a`` and ``w``,
``L_bs`` of ``bias`` and ``shift``): ``issue_latency = 2 L_ent + 3 + L_op``
and ``out_latency = L_bs + 2 + ShiftRequant.LATENCY + W_out`` (``W_out``:
``out``'s front registers, :attr:`MatmulSpec.out_write_latency`, so that
``done`` still means the last word is in ``out``); 9 and 7 when every buffer
reads in 2 cycles. Dense MiniLM shapes at ``m = 128`` on 16 x 16
reach utilization ``(m*k*n / (rows*cols)) / cycles`` > 0.999.

Pipeline (built for FPGA timing: every buffer is a
:class:`~hwgen.rtl.buffer.Buffer` whose reads end in the block RAM's own
output register, so no block RAM clock-to-out sits in front of logic, an
adder or another memory's address; large buffers add registered, replicated
addresses and a registered bank select):

* entry fetch: cycle 0 reads the header, cycle ``L_ent`` latches ``n_ent``;
  from the next cycle entries ``1 .. n_ent`` (then again from 1: one pass per
  M-tile, counted here, and the fetch stops after the last) are read and pushed into a :attr:`MatmulSpec.fifo_depth`
  (``L_ent + 3``) register FIFO whenever it has room (one read per cycle,
  paced by credit: at most ``fifo_depth`` held or in flight), so the issue
  stage never waits for an entry once the first one is in. The FIFO is a ring
  of ``fifo_depth`` slots, written straight from the read port, and a head
  register loaded from the oldest slot: a pop loads the head, it does not
  shift every slot;
* issue (stage 0): from the FIFO head (registers) the operand addresses
  ``a_base + k0 + kk`` and ``w0 + kk``, the tile flags, padding beats. The
  control reads registers only: whether the FIFO holds an entry, whether
  the beat is the entry's last row (``kk_rem`` counts down) and whether the
  tile has its minimum beats are each kept in a register, so no adder or
  compare sits in front of the pop decision. The stage issues while the FIFO
  holds entries (or the tile pads): it has no run flag and no M-tile count,
  since the fetch stops after the last M-tile's pass;
* idle: the run's counters are loaded in every cycle the engine is idle, under
  a register, so the ``start`` input drives only ``busy``; ``m`` is sampled
  into its own register in the idle cycles (the ``start`` cycle is the last)
  and copied into the row counters (the fetch's passes, the output's rows)
  the cycle after, so the ``m`` input pulls no control register towards it;
* stages 1 .. ``L_op``: the operand reads (the flags ride along); then the PE
  array's input (which is always ready: nothing stalls). Whether a beat's
  weight row is real (not padding, not a bubble) reaches the B operands
  through a tree of kept flag registers, one per column at the end, and
  zeroes that column's word (the array is built with ``zero_bubbles=False``);
  A is never zeroed (its products with a zero row are 0);
* output: PE row (the array presents each row once) -> register (the column
  group's bias and shift words read meanwhile, ``L_bs`` cycles) -> the words
  arrive -> ``acc + bias`` registered -> the three
  :class:`~hwgen.rtl.requant.ShiftRequant` stages -> write into ``out`` ->
  ``done`` the cycle after the last write.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from amaranth import Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import MemoryData, ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from .. import contract as C
from ..fixed import FixedType, bits_for_range
from .buffer import Buffer, read_latency, write_latency
from .pe_array import PEArray, RTLError, _is_int, check_positive
from .pipeline import delayed, fanout_tree
from .requant import ShiftRequant, check_shift_range, shift_code, shift_code_width

#: the requantization modes the engine implements (the quantizer's defaults)
RTL_Q, RTL_O = "AP_RND", "AP_SAT"
#: input buffers in load order, then the output buffer
IN_BUFFERS = ("a", "w", "ent", "bias", "shift")
#: B columns served by one copy at the first level of the weight-row flag's tree
#: (then one copy per column)
W_REAL_GROUP = 4


def _fmt_str(f: FixedType) -> str:
    return f"{'' if f.signed else 'u'}fixed<{f.width},{f.int_bits},{f.q},{f.o}>"


def _check_fmt(name: str, f) -> FixedType:
    if not isinstance(f, FixedType):
        raise RTLError(f"{name} must be a hwgen.fixed.FixedType, got {f!r}")
    return f


def _code_shape(f: FixedType) -> Shape:
    return signed(f.width) if f.signed else unsigned(f.width)


def _bits(n: int) -> int:
    """Bits of an unsigned counter holding 0 .. n."""
    return max(1, int(n).bit_length())


def _pack(layout: data.ArrayLayout, values: np.ndarray) -> list[int]:
    """Words of ``layout`` (an ArrayLayout of integers) from ``values`` shaped
    ``(words, len(layout))``: element ``e`` at bits ``e*w .. e*w + w - 1``."""
    w = Shape.cast(layout.elem_shape).width
    mask = (1 << w) - 1
    words = np.zeros(len(values), dtype=object)
    for e in range(layout.length):
        words |= (values[:, e].astype(np.int64) & mask).astype(object) << (e * w)
    return [int(v) for v in words]


def _unpack(layout: data.ArrayLayout, words) -> np.ndarray:
    """Inverse of :func:`_pack`: ``(words, len(layout))`` int64 codes."""
    shape = Shape.cast(layout.elem_shape)
    w = shape.width
    arr = np.array([int(v) for v in words], dtype=object)
    out = np.zeros((len(arr), layout.length), dtype=np.int64)
    for e in range(layout.length):
        v = ((arr >> (e * w)) & ((1 << w) - 1)).astype(np.int64)
        if shape.signed:
            v = np.where(v >= 1 << (w - 1), v - (1 << w), v)
        out[:, e] = v
    return out


@lru_cache(maxsize=1024)
def _read_latencies(spec: "MatmulSpec") -> dict[str, int]:
    """:attr:`MatmulSpec.read_latencies`, once per spec (specs are frozen and hashable)."""
    own = {b: read_latency(Shape.cast(lay).width, spec.depths[b]) for b, lay in spec.layouts.items()}
    for pair in (("a", "w"), ("bias", "shift")):
        for b in pair:
            own[b] = max(own[p] for p in pair)
    return own


@dataclass(frozen=True)
class MatmulSpec:
    """Every parameter of one :class:`MatmulEngine` and everything derived from
    them: buffer geometry and word layouts, host-side packing, the exact cycle
    count and the manifest. Plain data (no hardware is built), so the host
    driver and the benches use it without elaborating anything.

    ``x_fmt``, ``w_fmt``: operand formats (only width and signedness matter to
    the hardware); ``out_fmt``: output format, q/o must be AP_RND/AP_SAT (its
    fractional bits are carried by the run-time per-column shifts);
    ``bias_lo .. bias_hi``: range of the bias codes (0 .. 0: no bias);
    ``shift_min .. shift_max``: range of the per-column shifts ``x_frac +
    w_frac[n] - out_frac[n]``; ``w_blocks``: capacity of the ``w`` buffer in
    weight blocks (None: every block, ``NT * KB``; fewer stores a block-sparse
    matrix in less memory).
    """

    rows: int
    cols: int
    k: int
    n: int
    max_m: int
    x_fmt: FixedType
    w_fmt: FixedType
    out_fmt: FixedType
    bias_lo: int = 0
    bias_hi: int = 0
    shift_min: int = 0
    shift_max: int = 0
    block_k: int = 16
    name: str = "matmul"
    w_blocks: int | None = None

    def __post_init__(self):
        for p in ("rows", "cols", "k", "n", "max_m", "block_k"):
            check_positive(p, getattr(self, p))
        if self.w_blocks is not None:
            check_positive("w_blocks", self.w_blocks)
            if self.w_blocks > self.nt * self.kb:
                raise RTLError(f"w_blocks must be at most NT * KB = {self.nt * self.kb} (every block "
                               f"of W), got {self.w_blocks}")
        for p in ("x_fmt", "w_fmt", "out_fmt"):
            _check_fmt(p, getattr(self, p))
        if (self.out_fmt.q, self.out_fmt.o) != (RTL_Q, RTL_O):
            raise RTLError(f"out_fmt {_fmt_str(self.out_fmt)} has q={self.out_fmt.q}, "
                           f"o={self.out_fmt.o}; the RTL requantizer implements only "
                           f"q={RTL_Q}, o={RTL_O} (the quantizer's defaults): quantize with those modes")
        for p in ("bias_lo", "bias_hi"):
            if not _is_int(getattr(self, p)):
                raise RTLError(f"{p} must be an integer, got {getattr(self, p)!r}")
        if self.bias_lo > self.bias_hi:
            raise RTLError(f"bias_lo ({self.bias_lo}) must not exceed bias_hi ({self.bias_hi})")
        check_shift_range(self.shift_min, self.shift_max)
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise RTLError(f"name must be an identifier ([A-Za-z_][A-Za-z0-9_]*), got {self.name!r}")
        try:
            self.acc_width
            self.sum_width
        except C.ContractError as e:
            raise RTLError(str(e)) from None

    # -- derived geometry ------------------------------------------------
    @property
    def acc_width(self) -> int:
        """PE accumulator bits (``contract.acc_width`` of the operands over K)."""
        return C.acc_width(self.x_fmt, self.w_fmt, self.k)

    @property
    def sum_width(self) -> int:
        """Bits of accumulator + bias (``contract.acc_width`` with the bias range)."""
        return C.acc_width(self.x_fmt, self.w_fmt, self.k, self.bias_lo, self.bias_hi)

    @property
    def bias_width(self) -> int:
        return bits_for_range(min(self.bias_lo, 0), max(self.bias_hi, 0), True)

    @property
    def t_width(self) -> int:
        return shift_code_width(self.shift_min, self.shift_max)

    @property
    def nt(self) -> int:
        return -(-self.n // self.cols)

    @property
    def kb(self) -> int:
        return -(-self.k // self.block_k)

    @property
    def mt_max(self) -> int:
        return -(-self.max_m // self.rows)

    @property
    def min_beats(self) -> int:
        """Fewest beats per tile (:attr:`PEArray.min_tile_gap`): shorter tiles are padded."""
        return self.rows

    @property
    def w_capacity(self) -> int:
        """Weight blocks the ``w`` buffer holds."""
        return self.nt * self.kb if self.w_blocks is None else self.w_blocks

    def block_len(self, kb: int) -> int:
        """K rows of weight block ``kb``."""
        return min(self.block_k, self.k - kb * self.block_k)

    @property
    def depths(self) -> dict[str, int]:
        return {"a": self.mt_max * self.k, "w": self.w_capacity * self.block_k,
                "ent": self.nt * self.kb + 1, "bias": self.nt, "shift": self.nt,
                "out": self.mt_max * self.rows * self.nt}

    @property
    def layouts(self) -> dict[str, data.Layout]:
        """Word layout of every buffer."""
        return {
            "a": data.ArrayLayout(_code_shape(self.x_fmt), self.rows),
            "w": data.ArrayLayout(_code_shape(self.w_fmt), self.cols),
            "ent": unsigned(max(Shape.cast(self.ent_layout).width,
                                Shape.cast(self.ent_header_layout).width)),
            "bias": data.ArrayLayout(signed(self.bias_width), self.cols),
            "shift": data.ArrayLayout(unsigned(self.t_width), self.cols),
            "out": data.ArrayLayout(_code_shape(self.out_fmt), self.cols),
        }

    @property
    def ent_layout(self) -> data.StructLayout:
        """One block-list entry (module docstring, buffer ``ent``)."""
        return data.StructLayout({
            "k0": unsigned(_bits(self.k - 1)),
            "w0": unsigned(_bits(self.depths["w"] - 1)),
            "len_m1": unsigned(_bits(self.block_k - 1)),
            "empty": 1, "tile_last": 1, "list_last": 1,
        })

    @property
    def ent_header_layout(self) -> data.StructLayout:
        """Word 0 of ``ent``: the number of entries that follow."""
        return data.StructLayout({"n_ent": unsigned(_bits(self.nt * self.kb))})

    def addr_width(self, buf: str) -> int:
        return max(1, (self.depths[buf] - 1).bit_length())

    def members(self) -> dict[str, wiring.Member]:
        """The engine's ports (its ``wiring.Signature`` members)."""
        lay = self.layouts
        mem = {
            "start": In(1), "m": In(_bits(self.max_m)), "busy": Out(1), "done": Out(1),
        }
        for b in IN_BUFFERS:
            mem[f"{b}_wr"] = Out(WritePort.Signature(addr_width=self.addr_width(b), shape=lay[b]))
        mem["o_rd"] = Out(ReadPort.Signature(addr_width=self.addr_width("out"), shape=lay["out"]))
        return mem

    def ports(self) -> dict[str, dict]:
        """Verilog-level ports: ``{name: {"dir": "in"|"out", "width": bits}}``
        (``clk`` and ``rst`` besides); nested members joined by ``__``."""
        out = {}
        for path, member in wiring.Signature(self.members()).members.flatten():
            if member.is_port:
                out["__".join(path)] = {"dir": "in" if member.flow == wiring.In else "out",
                                        "width": Shape.cast(member.shape).width}
        return out

    # -- cycles ----------------------------------------------------------
    def _bitmap(self, bitmap) -> np.ndarray:
        """The bitmap as (NT, KB) bools (the argument is (KB, NT), like W)."""
        if bitmap is None:
            return np.ones((self.nt, self.kb), dtype=bool)
        b = np.asarray(bitmap)
        if (b.shape != (self.kb, self.nt) or not (b.dtype == bool or np.issubdtype(b.dtype, np.integer))
                or not np.isin(b, (0, 1)).all()):
            raise RTLError(f"bitmap must be a 0/1 array of shape (KB, NT) = ({self.kb}, {self.nt}) "
                           f"(blocks of block_k={self.block_k} rows x cols={self.cols} columns of W), "
                           f"got {b.dtype} {tuple(b.shape)}")
        return b.astype(bool).T

    def check_m(self, m) -> int:
        if not _is_int(m) or not 1 <= m <= self.max_m:
            raise RTLError(f"m must be an integer in 1..max_m={self.max_m}, got {m!r}")
        return m

    def tile_beats(self, bitmap=None) -> list[int]:
        """Beats of each N-tile's PE-array tile (occupied K rows, at least ``min_beats``)."""
        b = self._bitmap(bitmap)
        lens = np.array([self.block_len(kb) for kb in range(self.kb)])
        return [max(int(lens[b[t]].sum()), self.min_beats) for t in range(self.nt)]

    def beats(self, m: int, bitmap=None) -> int:
        return -(-self.check_m(m) // self.rows) * sum(self.tile_beats(bitmap))

    # -- the schedule, from the buffers' read latencies -------------------
    @property
    def read_latencies(self) -> dict[str, int]:
        """Read latency of each buffer (:func:`hwgen.rtl.buffer.read_latency` of its
        size); buffers read in lockstep share one: ``a`` and ``w`` (the operands),
        ``bias`` and ``shift`` (the output stage) take the larger of the pair.
        ``out``'s is the host's ``o_rd`` latency. Computed once per spec (every
        cycle count and every latency below reads it); a fresh dict each call."""
        return dict(_read_latencies(self))

    @property
    def out_write_latency(self) -> int:
        """Cycles from a result presented on ``out``'s write port to the word in
        ``out`` (its front registers); ``done`` waits for them."""
        lay = self.layouts["out"]
        return write_latency(Shape.cast(lay).width, self.depths["out"], self.read_latencies["out"])

    @property
    def fifo_depth(self) -> int:
        """Block-list entries held in registers or in flight: the fetch latency
        plus 3 (the slot, the head, the pop) covers the credit loop, so the issue
        stage never waits for an entry."""
        return self.read_latencies["ent"] + 3

    @property
    def issue_latency(self) -> int:
        """Cycles from ``start`` to the first beat the PE array accepts: the header
        read, ``n_ent`` latched, the first entry's fetch, its FIFO slot, the FIFO
        head, the operand reads."""
        lat = self.read_latencies
        return 2 * lat["ent"] + 3 + lat["a"]

    @property
    def out_latency(self) -> int:
        """Cycles from the last result row leaving the PE array to ``done``: the
        row register, the bias/shift read, ``acc + bias``, the requantizer, the
        write (through ``out``'s front registers), ``done``."""
        return 1 + self.read_latencies["bias"] + 1 + ShiftRequant.LATENCY + self.out_write_latency

    def cycles(self, m: int, bitmap=None) -> int:
        """Exact cycles from ``start`` to ``done`` (module docstring)."""
        return (self.issue_latency + self.beats(m, bitmap) - 1 + PEArray.LATENCY + self.rows - 1
                + self.out_latency)

    def ideal_cycles(self, m: int) -> float:
        """Dense MACs over PEs: the physical limit."""
        return self.check_m(m) * self.k * self.n / (self.rows * self.cols)

    def manifest(self, m: int, bitmap=None) -> dict:
        """JSON-able description of the kernel for a run with ``m`` rows."""
        cyc = self.cycles(m, bitmap)
        ideal = self.ideal_cycles(m)
        lay = self.layouts
        bm = self._bitmap(bitmap)
        return {
            "kernel": self.name,
            "op": "linear",
            "engine": "MatmulEngine",
            "parameters": {"rows": self.rows, "cols": self.cols, "k": self.k, "n": self.n,
                           "max_m": self.max_m, "block_k": self.block_k,
                           "w_blocks": self.w_capacity,
                           "min_beats": self.min_beats, "pe_latency": PEArray.LATENCY,
                           "issue_latency": self.issue_latency, "out_latency": self.out_latency,
                           "read_latencies": self.read_latencies},
            "formats": {"x": self.x_fmt.to_dict(), "w": self.w_fmt.to_dict(),
                        "out": self.out_fmt.to_dict(), "acc_width": self.acc_width,
                        "sum_width": self.sum_width, "bias_width": self.bias_width,
                        "bias_range": [self.bias_lo, self.bias_hi],
                        "shift_range": [self.shift_min, self.shift_max],
                        "shift_code_width": self.t_width},
            "ports": self.ports(),
            "buffers": {b: {"depth": self.depths[b], "width": Shape.cast(lay[b]).width,
                            "addr_width": self.addr_width(b)} for b in (*IN_BUFFERS, "out")},
            "m": m,
            "shape": [m, self.k, self.n],
            "blocks": {"occupied": int(bm.sum()), "total": int(bm.size)},
            "macs": m * self.k * self.n,
            "cycles": cyc,
            "ideal_cycles": ideal,
            "utilization": ideal / cyc,
        }

    # -- host-side packing (the one definition of every memory image) ----
    def occupancy(self, w) -> np.ndarray:
        """The bitmap (KB x NT bools) of ``w``'s blocks that hold a non-zero code
        (:func:`hwgen.prune.block_bitmap` with ``block_n = cols``)."""
        wp = np.zeros((self.kb * self.block_k, self.nt * self.cols), dtype=np.int64)
        wp[:self.k, :self.n] = self._check_codes("w", w, (self.k, self.n), self.w_fmt)
        return (wp.reshape(self.kb, self.block_k, self.nt, self.cols) != 0).any(axis=(1, 3))

    def _check_codes(self, what, v, shape, fmt: FixedType | None = None, lo=None, hi=None):
        a = np.asarray(v)
        if a.shape != shape or not np.issubdtype(a.dtype, np.integer):
            raise RTLError(f"{what} must be an integer array of shape {shape}, got {a.dtype} {tuple(a.shape)}")
        a = a.astype(np.int64)
        if fmt is not None:
            lo, hi = fmt.min_code, fmt.max_code
        if a.size and (a.min() < lo or a.max() > hi):
            raise RTLError(f"{what} codes must lie in {lo}..{hi}, got {int(a.min())}..{int(a.max())}")
        return a

    def pack_weights(self, w, bias=None, shift=None, bitmap=None) -> dict[str, list[int]]:
        """Images of ``w``, ``ent``, ``bias`` and ``shift`` from weight codes
        ``w`` (k x n), bias codes (n,) in ``bias_lo .. bias_hi`` (None: 0), the
        per-column shifts (n,) in ``shift_min .. shift_max`` (None: 0) and the
        block bitmap (None: every block occupied). A block marked empty must
        hold only zeros (its codes would be dropped)."""
        w = self._check_codes("w", w, (self.k, self.n), self.w_fmt)
        bias = np.zeros(self.n, np.int64) if bias is None else bias
        bias = self._check_codes("bias", bias, (self.n,), lo=self.bias_lo, hi=self.bias_hi)
        shift = np.zeros(self.n, np.int64) if shift is None else shift
        shift = self._check_codes("shift", shift, (self.n,), lo=self.shift_min, hi=self.shift_max)
        bm = self._bitmap(bitmap)
        lost = self.occupancy(w).T & ~bm
        if lost.any():
            nt, kb = (int(v) for v in np.argwhere(lost)[0])
            raise RTLError(f"bitmap marks weight block (nt={nt}, kb={kb}) empty but it holds "
                           f"non-zero codes; use occupancy(w) or zero the block")
        if int(bm.sum()) > self.w_capacity:
            raise RTLError(f"the bitmap has {int(bm.sum())} occupied weight blocks; the w buffer "
                           f"holds w_blocks={self.w_capacity}")
        bk, cols = self.block_k, self.cols
        wp = np.zeros((self.kb * bk, self.nt * cols), dtype=np.int64)
        wp[:self.k, :self.n] = w
        wimg = np.zeros((self.depths["w"], cols), dtype=np.int64)
        ents, nw = [], 0   # entries (k0, w0, len_m1, empty, tile_last, list_last); occupied blocks
        for t in range(self.nt):
            kbs = np.flatnonzero(bm[t])
            if not len(kbs):
                ents.append((0, 0, 0, 1, 1, 0))
            for i, kb in enumerate(kbs):
                wimg[nw * bk:(nw + 1) * bk] = wp[kb * bk:(kb + 1) * bk, t * cols:(t + 1) * cols]
                ents.append((int(kb) * bk, nw * bk, self.block_len(int(kb)) - 1, 0,
                             int(i == len(kbs) - 1), 0))
                nw += 1
        ents[-1] = ents[-1][:5] + (1,)
        lay = self.ent_layout
        ent_words = [len(ents) << self.ent_header_layout["n_ent"].offset]
        for e in ents:
            word = 0
            for name, v in zip(("k0", "w0", "len_m1", "empty", "tile_last", "list_last"), e):
                word |= int(v) << lay[name].offset
            ent_words.append(word)
        pad_n = self.nt * cols - self.n
        codes = shift_code(np.concatenate([shift, np.full(pad_n, self.shift_min, np.int64)]), self.shift_min)
        lays = self.layouts
        return {
            "w": _pack(lays["w"], wimg[:nw * bk]),
            "ent": ent_words,
            "bias": _pack(lays["bias"], np.concatenate([bias, np.zeros(pad_n, np.int64)]).reshape(self.nt, cols)),
            "shift": _pack(lays["shift"], codes.reshape(self.nt, cols)),
        }

    def pack_x(self, x) -> list[int]:
        """Image of ``a`` (the first ``ceil(m / rows) * k`` words) from the
        activation codes ``x`` (m x k, 1 <= m <= max_m)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.k:
            raise RTLError(f"x must be an integer array of shape (m, {self.k}), got {x.dtype} {tuple(x.shape)}")
        m = self.check_m(int(x.shape[0]))
        x = self._check_codes("x", x, x.shape, self.x_fmt)
        mt = -(-m // self.rows)
        xp = np.zeros((mt * self.rows, self.k), dtype=np.int64)
        xp[:m] = x
        # word mt*k + kk = column kk of M-tile mt
        cols = xp.reshape(mt, self.rows, self.k).transpose(0, 2, 1).reshape(mt * self.k, self.rows)
        return _pack(self.layouts["a"], cols)

    def unpack_out(self, words, m: int) -> np.ndarray:
        """Output codes ``y`` (m x n) from the ``out`` image (at least ``m * NT`` words)."""
        self.check_m(m)
        if len(words) < m * self.nt:
            raise RTLError(f"the out image needs at least m * NT = {m * self.nt} words, got {len(words)}")
        y = _unpack(self.layouts["out"], list(words)[:m * self.nt])
        return y.reshape(m, self.nt * self.cols)[:, :self.n]

    def reference(self, x, w, bias=None, shift=None) -> np.ndarray:
        """What the engine computes, by the contract (software, for checks)."""
        x = np.asarray(x, dtype=np.int64)
        acc = C.matmul_int(x, np.asarray(w, dtype=np.int64), 1 << 62)
        if bias is not None:
            acc = acc + np.asarray(bias, dtype=np.int64)
        s = np.zeros(self.n, np.int64) if shift is None else np.asarray(shift, dtype=np.int64)
        return C.requant(acc, s, self.out_fmt, 0)

    # -- from a graph ----------------------------------------------------
    @classmethod
    def for_linear(cls, graph, node, rows: int = 16, cols: int = 16, max_m: int = 128,
                   block_k: int = 16, w_blocks: int | None = None) -> "MatmulSpec":
        """The spec of a fixed graph's ``linear`` node (a Node or its name)."""
        node, ops = linear_operands(graph, node)
        w, bias, shift = ops["w"], ops["bias"], ops["shift"]
        g = graph
        return cls(rows=rows, cols=cols, k=int(w.shape[0]), n=int(w.shape[1]), max_m=max_m,
                   x_fmt=g.tensors[node.inputs[0]].fmt, w_fmt=g.tensors[node.inputs[1]].fmt,
                   out_fmt=g.tensors[node.outputs[0]].fmt,
                   bias_lo=int(min(bias.min(), 0)), bias_hi=int(max(bias.max(), 0)),
                   shift_min=int(shift.min()), shift_max=int(shift.max()), block_k=block_k,
                   name=_identifier(node.name), w_blocks=w_blocks)


def _identifier(name: str) -> str:
    s = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return s if s and not s[0].isdigit() else "k_" + s


def linear_operands(graph, node) -> tuple:
    """``(node, {"w": codes (k, n), "bias": codes (n,), "shift": (n,)})`` of a
    fixed graph's ``linear`` node: the weight and bias codes as stored and the
    per-column requantization shift ``x_frac + w_frac[n] - out_frac[n]`` (x at
    its finest channel, as :func:`hwgen.golden._linear`). Raises
    :class:`RTLError` for anything the engine cannot run."""
    from ..ir import GraphError
    if isinstance(node, str):
        try:
            node = graph.node(node)
        except GraphError as e:
            raise RTLError(str(e)) from None
    where = f"node '{node.name}'"
    if node.op != "linear":
        raise RTLError(f"{where}: op '{node.op}' is not a linear; the matmul engine runs linear nodes")
    if not graph.is_fixed:
        raise RTLError(f"graph '{graph.name}' is a float graph; quantize it first (`hwgen quantize`)")
    xt, wt, yt = graph.tensors[node.inputs[0]], graph.tensors[node.inputs[1]], graph.tensors[node.outputs[0]]
    for t in (xt, wt, yt):
        if t.fmt is None:
            raise RTLError(f"{where}: tensor '{t.name}' has no fixed-point format")
    if (yt.fmt.q, yt.fmt.o) != (RTL_Q, RTL_O):
        raise RTLError(f"{where}: output '{yt.name}' has format {_fmt_str(yt.fmt)} (q={yt.fmt.q}, "
                       f"o={yt.fmt.o}); the RTL requantizer implements only q={RTL_Q}, o={RTL_O}: "
                       "quantize with those modes")
    w = np.asarray(graph.weights[node.inputs[1]]).astype(np.int64)
    if w.ndim != 2:
        raise RTLError(f"{where}: weight '{wt.name}' has shape {list(w.shape)}, expected (K, N)")
    k, n = w.shape
    bname = graph.node_input(node, "bias")
    bias = (np.asarray(graph.weights[bname]).astype(np.int64).reshape(-1) if bname
            else np.zeros(n, np.int64))
    if bias.size != n:
        raise RTLError(f"{where}: bias '{bname}' has {bias.size} entries for {n} columns")

    def per_col(frac, what):
        a = np.asarray(frac, dtype=np.int64).reshape(-1)
        if a.size not in (1, n):
            raise RTLError(f"{where}: {what} has {a.size} per-channel formats for {n} columns")
        return np.broadcast_to(a, (n,))

    x_frac = int(np.max(np.asarray(xt.frac_bits())))
    shift = x_frac + per_col(wt.frac_bits(), f"weight '{wt.name}'") - per_col(yt.frac_bits(), f"output '{yt.name}'")
    return node, {"w": w, "bias": bias, "shift": np.ascontiguousarray(shift, dtype=np.int64)}


class MatmulEngine(wiring.Component):
    """The linear-layer engine of a :class:`MatmulSpec` (module docstring: the
    arithmetic, buffers and word formats, control protocol and exact timing).

    Ports (``spec.ports()`` lists them flat, as in the Verilog):
    ``start`` in 1, ``m`` in, ``busy`` out 1, ``done`` out 1;
    ``a_wr``, ``w_wr``, ``ent_wr``, ``bias_wr``, ``shift_wr``: write ports
    (``lib.memory.WritePort.Signature``: ``addr``, ``data`` (the word layout),
    ``en``), all inputs; ``o_rd``: read port of ``out`` (``addr``, ``en`` in;
    ``data`` out, ``spec.read_latencies["out"]`` cycles after ``addr``).

    ``init``: optional ``{buffer: [word, ...]}`` initial contents (the packed
    images; shorter lists are zero-filled); ``engine.mem[buffer]`` is each
    buffer's ``MemoryData``.
    """

    def __init__(self, spec: MatmulSpec, *, init: dict | None = None):
        try:
            if not isinstance(spec, MatmulSpec):
                raise RTLError(f"spec must be a MatmulSpec, got {spec!r}")
            init = {} if init is None else init
            if not isinstance(init, dict) or set(init) - set((*IN_BUFFERS, "out")):
                raise RTLError(f"init must be a dict with keys among {', '.join((*IN_BUFFERS, 'out'))}, "
                               f"got {init!r:.80}")
            for b, words in init.items():
                if len(words) > spec.depths[b]:
                    raise RTLError(f"init['{b}'] has {len(words)} words; the buffer holds {spec.depths[b]}")
        except RTLError:
            self._MustUse__silence = True  # never built: no "unused elaboratable" warning
            raise
        self.spec = spec
        self.mem = {}
        for b in (*IN_BUFFERS, "out"):
            width = Shape.cast(spec.layouts[b]).width
            self.mem[b] = MemoryData(shape=unsigned(width), depth=spec.depths[b],
                                     init=[int(v) for v in init.get(b, [])])
        super().__init__(spec.members())

    @classmethod
    def for_linear(cls, graph, node, rows: int = 16, cols: int = 16, max_m: int = 128,
                   block_k: int = 16, w_blocks: int | None = None,
                   init: dict | None = None) -> "MatmulEngine":
        """An engine for a fixed graph's ``linear`` node (see :meth:`MatmulSpec.for_linear`)."""
        return cls(MatmulSpec.for_linear(graph, node, rows, cols, max_m, block_k, w_blocks), init=init)

    def cycles(self, m: int, bitmap=None) -> int:
        return self.spec.cycles(m, bitmap)

    def manifest(self, m: int, bitmap=None) -> dict:
        return self.spec.manifest(m, bitmap)

    def elaborate(self, platform):
        m = Module()
        s = self.spec
        R, N = s.rows, s.cols
        lay = s.layouts

        bufs = {}
        for b in (*IN_BUFFERS, "out"):
            m.submodules[f"mem_{b}"] = bufs[b] = Buffer(lay[b], self.mem[b], s.read_latencies[b])
        for b in IN_BUFFERS:  # host write ports
            wiring.connect(m, wiring.flipped(getattr(self, f"{b}_wr")), bufs[b].wr)
        wiring.connect(m, wiring.flipped(self.o_rd), bufs["out"].rd)

        m.submodules.pe = pe = PEArray.for_formats(R, N, s.x_fmt, s.w_fmt, s.k, zero_bubbles=False)

        # ---- control ---------------------------------------------------------
        busy = Signal()
        start = Signal()
        done = Signal()
        m.d.comb += [self.busy.eq(busy & ~done), start.eq(self.start & ~self.busy)]

        # ---- entry fetch: block list -> a FIFO of registers ----------------------
        # Word 0 of `ent` is the header (the entry count E); entries 1..E are read in
        # a loop, one pass per M-tile, paced by FIFO credit only; the fetch stops after
        # the last M-tile's pass, so the FIFO holds exactly the entries still to issue
        # and the issue stage needs no run flag of its own. Every buffer read ends in registers (the
        # block RAM's own output register and more: hwgen.rtl.buffer): nothing read
        # from a memory reaches logic before it has passed a register.
        ent_rd = bufs["ent"].rd
        lat_e, depth = s.read_latencies["ent"], s.fifo_depth
        ent_w = Shape.cast(s.ent_layout).width
        hdr = data.View(s.ent_header_layout, ent_rd.data[:Shape.cast(s.ent_header_layout).width])
        n_ent = Signal(s.ent_header_layout.members["n_ent"])
        hdr_pipe = [Signal(name=f"hdr{i}") for i in range(lat_e)]  # the header read under way
        fetching = Signal()
        f_left = Signal(range(s.mt_max * R + 1))  # m - the fetched pass's first row
        f_last = Signal()                         # registered: f_left <= R (the last pass)
        ptr = Signal(ent_rd.addr.shape())
        inflight = [Signal(name=f"fetch{i}") for i in range(lat_e)]  # fetches 1 .. lat_e cycles ago
        held = Signal(range(depth + 1))       # entries held or in flight, kept by a register
        fetch = Signal()
        pop = Signal()
        arrive = inflight[-1]                 # the entry fetched lat_e cycles ago is on the port
        m.d.comb += [
            fetch.eq(fetching & (held < depth)),
            ent_rd.addr.eq(Mux(fetching, ptr, 0)),
        ]
        m.d.sync += [q.eq(d) for q, d in zip(inflight, [fetch] + inflight[:-1])]
        with m.If(fetch):
            with m.If(ptr == n_ent):          # the M-tile's pass ends
                m.d.sync += [ptr.eq(1), f_left.eq(f_left - R), f_last.eq(f_left <= 2 * R)]
                with m.If(f_last):
                    m.d.sync += fetching.eq(0)
            with m.Else():
                m.d.sync += ptr.eq(ptr + 1)
        m.d.sync += [q.eq(d) for q, d in zip(hdr_pipe, [start] + hdr_pipe[:-1])]
        with m.If(hdr_pipe[-1]):              # the header is on the read port
            m.d.sync += [n_ent.eq(hdr.n_ent), fetching.eq(1)]
        # The FIFO: a ring of depth slots that the arriving entries are written into
        # (straight from the read port's register into a slot: no logic after the block
        # RAM), and the head entry (what the issue stage reads) in its own register,
        # loaded from the oldest slot on a pop or when it is empty; so a pop drives the
        # head's register, not every slot.
        # entry words are data (no reset): the counters below say which are held
        head = Signal(ent_w, name="ent_head", reset_less=True)
        slots = [Signal(ent_w, name=f"ent_q{i}", reset_less=True) for i in range(depth)]
        # the read pointer twice: one selects the head's word, a kept copy selects the
        # fields the operand-row registers load (k0, w0, len_m1), so neither slot
        # multiplexer is spread over both sets of registers
        rp = Signal(range(depth))
        rp_rows = Signal(range(depth), attrs={"keep": 1})
        wp = Signal(range(depth))
        ring = Signal(range(depth + 1))       # entries in the slots
        ring_any = Signal()                   # registered: ring != 0
        nonempty = Signal()                   # registered: the head holds an entry

        def oldest_slot(sel, name):
            word = Signal(ent_w, name=name)
            with m.Switch(sel):               # every case listed: no latch, no lint warning
                for i in range(depth - 1):
                    with m.Case(i):
                        m.d.comb += word.eq(slots[i])
                with m.Default():
                    m.d.comb += word.eq(slots[depth - 1])
            return word
        oldest = oldest_slot(rp, "oldest")
        for i in range(depth):
            with m.If(arrive & (wp == i)):
                m.d.sync += slots[i].eq(ent_rd.data[:ent_w])
        with m.If(arrive):
            m.d.sync += wp.eq(Mux(wp == depth - 1, 0, wp + 1))
        load = Signal()                       # the oldest slot moves into the head
        m.d.comb += load.eq((pop | ~nonempty) & ring_any)
        with m.If(load):
            m.d.sync += [head.eq(oldest), rp.eq(Mux(rp == depth - 1, 0, rp + 1)),
                         rp_rows.eq(Mux(rp_rows == depth - 1, 0, rp_rows + 1))]
        m.d.sync += [ring.eq(ring + arrive - load), ring_any.eq(Mux(load, ring > 1, ring != 0) | arrive),
                     nonempty.eq(load | (nonempty & ~pop)), held.eq(held + fetch - pop)]

        # ---- issue stage (stage 0): FIFO head entry -> operand addresses ---------
        a_rd = bufs["a"].rd
        w_rd = bufs["w"].rd
        e = data.View(s.ent_layout, head)
        kk_rem = Signal(range(s.block_k))     # the entry's beats after this one
        kk_last = Signal()                    # registered: kk_rem == 0 (the entry's last beat)
        tcnt = Signal(range(s.min_beats + 1))   # beats of this tile so far (saturating)
        tcnt_ok = Signal(init=s.min_beats <= 1)  # registered: tcnt + 1 >= min_beats
        pad = Signal()                        # padding beats after the tile's last block
        sweep_end = Signal()                  # the tile being padded is the list's last
        a_base = Signal(range(s.mt_max * s.k + 1))

        go = Signal()                         # a beat is issued: the FIFO's entries run dry
        m.d.comb += go.eq(pad | nonempty)     # after the last M-tile (the fetch stops)

        real = Signal()
        entry_end = Signal()
        tile_end = Signal()
        list_end = Signal()
        m.d.comb += [
            real.eq(~pad & ~e.empty),
            entry_end.eq(real & kk_last),
            tile_end.eq(Mux(real, entry_end & e.tile_last, 1) & tcnt_ok),
            list_end.eq(Mux(pad, sweep_end, e.list_last)),
            pop.eq(go & (entry_end | (~pad & e.empty & tile_end))),
        ]
        # The operand addresses: e.k0 + kk and e.w0 + kk kept in registers (a new head
        # loads its first row, each beat adds 1), so no adder sits between the control
        # and a buffer; the a address adds the M-tile's base, register to register.
        a_off = Signal(range(s.k + 1))
        w_addr = Signal(w_rd.addr.shape())
        nh = data.View(s.ent_layout, oldest_slot(rp_rows, "oldest_rows"))
        m.d.comb += [a_rd.addr.eq(a_base + a_off), w_rd.addr.eq(w_addr)]
        # kk_rem and kk_last follow them: a new head (loaded from the ring) has len_m1
        # beats after its first, and each beat counts one down
        with m.If(load):
            m.d.sync += [a_off.eq(nh.k0), w_addr.eq(nh.w0), kk_rem.eq(nh.len_m1),
                         kk_last.eq(nh.len_m1 == 0)]
        with m.Elif(go & real):
            m.d.sync += [a_off.eq(a_off + 1), w_addr.eq(w_addr + 1), kk_rem.eq(kk_rem - 1),
                         kk_last.eq(kk_rem == 1)]
        with m.If(go):
            with m.If(tile_end):
                m.d.sync += [tcnt.eq(0), tcnt_ok.eq(s.min_beats <= 1)]
            with m.Elif(tcnt != s.min_beats):
                m.d.sync += [tcnt.eq(tcnt + 1), tcnt_ok.eq(tcnt + 2 >= s.min_beats)]
            with m.If(entry_end & e.tile_last & ~tile_end):
                m.d.sync += [pad.eq(1), sweep_end.eq(e.list_last)]
            with m.If(tile_end):
                m.d.sync += pad.eq(0)
                with m.If(list_end):
                    m.d.sync += a_base.eq(a_base + s.k)
        # stages 1 .. lat_op: the operand reads; the beat's flags ride along
        lat_op = s.read_latencies["a"]
        op_valid, op_first, op_last = delayed(
            m, [go, tcnt == 0, tile_end], lat_op, ("valid", "first", "last"))
        # whether the beat's weight row is real (not a padding beat, not a bubble) reaches
        # the B operands through a tree of kept register copies, one per column at the
        # end, so no single register drives every B bit across the array
        # (no reset: a stale flag in the cycles after a reset only feeds the
        # accumulators before any tile's first beat, which overwrites them)
        w_real, = delayed(m, [go & real], lat_op - 2, ("w_real",), reset_less=True)
        w_real_c = fanout_tree(m, w_real, N, [W_REAL_GROUP, 1], ["w_real_g", "w_real_c"], reset_less=True)

        # ---- the operand words -> PE array -----------------------------------
        av, wv = a_rd.data, w_rd.data
        m.d.comb += [pe.i.valid.eq(op_valid), pe.i.payload.first.eq(op_first),
                     pe.i.payload.last.eq(op_last)]
        # a padding beat or a bubble zeroes its weight row only: its products are 0
        # whatever A holds
        m.d.comb += [pe.i.payload.a[r].eq(av[r]) for r in range(R)]
        m.d.comb += [pe.i.payload.b[c].eq(Mux(w_real_c[c], wv[c], 0)) for c in range(N)]

        # ---- output side: PE rows -> + bias -> requant -> out buffer -------------
        out_nt = Signal(range(max(s.nt, 2)))
        out_nt_last = Signal(init=s.nt == 1)         # registered: out_nt == NT - 1
        out_left = Signal(range(s.mt_max * R + 1))  # m - the draining M-tile's first row
        out_last = Signal()                          # ... <= R: it is the last M-tile
        bias_rd = bufs["bias"].rd
        shift_rd = bufs["shift"].rd
        m.d.comb += [bias_rd.addr.eq(out_nt), shift_rd.addr.eq(out_nt)]
        fin = Signal()
        m.d.comb += fin.eq(pe.o.payload.last & out_nt_last & out_last)
        # out address of the draining tile's row 0, (m - out_left) * NT + out_nt, kept by
        # additions (no multiplier on the way to the out buffer's address)
        tile_base = Signal(range((s.mt_max + 1) * R * s.nt + 1))
        with m.If(pe.o.valid & pe.o.payload.last):
            with m.If(out_nt_last):
                m.d.sync += [out_nt.eq(0), out_nt_last.eq(s.nt == 1), out_left.eq(out_left - R),
                             out_last.eq(out_left <= 2 * R),
                             tile_base.eq(tile_base + (R * s.nt - (s.nt - 1)))]
            with m.Else():
                m.d.sync += [out_nt.eq(out_nt + 1), out_nt_last.eq(out_nt + 2 == s.nt),
                             tile_base.eq(tile_base + 1)]

        # stage R1: accumulator row, whether it is a row < m, and its out address (rows
        # drain in order, row 0 first: each row's address is the previous one's + NT).
        # Only the valid and done flags are reset; rows and addresses are data
        v1, fin1, ok1 = Signal(), Signal(), Signal()
        addr1 = Signal(range((s.mt_max + 1) * R * s.nt + 1), reset_less=True)
        acc1 = Signal(pe.o.payload.data.shape(), reset_less=True)
        m.d.sync += [v1.eq(pe.o.valid), fin1.eq(pe.o.valid & fin), ok1.eq(pe.o.payload.row < out_left),
                     acc1.eq(pe.o.payload.data)]
        with m.If(pe.o.valid):
            m.d.sync += addr1.eq(Mux(pe.o.payload.row == 0, tile_base, addr1 + s.nt))
        # stage R2: the row's out address; then the row waits for its bias/shift
        # words (read_latencies["bias"] cycles after the address, which is out_nt)
        v2, fin2 = Signal(), Signal()
        addr2 = Signal(bufs["out"].wr.addr.shape(), reset_less=True)
        acc2 = Signal.like(acc1)
        m.d.sync += [v2.eq(v1 & ok1), fin2.eq(fin1), addr2.eq(addr1),
                     acc2.eq(acc1)]
        v2, fin2 = delayed(m, [v2, fin2], s.read_latencies["bias"] - 2, ("v_w", "fin_w"))
        addr2, acc2 = delayed(m, [addr2, acc2], s.read_latencies["bias"] - 2, ("addr_w", "acc_w"),
                              reset_less=True)
        bv, tv = bias_rd.data, shift_rd.data
        # stage R3: sum = acc + bias, shift codes -> ShiftRequant
        m.submodules.rq = rq = ShiftRequant(s.sum_width, s.shift_min, s.shift_max,
                                            s.out_fmt.width, s.out_fmt.signed, lanes=N)
        v3, fin3 = Signal(), Signal()
        addr3 = Signal.like(addr2)
        m.d.sync += [v3.eq(v2), fin3.eq(fin2), addr3.eq(addr2)]
        rq_in = Signal.like(rq.i, name="rq_in", reset_less=True)
        m.d.comb += rq.i.eq(rq_in)
        for c in range(N):
            m.d.sync += [rq_in.c[c].eq(acc2[c] + bv[c]), rq_in.t[c].eq(tv[c])]
        # ShiftRequant stages (R3, R4): valid/address ride alongside
        vq, finq = delayed(m, [v3, fin3], ShiftRequant.LATENCY, ("v_q", "fin_q"))
        addrq, = delayed(m, [addr3], ShiftRequant.LATENCY, ("addr_q",), reset_less=True)
        ow = bufs["out"].wr
        m.d.comb += [ow.en.eq(vq), ow.addr.eq(addrq), ow.data.eq(rq.o.as_value())]
        # the last word through out's front registers, then done
        fin_o, = delayed(m, [finq], s.out_write_latency, ("fin_o",))
        m.d.sync += done.eq(fin_o)
        m.d.comb += self.done.eq(done)

        # ---- start / done (a start in the done cycle is taken) ------------------
        # The run's state is loaded in every idle cycle under `idle`: a register, not the
        # start input, drives those hundred-odd registers' loads.
        idle = Signal(init=1)
        m.d.sync += idle.eq((~start & ~self.busy) | fin_o)
        with m.If(done):
            m.d.sync += busy.eq(0)
        with m.If(start):   # the header is read in this cycle (port address 0)
            m.d.sync += busy.eq(1)
        # m is sampled into its own register (in the start cycle: the last idle one) and
        # copied into the row counters the cycle after, which are first read far later;
        # so the m input pulls no control register towards it
        m_q = Signal.like(self.m)
        with m.If(hdr_pipe[0]):
            m.d.sync += [f_left.eq(m_q), f_last.eq(m_q <= R), out_left.eq(m_q), out_last.eq(m_q <= R)]
        with m.If(idle):
            m.d.sync += [a_base.eq(0), m_q.eq(self.m),
                         out_nt.eq(0), out_nt_last.eq(s.nt == 1), tile_base.eq(0), tcnt.eq(0),
                         tcnt_ok.eq(s.min_beats <= 1), pad.eq(0),
                         fetching.eq(0), ptr.eq(1), held.eq(0), nonempty.eq(0),
                         rp.eq(0), rp_rows.eq(0), wp.eq(0), ring.eq(0), ring_any.eq(0)]
            m.d.sync += [f.eq(0) for f in inflight]
        return m
