"""Amaranth RTL (hwgen.rtl) in Amaranth's Python simulator, bit-exact against
the contract: the PE array's accumulators vs ``contract.matmul_int`` (random
int8 and a real quantized linear of the tiny decoder), its cycle counts vs
the documented formula, the requantizer vs ``fixed.requantize`` (AP_RND,
AP_SAT), and Verilog generation. Mismatch counts are printed; 0 is the only pass.
"""
import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.sim import Simulator
from conftest import WithReset, build_tiny_decoder, tiny_decoder_feeds

from hwgen import contract as C
from hwgen.fixed import FixedType, requantize
from hwgen.golden import GoldenModel, frac_of
from hwgen.quant import QuantConfig, quantize
from hwgen.rtl import PEArray, Requant, RTLError, ShiftRequant
from hwgen.rtl import verilog as hdl_verilog
from hwgen.rtl.requant import shift_code

INT8 = FixedType(8, 8, True)


# ----------------------------------------------------------------------------
# a testbench that streams tiles through a PEArray
# ----------------------------------------------------------------------------

def run_tiles(dut: PEArray, tiles, in_gap=0.0, seed=0, gap=None, lenient=False, zero_b=False):
    """Stream ``tiles`` (a list of (A[rows x K], B[K x cols])) through ``dut``
    back to back, as a producer that keeps the array's rule: a ``last`` beat is
    held back until ``gap`` (default ``dut.min_tile_gap``) cycles after the
    previous one. ``in_gap``: probability that a cycle is a bubble
    (``i.valid`` low). Returns (C tiles, per-tile cycles from first beat to
    last row, total cycles first beat .. last row, final ``overrun``).
    ``lenient``: stop after the last beat's drain time instead of waiting for
    every tile's rows (a rule-breaking producer loses rows). ``zero_b``: the
    producer presents an all-zero B row in every bubble (what an array with
    ``zero_bubbles=False`` needs); otherwise a bubble leaves the last beat's payload."""
    rng = np.random.default_rng(seed)
    beats = []
    for t, (a, b) in enumerate(tiles):
        k = a.shape[1]
        for i in range(k):
            beats.append((t, {"a": [int(v) for v in a[:, i]], "b": [int(v) for v in b[i]],
                              "first": i == 0, "last": i == k - 1}))
    got = [np.zeros((dut.rows, dut.cols), np.int64) for _ in tiles]
    start, end, rows_seen = {}, {}, [0] * len(tiles)
    state = {"cycles": 0}

    gap = dut.min_tile_gap if gap is None else gap

    async def tb(ctx):
        nb, tile_out, cyc, prev_last = 0, 0, 0, -(1 << 30)
        while (tile_out < len(tiles) if not lenient
               else nb < len(beats) or cyc < prev_last + PEArray.LATENCY + dut.rows + 2):
            valid = nb < len(beats) and rng.random() >= in_gap
            if valid and beats[nb][1]["last"]:
                valid = cyc - prev_last >= gap
                prev_last = cyc if valid else prev_last
            ctx.set(dut.i.valid, valid)
            if not valid and zero_b:
                ctx.set(dut.i.payload.b, [0] * dut.cols)
            if valid:
                ctx.set(dut.i.payload, beats[nb][1])
                start.setdefault(beats[nb][0], cyc)
                nb += 1
            if ctx.get(dut.o.valid) and not lenient:
                p = ctx.get(dut.o.payload)
                assert p.row == rows_seen[tile_out], "rows out of order"
                got[tile_out][p.row] = [int(v) for v in p.data]
                rows_seen[tile_out] += 1
                assert bool(p.last) == (rows_seen[tile_out] == dut.rows)
                if p.last:
                    end[tile_out] = cyc
                    tile_out += 1
            await ctx.tick()
            cyc += 1
            assert cyc < 100_000, "simulation hung"
        state["cycles"] = cyc
        state["overrun"] = ctx.get(dut.overrun)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    if lenient:
        return got, [], 0, state["overrun"]
    per_tile = [end[t] - start[t] + 1 for t in range(len(tiles))]
    return got, per_tile, end[len(tiles) - 1] - start[0] + 1, state["overrun"]


