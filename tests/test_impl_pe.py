"""The PE array's multiplier mapping for FPGA timing closure (hwgen.rtl.pe_array:
PEMapping, RegisteredMul, MULT18X18D, FabricMul): arrays that mix DSP-twin and
fabric multipliers stay bit-exact against ``contract.matmul_int`` in Amaranth's
simulator (random tiles, extreme codes, bubbles) with the documented cycle
counts; the synthesis netlist instantiates MULT18X18D with its registers for
exactly the PEs the mapping gives DSPs."""
import re

import numpy as np
import pytest
from test_rtl_matmul import _mismatches, _rand_tile, run_tiles

from hwgen.rtl import verilog as hdl_verilog
from hwgen.rtl.pe_array import (FANOUT_GROUP, FANOUT_LEVELS, MUL_STAGES, PIPE, FabricMul, PEArray, PEMapping, RTLError,
                                pe_kinds)


@pytest.mark.parametrize("dsp", [0, 5])
def test_mixed_mapping_bit_exact(dsp):
    """dsp=0: every PE a fabric multiplier; dsp=5 of 12: five DSP twins, seven
    fabric. Random tiles of K = 1, 2, 7, 9, all-(-128) corners (the largest
    product) and random bubbles."""
    rng = np.random.default_rng(dsp)
    dut = PEArray(3, 4, 8, 8, 24, mapping=PEMapping(dsp=dsp, instances=False))
    tiles = [_rand_tile(rng, 3, 4, k) for k in (1, 2, 7, 9)]
    tiles.append((np.full((3, 5), -128), np.full((5, 4), -128)))
    tiles.append((np.full((3, 3), 127), np.full((3, 4), -128)))
    got, per_tile, _, overrun = run_tiles(dut, tiles, in_gap=0.3, seed=dsp)
    assert not overrun
    bad = _mismatches(got, tiles)
    print(f"[pe 3x4 dsp={dsp}] mismatches {bad}")
    assert bad == 0


def test_mixed_mapping_cycles_and_odd_widths():
    """An isolated tile takes exactly PEArray.cycles(K, rows) whatever the
    multipliers; 5-bit x 3-bit operands exercise the fabric tree's uneven levels."""
    rng = np.random.default_rng(7)
    dut = PEArray(2, 3, 5, 3, 16, mapping=PEMapping(dsp=2, instances=False))
    a, b = rng.integers(-16, 16, (2, 6)), rng.integers(-4, 4, (6, 3))
    got, per_tile, _, _ = run_tiles(dut, [(a, b)])
    assert _mismatches(got, [(a, b)]) == 0
    assert per_tile[0] == PEArray.cycles(6, 2) == 6 + 2 + PEArray.LATENCY - 1
    assert PEArray.LATENCY == PIPE + 2 == 1 + FANOUT_LEVELS + MUL_STAGES + 2


@pytest.mark.parametrize("aw, bw", [(4, 4), (4, 1), (3, 2), (5, 3), (4, 5), (2, 9)])
def test_fabric_mul_exhaustive(aw, bw):
    """Every signed product through one FabricMul, for b of 1 to 5 and 9 bits: the
    sign row subtracted where the adder tree first pairs it (or alone, 1 bit),
    the spare stage's operand registers (b of up to 8 bits: at most 3 adder
    levels) or none (9-bit b: 4 levels in the 4 stages)."""
    from amaranth.sim import Simulator

    dut = FabricMul(aw, bw)
    pairs = [(x, y) for x in range(-(1 << aw - 1), 1 << aw - 1) for y in range(-(1 << bw - 1), 1 << bw - 1)]
    out = []

    async def tb(ctx):
        for n in range(len(pairs) + MUL_STAGES):
            if n < len(pairs):
                ctx.set(dut.a, pairs[n][0])
                ctx.set(dut.b, pairs[n][1])
            if n >= MUL_STAGES:
                out.append(ctx.get(dut.p))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    bad = sum(int(o != x * y) for o, (x, y) in zip(out, pairs))
    print(f"[fabric {aw}x{bw} exhaustive] mismatches {bad} of {len(pairs)}")
    assert bad == 0 and len(out) == len(pairs)


def test_netlist_instances():
    """With a platform mapping of 3 DSPs, the Verilog has exactly 3 MULT18X18D
    with input and output registers on CLK0/CE0, and no `*` left in the fabric PEs;
    the flags' and the operands' fan-out copies carry `keep` (hwgen.impl keeps
    them apart): a tree of operand copies, one per 4 then one per FANOUT_GROUP
    PEs of a row or column."""
    class Plat:
        pe_mapping = PEMapping(dsp=3)

    text = hdl_verilog.convert(PEArray(2, 10, 8, 8, 24), name="top", platform=Plat())
    cells = re.findall(r"MULT18X18D #\((.*?)\) dsp \(", text, re.S)
    assert len(cells) == 3
    for c in cells:
        for r in ("INPUTA", "INPUTB", "OUTPUT"):
            assert f'.REG_{r}_CLK("CLK0")' in c and f'.REG_{r}_CE("CE0")' in c
        assert "REG_PIPELINE" not in c
    kept = [re.search(r"reg (?:signed )?(?:\[\d+:0\] )?(\w+)", d).group(1) for d in text.split(";")
            if "keep" in d and " reg " in d]
    assert sorted(k for k in kept if k.startswith("first_pe")) == sorted(f"first_pe{i}_{j}" for i in range(2) for j in range(10))
    assert sorted(k for k in kept if k.startswith("last_r")) == ["last_r0", "last_r1"]
    assert (FANOUT_GROUP, FANOUT_LEVELS) == (2, 2)
    for i in range(2):   # a row of 10 PEs: 3 copies (4 PEs each), then 5 (2 PEs each)
        assert sorted(k for k in kept if k.startswith(f"a_{i}_")) == (
            [f"a_{i}_l1_{g}" for g in range(3)] + [f"a_{i}_l2_{g}" for g in range(5)])
    assert not [k for k in kept if k.startswith("an_")]   # no negated copies: FabricMul subtracts
    # the level-2 copy 2 (PEs 4, 5) is loaded from level-1 copy 1 (PEs 4 .. 7), copy 4 (PEs 8, 9) from copy 2
    assert re.search(r"a_0_l2_2 <= a_0_l1_1;", text) and re.search(r"a_0_l2_4 <= a_0_l1_2;", text)
    assert sorted(k for k in kept if k.startswith("b_")) == sorted(f"b_{j}_l{v}_0" for j in range(10) for v in (1, 2))
    assert pe_kinds(2, 3, 8, 8, Plat.pe_mapping) == [["dsp"] * 3, ["fabric"] * 3]
    assert pe_kinds(2, 3, 24, 8, Plat.pe_mapping) == [["dsp"] * 3] * 2  # wider than 18 bits


@pytest.mark.parametrize("make, msg", [
    (lambda: PEMapping(dsp=-1), "PEMapping.dsp must be an integer >= 0, got -1"),
    (lambda: PEMapping(dsp=True), "PEMapping.dsp must be an integer >= 0, got True"),
    (lambda: PEMapping(dsp=2, instances=1), "PEMapping.instances must be a bool, got 1"),
    (lambda: PEArray(2, 2, 8, 8, 24, mapping=3), "mapping must be a PEMapping or None, got 3"),
])
def test_mapping_validation(make, msg):
    with pytest.raises(RTLError) as e:
        make()
    assert str(e.value) == msg
