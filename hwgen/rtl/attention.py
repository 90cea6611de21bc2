"""Streaming attention engine: one head of the graph's ``attention`` op, bit-exact.

What it computes
----------------
For one head with ``head_dim`` = D, per pass of ``s_q`` tokens written at the
absolute positions ``offset .. offset + s_q - 1`` of an on-chip K/V cache,
with ``s_kv = offset + s_q`` positions attended:

* ``S = Q K^T`` exactly (``hwgen.contract.matmul_act``: a signed
  ``acc_width(q, k, D)``-bit score with ``q.frac + k.frac`` fractional bits;
  the attention scale is folded into the q projection);
* masks: key ``j`` is valid for query ``i`` when ``j < s_kv``, its stored
  padding bit is 1 (``contract.padding_mask``) and, for causal nodes,
  ``j <= offset + i`` (``contract.causal_mask``);
* the integer softmax of :func:`hwgen.contract.softmax`: ``m`` = max of the
  valid scores; ``d = m - s`` requantized to ``ExpTable.index_format()``
  (its rounding and saturation) and clamped onto the table's last (zero)
  entry; ``e`` = exp table; ``total = sum e``; ``n = bit_length(total) - 1``,
  the ``RecipTable.index_bits`` bits below the leading one select ``r`` from
  the reciprocal table (``r = 0`` when ``total == 0``); ``p = requant(e * r,
  recip.out_bits + n, prob format)``. Masked keys get ``e = 0`` directly,
  which is the table's last entry the contract saturates them onto, so a
  fully masked row gives all-zero probabilities exactly as the contract;
* ``O = P V`` exactly (``acc_width(prob, v, max_seq)`` bits) requantized to
  the output format (its rounding and overflow modes).

Both tables come from :func:`hwgen.contract.exp_table` /
:func:`hwgen.contract.recip_table` with the node's attrs, at elaboration.
Every requantization is :func:`hwgen.rtl.fxround.requant_value` (all
ap_fixed modes).

Streams
-------
``i`` (``In(stream.Signature(in_layout))``): one beat per token of the pass,
fields ``q``, ``k``, ``v`` (D codes each, the head's slice of the token's
projections), ``valid`` (its padding-mask bit), ``pos`` (its absolute
position: K, V and ``valid`` are written at cache address ``pos``) and
``last`` (the pass's last token). Tokens of a pass come at consecutive
positions; the first beat's ``pos`` is the pass's ``offset``; ``s_kv`` is the
last beat's ``pos + 1``. Cache entries at positions below ``offset`` stay
from earlier passes (the decoder's KV cache: a prefill pass at offset 0, then
one-token passes at offset 1, 2, ...). :meth:`AttentionEngine.pack` builds
the beats.

``o`` (``Out(stream.Signature(out_layout))``): one beat per query, in order,
fields ``data`` (D output codes), ``row`` (query index in the pass), ``last``
(the pass's last query). :meth:`AttentionEngine.unpack` reads them.

Architecture and exact timing
-----------------------------
Memories (``amaranth.lib.memory``): Q (``max_seq`` rows); K and V in
``lanes`` banks (position ``j`` in bank ``j % lanes`` at address
``j // lanes``; the K word carries the padding bit); score and ``e``
buffers for two queries (``2 * G_max`` words of ``lanes`` entries,
``G_max = ceil(max_seq / lanes)``); the exp ROM (one read port per lane)
and the reciprocal ROM. One ``lanes x head_dim`` array of registered
multipliers is shared by QK^T (a group of ``lanes`` keys per cycle, a dot
product of ``head_dim`` per lane) and PV (``lanes`` keys per cycle, every
column of V at once); an adder tree per lane (QK^T) and per column (PV)
reads the product registers.

With ``G = ceil(s_kv / lanes)`` groups per row, a pass is LOAD (one beat
per cycle) then ``s_q + 2`` super-phases ``k = 0 .. s_q + 1``, each
overlapping three queries:

* A(k): scores of query ``k`` (issue in cycles ``0 .. G-1``, products one
  cycle later, the last score written in cycle ``G + A_SPAN - 1``) into the
  score buffer, row max;
* B(k-1): exp, row sum and reciprocal of query ``k - 1`` (exp ROMs and
  adders only; the reciprocal is latched in cycle ``G + B_SPAN - 1``);
* C(k-2): probabilities and PV of query ``k - 2``. While A runs, PV issues
  from cycle ``T - G - C_LEAD`` (``T = period(G) = max(2 G, G + B_SPAN)``):
  its products follow A's without a gap, the multipliers are busy ``2 G``
  cycles of every ``T``, and the row reaches the output register 2 cycles
  into the next super-phase. Without A, PV issues from cycle 0 and the row
  reaches the output register in cycle ``G + C_SPAN - 1``.

Super-phase lengths (:meth:`AttentionEngine.phase_lengths`): ``T`` while A
and C both run, ``G + A_SPAN`` for the first (A alone), ``G + max(B_SPAN,
C_SPAN)`` for the others. Row ``i`` is valid on ``o`` from the cycle after
it enters the output register. Counting cycle 0 as the one in which the
first beat is accepted, with beats back to back and ``o.ready`` high, the
last output beat is taken in cycle ``cycles(s_q, s_kv) - 1``::

    cycles(s_q, s_kv) = s_q + sum(phase_lengths(s_q, G)) + 1

``i.ready`` is high while no pass is computing. When a finished row meets a
full output register that ``o`` does not empty, every register and memory
port holds for that cycle (``EnableInserter``): back-pressure delays the
pass and never drops or reorders data; ``o.valid`` depends on registers only.
"""
from __future__ import annotations

