"""hwgen.rtl.buffer.Buffer: the two-cycle read contract in Amaranth's simulator
(behavioural memory and the ECP5 distributed-RAM path), the DP16KD tiling and
the ECP5 block-RAM netlist (every block with its output register on)."""
import re

import numpy as np
import pytest
from amaranth import Elaboratable, Fragment, Value, unsigned
from amaranth.lib import data
from amaranth.lib.memory import MemoryData
from amaranth.sim import Simulator

from hwgen.rtl import verilog as hdl_verilog
from hwgen.rtl.buffer import LUTRAM_DEPTH, READ_LATENCY, Buffer, dp16kd_tiling
from hwgen.rtl.pe_array import RTLError


class _ECP5:
    ecp5_bram = True


def _run(buf: Buffer, writes, reads, platform=None):
    """Write ``writes`` ({addr: word}), then read ``reads`` (a list of addresses,
    None = a cycle with ``en`` low) one per cycle; returns ``data`` of every cycle
    from the first read on (``len(reads) + READ_LATENCY`` samples)."""
    seen = []

    async def tb(ctx):
        for a, w in writes.items():
            ctx.set(buf.wr.addr, a)
            ctx.set(Value.cast(buf.wr.data), w)
            ctx.set(buf.wr.en, 1)
            await ctx.tick()
        ctx.set(buf.wr.en, 0)
        for a in reads + [None] * READ_LATENCY:
            ctx.set(buf.rd.en, a is not None)
            if a is not None:
                ctx.set(buf.rd.addr, a)
            await ctx.tick()
            seen.append(ctx.get(Value.cast(buf.rd.data)))

    sim = Simulator(buf if platform is None else _Wrap(buf, platform))
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return seen


class _Wrap(Elaboratable):
    """Elaborates ``buf`` with ``platform`` (what hwgen.impl passes)."""

    def __init__(self, buf, platform):
        self.buf, self.platform = buf, platform

    def elaborate(self, platform):
        return Fragment.get(self.buf, self.platform)


@pytest.mark.parametrize("platform, depth", [(None, 200), (_ECP5(), 40)])
def test_two_cycle_read(platform, depth):
    """Behavioural (any depth) and the ECP5 distributed-RAM path (depth <=
    LUTRAM_DEPTH, simulated): the word read in cycle t is on ``data`` after
    READ_LATENCY ticks and holds while ``en`` is low."""
    assert depth <= LUTRAM_DEPTH or platform is None
    rng = np.random.default_rng(depth)
    words = {int(a): int(w) for a, w in zip(rng.permutation(depth)[:30], rng.integers(0, 1 << 20, 30))}
    buf = Buffer(unsigned(20), MemoryData(shape=unsigned(20), depth=depth, init=[]))
    addrs = list(words)[:12]
    reads = addrs[:6] + [None, None] + addrs[6:]
    seen = _run(buf, words, reads, platform)
    # sample k (after k+1 ticks) shows the read issued READ_LATENCY - 1 samples earlier
    want, last = [], None
    for k in range(len(seen)):
        src = k - (READ_LATENCY - 1)
        if 0 <= src < len(reads) and reads[src] is not None:
            last = words[reads[src]]
        want.append(last)
    got = [s for s, w in zip(seen, want) if w is not None]
    assert got == [w for w in want if w is not None]


def test_layout_ports_and_init():
    """A ``lib.data`` layout on the ports; initial contents from the MemoryData."""
    lay = data.ArrayLayout(unsigned(6), 3)
    buf = Buffer(lay, MemoryData(shape=unsigned(18), depth=4, init=[0x3F, 1 << 12]))
    seen = _run(buf, {}, [1, 0])
    assert seen[READ_LATENCY - 1] == 1 << 12 and seen[READ_LATENCY] == 0x3F


@pytest.mark.parametrize("width, depth, want", [
    (128, 9216, (18, 1024, 8, 9)),   # the MiniLM 384x384 weight buffer on 16x16
    (128, 3072, (18, 1024, 8, 3)),
    (30, 577, (18, 1024, 2, 1)),
    (8, 2048, (9, 2048, 1, 1)),
    (1, 16000, (1, 16384, 1, 1)),
    (272, 100, (18, 1024, 16, 1)),
])
def test_dp16kd_tiling(width, depth, want):
    w, d, across, deep = dp16kd_tiling(width, depth)
    assert (w, d, across, deep) == want
    assert w * across >= width and d * deep >= depth


def test_ecp5_netlist_dp16kd_with_output_register():
    """A 40-bit x 3000-word buffer on the ECP5 path: 3 x 3 DP16KD (18 x 1024),
    each with REGMODE_B = OUTREG, DATA_WIDTH 18, write address on ADA4.. and
    read enable on CEB; 40-word buffers stay distributed RAM (no DP16KD)."""
    buf = Buffer(unsigned(40), MemoryData(shape=unsigned(40), depth=3000, init=[]))
    text = hdl_verilog.convert(buf, name="buf", platform=_ECP5())
    cells = re.findall(r"DP16KD #\((.*?)\) (\w+) \((.*?)\);", text, re.S)
    assert len(cells) == 9
    for params, _, conns in cells:
        assert '.REGMODE_B("OUTREG")' in params and ".DATA_WIDTH_B(32'd18)" in params
        assert ".ADA0(1'h1)" in conns and ".ADA1(1'h1)" in conns   # both byte enables
        assert ".ADB0(1'h0)" in conns and ".CEB(rd__en)" in conns
    small = hdl_verilog.convert(Buffer(unsigned(40), MemoryData(shape=unsigned(40), depth=40, init=[])),
                                name="buf", platform=_ECP5())
    assert "DP16KD" not in small


def test_validation():
    with pytest.raises(RTLError, match=r"data must be a MemoryData of unsigned\(8\)"):
        Buffer(unsigned(8), MemoryData(shape=unsigned(9), depth=4, init=[]))
    buf = Buffer(unsigned(8), MemoryData(shape=unsigned(8), depth=100, init=[1]))
    with pytest.raises(RTLError, match="initial contents cannot be mapped to ECP5 block RAM"):
        hdl_verilog.convert(buf, name="buf", platform=_ECP5())