def _mismatches(got, tiles):
    return sum(int((g != C.matmul_int(a, b, 128 * 128)).sum()) for g, (a, b) in zip(got, tiles))


def _rand_tile(rng, rows, cols, k):
    return rng.integers(-128, 128, (rows, k)), rng.integers(-128, 128, (k, cols))


# ----------------------------------------------------------------------------
# PE array
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, msg", [
    ((0, 4, 8, 8, 21), "rows must be a positive integer, got 0"),
    ((4, -1, 8, 8, 21), "cols must be a positive integer, got -1"),
    ((True, 4, 8, 8, 21), "rows must be a positive integer, got True"),
    ((4, 4, 0, 8, 21), "a_width must be an integer in 1..48, got 0"),
    ((4, 4, 8, 8.0, 21), "b_width must be an integer in 1..48, got 8.0"),
    ((4, 4, 8, 8, 49), "acc_width must be an integer in 1..48, got 49"),
    ((4, 4, 8, 8, 15), "acc_width must be at least a_width + b_width = 16 (one product), got 15"),
])
def test_pe_array_validation(args, msg):
    with pytest.raises(RTLError) as e:
        PEArray(*args)
    assert str(e.value) == msg


def test_pe_array_random_int8_k37():
    """4x4 array, int8 x int8, K = 37, the contract's accumulator width; exact
    cycles of one isolated tile: ``PEArray.cycles(K, rows)``."""
    rng = np.random.default_rng(1)
    k = 37
    dut = PEArray.for_formats(4, 4, INT8, INT8, k)
    assert dut.acc_width == C.acc_width(INT8, INT8, k) == 21
    # the extreme tile (every product +2**14) next to a random one
    worst = (np.full((4, k), -128), np.full((k, 4), -128))
    tiles = [_rand_tile(rng, 4, 4, k), worst]
    got, per_tile, _, _ = run_tiles(dut, tiles[:1])
    bad = _mismatches(got, tiles[:1])
    got2, *_ = run_tiles(dut, tiles[1:])
    bad += _mismatches(got2, tiles[1:])
    assert got2[0][0, 0] == k * 2 ** 14
    print(f"\n[pe 4x4 K={k}] {2 * 16} accumulators, mismatches {bad}; "
          f"cycles {per_tile[0]} (PEArray.cycles = {PEArray.cycles(k, 4)})")
    assert bad == 0
    assert per_tile[0] == PEArray.cycles(k, 4)


def test_pe_array_back_to_back_throughput():
    """Tiles with K >= rows (PEArray.min_tile_gap, which MatmulSpec.min_beats
    relies on) stream with no gap ((n-1)*K + cycles(K) in all, one MAC per PE
    per cycle); shorter tiles need bubbles from the producer but stay exact."""
    rng = np.random.default_rng(2)
    dut = PEArray(4, 4, 8, 8, 21)
    assert dut.min_tile_gap == 4
    k, n = 4, 6
    tiles = [_rand_tile(rng, 4, 4, k) for _ in range(n)]
    got, _, total, overrun = run_tiles(dut, tiles)
    bad = _mismatches(got, tiles)
    want = (n - 1) * k + PEArray.cycles(k, 4)
    print(f"\n[pe 4x4 back-to-back {n} tiles K={k}] mismatches {bad}; "
          f"cycles {total} ((n-1)*K + cycles(K) = {want})")
    assert bad == 0 and total == want and not overrun
    ks = [1, 3, 2, 37, 1, 4]  # short tiles: the producer holds their ends back
    tiles = [_rand_tile(rng, 4, 4, kk) for kk in ks]
    got, _, total, overrun = run_tiles(dut, tiles)
    bad = _mismatches(got, tiles)
    print(f"[pe 4x4 short tiles K={ks}] mismatches {bad}; cycles {total}")
    assert bad == 0 and not overrun


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (1, 1)])
def test_pe_array_bubbles(shape):
    """Random bubbles (i.valid low, 30 % of cycles) anywhere in the stream; odd
    shapes: still exact."""
    rows, cols = shape
    rng = np.random.default_rng(3)
    dut = PEArray(rows, cols, 8, 6, 22)
    ks = [7, 1, 13, 2, 37]
    tiles = [(rng.integers(-128, 128, (rows, kk)), rng.integers(-32, 32, (kk, cols))) for kk in ks]
    got, _, total, overrun = run_tiles(dut, tiles, in_gap=0.3, seed=4)
    bad = _mismatches(got, tiles)
    print(f"\n[pe {rows}x{cols} bubbles] mismatches {bad}; cycles {total}")
    assert bad == 0 and not overrun


