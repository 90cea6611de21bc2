"""MatmulEngine (hwgen.rtl.matmul) in Amaranth's simulator: output codes vs the
contract (random operands, corners) and vs the golden model (real quantized
linears), measured start->done cycles vs ``cycles()`` exactly, block sparsity,
the host packing round trip, the control protocol, every validation message,
and Verilog generation. Mismatch counts are printed; 0 is the only pass."""
import json
import time

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.sim import Simulator
from conftest import tiny_decoder_feeds

from hwgen import contract as C
from hwgen.fixed import FixedType, requantize
from hwgen.golden import GoldenModel
from hwgen.ir import Graph
from hwgen.rtl import MatmulEngine, MatmulSpec, PEArray, RTLError, linear_operands

I8 = FixedType(8, 4, True)
O8 = FixedType(8, 3, True, "AP_RND", "AP_SAT")


# ----------------------------------------------------------------------------
# a testbench: images in, start, wait for done, out image back
# ----------------------------------------------------------------------------

async def _start_and_wait(ctx, dut, m):
    """Pulse ``start`` with ``m``; cycles from the start cycle (0) to ``done``."""
    assert not ctx.get(dut.busy)
    ctx.set(dut.m, m)
    ctx.set(dut.start, 1)
    await ctx.tick()
    ctx.set(dut.start, 0)
    cyc = 1
    while not ctx.get(dut.done):
        assert ctx.get(dut.busy), "busy fell before done"
        await ctx.tick()
        cyc += 1
        assert cyc < 200_000, "engine hung"
    assert not ctx.get(dut.busy), "busy still high in the done cycle"
    await ctx.tick()
    assert not ctx.get(dut.done), "done is longer than one cycle"
    return cyc


async def _write(ctx, port, words):
    for addr, word in enumerate(words):
        ctx.set(port.addr, addr)
        ctx.set(port.data, word)
        ctx.set(port.en, 1)
        await ctx.tick()
    ctx.set(port.en, 0)


async def _read_out(ctx, dut, n_words):
    words = []
    ctx.set(dut.o_rd.en, 1)
    for addr in range(n_words):
        ctx.set(dut.o_rd.addr, addr)
        await ctx.tick()
        words.append(ctx.get(dut.o_rd.data.as_value()))
    return words


def run_engine(spec: MatmulSpec, x, w, bias=None, shift=None, bitmap=None):
    """One run with the images baked in as initial contents: (y codes, cycles)."""
    img = spec.pack_weights(w, bias, shift, bitmap)
    img["a"] = spec.pack_x(x)
    m = len(x)
    dut = MatmulEngine(spec, init=img)
    res = {}

    async def tb(ctx):
        res["cycles"] = await _start_and_wait(ctx, dut, m)
        res["out"] = [ctx.get(dut.mem["out"][i]) for i in range(m * spec.nt)]

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return spec.unpack_out(res["out"], m), res["cycles"]


def _check(label, spec, y, want, cycles, m, bitmap=None):
    bad = int((y != want).sum())
    print(f"\n[{label}: {spec.rows}x{spec.cols}, m={m} k={spec.k} n={spec.n} block_k={spec.block_k}] "
          f"mismatches {bad}/{want.size}; cycles {cycles} (cycles() {spec.cycles(m, bitmap)}, "
          f"ideal {spec.ideal_cycles(m):.1f})")
    assert bad == 0
    assert cycles == spec.cycles(m, bitmap)


def _spec(rows, cols, k, n, max_m, block_k=16, x_fmt=I8, w_fmt=I8, out_fmt=O8, bias=(0, 0),
          shift=(0, 0)):
    return MatmulSpec(rows=rows, cols=cols, k=k, n=n, max_m=max_m, x_fmt=x_fmt, w_fmt=w_fmt,
                      out_fmt=out_fmt, bias_lo=bias[0], bias_hi=bias[1], shift_min=shift[0],
                      shift_max=shift[1], block_k=block_k)


def _rand_case(rng, spec, m):
    x = rng.integers(spec.x_fmt.min_code, spec.x_fmt.max_code + 1, (m, spec.k))
    w = rng.integers(spec.w_fmt.min_code, spec.w_fmt.max_code + 1, (spec.k, spec.n))
    b = rng.integers(spec.bias_lo, spec.bias_hi + 1, spec.n)
    s = rng.integers(spec.shift_min, spec.shift_max + 1, spec.n)
    return x, w, b, s


def _contract_linear(spec, x, w, b, s):
    """``contract.linear`` with per-column shifts written as per-column output fractional bits."""
    return C.linear(x, 0, w, np.zeros(spec.n, np.int64), b, spec.out_fmt, spec.sum_width,
                    out_frac=-np.asarray(s, np.int64))


# ----------------------------------------------------------------------------
# random operands
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols, k, n, m, max_m, block_k", [
    (4, 4, 10, 6, 5, 9, 4),       # M, K, N not multiples of the array or the block
    (3, 5, 37, 11, 7, 9, 16),     # odd array, one partial block
    (4, 4, 40, 8, 9, 9, 4),       # m = max_m, several M-tiles
    (4, 4, 24, 5, 1, 8, 8),       # a single token
    (2, 3, 3, 4, 3, 4, 2),        # K shorter than min_beats: padded tiles
])
def test_random_vs_contract(rows, cols, k, n, m, max_m, block_k):
    rng = np.random.default_rng(k * 100 + n)
    spec = _spec(rows, cols, k, n, max_m, block_k, bias=(-3000, 3000), shift=(-2, 9))
    x, w, b, s = _rand_case(rng, spec, m)
    y, cycles = run_engine(spec, x, w, b, s)
    want = _contract_linear(spec, x, w, b, s)
    assert (spec.reference(x, w, b, s) == want).all()
    _check("random", spec, y, want, cycles, m)
