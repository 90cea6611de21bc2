"""hwgen.rtl.fxround.requant_value in Amaranth's simulator vs hwgen.fixed.requantize:
every rounding and overflow mode, signed and unsigned outputs, shifts right,
none and left (also longer than the code), exhaustively over 7-bit signed and
unsigned input codes."""
import itertools

import numpy as np
import pytest
from amaranth import Module, Signal, signed, unsigned
from amaranth.sim import Simulator

from hwgen.fixed import OVERFLOW_MODES, QUANT_MODES, FixedType, requantize
from hwgen.rtl.fxround import requant_value

IN_W = 7


@pytest.mark.parametrize("in_signed", [True, False])
def test_requant_value_all_modes_exhaustive(in_signed):
    m = Module()
    c = Signal(signed(IN_W) if in_signed else unsigned(IN_W))
    cases, outs = [], []
    # (frac_in, out width, out int bits, signed): shifts 3, 1, 0, -2 and 9 (> code width)
    shapes = [(5, 4, 2, True), (5, 3, 0, False), (3, 4, 1, True), (2, 5, 1, True),
              (6, 5, 5, False), (9, 3, 3, True), (4, 1, 1, True)]
    for (frac_in, w, ib, sg), q, o in itertools.product(shapes, QUANT_MODES, OVERFLOW_MODES):
        fmt = FixedType(w, ib, sg, q, o)
        cases.append((frac_in, fmt))
        outs.append(requant_value(m, c, frac_in, fmt, f"r{len(outs)}"))
    codes = np.arange(-2 ** (IN_W - 1), 2 ** (IN_W - 1)) if in_signed else np.arange(2 ** IN_W)
    got = np.zeros((len(cases), len(codes)), np.int64)

    async def tb(ctx):
        for n, code in enumerate(codes):
            ctx.set(c, int(code))
            for i, s in enumerate(outs):
                got[i, n] = ctx.get(s)

    sim = Simulator(m)
    sim.add_testbench(tb)
    sim.run()
    bad = 0
    for i, (frac_in, f) in enumerate(cases):
        want = requantize(codes, frac_in, f.width, f.frac_bits, f.signed, f.q, f.o)
        bad += int((got[i] != want).sum())
    print(f"fxround ({'signed' if in_signed else 'unsigned'} input): {len(cases)} mode/format "
          f"cases x {len(codes)} codes, mismatches {bad}")
    assert bad == 0
