"""MatmulEngine (hwgen.rtl.matmul) in Amaranth's simulator: output codes vs the
contract (random operands, corners) and vs the golden model (real quantized
linears), measured start->done cycles vs ``cycles()`` exactly, block sparsity,
the host packing round trip, the control protocol, every validation message,
and Verilog generation. Mismatch counts are printed; 0 is the only pass."""
import copy
import json
import time

import numpy as np
import pytest
from amaranth import Shape, Value
from amaranth.back import verilog
from amaranth.sim import Simulator
from conftest import WithReset, tiny_decoder_feeds

from hwgen import contract as C
from hwgen.fixed import FixedType
from hwgen.golden import GoldenModel
from hwgen.ir import Graph
from hwgen.rtl import MatmulEngine, MatmulSpec, RTLError, linear_operands

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
        ctx.set(Value.cast(port.data), word)
        ctx.set(port.en, 1)
        await ctx.tick()
    ctx.set(port.en, 0)


async def _read_out(ctx, dut, n_words):
    """Words 0 .. n_words-1 of ``out``, pipelined: one address per cycle, each
    word ``spec.read_latencies["out"]`` cycles later."""
    words = []
    lat = dut.spec.read_latencies["out"]
    ctx.set(dut.o_rd.en, 1)
    for c in range(n_words + lat - 1):
        ctx.set(dut.o_rd.addr, min(c, n_words - 1))
        await ctx.tick()
        if c >= lat - 1:
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
    return C.linear(x, 0, w, np.zeros(spec.n, np.int64), np.asarray(b, np.int64), spec.out_fmt, spec.sum_width,
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


# ----------------------------------------------------------------------------
# corners: rounding ties, saturation, unsigned formats, the widest accumulator
# ----------------------------------------------------------------------------

def test_rounding_ties_and_saturation():
    """K = 1, w = 1: y[r, c] = requant(x[r] + bias[c], shift[c]) over every int8 x,
    with biases that put exact ties (q + 1/2) at 0, at the saturation limits and
    past them, and negative (left) shifts that saturate."""
    s = 4
    bias = [0, 127 << s, -128 << s, 0, 1 << 10, -(1 << 10), 0, 8]
    shift = [s, s, s, 0, -2, -3, 1, s]
    spec = _spec(4, 4, 1, len(bias), 256, bias=(min(bias), max(bias)), shift=(min(shift), max(shift)))
    x = np.arange(-128, 128).reshape(-1, 1)
    w = np.ones((1, len(bias)), np.int64)
    want = _contract_linear(spec, x, w, bias, shift)
    acc = x + np.array(bias)
    sh = np.array(shift)
    ties = int(((sh > 0) & (acc % (1 << np.maximum(sh, 1)) == (1 << np.maximum(sh - 1, 0)))).sum())
    sat = int(((want == 127) | (want == -128)).sum())
    assert ties > 50 and sat > 100
    y, cycles = run_engine(spec, x, w, bias, shift)
    print(f"\n[corners] {ties} exact ties, {sat} saturated outputs")
    _check("ties + saturation", spec, y, want, cycles, 256)


@pytest.mark.parametrize("x_fmt, out_fmt", [
    (FixedType(8, 8, False), FixedType(8, 2, False, "AP_RND", "AP_SAT")),   # unsigned x and y
    (FixedType(6, 2, True), FixedType(12, 6, True, "AP_RND", "AP_SAT")),   # narrow x, wide y
])
def test_unsigned_and_odd_formats(x_fmt, out_fmt):
    rng = np.random.default_rng(5)
    spec = _spec(4, 3, 21, 7, 6, 8, x_fmt=x_fmt, w_fmt=FixedType(5, 1, True), out_fmt=out_fmt,
                 bias=(-500, 700), shift=(0, 7))
    x, w, b, s = _rand_case(rng, spec, 6)
    want = _contract_linear(spec, x, w, b, s)
    y, cycles = run_engine(spec, x, w, b, s)
    _check(f"x {x_fmt} -> y {out_fmt}", spec, y, want, cycles, 6)


def test_widest_accumulator():
    """Every product at its extreme (-128 * -128) over K = 300 plus the largest
    bias: the sum needs the contract's full width; the output saturates, and a
    big shift brings it back in range exactly."""
    k, n = 300, 5
    spec = _spec(4, 4, k, n, 5, bias=(-(1 << 20), 1 << 20), shift=(0, 20))
    assert spec.acc_width == C.acc_width(I8, I8, k) and spec.sum_width == C.acc_width(I8, I8, k, -(1 << 20), 1 << 20)
    x = np.full((5, k), -128)
    x[1] = 127
    w = np.full((k, n), -128)
    bias = np.array([1 << 20, -(1 << 20), 0, 12345, -1])
    shift = np.array([20, 19, 0, 13, 12])
    want = _contract_linear(spec, x, w, bias, shift)
    y, cycles = run_engine(spec, x, w, bias, shift)
    _check("widest accumulator", spec, y, want, cycles, 5)


# ----------------------------------------------------------------------------
# block sparsity
# ----------------------------------------------------------------------------

def _sparsify(spec, w, bitmap):
    """``w`` with the blocks that ``bitmap`` (KB x NT) marks empty set to 0."""
    mask = np.repeat(np.repeat(np.asarray(bitmap, bool), spec.block_k, 0), spec.cols, 1)
    return w * mask[:spec.k, :spec.n]


@pytest.mark.parametrize("pattern", ["random", "empty_tile", "all_empty", "one_block", "short_tiles"])
def test_sparse_bitmaps(pattern):
    """Empty blocks issue no beats: cycles() counts only occupied K rows (at
    least min_beats per tile), measured exactly; outputs still exact (an N-tile
    without blocks gives requant(bias))."""
    rng = np.random.default_rng(11)
    spec = _spec(4, 4, 45, 14, 7, 8, bias=(-2000, 2000), shift=(1, 8))   # KB = 6 (last 5 rows), NT = 4
    x, w, b, s = _rand_case(rng, spec, 7)
    bm = {
        "random": rng.random((spec.kb, spec.nt)) < 0.5,
        "empty_tile": np.ones((spec.kb, spec.nt), bool),
        "all_empty": np.zeros((spec.kb, spec.nt), bool),
        "one_block": np.zeros((spec.kb, spec.nt), bool),
        "short_tiles": np.zeros((spec.kb, spec.nt), bool),
    }[pattern]
    if pattern == "empty_tile":
        bm[:, 1] = False
    if pattern == "one_block":
        bm[2, 3] = True
    if pattern == "short_tiles":   # only the 5-row last block: tiles padded to min_beats
        bm[-1] = True
    w = _sparsify(spec, w, bm)
    assert (spec.occupancy(w) <= bm).all()
    if bm.any():   # a w buffer sized to the occupied blocks only
        spec = MatmulSpec(**{**spec.__dict__, "w_blocks": int(bm.sum())})
        assert spec.depths["w"] == int(bm.sum()) * spec.block_k
    want = _contract_linear(spec, x, w, b, s)
    y, cycles = run_engine(spec, x, w, b, s, bitmap=bm.astype(np.uint8))
    _check(f"sparse {pattern} ({int(bm.sum())}/{bm.size} blocks)", spec, y, want, cycles, 7, bm)
    lens = [spec.block_len(kb) for kb in range(spec.kb)]
    tiles = [max(sum(lens[kb] for kb in range(spec.kb) if bm[kb, t]), spec.min_beats) for t in range(spec.nt)]
    assert spec.beats(7, bm) == 2 * sum(tiles)
    if pattern != "empty_tile":
        assert spec.cycles(7, bm) < spec.cycles(7)


def test_random_geometries_fuzz():
    """30 seeded random geometries (arrays 1..4 x 1..4, K 1..29, N 1..11,
    block_k 1/2/3/5/16 -- block_k 1 consumes one block-list entry per cycle --,
    m 1..max_m, random bitmaps of random density): every output exact, every
    run at exactly cycles()."""
    rng = np.random.default_rng(5)
    fails = []
    for _ in range(30):
        r, c, k, n = (int(rng.integers(1, hi)) for hi in (5, 5, 30, 12))
        bk, max_m = int(rng.choice([1, 2, 3, 5, 16])), int(rng.integers(1, 12))
        m = int(rng.integers(1, max_m + 1))
        spec = _spec(r, c, k, n, max_m, bk, bias=(-500, 500), shift=(-2, 7))
        x, w, b, s = _rand_case(rng, spec, m)
        bm = rng.random((spec.kb, spec.nt)) < rng.random()
        w = _sparsify(spec, w, bm)
        y, cycles = run_engine(spec, x, w, b, s, bitmap=bm)
        bad = int((y != _contract_linear(spec, x, w, b, s)).sum())
        if bad or cycles != spec.cycles(m, bm):
            fails.append((r, c, k, n, bk, m, bad, cycles, spec.cycles(m, bm)))
    print(f"\n[fuzz] 30 geometries, failures {fails}")
    assert fails == []


# ----------------------------------------------------------------------------
# real quantized linears vs the golden model
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vals(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    return g, GoldenModel(g, workers=1)(tiny_decoder_feeds(1)[0], record=True)


@pytest.mark.parametrize("name, m", [("L0.q", 24), ("L0.fc1", 23), ("L1.fc2", 5), ("logits", 1)])
def test_tiny_decoder_linears_vs_golden(tiny_vals, name, m):
    """A tiny-decoder linear (W8A8, per-channel weights and outputs) on a 4 x 4
    array: the golden model's input codes in, its output codes out."""
    g, vals = tiny_vals
    node = g.producer(name)
    spec = MatmulSpec.for_linear(g, node, rows=4, cols=4, max_m=24, block_k=8)
    _, ops = linear_operands(g, node)
    x = vals[node.inputs[0]].reshape(-1, spec.k)[:m]
    want = vals[node.outputs[0]].reshape(-1, spec.n)[:m]
    assert spec.sum_width == node.attrs["acc_bits"]
    y, cycles = run_engine(spec, x, ops["w"], ops["bias"], ops["shift"])
    _check(f"{node.name} vs golden", spec, y, want, cycles, m)


def test_tiny_decoder_linear_pruned_blocks(tiny_vals):
    """A real linear with half of its weight blocks zeroed: the sparse engine
    equals the contract's linear with the graph's own formats."""
    g, vals = tiny_vals
    node = g.producer("L0.fc1")
    spec = MatmulSpec.for_linear(g, node, rows=4, cols=4, max_m=24, block_k=4)
    _, ops = linear_operands(g, node)
    bm = np.random.default_rng(2).random((spec.kb, spec.nt)) < 0.5
    w = _sparsify(spec, ops["w"], bm)
    x = vals[node.inputs[0]].reshape(-1, spec.k)[:10]
    xt = g.tensors[node.inputs[0]]
    want = C.linear(x, int(np.max(np.asarray(xt.frac_bits()))), w,
                    np.asarray(g.tensors[node.inputs[1]].frac_bits()).reshape(-1), ops["bias"],
                    g.tensors[node.outputs[0]].fmt, node.attrs["acc_bits"],
                    out_frac=np.asarray(g.tensors[node.outputs[0]].frac_bits()).reshape(-1))
    y, cycles = run_engine(spec, x, w, ops["bias"], ops["shift"], bitmap=bm)
    _check(f"{node.name} pruned ({int(bm.sum())}/{bm.size} blocks)", spec, y, want, cycles, 10, bm)


def test_bert_block_linear_16x16_vs_golden(bert_block_graph):
    """The BERT block's q projection (64 x 64) on a 16 x 16 array, m = 22 (two
    sentences of 11 tokens: not a multiple of 16), vs the golden model."""
    g = Graph.load(bert_block_graph)
    node = next(n for n in g.nodes if n.op == "linear")
    x = np.random.default_rng(3).normal(size=(2, 11, 64))
    vals = GoldenModel(g, workers=1)({"x": x}, record=True)
    spec = MatmulSpec.for_linear(g, node, rows=16, cols=16, max_m=32)
    _, ops = linear_operands(g, node)
    xc = vals[node.inputs[0]].reshape(-1, spec.k)
    want = vals[node.outputs[0]].reshape(-1, spec.n)
    y, cycles = run_engine(spec, xc, ops["w"], ops["bias"], ops["shift"])
    _check(f"bert {node.name} vs golden", spec, y, want, cycles, 22)
    assert spec.manifest(22)["utilization"] == spec.ideal_cycles(22) / cycles


# ----------------------------------------------------------------------------
# control protocol and the host ports
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols, k, n, block_k, latencies", [
    (3, 4, 13, 9, 4, {"a": 2, "w": 2, "ent": 2, "bias": 2, "shift": 2, "out": 2}),
    # large buffers: w 8 DP16KD (9 x 2048, 8 across), bias 6, out 4 (one front register)
    (2, 8, 16, 520, 4, {"a": 4, "w": 4, "ent": 2, "bias": 4, "shift": 4, "out": 4}),
    # a 4097-entry block list (2 x 5 DP16KD: the copy tree and the bank select): the entry fetch at latency 7
    (2, 2, 256, 32, 1, {"a": 4, "w": 4, "ent": 7, "bias": 2, "shift": 2, "out": 2}),
])
def test_host_ports_and_repeated_runs(rows, cols, k, n, block_k, latencies):
    """Load every buffer through its write port (the host DMA path), run m = 6,
    read ``out`` through ``o_rd``; then load new activations and run m = 2 with
    ``start`` held high from the done cycle on (taken at once); both exact, both
    at cycles(m). Also with buffers large enough for longer read latencies (the
    schedule derived from them: entry FIFO, operand stages, bias wait, ``done``
    after ``out``'s front registers)."""
    rng = np.random.default_rng(21)
    spec = _spec(rows, cols, k, n, 8, block_k, bias=(-900, 900), shift=(0, 6))
    assert spec.read_latencies == latencies
    x, w, b, s = _rand_case(rng, spec, 6)
    x2 = rng.integers(-128, 128, (2, spec.k))
    bm = spec.occupancy(w)
    bm[1, 2] = False
    w = _sparsify(spec, w, bm)
    img = spec.pack_weights(w, b, s, bm)
    dut = MatmulEngine(spec)
    got = {}

    async def tb(ctx):
        for buf in ("w", "ent", "bias", "shift"):
            await _write(ctx, getattr(dut, f"{buf}_wr"), img[buf])
        await _write(ctx, dut.a_wr, spec.pack_x(x))
        got["c1"] = await _start_and_wait(ctx, dut, 6)
        got["y1"] = spec.unpack_out(await _read_out(ctx, dut, 6 * spec.nt), 6)
        await _write(ctx, dut.a_wr, spec.pack_x(x2))
        ctx.set(dut.m, 2)
        ctx.set(dut.start, 1)
        await ctx.tick()
        cyc = 1
        while not ctx.get(dut.done):
            await ctx.tick()
            cyc += 1
        got["c2"] = cyc
        await ctx.tick()      # start still high: the done cycle took it
        assert ctx.get(dut.busy)
        ctx.set(dut.start, 0)
        cyc = 1
        while not ctx.get(dut.done):
            await ctx.tick()
            cyc += 1
        got["c3"] = cyc
        got["y2"] = spec.unpack_out(await _read_out(ctx, dut, 2 * spec.nt), 2)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    _check("ports, run 1", spec, got["y1"], _contract_linear(spec, x, w, b, s), got["c1"], 6, bm)
    _check("ports, run 2", spec, got["y2"], _contract_linear(spec, x2, w, b, s), got["c2"], 2, bm)
    assert got["c3"] == spec.cycles(2, bm)
    # ``done`` means every word is in ``out`` (read from the MemoryData in the done cycle)
    y, cycles = run_engine(spec, x, w, b, s, bm)
    _check("images, done", spec, y, _contract_linear(spec, x, w, b, s), cycles, 6, bm)