def test_pe_array_producer_zeroed_bubbles():
    """``zero_bubbles=False``: the array leaves B of a bubble as it comes, so a
    producer that zeroes it stays exact and one that does not is caught (the
    same stream as test_pe_array_bubbles)."""
    rng = np.random.default_rng(3)
    ks = [7, 1, 13, 2, 37]
    tiles = [(rng.integers(-128, 128, (4, kk)), rng.integers(-32, 32, (kk, 4))) for kk in ks]
    dut = PEArray(4, 4, 8, 6, 22, zero_bubbles=False)
    got, _, _, overrun = run_tiles(dut, tiles, in_gap=0.3, seed=4, zero_b=True)
    assert _mismatches(got, tiles) == 0 and not overrun
    got, _, _, _ = run_tiles(PEArray(4, 4, 8, 6, 22, zero_bubbles=False), tiles, in_gap=0.3, seed=4)
    assert _mismatches(got, tiles) > 0
    with pytest.raises(RTLError) as e:
        PEArray(4, 4, 8, 6, 22, zero_bubbles=1)
    assert str(e.value) == "zero_bubbles must be a bool, got 1"


def test_pe_array_reset_in_every_cycle_of_a_tile():
    """A one-cycle reset in each cycle of a tile's flight in turn (beats in, the
    fan-out, the multipliers, the accumulators, the bank draining): no output
    row of the old tile appears after the reset, and the next tile is exact at
    its usual cycles. The flag copies per row and per PE have no reset; the
    output's valid comes from the reset delay line."""
    rng = np.random.default_rng(3)
    dut = PEArray(2, 3, 8, 8, 24, zero_bubbles=False)
    top = WithReset(dut)
    (a0, b0), (a1, b1) = _rand_tile(rng, 2, 3, 5), _rand_tile(rng, 2, 3, 4)
    span = PEArray.cycles(5, 2)
    seen = []

    async def tile(ctx, a, b):
        for k in range(len(b)):
            ctx.set(dut.i.valid, 1)
            ctx.set(dut.i.payload, {"a": list(a[:, k]), "b": list(b[k]), "first": k == 0,
                                    "last": k == len(b) - 1})
            await ctx.tick()
        ctx.set(dut.i.valid, 0)
        ctx.set(dut.i.payload.b, [0] * 3)

    async def tb(ctx):
        for reset_at in range(1, span):
            await tile(ctx, a0, b0)
            for _ in range(reset_at - len(b0)):
                await ctx.tick()
            ctx.set(top.rst, 1)
            await ctx.tick()
            ctx.set(top.rst, 0)
            for _ in range(span):
                assert not ctx.get(dut.o.valid), reset_at
                await ctx.tick()
            await tile(ctx, a1, b1)
            rows, cyc = [], len(b1)
            while len(rows) < 2:
                if ctx.get(dut.o.valid):
                    rows.append(list(ctx.get(dut.o.payload.data)))
                await ctx.tick()
                cyc += 1
            seen.append((reset_at, rows, cyc))

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    want = (a1 @ b1).tolist()
    assert len(seen) == span - 1
    assert all(rows == want for _, rows, _ in seen)
    assert all(cyc == PEArray.cycles(4, 2) for _, _, cyc in seen)