import numpy as np
from amaranth import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.hdl import EnableInserter
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .. import contract as C
from ..fixed import FixedType
from .fxround import check_modes, fmt_shape, requant_value
from .pe_array import RTLError, _is_int, check_positive

#: a super-phase running A lasts at least G + A_SPAN cycles (its last score write)
A_SPAN = 3
#: one running B lasts at least G + B_SPAN cycles (its reciprocal latched in G + 4)
B_SPAN = 5
#: with A running, PV issue starts C_LEAD + G cycles before the super-phase ends: its
#: products (3 cycles after issue) follow A's (1 cycle after issue) without a gap
C_LEAD = 2
#: PV issued from cycle 0 (no A running) puts its row into the output register in
#: cycle G + C_SPAN - 1
C_SPAN = 5


def _bits(n: int) -> int:
    """Unsigned bits to hold 0..n."""
    return max(1, int(n).bit_length())


def _tree(values):
    """Balanced adder tree (exact: Amaranth widens every sum)."""
    values = list(values)
    while len(values) > 1:
        values = [values[i] + values[i + 1] if i + 1 < len(values) else values[i]
                  for i in range(0, len(values), 2)]
    return values[0]


def _fmt_dict(f: FixedType) -> dict:
    return {"width": f.width, "int_bits": f.int_bits, "frac_bits": f.frac_bits,
            "signed": f.signed, "q": f.q, "o": f.o, "ctype": f.ctype()}