def test_reset_in_every_cycle_of_a_run():
    """A one-cycle reset in each cycle of a run in turn (the entry fetch, the
    issue, the drain through the PE array and the requantizer), each followed by
    a new run: no ``done`` or ``busy`` left over, every new run exact and at
    cycles(m). The data path's registers (flag copies, rows, entry words) have
    no reset: this is the check that what they hold after a reset never
    reaches ``out``."""
    rng = np.random.default_rng(5)
    spec = _spec(2, 3, 10, 5, 4, 4, bias=(-900, 900), shift=(0, 6))
    x, w, b, s = _rand_case(rng, spec, 4)
    img = spec.pack_weights(w, b, s)
    img["a"] = spec.pack_x(x)
    dut = MatmulEngine(spec, init=img)
    top = WithReset(dut)
    rst = top.rst
    n = spec.cycles(4)
    runs = []

    async def tb(ctx):
        for reset_at in range(1, n):
            ctx.set(dut.m, 4)
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            for _ in range(reset_at - 1):
                await ctx.tick()
            ctx.set(rst, 1)
            await ctx.tick()
            ctx.set(rst, 0)
            for _ in range(n):      # nothing of the old run comes out
                assert not ctx.get(dut.busy) and not ctx.get(dut.done), reset_at
                await ctx.tick()
            cyc = await _start_and_wait(ctx, dut, 4)
            runs.append((cyc, spec.unpack_out(await _read_out(ctx, dut, 4 * spec.nt), 4)))

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    want = _contract_linear(spec, x, w, b, s)
    bad = sum(int((y != want).sum()) for _, y in runs)
    print(f"\n[reset in each of cycles 1..{n - 1}] {len(runs)} runs after a reset, mismatches {bad}")
    assert len(runs) == n - 1 and bad == 0 and all(c == n for c, _ in runs)