def test_pe_array_overrun_is_flagged():
    """A producer that breaks the rule (tile ends 2 cycles apart on a 4-row
    array) makes the array raise ``overrun``; keeping the rule, it stays low."""
    rng = np.random.default_rng(5)
    tiles = [_rand_tile(rng, 4, 4, 2) for _ in range(3)]
    dut = PEArray(4, 4, 8, 8, 21)
    *_, overrun = run_tiles(dut, tiles, gap=2, lenient=True)
    assert overrun
    got, *_, overrun = run_tiles(PEArray(4, 4, 8, 8, 21), tiles)
    assert not overrun and _mismatches(got, tiles) == 0


# ----------------------------------------------------------------------------
# a real quantized linear, tiled onto a 4x4 array
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_w8a8():
    g, _ = quantize(build_tiny_decoder(), tiny_decoder_feeds(), QuantConfig.from_bits("w8a8"))
    vals = GoldenModel(g)(tiny_decoder_feeds(1)[0], record=True)
    return g, vals


def _requant_sim(dut: Requant, acc: np.ndarray) -> np.ndarray:
    """Rows of ``acc`` (lanes wide) through a combinational Requant."""
    out = []

    async def tb(ctx):
        for row in acc:
            ctx.set(dut.i, [int(v) for v in row])
            out.append([int(v) for v in ctx.get(dut.o)])

    sim = Simulator(dut)
    sim.add_testbench(tb)
    sim.run()
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("name", ["n4.linear", "n8.linear", "n11.linear", "n13.linear", "n28.linear"])
def test_pe_array_quantized_linear(tiny_w8a8, name):
    """A tiny-decoder linear (W8A8, per-channel): its golden x codes (all 24 tokens)
    and weight codes, tiled M x N onto a 4x4 array: every accumulator equals
    ``matmul_int``; then + bias and a per-column Requant equal the golden
    model's output codes."""
    g, vals = tiny_w8a8
    node = g.node(name)
    x = vals[node.inputs[0]].reshape(-1, vals[node.inputs[0]].shape[-1])
    w = g.weights[node.inputs[1]].astype(np.int64)
    m, k = x.shape
    n = w.shape[1]
    x_fmt, w_fmt = g.tensors[node.inputs[0]].fmt, g.tensors[node.inputs[1]].fmt
    dut = PEArray.for_formats(4, 4, x_fmt, w_fmt, k)
    tiles, where = [], []
    for i in range(0, m, 4):
        for j in range(0, n, 4):
            tiles.append((x[i:i + 4], w[:, j:j + 4]))
            where.append((i, j))
    got, per_tile, total, overrun = run_tiles(dut, tiles)
    assert not overrun
    acc = np.zeros((m, n), np.int64)
    for (i, j), c in zip(where, got):
        acc[i:i + 4, j:j + 4] = c
    max_product = max(abs(v) for v in C.product_range(x_fmt, w_fmt))
    want = C.matmul_int(x, w, max_product)
    bad = int((acc != want).sum())
    # + bias, then requantize per column (accumulator frac = x_frac + w_frac[n])
    bias = g.weights[g.node_input(node, "bias")].astype(np.int64)
    out_t = g.tensors[node.outputs[0]]
    x_frac = int(np.max(frac_of(g, node.inputs[0])))
    w_frac = np.broadcast_to(np.asarray(g.tensors[node.inputs[1]].frac_bits()).reshape(-1), (n,))
    out_frac = np.broadcast_to(np.asarray(frac_of(g, node.outputs[0])).reshape(-1), (n,))
    shifts = [int(x_frac + wf - of) for wf, of in zip(w_frac, out_frac)]
    rq = Requant(node.attrs["acc_bits"], shifts, out_t.fmt.width, out_t.fmt.signed, lanes=n)
    y = _requant_sim(rq, acc + bias)
    y_gold = vals[node.outputs[0]].reshape(-1, n)
    want_total = (len(tiles) - 1) * k + PEArray.cycles(k, 4)
    bad_y = int((y != y_gold).sum())
    print(f"\n[{name} x{x.shape}@w{w.shape} on 4x4, {len(tiles)} tiles K={k}, acc {dut.acc_width} bits] "
          f"accumulator mismatches {bad}/{acc.size}; requant vs golden {bad_y}/{y.size}; "
          f"cycles {total} (back to back: (tiles-1)*K + cycles(K) = {want_total}), "
          f"one tile {per_tile[0]} (PEArray.cycles = {PEArray.cycles(k, 4)})")
    assert bad == 0 and bad_y == 0
    assert total == want_total


