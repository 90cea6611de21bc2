"""On-chip buffer with a registered, pipelined read: one write port, one read
port, :attr:`Buffer.latency` cycles (at least ``READ_LATENCY`` = 2) from a
read address to its data.

Contract
--------
``Buffer(shape, data, latency=None)`` holds the words of ``data`` (a
``lib.memory`` ``MemoryData`` of ``unsigned(width)``: its depth and initial
contents; the simulator reads and sets it) seen through ``shape`` on the
ports (the width, or a ``lib.data`` layout of that width).

``wr`` (``lib.memory.WritePort.Signature``: ``addr``, ``data``, ``en``, all
inputs): the word is written when ``en`` is high.

``rd`` (``lib.memory.ReadPort.Signature``: ``addr``, ``en`` in, ``data``
out): in a cycle with ``en`` high the word at ``addr`` is read; it is on
``data`` ``latency`` cycles later and stays there until the next read
arrives. ``en`` defaults to 1. Writes and reads are ordered by the cycle
they are presented in: a read sees every write presented in an earlier
cycle, not one presented in the same cycle (it returns the old word).

``latency`` defaults to :func:`read_latency` ``(width, depth)``, the
buffer's own: a pure function of its size, the same in simulation, in the
generated Verilog and on the FPGA, so an engine's schedule (and its exact
cycle count) is computed once from it. A larger ``latency`` adds registers
in front of the memory (on both ports, which keeps the ordering above);
engines use that to give buffers read in lockstep one latency.

Why these registers: a block RAM's clock to output (about 5.8 ns on an
LFE5U-85F, speed 6) plus one route capped every engine near 130 MHz, so the
second register is the block RAM's own output register (``DP16KD``
``REGMODE="OUTREG"``). A buffer of more than :data:`ADDR_REG_BLOCKS` block
RAMs spans a large part of the die: its address, enable and write port are
registered first, in a root register next to the logic that drives them and
then one copy per block (kept apart in synthesis), so each address net
drives one block (two cycles); a buffer of more than :data:`ADDR_TREE_BLOCKS`
blocks puts one more level in between, one copy per column of blocks (the
same data bits in every bank), with the write data copied the same way (one
more cycle: placed, the MiniLM weight buffer's root address fanned out to 72
blocks over 83 tiles); a buffer more than one bank deep
selects the bank in two registered steps, each block's word masked by its
select bit, then the banks' words ORed (two cycles), so no route from a
distant block RAM ends in logic. Measured on the 8 x 8 proxy engine: the
address path kk -> W address adder -> W block RAM, 9.6 ns, and then the
W block RAM -> AND-OR -> register path, 7.7 ns (6.3 routing), were its
critical paths.

Implementations
---------------
* Default (simulation, the generated Verilog): an Amaranth ``lib.memory``
  ``Memory`` with a synchronous read port, :func:`write_latency` registers
  in front of both ports and the rest after the read port, placed as on
  ECP5, so the memory holds each word from the same cycle on both.
* ``platform.ecp5_bram`` true (what :mod:`hwgen.impl` passes when it
  synthesizes for ECP5): buffers deeper than :data:`LUTRAM_DEPTH` words are
  built from ``DP16KD`` primitives with the output register on, tiled in
  width and depth in the configuration (18x1024, 9x2048, 4x4096, 2x8192 or
  1x16384) that needs the fewest blocks; the read bank's select rides two
  registers beside the data (the second one-hot, one copy per block), masks
  each block's word into a register next to it, and the banks' masked words
  are ORed into the output register. Shallower buffers
  are distributed RAM: an asynchronous-read ``Memory`` and two registers.
  Initial contents cannot be given on this path (the host loads every buffer
  through ``wr``).
"""
from __future__ import annotations

from amaranth import C, Cat, ClockSignal, Instance, Module, Shape, Signal, Value, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory, MemoryData, ReadPort, WritePort
from amaranth.lib.wiring import Out

from .pe_array import RTLError, _is_int, check_positive
from .pipeline import delayed

#: the fewest cycles from a read address (``rd.en`` high) to its word on ``rd.data``
READ_LATENCY = 2