def test_pack_round_trip():
    """The out image layout read back by unpack_out; pack_x word order."""
    spec = _spec(3, 4, 5, 6, 7)
    y = np.arange(-60, 60).reshape(20, 6)[:7] % 256 - 128
    words = [0] * spec.depths["out"]
    lay = spec.layouts["out"]
    for r in range(7):
        for t in range(spec.nt):
            word = 0
            for c in range(spec.cols):
                v = y[r, t * spec.cols + c] if t * spec.cols + c < spec.n else 0
                word |= (int(v) & 0xFF) << (8 * c)
            words[r * spec.nt + t] = word
    assert Shape.cast(lay).width == 32
    assert (spec.unpack_out(words, 7) == y).all()
    x = np.arange(35).reshape(7, 5) - 17
    a = spec.pack_x(x)
    assert len(a) == 3 * 5               # ceil(7 / 3) M-tiles of k words
    word = a[1 * 5 + 2]                  # M-tile 1, column 2: x[3..5, 2]
    assert [((word >> (8 * r)) & 0xFF) for r in range(3)] == [int(v) & 0xFF for v in x[3:6, 2]]
    assert a[2 * 5 + 4] == int(x[6, 4]) & 0xFF        # rows past m are zero


# ----------------------------------------------------------------------------
# cycles and manifest
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("k, n", [(384, 384), (384, 1536), (1536, 384)])
def test_minilm_shapes_utilization(k, n):
    """The MiniLM layer's matmuls at m = 128 on 16 x 16: utilization >= 0.90
    (by the exact cycle formula, which the simulated runs above match)."""
    spec = _spec(16, 16, k, n, 128)
    man = spec.manifest(128)
    json.dumps(man)
    assert man["cycles"] == spec.cycles(128)
    assert man["ideal_cycles"] == 128 * k * n / 256
    print(f"\n[minilm {k}x{n} m=128 on 16x16] cycles {man['cycles']}, ideal {man['ideal_cycles']:.0f}, "
          f"utilization {man['utilization']:.4f}")
    assert man["utilization"] >= 0.90
    for key in ("kernel", "op", "ports", "parameters", "formats", "buffers", "cycles", "ideal_cycles",
                "utilization"):
        assert key in man


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("change, msg", [
    ({"rows": 0}, "rows must be a positive integer, got 0"),
    ({"cols": 2.0}, "cols must be a positive integer, got 2.0"),
    ({"k": -1}, "k must be a positive integer, got -1"),
    ({"n": True}, "n must be a positive integer, got True"),
    ({"max_m": 0}, "max_m must be a positive integer, got 0"),
    ({"block_k": 0}, "block_k must be a positive integer, got 0"),
    ({"x_fmt": 8}, "x_fmt must be a hwgen.fixed.FixedType, got 8"),
    ({"w_fmt": None}, "w_fmt must be a hwgen.fixed.FixedType, got None"),
    ({"out_fmt": FixedType(8, 3, True, "AP_TRN", "AP_SAT")},
     "out_fmt fixed<8,3,AP_TRN,AP_SAT> has q=AP_TRN, o=AP_SAT; the RTL requantizer implements only "
     "q=AP_RND, o=AP_SAT (the quantizer's defaults): quantize with those modes"),
    ({"out_fmt": FixedType(8, 3, False, "AP_RND", "AP_WRAP")},
     "out_fmt ufixed<8,3,AP_RND,AP_WRAP> has q=AP_RND, o=AP_WRAP; the RTL requantizer implements only "
     "q=AP_RND, o=AP_SAT (the quantizer's defaults): quantize with those modes"),
    ({"out_fmt": "int8"}, "out_fmt must be a hwgen.fixed.FixedType, got 'int8'"),
    ({"bias_lo": 1.5}, "bias_lo must be an integer, got 1.5"),
    ({"bias_hi": None}, "bias_hi must be an integer, got None"),
    ({"shift_max": 1.0}, "shift_max must be an integer in -62..62, got 1.0"),
    ({"bias_lo": 5, "bias_hi": 4}, "bias_lo (5) must not exceed bias_hi (4)"),
    ({"shift_min": 63}, "shift_min must be an integer in -62..62, got 63"),
    ({"shift_min": 3, "shift_max": 2}, "shift_min (3) must not exceed shift_max (2)"),
    ({"name": "9x"}, "name must be an identifier ([A-Za-z_][A-Za-z0-9_]*), got '9x'"),
    ({"w_blocks": 0}, "w_blocks must be a positive integer, got 0"),
    ({"w_blocks": 9}, "w_blocks must be at most NT * KB = 2 (every block of W), got 9"),
    ({"k": 1 << 40, "x_fmt": FixedType(16, 8)},
     "accumulator of 1099511627776 products of ap_fixed<16,8,AP_TRN,AP_WRAP> x "
     "ap_fixed<8,4,AP_TRN,AP_WRAP> needs 64 bits; the contract supports at most 48"),
])
def test_spec_validation(change, msg):
    kw = dict(rows=4, cols=4, k=8, n=8, max_m=8, x_fmt=I8, w_fmt=I8, out_fmt=O8)
    kw.update(change)
    with pytest.raises(RTLError) as e:
        MatmulSpec(**kw)
    assert str(e.value) == msg