# ----------------------------------------------------------------------------
# requantizer
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("in_width, shift, out_width, out_signed", [
    (21, 7, 8, True),     # typical linear output
    (21, 0, 8, True),     # no shift: pure saturation
    (12, -3, 16, True),   # left shift into a wider output
    (16, -3, 12, True),   # left shift that saturates
    (21, 9, 8, False),    # unsigned output: negatives saturate to 0
    (10, 15, 4, True),    # shift past the input width
    (20, 12, 16, True),   # output wider than the shifted accumulator
    (5, 1, 1, True),      # 1-bit signed output
])
def test_requant_vs_fixed(in_width, shift, out_width, out_signed):
    rng = np.random.default_rng(in_width * 100 + shift)
    lo, hi = -(1 << (in_width - 1)), (1 << (in_width - 1)) - 1
    lanes = 8
    edges = [lo, lo + 1, hi, hi - 1, 0, -1, 1]
    if shift > 0:  # exact ties k + 1/2 and their neighbours, around zero and at the saturation limits
        half = 1 << (shift - 1)
        for base in (0, 1 << (shift + out_width - 1), -(1 << (shift + out_width - 1))):
            for t in range(-6, 7):
                edges += [base + t * 2 * half + half + d for d in (-1, 0, 1)]
    # uniform over the input range (mostly saturating) and over the window that
    # maps onto the output range and just past it (mostly not)
    olo, ohi = (-(1 << (out_width - 1)), (1 << (out_width - 1)) - 1) if out_signed else (0, (1 << out_width) - 1)
    sh = max(shift, 0)
    near = rng.integers(max(lo, (2 * olo - 2) << sh), min(hi, (2 * ohi + 2) << sh) + 1, 2000)
    vals = np.clip(np.concatenate([rng.integers(lo, hi + 1, 2000), near, np.array(edges)]), lo, hi)
    vals = np.concatenate([vals, np.zeros((-len(vals)) % lanes, np.int64)]).astype(np.int64)
    want = requantize(vals, shift, out_width, 0, out_signed, "AP_RND", "AP_SAT")
    got = _requant_sim(Requant(in_width, shift, out_width, out_signed, lanes=lanes),
                       vals.reshape(-1, lanes)).reshape(-1)
    bad = int((got != want).sum())
    sat = int(((want == ohi) | (want == olo)).sum())
    print(f"\n[requant in {in_width} shift {shift} -> {'s' if out_signed else 'u'}{out_width}] "
          f"{vals.size} codes ({sat} at a limit), mismatches {bad}")
    assert bad == 0


def test_requant_registered_and_validation():
    dut = Requant(16, [3, 4], 8, True, lanes=2, registered=True)
    vals = [(1000, -1000), (-32768, 32767), (12, -12)]
    got = []

    async def tb(ctx):
        for v in vals:
            ctx.set(dut.i, list(v))
            await ctx.tick()
            got.append([int(x) for x in ctx.get(dut.o)])

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    v = np.array(vals)
    want = np.stack([requantize(v[:, 0], 3, 8, 0, True, "AP_RND", "AP_SAT"),
                     requantize(v[:, 1], 4, 8, 0, True, "AP_RND", "AP_SAT")], axis=1)
    assert (np.array(got) == want).all()
    for args, kw, msg in [
        ((0, 3, 8), {}, "in_width must be an integer in 1..48, got 0"),
        ((16, 3, 8), {"lanes": 0}, "lanes must be a positive integer, got 0"),
        ((16, [1, 2], 8), {"lanes": 3}, "shift must have one entry per lane (3), got 2"),
        ((16, 63, 8), {}, "shift must be an integer in -62..62, got 63"),
        ((16, 2.0, 8), {}, "shift must be an int or a list of 1 ints, got 2.0"),
        ((16, 2, 8), {"out_signed": 1}, "out_signed must be a bool, got 1"),
    ]:
        with pytest.raises(RTLError) as e:
            Requant(*args, **kw)
        assert str(e.value) == msg


