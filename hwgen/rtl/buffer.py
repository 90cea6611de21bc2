"""On-chip buffer with a registered read: one write port, one read port,
``READ_LATENCY`` (2) cycles from a read address to its data.

Contract
--------
``Buffer(shape, data)`` holds the words of ``data`` (a ``lib.memory``
``MemoryData`` of ``unsigned(width)``: its depth and initial contents; the
simulator reads and sets it) seen through ``shape`` on the ports (the width,
or a ``lib.data`` layout of that width).

``wr`` (``lib.memory.WritePort.Signature``: ``addr``, ``data``, ``en``, all
inputs): the word is written at the clock edge of a cycle with ``en`` high.

``rd`` (``lib.memory.ReadPort.Signature``: ``addr``, ``en`` in, ``data``
out): in a cycle with ``en`` high the word at ``addr`` is read; it is on
``data`` two cycles later and stays there until the next read arrives (a read
of a word written in the same cycle returns the old word). ``en`` defaults to 1.

Why two cycles: the second register is the block RAM's own output register
(``DP16KD`` ``REGMODE="OUTREG"`` on ECP5). Without it a block RAM's clock to
output (about 5.8 ns on an LFE5U-85F, speed 6) plus one route capped every
engine near 130 MHz; with it the RAM output is as fast as a flip-flop's.

Implementations
---------------
* Default (simulation, the generated Verilog): an Amaranth ``lib.memory``
  ``Memory`` with a synchronous read port, followed by one register.
* ``platform.ecp5_bram`` true (what :mod:`hwgen.impl` passes when it
  synthesizes for ECP5): buffers deeper than :data:`LUTRAM_DEPTH` words are
  built from ``DP16KD`` primitives with the output register on, tiled in
  width and depth in the configuration (18x1024, 9x2048, 4x4096, 2x8192 or
  1x16384) that needs the fewest blocks; the read bank's select rides two
  registers beside the data (the second one-hot, one copy per block column)
  and picks the bank's output with an AND-OR. Shallower buffers
  are distributed RAM: an asynchronous-read ``Memory`` and two registers.
  Initial contents cannot be given on this path (the host loads every buffer
  through ``wr``).
"""
from __future__ import annotations

from amaranth import C, Cat, ClockSignal, Instance, Module, Shape, Signal, Value, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory, MemoryData, ReadPort, WritePort
from amaranth.lib.wiring import Out

from .pe_array import RTLError, check_positive

#: cycles from a read address (``rd.en`` high) to its word on ``rd.data``
READ_LATENCY = 2

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


class Buffer(wiring.Component):
    """A ``depth`` x ``shape`` RAM with write port ``wr`` and a two-cycle read
    port ``rd`` (module docstring)."""

    def __init__(self, shape, data: MemoryData):
        try:
            self.shape = shape
            self.width = Shape.cast(shape).width
            if not isinstance(data, MemoryData) or Shape.cast(data.shape) != unsigned(self.width):
                raise RTLError(f"data must be a MemoryData of unsigned({self.width}), got {data!r}")
            self.depth = check_positive("depth", data.depth)
        except RTLError:
            self._MustUse__silence = True  # never built: no "unused elaboratable" warning
            raise
        self.data = data
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

    def _memory(self, async_read: bool) -> Module:
        m = Module()
        m.submodules.mem = mem = Memory(data=self.data)
        wp = mem.write_port()
        m.d.comb += [wp.addr.eq(self.wr.addr), wp.data.eq(self.wr.data), wp.en.eq(self.wr.en)]
        q = Signal(self.width, reset_less=True)
        if async_read:     # distributed RAM, then two registers
            rp = mem.read_port(domain="comb")
            q1 = Signal(self.width, reset_less=True)
            m.d.comb += rp.addr.eq(self.rd.addr)
            with m.If(self.rd.en):
                m.d.sync += q1.eq(rp.data)
            m.d.sync += q.eq(q1)
        else:              # synchronous read port, then one register
            rp = mem.read_port()
            m.d.comb += [rp.addr.eq(self.rd.addr), rp.en.eq(self.rd.en)]
            m.d.sync += q.eq(rp.data)
        m.d.comb += self.rd.data.eq(q)
        return m

    def _dp16kd(self) -> Module:
        m = Module()
        bw, bd, across, deep = dp16kd_tiling(self.width, self.depth)
        low = (bd - 1).bit_length()              # word address bits inside one block
        pad = DP16KD_ADDR_BITS - low             # address pins below the word address
        wr_hi = self.wr.addr[low:] if deep > 1 else C(0, 1)
        rd_hi = self.rd.addr[low:] if deep > 1 else C(0, 1)
        wdata = Signal(across * bw)
        m.d.comb += wdata.eq(Value.cast(self.wr.data))
        bank_q = []
        for d in range(deep):
            q = Signal(across * bw, name=f"bank{d}_q")
            bank_q.append(q)
            we = Signal(name=f"bank{d}_we")
            m.d.comb += we.eq(self.wr.en & (wr_hi == d))
            for x in range(across):
                ports = {
                    "i_CLKA": ClockSignal("sync"), "i_CEA": C(1, 1), "i_OCEA": C(1, 1),
                    "i_WEA": we, "i_RSTA": C(0, 1),
                    "i_CLKB": ClockSignal("sync"), "i_CEB": self.rd.en, "i_OCEB": C(1, 1),
                    "i_WEB": C(0, 1), "i_RSTB": C(0, 1),
                }
                for k in range(3):
                    ports[f"i_CSA{k}"] = C(0, 1)
                    ports[f"i_CSB{k}"] = C(0, 1)
                for k in range(DP16KD_ADDR_BITS):
                    if k >= pad:
                        ports[f"i_ADA{k}"] = self.wr.addr[k - pad] if k - pad < len(self.wr.addr) else C(0, 1)
                        ports[f"i_ADB{k}"] = self.rd.addr[k - pad] if k - pad < len(self.rd.addr) else C(0, 1)
                    else:   # below the word address: the x18 mode's byte enables (write both), else 0
                        ports[f"i_ADA{k}"] = C(int(bw == 18 and k < 2), 1)
                        ports[f"i_ADB{k}"] = C(0, 1)
                for k in range(18):
                    bit = x * bw + k
                    ports[f"i_DIA{k}"] = wdata[bit] if k < bw and bit < self.width else C(0, 1)
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
        # decoded one-hot, again with the output register -- one copy per block column
        # (kept apart in synthesis), so no select bit drives more than one column's
        # bw AND-OR selectors
        sel1 = Signal(range(deep), reset_less=True)
        with m.If(self.rd.en):
            m.d.sync += sel1.eq(rd_hi)
        cols = []
        for x in range(across):
            hot = Signal(deep, reset_less=True, name=f"hot{x}", attrs={"keep": 1})
            m.d.sync += hot.eq(Cat(sel1 == d for d in range(deep)))
            col = 0
            for d in range(deep):
                col = col | (bank_q[d][x * bw:(x + 1) * bw] & hot[d].replicate(bw))
            cols.append(col)
        m.d.comb += self.rd.data.eq(Cat(*cols)[:self.width])
        return m