def test_engine_pack_and_cycles_validation():
    spec = _spec(4, 4, 8, 6, 8, 4, bias=(-10, 10), shift=(0, 3))
    w = np.ones((8, 6), np.int64)
    for call, msg in [
        (lambda: MatmulEngine("spec"), "spec must be a MatmulSpec, got 'spec'"),
        (lambda: MatmulEngine(spec, init={"q": []}),
         "init must be a dict with keys among a, w, ent, bias, shift, out, got {'q': []}"),
        (lambda: MatmulEngine(spec, init={"bias": [0] * 3}), "init['bias'] has 3 words; the buffer holds 2"),
        (lambda: spec.cycles(0), "m must be an integer in 1..max_m=8, got 0"),
        (lambda: spec.cycles(9), "m must be an integer in 1..max_m=8, got 9"),
        (lambda: spec.cycles(2, np.ones((2, 2))),
         "bitmap must be a 0/1 array of shape (KB, NT) = (2, 2) (blocks of block_k=4 rows x cols=4 "
         "columns of W), got float64 (2, 2)"),
        (lambda: spec.cycles(2, np.full((3, 2), 1)),
         "bitmap must be a 0/1 array of shape (KB, NT) = (2, 2) (blocks of block_k=4 rows x cols=4 "
         "columns of W), got int64 (3, 2)"),
        (lambda: spec.pack_weights(w, bitmap=np.array([[1, 1], [0, 1]])),
         "bitmap marks weight block (nt=0, kb=1) empty but it holds non-zero codes; use "
         "occupancy(w) or zero the block"),
        (lambda: spec.pack_weights(w * 200), "w codes must lie in -128..127, got 200..200"),
        (lambda: spec.pack_weights(w[:7]), "w must be an integer array of shape (8, 6), got int64 (7, 6)"),
        (lambda: spec.pack_weights(w, bias=np.full(6, 11)), "bias codes must lie in -10..10, got 11..11"),
        (lambda: spec.pack_weights(w, shift=np.full(6, -1)), "shift codes must lie in 0..3, got -1..-1"),
        (lambda: spec.pack_x(np.zeros((9, 8), np.int64)), "m must be an integer in 1..max_m=8, got 9"),
        (lambda: spec.pack_x(np.zeros((2, 7), np.int64)),
         "x must be an integer array of shape (m, 8), got int64 (2, 7)"),
        (lambda: spec.pack_x(np.full((2, 8), 0.5)),
         "x must be an integer array of shape (2, 8), got float64 (2, 8)"),
        (lambda: spec.unpack_out([0] * 5, 3), "the out image needs at least m * NT = 6 words, got 5"),
        (lambda: _spec(4, 4, 8, 6, 8, 4).__class__(**{**spec.__dict__, "w_blocks": 3}).pack_weights(w),
         "the bitmap has 4 occupied weight blocks; the w buffer holds w_blocks=3"),
    ]:
        with pytest.raises(RTLError) as e:
            call()
        assert str(e.value) == msg