@pytest.mark.parametrize("in_width, shift_min, shift_max, out_width, out_signed", [
    (21, 3, 9, 8, True),      # typical linear outputs, positive shifts only (pre-shift right by 2)
    (20, -3, 6, 8, True),     # left and right shifts (pre-shift left by 3)
    (16, -6, -2, 12, True),   # left shifts only, saturating
    (18, 0, 0, 8, False),     # one shift, unsigned output
    (12, 10, 16, 4, True),    # shifts past the input width
    (24, 1, 1, 16, True),     # a single shift of 1
])
def test_shift_requant_vs_fixed(in_width, shift_min, shift_max, out_width, out_signed):
    """ShiftRequant with a random run-time shift per lane and value: every code
    equals ``fixed.requantize`` (AP_RND, AP_SAT); LATENCY cycles from i to o."""
    rng = np.random.default_rng(in_width + 7 * shift_max)
    lanes, n = 6, 400
    lo, hi = -(1 << (in_width - 1)), (1 << (in_width - 1)) - 1
    sh = rng.integers(shift_min, shift_max + 1, (n, lanes))
    half = np.where(sh > 0, 1 << np.maximum(sh - 1, 0), 0)
    ties = rng.integers(-200, 200, (n, lanes)) * (2 * half) + half        # exact ties
    vals = np.where(rng.random((n, lanes)) < 0.3, ties, rng.integers(lo, hi + 1, (n, lanes)))
    vals[:4] = [[lo] * lanes, [hi] * lanes, [0] * lanes, [-1] * lanes]
    vals = np.clip(vals, lo, hi)
    want = requantize(vals, sh, out_width, 0, out_signed, "AP_RND", "AP_SAT")
    dut = ShiftRequant(in_width, shift_min, shift_max, out_width, out_signed, lanes=lanes)
    got = []

    async def tb(ctx):
        for row in range(n + ShiftRequant.LATENCY):
            if row < n:
                ctx.set(dut.i, {"c": [int(v) for v in vals[row]],
                                "t": [int(shift_code(int(v), shift_min)) for v in sh[row]]})
            await ctx.tick()
            if row + 1 >= ShiftRequant.LATENCY:
                got.append([int(v) for v in ctx.get(dut.o)])

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    got = np.array(got[:n])
    bad = int((got != want).sum())
    print(f"\n[shift requant in {in_width}, shifts {shift_min}..{shift_max} -> "
          f"{'s' if out_signed else 'u'}{out_width}] {want.size} codes, mismatches {bad}")
    assert bad == 0


def test_shift_requant_validation():
    for args, msg in [
        ((0, 0, 1, 8), "in_width must be an integer in 1..48, got 0"),
        ((16, -63, 1, 8), "shift_min must be an integer in -62..62, got -63"),
        ((16, 0, 1.0, 8), "shift_max must be an integer in -62..62, got 1.0"),
        ((16, 2, 1, 8), "shift_min (2) must not exceed shift_max (1)"),
        ((16, 0, 1, 49), "out_width must be an integer in 1..48, got 49"),
        ((16, 0, 1, 8, "yes"), "out_signed must be a bool, got 'yes'"),
        ((16, 0, 1, 8, True, 0), "lanes must be a positive integer, got 0"),
    ]:
        with pytest.raises(RTLError) as e:
            ShiftRequant(*args)
        assert str(e.value) == msg


# ----------------------------------------------------------------------------
# Verilog
# ----------------------------------------------------------------------------

def test_verilog_generation():
    v = hdl_verilog.convert(PEArray(4, 4, 8, 8, 21), name="pe_array")
    assert "module pe_array(" in v and "endmodule" in v
    for port in ("i__valid", "i__payload", "o__valid", "o__payload", "overrun"):
        assert port in v, port
    assert "i__ready" not in v and "o__ready" not in v  # both streams are always ready
    r = verilog.convert(Requant(21, [7, 8, 9, 10], 8, True, lanes=4), name="requant")
    assert "module requant(" in r