#: DP16KD buffers of more blocks than this register (and replicate) their address first
ADDR_REG_BLOCKS = 2

#: DP16KD buffers of more blocks than this copy their front registers in a tree: the
#: root, one copy per column of blocks (the same data bits, every bank), one per block
ADDR_TREE_BLOCKS = 8

#: front registers of those buffers: a root register (next to the logic driving the
#: port), then one copy per block (next to the block)
ADDR_STAGES = 2

#: registers after the block RAMs of a buffer several banks deep (the bank select)
SELECT_STAGES = 2

#: ECP5 buffers up to this many words are distributed RAM, deeper ones DP16KD
LUTRAM_DEPTH = 64

#: DP16KD configurations: (data width, words), one 18 Kbit block each
DP16KD_CONFIGS = ((18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384))

#: address pins of a DP16KD: 14, the low ones unused (or byte enables) below 16 Kbit / width
DP16KD_ADDR_BITS = 14


def dp16kd_tiling(width: int, depth: int) -> tuple[int, int, int, int]:
    """``(block width, block words, blocks across, blocks deep)`` of the DP16KD
    tiling of a ``width`` x ``depth`` buffer with the fewest blocks (ties: the
    fewest banks in depth, so the smallest output multiplexer)."""
    best = None
    for w, d in DP16KD_CONFIGS:
        across, deep = -(-width // w), -(-depth // d)
        key = (across * deep, deep)
        if best is None or key < best[0]:
            best = (key, (w, d, across, deep))
    return best[1]


def read_latency(width: int, depth: int) -> int:
    """A ``width`` x ``depth`` buffer's own read latency: ``READ_LATENCY``, plus
    ``ADDR_STAGES`` when its DP16KD tiling has more than ``ADDR_REG_BLOCKS`` blocks
    (registered, replicated address and write port), plus 1 when it has more
    than ``ADDR_TREE_BLOCKS`` (the per-column copies), plus ``SELECT_STAGES`` when
    it is more than one bank deep (the registered bank select). Buffers of up to
    ``LUTRAM_DEPTH`` words: 2."""
    if depth <= LUTRAM_DEPTH:
        return READ_LATENCY
    _, _, across, deep = dp16kd_tiling(width, depth)
    return (READ_LATENCY + ADDR_STAGES * int(across * deep > ADDR_REG_BLOCKS)
            + int(across * deep > ADDR_TREE_BLOCKS) + _select_stages(width, depth))


def _select_stages(width: int, depth: int) -> int:
    """Registers after the block RAMs of a buffer more than one DP16KD bank deep:
    each bank's word masked by its select bit (next to the bank), then their OR;
    0 for the others."""
    return SELECT_STAGES if depth > LUTRAM_DEPTH and dp16kd_tiling(width, depth)[3] > 1 else 0


def write_latency(width: int, depth: int, latency: int | None = None) -> int:
    """Cycles from a write presented on ``wr`` to the word in memory (the front
    registers) for a ``width`` x ``depth`` buffer of read ``latency`` (None: its
    own): ``latency - READ_LATENCY`` less the bank select registers. The same on
    every implementation, so ``MemoryData`` in the simulator and the block RAMs
    hold a word from the same cycle on."""
    latency = read_latency(width, depth) if latency is None else latency
    return latency - READ_LATENCY - _select_stages(width, depth)


class Buffer(wiring.Component):
    """A ``depth`` x ``shape`` RAM with write port ``wr`` and a read port ``rd``
    of ``latency`` cycles (module docstring)."""

    def __init__(self, shape, data: MemoryData, latency: int | None = None):
        try:
            self.shape = shape
            self.width = Shape.cast(shape).width
            if not isinstance(data, MemoryData) or Shape.cast(data.shape) != unsigned(self.width):
                raise RTLError(f"data must be a MemoryData of unsigned({self.width}), got {data!r}")
            self.depth = check_positive("depth", data.depth)
            own = read_latency(self.width, self.depth)
            if latency is None:
                latency = own
            elif not _is_int(latency) or latency < own:
                raise RTLError(f"latency must be an integer >= {own} (the read latency of a "
                               f"{self.width} x {self.depth} buffer), got {latency!r}")
        except RTLError:
            self._MustUse__silence = True  # never built: no "unused elaboratable" warning
            raise
        self.data = data
        self.latency = latency
        self.write_latency = write_latency(self.width, self.depth, latency)
        aw = max(1, (self.depth - 1).bit_length())
        super().__init__({"wr": Out(WritePort.Signature(addr_width=aw, shape=shape)),
                          "rd": Out(ReadPort.Signature(addr_width=aw, shape=shape))})

    def elaborate(self, platform):
        if getattr(platform, "ecp5_bram", False):
            if any(self.data.init):
                raise RTLError("a buffer with initial contents cannot be mapped to ECP5 block RAM; "
                               "load it through its write port")
            if self.depth > LUTRAM_DEPTH:
                return self._dp16kd()
            return self._memory(async_read=True)
        return self._memory(async_read=False)

    def _ports(self, m: Module, stages: int) -> list:
        """The write port (address, data, enable) and the read port (address,
        enable), each behind ``stages`` registers: both ports move together, so
        the order of reads and writes is kept."""
        return delayed(m, [self.wr.addr, Value.cast(self.wr.data), self.wr.en, self.rd.addr, self.rd.en],
                       stages, ("wa", "wd", "we", "ra", "ren"), reset_less=True)

    def _memory(self, async_read: bool) -> Module:
        m = Module()
        wa, wd, we, ra, ren = self._ports(m, self.write_latency)
        m.submodules.mem = mem = Memory(data=self.data)
        wp = mem.write_port()
        m.d.comb += [wp.addr.eq(wa), wp.data.eq(wd), wp.en.eq(we)]
        q = Signal(self.width, reset_less=True)
        if async_read:     # distributed RAM, then two registers
            rp = mem.read_port(domain="comb")
            q1 = Signal(self.width, reset_less=True)
            m.d.comb += rp.addr.eq(ra)
            with m.If(ren):
                m.d.sync += q1.eq(rp.data)
            m.d.sync += q.eq(q1)
        else:              # synchronous read port, then one register
            rp = mem.read_port()
            m.d.comb += [rp.addr.eq(ra), rp.en.eq(ren)]
            m.d.sync += q.eq(rp.data)
        # the registers where ECP5's bank select has its own
        q, = delayed(m, [q], self.latency - READ_LATENCY - self.write_latency, ("q",), reset_less=True)
        m.d.comb += self.rd.data.eq(q)
        return m

    def _dp16kd(self) -> Module:
        m = Module()
        bw, bd, across, deep = dp16kd_tiling(self.width, self.depth)
        low = (bd - 1).bit_length()              # word address bits inside one block
        pad = DP16KD_ADDR_BITS - low             # address pins below the word address
        pre = self.write_latency                 # front registers (then the bank select's, if banked)
        copies = across * deep > ADDR_REG_BLOCKS  # the last front register: one copy per block
        tree = across * deep > ADDR_TREE_BLOCKS   # and before it one copy per column of blocks
        wa, wd, we, ra, ren = self._ports(m, pre - copies - tree)
        wd = Value.cast(wd)

        def hi(addr):
            return addr[low:] if deep > 1 else C(0, 1)

        def front(name, value):
            """``value`` at the block RAM pins: a kept register copy, or the value."""
            if not copies:
                return value
            q = Signal(len(value), name=name, reset_less=True, attrs={"keep": 1})
            m.d.sync += q.eq(value)
            return q

        # the middle level: per column x of blocks its address, enable and data slice
        col = []
        for x in range(across):
            bits = wd[x * bw:min((x + 1) * bw, self.width)]
            ports = (wa, we, ra, ren, bits)
            if tree:
                ports = tuple(front(f"{n}_c{x}", v) for n, v in zip(("wa", "we", "ra", "ren", "wd"), ports))
            col.append(ports)

        bank_q = []
        for d in range(deep):
            q = Signal(across * bw, name=f"bank{d}_q")
            bank_q.append(q)
            for x in range(across):
                c_wa, c_we, c_ra, c_ren, c_wd = col[x]
                b_wa = front(f"wa_{d}_{x}", c_wa)
                b_we = front(f"we_{d}_{x}", c_we & (hi(c_wa) == d))
                b_ra = front(f"ra_{d}_{x}", c_ra)
                b_ren = front(f"ren_{d}_{x}", c_ren)
                b_wd = front(f"wd_{d}_{x}", c_wd)
                ports = {
                    "i_CLKA": ClockSignal("sync"), "i_CEA": C(1, 1), "i_OCEA": C(1, 1),
                    "i_WEA": b_we, "i_RSTA": C(0, 1),
                    "i_CLKB": ClockSignal("sync"), "i_CEB": b_ren, "i_OCEB": C(1, 1),
                    "i_WEB": C(0, 1), "i_RSTB": C(0, 1),
                }
                for k in range(3):
                    ports[f"i_CSA{k}"] = C(0, 1)
                    ports[f"i_CSB{k}"] = C(0, 1)
                for k in range(DP16KD_ADDR_BITS):
                    if k >= pad:
                        ports[f"i_ADA{k}"] = b_wa[k - pad] if k - pad < len(b_wa) else C(0, 1)
                        ports[f"i_ADB{k}"] = b_ra[k - pad] if k - pad < len(b_ra) else C(0, 1)
                    else:   # below the word address: the x18 mode's byte enables (write both), else 0
                        ports[f"i_ADA{k}"] = C(int(bw == 18 and k < 2), 1)
                        ports[f"i_ADB{k}"] = C(0, 1)
                for k in range(18):
                    bit = x * bw + k
                    ports[f"i_DIA{k}"] = b_wd[k] if k < len(b_wd) else C(0, 1)
                    ports[f"i_DIB{k}"] = C(0, 1)
                    if k < bw:
                        ports[f"o_DOB{k}"] = q[bit]
                m.submodules[f"bram_{d}_{x}"] = Instance(
                    "DP16KD", p_DATA_WIDTH_A=bw, p_DATA_WIDTH_B=bw,
                    p_REGMODE_A="NOREG", p_REGMODE_B="OUTREG", p_RESETMODE="SYNC",
                    p_ASYNC_RESET_RELEASE="SYNC", p_CSDECODE_A="0b000", p_CSDECODE_B="0b000",
                    p_WRITEMODE_A="NORMAL", p_WRITEMODE_B="NORMAL", p_GSR="DISABLED", **ports)
        if deep == 1:
            m.d.comb += self.rd.data.eq(bank_q[0][:self.width])
            return m
        # the bank of each read rides beside it: registered with the read (en), then,
        # decoded one-hot, again with the output register -- one copy per block (kept
        # apart in synthesis), so each select bit drives one block's bw AND gates; each
        # block's word, masked, is registered next to it (SELECT_STAGES: 1), then the
        # banks' masked words are ORed into the output register (2)
        s_ra, s_ren = hi(ra), ren
        for lv in range(copies + tree):       # beside the front registers' levels
            s_ra, s_ren = front(f"ra_sel{lv}", s_ra), front(f"ren_sel{lv}", s_ren)
        sel1 = Signal(range(deep), reset_less=True)
        with m.If(s_ren):
            m.d.sync += sel1.eq(s_ra)
        masked = []
        for d in range(deep):
            row = []
            for x in range(across):
                hot = Signal(reset_less=True, name=f"hot_{d}_{x}", attrs={"keep": 1})
                m.d.sync += hot.eq(sel1 == d)
                mq = Signal(bw, reset_less=True, name=f"masked_{d}_{x}")
                m.d.sync += mq.eq(bank_q[d][x * bw:(x + 1) * bw] & hot.replicate(bw))
                row.append(mq)
            masked.append(Cat(*row))
        word = 0
        for d in range(deep):
            word = word | masked[d]
        out = Signal(self.width, reset_less=True)
        m.d.sync += out.eq(word[:self.width])
        m.d.comb += self.rd.data.eq(out)
        return m