def test_for_linear_errors(tiny_decoder_fixed, tiny_decoder):
    g = tiny_decoder_fixed
    for graph, node, msg in [
        (g, "n3.layernorm", "node 'n3.layernorm': op 'layernorm' is not a linear; the matmul engine "
                            "runs linear nodes"),
        (g, "nope", "no node named 'nope'"),
        (tiny_decoder, "n4.linear", "graph 'tiny-decoder' is a float graph; quantize it first "
                                    "(`hwgen quantize`)"),
    ]:
        with pytest.raises(RTLError) as e:
            MatmulEngine.for_linear(graph, node)
        assert str(e.value) == msg
    bad = copy.deepcopy(g)
    t = bad.tensors[bad.node("n4.linear").outputs[0]]
    t.fmt = FixedType(t.fmt.width, t.fmt.int_bits, t.fmt.signed, "AP_TRN", "AP_WRAP")
    with pytest.raises(RTLError) as e:
        MatmulSpec.for_linear(bad, "n4.linear")
    assert str(e.value) == (
        "node 'n4.linear': output 'L0.q' has format fixed<8,%d,AP_TRN,AP_WRAP> (q=AP_TRN, o=AP_WRAP); "
        "the RTL requantizer implements only q=AP_RND, o=AP_SAT: quantize with those modes" % t.fmt.int_bits)
    bad = copy.deepcopy(g)
    bad.tensors["L0.fc1"].fmt = None
    with pytest.raises(RTLError) as e:
        linear_operands(bad, "n11.linear")
    assert str(e.value) == "node 'n11.linear': tensor 'L0.fc1' has no fixed-point format"
    bad = copy.deepcopy(g)
    bad.weights["L0.fc1.b"] = bad.weights["L0.fc1.b"][:5]
    with pytest.raises(RTLError) as e:
        linear_operands(bad, "n11.linear")
    assert str(e.value) == "node 'n11.linear': bias 'L0.fc1.b' has 5 entries for 32 columns"
    bad = copy.deepcopy(g)
    bad.weights["L0.fc1.w"] = bad.weights["L0.fc1.w"].reshape(-1)
    with pytest.raises(RTLError) as e:
        linear_operands(bad, "n11.linear")
    assert str(e.value) == "node 'n11.linear': weight 'L0.fc1.w' has shape [512], expected (K, N)"