class AttentionEngine(wiring.Component):
    """One attention head with an on-chip KV cache (see the module docstring
    for the arithmetic, the streams and the exact cycle count).

    Parameters: ``head_dim``, ``max_seq`` (cache positions), ``lanes`` (a
    power of two: keys per cycle; ``lanes x head_dim`` multipliers), the
    :class:`~hwgen.fixed.FixedType` of ``q``, ``k``, ``v``, the output and the
    probabilities, the :class:`~hwgen.contract.ExpTable` and
    :class:`~hwgen.contract.RecipTable`, ``causal``, and ``name`` (the kernel
    name in the manifest).
    """

    def __init__(self, head_dim: int, max_seq: int, lanes: int, q_fmt: FixedType,
                 k_fmt: FixedType, v_fmt: FixedType, out_fmt: FixedType, prob_fmt: FixedType,
                 exp: C.ExpTable, recip: C.RecipTable, causal: bool, name: str = "attention"):
        try:
            self._check(head_dim, max_seq, lanes, q_fmt, k_fmt, v_fmt, out_fmt, prob_fmt,
                        exp, recip, causal, name)
        except RTLError:
            self._MustUse__silence = True  # never built: no "unused elaboratable" warning
            raise
        super().__init__({
            "i": In(stream.Signature(self.in_layout)),
            "o": Out(stream.Signature(self.out_layout)),
        })

    # -- parameters and derived widths (computed once, read everywhere) -------
    def _check(self, head_dim, max_seq, lanes, q_fmt, k_fmt, v_fmt, out_fmt, prob_fmt,
               exp, recip, causal, name) -> None:
        self.head_dim = check_positive("head_dim", head_dim)
        self.max_seq = check_positive("max_seq", max_seq)
        self.lanes = check_positive("lanes", lanes)
        if lanes & (lanes - 1):
            raise RTLError(f"lanes must be a power of two, got {lanes}")
        if lanes > max_seq:
            raise RTLError(f"lanes ({lanes}) must not exceed max_seq ({max_seq})")
        for what, f in (("q", q_fmt), ("k", k_fmt), ("v", v_fmt), ("output", out_fmt),
                        ("prob", prob_fmt)):
            if not isinstance(f, FixedType):
                raise RTLError(f"{what} format must be a hwgen.fixed.FixedType, got {f!r}")
            check_modes(what, f)
        if not isinstance(exp, C.ExpTable):
            raise RTLError(f"exp must be a hwgen.contract.ExpTable, got {exp!r}")
        if not isinstance(recip, C.RecipTable):
            raise RTLError(f"recip must be a hwgen.contract.RecipTable, got {recip!r}")
        if not isinstance(causal, bool):
            raise RTLError(f"causal must be a bool, got {causal!r}")
        if not isinstance(name, str) or not name.isidentifier():
            raise RTLError(f"name must be an identifier, got {name!r}")
        self.q_fmt, self.k_fmt, self.v_fmt = q_fmt, k_fmt, v_fmt
        self.out_fmt, self.prob_fmt = out_fmt, prob_fmt
        self.exp, self.recip, self.causal, self.name = exp, recip, causal, name
        self.lg_lanes = lanes.bit_length() - 1
        self.groups_max = -(-max_seq // lanes)
        #: memory depths (words): Q rows, each K / V bank, score and e buffers (two queries each)
        self.depths = {"q": max_seq, "kv": self.groups_max, "score": 2 * self.groups_max,
                       "e": 2 * self.groups_max}
        try:
            self.s_bits = C.acc_width(q_fmt, k_fmt, head_dim)
            self.o_bits = C.acc_width(prob_fmt, v_fmt, max_seq)
        except C.ContractError as e:
            raise RTLError(str(e)) from None
        self.s_frac = q_fmt.frac_bits + k_fmt.frac_bits
        self.o_frac = prob_fmt.frac_bits + v_fmt.frac_bits
        self.exp_table = C.exp_table(exp)
        self.recip_table = C.recip_table(recip)
        self.idx_fmt = exp.index_format()
        self.e_bits = _bits(int(self.exp_table.max()))
        self.tot_bits = _bits(int(self.exp_table.max()) * max_seq)
        self.n_max = self.tot_bits - 1
        self.r_bits = _bits(int(self.recip_table.max()))
        self.er_bits = self.e_bits + self.r_bits
        self.ern_bits = self.er_bits + self.n_max
        self.ern_frac = recip.out_bits + self.n_max
        self.pos_bits = _bits(max_seq - 1)
        self.seq_bits = _bits(max_seq)

    # -- stream payloads ----------------------------------------------------
    @property
    def in_layout(self) -> data.StructLayout:
        """One token: its q, k, v rows (head slice), padding bit, position, last flag."""
        D = self.head_dim
        return data.StructLayout({
            "q": data.ArrayLayout(fmt_shape(self.q_fmt), D),
            "k": data.ArrayLayout(fmt_shape(self.k_fmt), D),
            "v": data.ArrayLayout(fmt_shape(self.v_fmt), D),
            "valid": 1,
            "pos": unsigned(self.pos_bits),
            "last": 1,
        })

    @property
    def out_layout(self) -> data.StructLayout:
        """One query's output row, its index in the pass, last flag."""
        return data.StructLayout({
            "data": data.ArrayLayout(fmt_shape(self.out_fmt), self.head_dim),
            "row": unsigned(self.pos_bits),
            "last": 1,
        })

    # -- construction from a graph ------------------------------------------
    @classmethod
    def for_node(cls, graph, node, max_seq: int | None = None, lanes: int = 8) -> "AttentionEngine":
        """The engine for one head of ``node`` (an ``attention`` node or its
        name) of the fixed ``graph``: formats, tables and causality from the
        graph; ``max_seq`` defaults to the node's ``max_positions``."""
        from ..golden import fmt_of
        from ..ir import GraphError

        if isinstance(node, str):
            try:
                node = graph.node(node)
            except (KeyError, GraphError):
                raise RTLError(f"graph '{graph.name}' has no node '{node}'") from None
        where = f"node '{node.name}'"
        if node.op != "attention":
            raise RTLError(f"{where}: op '{node.op}' is not 'attention'")
        if not graph.is_fixed:
            raise RTLError(f"graph '{graph.name}' is a float graph; quantize it first "
                           "(`hwgen quantize`)")
        a = node.attrs
        if a.get("scale", 1) != 1:
            raise RTLError(f"{where}: attention scale {a['scale']} was not folded into the "
                           "q projection")
        for t in list(node.inputs[:3]) + [node.outputs[0]]:
            if graph.tensors[t].per_channel:
                raise RTLError(f"{where}: tensor '{t}' has per-channel formats; the attention "
                               "engine takes uniform q, k, v and output formats")
        if max_seq is None:
            max_seq = a.get("max_positions")
            if max_seq is None:
                raise RTLError(f"{where} has no max_positions: pass max_seq (the longest "
                               "sequence the engine must hold)")
        qf, kf, vf = (fmt_of(graph, t) for t in node.inputs[:3])
        name = "attention_" + "".join(ch if ch.isalnum() else "_" for ch in node.name)
        return cls(int(a["head_dim"]), max_seq, lanes, qf, kf, vf, fmt_of(graph, node.outputs[0]),
                   FixedType.from_dict(a["prob_format"]), C.ExpTable(**a["exp"]),
                   C.RecipTable(**a["recip"]), bool(a.get("causal")), name)

    # -- timing ---------------------------------------------------------------
    def groups(self, s_kv: int) -> int:
        return -(-s_kv // self.lanes)

    def _check_shape(self, s_q: int, s_kv: int) -> None:
        check_positive("s_q", s_q)
        check_positive("s_kv", s_kv)
        if s_q > s_kv:
            raise RTLError(f"s_q ({s_q}) must not exceed s_kv ({s_kv}): a pass attends to its own "
                           "tokens and the cache before them")
        if s_kv > self.max_seq:
            raise RTLError(f"s_kv ({s_kv}) exceeds the engine's max_seq ({self.max_seq})")

    @staticmethod
    def period(groups: int) -> int:
        """Cycles of a steady super-phase (A, B and C running) for rows of
        ``groups`` lane groups: ``max(2 G, G + B_SPAN)``; the multipliers are
        busy ``2 G`` of them."""
        return max(2 * groups, groups + B_SPAN)

    @staticmethod
    def phase_lengths(s_q: int, groups: int) -> list[int]:
        """Cycles of super-phases ``k = 0 .. s_q + 1``: ``period(G)`` while A
        and C both run, ``G + A_SPAN`` for the first (A alone), ``G +
        max(B_SPAN, C_SPAN)`` for the others (no A: PV starts in cycle 0)."""
        out = []
        for k in range(s_q + 2):
            a, b, c = k < s_q, 1 <= k <= s_q, k >= 2
            if a and c:
                out.append(AttentionEngine.period(groups))
            elif a and not b:
                out.append(groups + A_SPAN)
            else:
                out.append(groups + max(B_SPAN, C_SPAN))
        return out

    def cycles(self, s_q: int, s_kv: int) -> int:
        """Exact cycles of one pass, first accepted beat to last output beat
        taken (beats back to back, ``o.ready`` high): the beats, the
        super-phases, one cycle for the output beat."""
        self._check_shape(s_q, s_kv)
        return s_q + sum(self.phase_lengths(s_q, self.groups(s_kv))) + 1

    @property
    def mac_units(self) -> int:
        return self.lanes * self.head_dim

    def ideal_cycles(self, s_q: int, s_kv: int) -> int:
        """MACs of QK^T and PV over the shared multipliers, rounded up."""
        self._check_shape(s_q, s_kv)
        return -(-(2 * s_q * s_kv * self.head_dim) // self.mac_units)

    def manifest(self, s_q: int, s_kv: int) -> dict:
        """JSON-able description of the kernel and its timing for one pass."""
        cyc = self.cycles(s_q, s_kv)
        ideal = self.ideal_cycles(s_q, s_kv)
        dep = self.depths

        def port(direction, layout):
            return {"direction": direction, "width": layout.size,
                    "fields": {name: field.width for name, field in layout}}

        return {
            "kernel": self.name,
            "op": "attention",
            "ports": {"i": port("in", self.in_layout), "o": port("out", self.out_layout)},
            "parameters": {"head_dim": self.head_dim, "max_seq": self.max_seq,
                           "lanes": self.lanes, "causal": self.causal,
                           "mac_units": self.mac_units},
            "formats": {"q": _fmt_dict(self.q_fmt), "k": _fmt_dict(self.k_fmt),
                        "v": _fmt_dict(self.v_fmt), "out": _fmt_dict(self.out_fmt),
                        "prob": _fmt_dict(self.prob_fmt), "exp_index": _fmt_dict(self.idx_fmt),
                        "score": {"width": self.s_bits, "frac_bits": self.s_frac, "signed": True},
                        "out_acc": {"width": self.o_bits, "frac_bits": self.o_frac, "signed": True}},
            "tables": {"exp": {**self.exp.to_dict(), "entries": int(self.exp_table.size),
                               "width": self.e_bits},
                       "recip": {**self.recip.to_dict(), "entries": int(self.recip_table.size),
                                 "width": self.r_bits}},
            "memories": {"q": {"depth": dep["q"], "width": self.head_dim * self.q_fmt.width},
                         "k": {"banks": self.lanes, "depth": dep["kv"],
                               "width": self.head_dim * self.k_fmt.width + 1},
                         "v": {"banks": self.lanes, "depth": dep["kv"],
                               "width": self.head_dim * self.v_fmt.width},
                         "score": {"depth": dep["score"], "width": self.lanes * (self.s_bits + 1)},
                         "e": {"depth": dep["e"], "width": self.lanes * self.e_bits}},
            "shape": {"s_q": s_q, "s_kv": s_kv},
            "cycles": cyc,
            "ideal_cycles": ideal,
            "utilization": round(ideal / cyc, 4),
        }

    # -- host side: what the hardware is fed and returns ----------------------
    def pack(self, q, k, v, valid=None, offset: int = 0) -> list[int]:
        """Payload integers of one pass's ``i`` beats: ``q``, ``k``, ``v`` are
        (s_q, head_dim) integer codes of this head (the tokens' slices
        ``x[b, :, h*D:(h+1)*D]``), ``valid`` (s_q,) their padding-mask bits
        (default all 1), ``offset`` the absolute position of the first token."""
        D = self.head_dim
        arrs = []
        for what, x, f in (("q", q, self.q_fmt), ("k", k, self.k_fmt), ("v", v, self.v_fmt)):
            x = np.asarray(x)
            if x.ndim != 2 or x.shape[1] != D or not np.issubdtype(x.dtype, np.integer):
                raise RTLError(f"{what} must be an integer array of shape (s_q, {D}), got "
                               f"{x.dtype} {list(x.shape)}")
            if x.size and (x.min() < f.min_code or x.max() > f.max_code):
                raise RTLError(f"{what} codes {int(x.min())}..{int(x.max())} are outside the "
                               f"format {f.ctype()} ({f.min_code}..{f.max_code})")
            arrs.append(x.astype(np.int64))
        s_q = arrs[0].shape[0]
        if any(a.shape[0] != s_q for a in arrs) or s_q == 0:
            raise RTLError(f"q, k, v must have the same number (>= 1) of rows, got "
                           f"{[a.shape[0] for a in arrs]}")
        valid = np.ones(s_q, np.int64) if valid is None else np.asarray(valid)
        if valid.shape != (s_q,) or not np.isin(valid, (0, 1)).all():
            raise RTLError(f"valid must be {s_q} values of 0/1, got {valid!r}")
        if not _is_int(offset) or offset < 0 or offset + s_q > self.max_seq:
            raise RTLError(f"positions offset={offset} .. offset+{s_q}-1 must lie in the cache "
                           f"(0..{self.max_seq - 1})")
        lay = self.in_layout
        return [lay.const({"q": arrs[0][i].tolist(), "k": arrs[1][i].tolist(),
                           "v": arrs[2][i].tolist(), "valid": int(valid[i]), "pos": offset + i,
                           "last": i == s_q - 1}).as_value().value for i in range(s_q)]

    def unpack(self, beats) -> np.ndarray:
        """(s_q, head_dim) int64 output codes from one pass's ``o`` payload
        integers; checks their ``row`` order and the ``last`` flag."""
        lay = self.out_layout
        rows = []
        for n, b in enumerate(beats):
            c = lay.from_bits(int(b))
            if c.row != n:
                raise RTLError(f"output beat {n} carries row {c.row}")
            if bool(c.last) != (n == len(beats) - 1):
                raise RTLError(f"output beat {n} has last={c.last} in a pass of {len(beats)} rows")
            rows.append([int(x) for x in c.data])
        return np.array(rows, dtype=np.int64).reshape(len(rows), self.head_dim)

    # -- hardware -------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        D, L, lg = self.head_dim, self.lanes, self.lg_lanes
        GM = self.groups_max
        gb = _bits(GM)
        tb = _bits(self.period(GM) + max(B_SPAN, C_SPAN))
        i_s, o_s = self.i, self.o

        # ---------------- memories -------------------------------------------
        k_word = data.StructLayout({"k": data.ArrayLayout(fmt_shape(self.k_fmt), D), "valid": 1})
        v_word = data.ArrayLayout(fmt_shape(self.v_fmt), D)
        s_word = data.StructLayout({"s": data.ArrayLayout(signed(self.s_bits), L),
                                    "m": unsigned(L)})
        e_word = data.ArrayLayout(unsigned(self.e_bits), L)
        dep = self.depths
        m.submodules.q_mem = q_mem = Memory(shape=data.ArrayLayout(fmt_shape(self.q_fmt), D),
                                            depth=dep["q"], init=[])
        k_mem, v_mem = [], []
        for b in range(L):
            km = Memory(shape=k_word, depth=dep["kv"], init=[])
            vm = Memory(shape=v_word, depth=dep["kv"], init=[])
            m.submodules[f"k_bank{b}"] = km
            m.submodules[f"v_bank{b}"] = vm
            k_mem.append(km)
            v_mem.append(vm)
        # score and e buffers hold two queries each (parity = query index & 1)
        m.submodules.s_buf = s_buf = Memory(shape=s_word, depth=dep["score"], init=[])
        m.submodules.e_buf = e_buf = Memory(shape=e_word, depth=dep["e"], init=[])
        m.submodules.exp_rom = exp_rom = Memory(shape=unsigned(self.e_bits),
                                                depth=len(self.exp_table),
                                                init=[int(x) for x in self.exp_table])
        m.submodules.recip_rom = recip_rom = Memory(shape=unsigned(self.r_bits),
                                                    depth=len(self.recip_table),
                                                    init=[int(x) for x in self.recip_table])

        def slot(parity, g):
            return Mux(parity, g + GM, g)

        # ---------------- control registers ----------------------------------
        t = Signal(tb)                     # cycle within the super-phase
        k = Signal(self.seq_bits + 1)      # super-phase: A(k), B(k - 1), C(k - 2)
        cnt = Signal(self.seq_bits)        # beats of the pass so far
        s_q = Signal(self.seq_bits)
        s_kv = Signal(self.seq_bits)
        offset = Signal(self.pos_bits)
        G = Signal(gb)                     # groups of lanes keys per row
        T = Signal(tb)                     # super-phase length: period(G)
        c_lead = Signal(tb)                # PV issue start while A runs: T - G - C_LEAD
        len_a = Signal(tb)                 # G + A_SPAN
        len_bc = Signal(tb)                # G + max(B_SPAN, C_SPAN)
        running = Signal()
        out_valid = Signal()
        out_row = Signal(self.pos_bits)
        out_last = Signal()
        o_data = [Signal(fmt_shape(self.out_fmt), name=f"o_data{d}") for d in range(D)]
        c5_v = Signal()                    # a finished row is about to enter the output register
        stall = Signal()
        m.d.comb += stall.eq(c5_v & out_valid & ~o_s.ready)

        # ---------------- LOAD: write the pass's tokens ----------------------
        q_wp = q_mem.write_port()
        take = Signal()
        pay = i_s.payload
        m.d.comb += [i_s.ready.eq(~running),
                     take.eq(i_s.valid & i_s.ready),
                     q_wp.addr.eq(cnt), q_wp.data.eq(pay.q), q_wp.en.eq(take)]
        for b in range(L):
            kw, vw = k_mem[b].write_port(), v_mem[b].write_port()
            hit = take & ((pay.pos[:lg] == b) if lg else 1)
            m.d.comb += [kw.addr.eq(pay.pos >> lg), kw.data.k.eq(pay.k), kw.data.valid.eq(pay.valid),
                         kw.en.eq(hit), vw.addr.eq(pay.pos >> lg), vw.data.eq(pay.v), vw.en.eq(hit)]
        g_new = Signal(gb)
        m.d.comb += g_new.eq((pay.pos + L) >> lg)
        with m.If(take):
            m.d.sync += cnt.eq(cnt + 1)
            with m.If(cnt == 0):
                m.d.sync += offset.eq(pay.pos)
            with m.If(pay.last):
                t_new = Mux(g_new > B_SPAN, g_new << 1, g_new + B_SPAN)
                m.d.sync += [s_q.eq(cnt + 1), s_kv.eq(pay.pos + 1), G.eq(g_new), T.eq(t_new),
                             c_lead.eq(t_new - g_new - C_LEAD), len_a.eq(g_new + A_SPAN),
                             len_bc.eq(g_new + max(B_SPAN, C_SPAN)),
                             cnt.eq(0), k.eq(0), t.eq(0), running.eq(1)]

        # ---------------- super-phase sequencing -------------------------------
        a_on = Signal()
        b_on = Signal()
        c_on = Signal()
        m.d.comb += [a_on.eq(running & (k < s_q)), b_on.eq(running & (k >= 1) & (k <= s_q)),
                     c_on.eq(running & (k >= 2))]
        # phase_lengths(): period while A and C run, G + A_SPAN for A alone, else len_bc
        length = Signal(tb)
        c_start = Signal(tb)
        m.d.comb += [length.eq(Mux(a_on & c_on, T, Mux(a_on & ~b_on, len_a, len_bc))),
                     c_start.eq(Mux(a_on, c_lead, 0))]
        with m.If(running):
            m.d.sync += t.eq(t + 1)
            with m.If(t == length - 1):
                m.d.sync += [t.eq(0), k.eq(k + 1)]
                with m.If(k == s_q + 1):
                    m.d.sync += running.eq(0)
        qa, qb, qc = k, k - 1, k - 2

        # ---------------- shared multiplier array ------------------------------
        q_rp = q_mem.read_port()
        m.d.comb += q_rp.addr.eq(qa)
        k_rp = [km.read_port() for km in k_mem]
        v_rp = [vm.read_port() for vm in v_mem]
        a1_v = Signal()                      # A stage 1: K rows arrive; products
        c3_v = Signal()                      # C stage 3: V rows arrive; products
        c3_p = [Signal(fmt_shape(self.prob_fmt), name=f"c3_p{l}") for l in range(L)]
        prod = [[None] * D for _ in range(L)]
        for l in range(L):
            for d in range(D):
                a_op = Mux(c3_v, c3_p[l], q_rp.data[d])
                b_op = Mux(c3_v, v_rp[l].data[d], k_rp[l].data.k[d])
                e = a_op * b_op
                prod[l][d] = p = Signal(e.shape(), name=f"prod_{l}_{d}")
                with m.If(a1_v | c3_v):
                    m.d.sync += p.eq(e)

        # ---------------- A(k): scores, masks, row max -------------------------
        a_issue = a_on & (t < G)
        a1_g, a2_g, a3_g = (Signal(gb, name=f"a{s}_g") for s in (1, 2, 3))
        a1_lm, a2_m, a3_m = (Signal(L, name=f"a{s}_m") for s in (1, 2, 3))
        a2_v, a3_v = Signal(), Signal()
        a1_par, a2_par, a3_par = Signal(), Signal(), Signal()
        a3_s = [Signal(signed(self.s_bits), name=f"a3_s{l}") for l in range(L)]
        for rp in k_rp:
            m.d.comb += rp.addr.eq(t)
        jb = Signal(tb + lg)
        m.d.comb += jb.eq(t << lg)
        lane_ok = []
        for l in range(L):
            j = jb + l
            ok = j < s_kv
            if self.causal:
                ok = ok & (j <= offset + qa)
            lane_ok.append(ok)
        m.d.sync += [a1_v.eq(a_issue), a1_g.eq(t), a1_lm.eq(Cat(*lane_ok)), a1_par.eq(qa[0]),
                     a2_v.eq(a1_v), a2_g.eq(a1_g), a2_par.eq(a1_par),
                     a2_m.eq(a1_lm & Cat(*[rp.data.valid for rp in k_rp])),
                     a3_v.eq(a2_v), a3_g.eq(a2_g), a3_m.eq(a2_m), a3_par.eq(a2_par)]
        for l in range(L):
            m.d.sync += a3_s[l].eq(_tree(prod[l]))
        s_wp = s_buf.write_port()
        m.d.comb += [s_wp.addr.eq(slot(a3_par, a3_g)), s_wp.en.eq(a3_v), s_wp.data.m.eq(a3_m)]
        m.d.comb += [s_wp.data.s[l].eq(a3_s[l]) for l in range(L)]
        row_max = [Signal(signed(self.s_bits), name=f"row_max{i}") for i in range(2)]
        row_any = [Signal(name=f"row_any{i}") for i in range(2)]
        cur_max = Mux(a3_par, row_max[1], row_max[0])
        cur_any = Mux(a3_par, row_any[1], row_any[0])
        best, any_v = cur_max, cur_any
        for l in range(L):          # a chain of signals (expressions would duplicate it 2**L times)
            take_l = a3_m[l] & (~any_v | (a3_s[l] > best))
            nb, na = Signal(signed(self.s_bits), name=f"a3_best{l}"), Signal(name=f"a3_any{l}")
            m.d.comb += [nb.eq(Mux(take_l, a3_s[l], best)), na.eq(any_v | a3_m[l])]
            best, any_v = nb, na
        for i in range(2):
            with m.If(a_on & (t == 0) & (qa[0] == i)):
                m.d.sync += row_any[i].eq(0)
            with m.Elif(a3_v & (a3_par == i)):
                m.d.sync += [row_max[i].eq(best), row_any[i].eq(any_v)]

        # ---------------- B(k - 1): exp, row sum, reciprocal --------------------
        b_issue = b_on & (t < G)
        b_par = qb[0]
        s_rp = s_buf.read_port()
        m.d.comb += s_rp.addr.eq(slot(b_par, t))
        b1_v, b2_v, b3_v = Signal(), Signal(), Signal()
        b1_g, b2_g, b3_g = (Signal(gb, name=f"b{s}_g") for s in (1, 2, 3))
        b2_m, b3_m = Signal(L), Signal(L)
        b2_idx = [Signal(self.idx_fmt.width, name=f"b2_idx{l}") for l in range(L)]
        m.d.sync += [b1_v.eq(b_issue), b1_g.eq(t), b2_v.eq(b1_v), b2_g.eq(b1_g),
                     b2_m.eq(s_rp.data.m), b3_v.eq(b2_v), b3_g.eq(b2_g), b3_m.eq(b2_m)]
        b_max = Mux(b_par, row_max[1], row_max[0])
        last_idx = len(self.exp_table) - 1
        exp_rp = []
        for l in range(L):
            dl = Signal(unsigned(self.s_bits + 1), name=f"b1_d{l}")
            m.d.comb += dl.eq(b_max - s_rp.data.s[l])
            ix = requant_value(m, dl, self.s_frac, self.idx_fmt, f"b1_ix{l}")
            m.d.sync += b2_idx[l].eq(Mux(ix > last_idx, last_idx, ix))
            rp = exp_rom.read_port()
            m.d.comb += rp.addr.eq(b2_idx[l])
            exp_rp.append(rp)
        e_l = [Mux(b3_m[l], exp_rp[l].data, 0) for l in range(L)]
        e_wp = e_buf.write_port()
        m.d.comb += [e_wp.addr.eq(slot(b_par, b3_g)), e_wp.en.eq(b3_v)]
        m.d.comb += [e_wp.data[l].eq(e_l[l]) for l in range(L)]
        total = Signal(self.tot_bits)
        with m.If(b_on & (t == 0)):
            m.d.sync += total.eq(0)
        with m.Elif(b3_v):
            m.d.sync += total.eq(total + _tree(e_l))
        # reciprocal: n = bit_length(total) - 1, index bits below the leading one
        n = Signal(_bits(self.n_max))
        for b in range(self.tot_bits):
            with m.If(total[b]):
                m.d.comb += n.eq(b)
        ib = self.recip.index_bits
        r_rp = recip_rom.read_port()
        m.d.comb += r_rp.addr.eq(((total << ib) >> n)[:ib])
        r_q = [Signal(self.r_bits, name=f"r{i}") for i in range(2)]
        n_q = [Signal(len(n), name=f"n{i}") for i in range(2)]
        for i in range(2):
            with m.If(b_on & (t == G + (B_SPAN - 1)) & (b_par == i)):
                m.d.sync += [r_q[i].eq(Mux(total == 0, 0, r_rp.data)), n_q[i].eq(n)]

        # ---------------- C(k - 2): probabilities, PV, output -------------------
        c_issue = c_on & (t >= c_start) & (t < c_start + G)
        c_par = qc[0]
        # the row travels with the pipeline (a PV may still drain when the next one starts)
        c1_row, c2_row, c3_row, c4_row = (Signal(self.pos_bits, name=f"c{s}_row")
                                          for s in (1, 2, 3, 4))
        m.d.sync += [c1_row.eq(qc), c2_row.eq(c1_row), c3_row.eq(c2_row), c4_row.eq(c3_row)]
        e_rp = e_buf.read_port()
        m.d.comb += e_rp.addr.eq(slot(c_par, t - c_start))
        c1_v, c2_v, c4_v = Signal(), Signal(), Signal()
        c5_row = Signal(self.pos_bits)
        c1_g, c2_g, c3_g, c4_g = (Signal(gb, name=f"c{s}_g") for s in (1, 2, 3, 4))
        c2_er = [Signal(self.er_bits, name=f"c2_er{l}") for l in range(L)]
        m.d.sync += [c1_v.eq(c_issue), c1_g.eq(t - c_start), c2_v.eq(c1_v), c2_g.eq(c1_g),
                     c3_v.eq(c2_v), c3_g.eq(c2_g), c4_v.eq(c3_v), c4_g.eq(c3_g),
                     c5_v.eq(c4_v & (c4_g == G - 1)), c5_row.eq(c4_row)]
        r_c = Mux(c_par, r_q[1], r_q[0])
        n_c = Mux(c_par, n_q[1], n_q[0])
        up = Signal(len(n))                 # left-align e * r to n_max: shift up by n_max - n
        m.d.comb += up.eq(self.n_max - n_c)
        for l in range(L):
            m.d.sync += c2_er[l].eq(e_rp.data[l] * r_c)
            ern = Signal(self.ern_bits, name=f"c2_ern{l}")
            m.d.comb += ern.eq(c2_er[l] << up)
            p = requant_value(m, ern, self.ern_frac, self.prob_fmt, f"c2_p{l}")
            m.d.sync += c3_p[l].eq(p)
        for rp in v_rp:
            m.d.comb += rp.addr.eq(c2_g)
        acc = [Signal(signed(self.o_bits), name=f"acc{d}") for d in range(D)]
        with m.If(c4_v):
            for d in range(D):
                col = _tree(prod[l][d] for l in range(L))
                m.d.sync += acc[d].eq(Mux(c4_g == 0, 0, acc[d]) + col)
        with m.If(o_s.valid & o_s.ready):
            m.d.sync += out_valid.eq(0)
        with m.If(c5_v):
            m.d.sync += [out_valid.eq(1), out_row.eq(c5_row), out_last.eq(c5_row + 1 == s_q)]
            for d in range(D):
                m.d.sync += o_data[d].eq(
                    requant_value(m, acc[d], self.o_frac, self.out_fmt, f"o_rq{d}"))
        m.d.comb += [o_s.valid.eq(out_valid), o_s.payload.row.eq(out_row),
                     o_s.payload.last.eq(out_last)]
        m.d.comb += [o_s.payload.data[d].eq(o_data[d]) for d in range(D)]
        # output back-pressure freezes every register and memory port for the cycle
        return EnableInserter({"sync": ~stall})(m)