# ----------------------------------------------------------------------------
# Verilog
# ----------------------------------------------------------------------------

def test_verilog_ports_match_spec(tiny_decoder_fixed):
    eng = MatmulEngine.for_linear(tiny_decoder_fixed, "n4.linear", rows=4, cols=4, max_m=24, block_k=8)
    v = verilog.convert(eng, name=eng.spec.name)
    assert f"module {eng.spec.name}(" in v
    ports = eng.spec.ports()
    for name, p in ports.items():
        decl = f"{'input' if p['dir'] == 'in' else 'output'} " + (f"[{p['width'] - 1}:0] " if p["width"] > 1 else "")
        assert f"{decl}{name};" in v, (name, p)
    assert {"start", "m", "busy", "done", "a_wr__data", "o_rd__data"} <= set(ports)
    assert eng.manifest(24)["ports"] == ports


def test_verilog_weight_zero_flags_per_column(tiny_decoder_fixed):
    """The weight-row-is-real flag reaches each B column through kept register
    copies: one per group of 4 columns, then one per column, and each column's
    word is zeroed by its own copy (the array is built with zero_bubbles=False)."""
    import re

    eng = MatmulEngine.for_linear(tiny_decoder_fixed, "n4.linear", rows=4, cols=6, max_m=24, block_k=8)
    v = verilog.convert(eng, name=eng.spec.name)
    kept = {re.search(r"reg (?:signed )?(?:\[\d+:0\] )?(\w+)", d).group(1) for d in v.split(";")
            if "keep" in d and " reg " in d}
    assert {k for k in kept if k.startswith("w_real_g")} == {"w_real_g0", "w_real_g1"}
    assert {k for k in kept if k.startswith("w_real_c")} == {f"w_real_c{c}" for c in range(6)}
    for c in range(6):   # column c's weight word is zeroed by its own copy
        assert len(re.findall(rf"w_real_c{c} \? .*rd__data\S* \[{8 * c + 7}:{8 * c}\] : 8'h00;", v)) == 1


@pytest.mark.slow
def test_minilm_engine_verilog_time():
    """Elaboration + Verilog of the 16 x 16 engine for MiniLM's FFN up
    projection (k 384, n 1536, max_m 128): the time is printed (README)."""
    spec = _spec(16, 16, 384, 1536, 128, bias=(-(1 << 20), 1 << 20), shift=(0, 20))
    t = time.time()
    v = verilog.convert(MatmulEngine(spec), name="minilm_ffn_up")
    dt = time.time() - t
    print(f"\n[minilm (128,384,1536) 16x16 engine] elaboration + Verilog {dt:.1f} s, {len(v) / 1e6:.1f} MB")
    assert "module minilm_ffn_up(" in v


@pytest.mark.slow
def test_minilm_k_measured_utilization_16x16():
    """Measured in simulation: m = 128, k = 384 (MiniLM) on 16 x 16, n cut to 32
    to keep Amaranth's simulator to seconds: exact outputs, cycles == cycles(),
    utilization >= 0.90."""
    rng = np.random.default_rng(8)
    spec = _spec(16, 16, 384, 32, 128, bias=(-(1 << 16), 1 << 16), shift=(4, 12))
    x, w, b, s = _rand_case(rng, spec, 128)
    t = time.time()
    y, cycles = run_engine(spec, x, w, b, s)
    dt = time.time() - t
    _check("minilm k, measured", spec, y, _contract_linear(spec, x, w, b, s), cycles, 128)
    util = spec.ideal_cycles(128) / cycles
    print(f"[measured utilization {util:.4f}; {cycles} cycles simulated in {dt:.1f} s]")
    assert util >= 0.90
