"""hwgen.rtl.attention.AttentionEngine in Amaranth's simulator, bit-exact per head:

* against the golden model's own ``attention`` kernel (hwgen.golden) on real
  quantized activations: the bert block (encoder, with a padding mask) and
  the tiny decoder (causal prefill, then single-token steps against the
  engine's KV cache, vs GoldenState decoding);
* against the contract (hwgen.contract.softmax / matmul_act) on corner cases:
  fully masked rows, a single token, sequences that are not a multiple of the
  lanes, saturating scores and outputs, non-default rounding/overflow modes,
  random stream back-pressure;
* measured cycles == cycles(); constructor and for_node validation messages;
  Verilog generation. Mismatch counts are printed; 0 is the only pass.
"""
import time

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.sim import Simulator
from conftest import tiny_decoder_feeds

from hwgen import contract as C
from hwgen import golden
from hwgen.fixed import FixedType
from hwgen.golden import GoldenModel, GoldenState
from hwgen.ir import Graph
from hwgen.rtl.attention import AttentionEngine
from hwgen.rtl.pe_array import RTLError

I8 = FixedType(8, 3, True, "AP_RND", "AP_SAT")
P8 = FixedType(8, 0, False, "AP_RND", "AP_SAT")


def engine(hd=4, max_seq=12, lanes=4, causal=False, q=I8, k=I8, v=I8, out=I8, prob=P8,
           exp=C.ExpTable(), recip=C.RecipTable()):
    return AttentionEngine(hd, max_seq, lanes, q, k, v, out, prob, exp, recip, causal)


# ----------------------------------------------------------------------------
# testbench: passes streamed through one engine (its KV cache persists)
# ----------------------------------------------------------------------------

def run_passes(eng: AttentionEngine, passes, in_gap=0.0, out_stall=0.0, seed=0):
    """Stream each pass's beats (``eng.pack`` output) and collect its output
    beats. ``in_gap`` / ``out_stall``: probability that a cycle has
    ``i.valid`` / ``o.ready`` low. Returns (outputs per pass as arrays,
    cycles per pass from first accepted beat to last output beat taken)."""
    rng = np.random.default_rng(seed)
    outs, cycles = [], []

    async def tb(ctx):
        for beats in passes:
            got, nb, cyc, start = [], 0, 0, None
            while len(got) < len(beats):
                valid = nb < len(beats) and rng.random() >= in_gap
                ctx.set(eng.i.valid, valid)
                if valid:
                    ctx.set(eng.i.payload.as_value(), beats[nb])
                ready = rng.random() >= out_stall
                ctx.set(eng.o.ready, ready)
                if valid and ctx.get(eng.i.ready):
                    start = cyc if start is None else start
                    nb += 1
                if ready and ctx.get(eng.o.valid):
                    got.append(ctx.get(eng.o.payload.as_value()))
                await ctx.tick()
                cyc += 1
                assert cyc < 200_000, "simulation hung"
            ctx.set(eng.i.valid, 0)
            outs.append(eng.unpack(got))
            cycles.append(cyc - start)

    sim = Simulator(eng)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return outs, cycles


def contract_head(eng, q, k, v, valid, offset=0):
    """One head by the contract, the way hwgen.golden._attention composes it:
    q (s_q, D) against the cache k, v (s_kv, D), padding bits valid (s_kv,)."""
    s = C.matmul_act(q, eng.q_fmt, k.T, eng.k_fmt)
    ok = np.ones(s.shape, bool)
    if eng.causal:
        ok = C.causal_mask(s.shape[0], s.shape[1], offset)
    ok = ok & (np.asarray(valid)[None, :] != 0)
    p = C.softmax(s, eng.s_frac, ok, eng.exp, eng.recip, eng.prob_fmt)
    return C.matmul_act(p, eng.prob_fmt, v, eng.v_fmt, eng.out_fmt)


def _rand(rng, fmt, *shape):
    return rng.integers(fmt.min_code, fmt.max_code + 1, shape)


def _check(name, got, want):
    bad = sum(int((g != w).sum()) for g, w in zip(got, want))
    n = sum(w.size for w in want)
    print(f"{name}: {n} outputs, mismatches {bad}")
    assert all(g.shape == w.shape for g, w in zip(got, want))
    assert bad == 0


# ----------------------------------------------------------------------------
# real activations vs the golden model
# ----------------------------------------------------------------------------

def _split(x, b, h, hd):
    return x[b, :, h * hd:(h + 1) * hd]


def test_bert_block_encoder_with_padding_vs_golden(bert_block_graph):
    g = Graph.load(bert_block_graph)
    node = next(n for n in g.nodes if n.op == "attention")
    gm = GoldenModel(g, workers=1)
    x = np.random.default_rng(3).normal(size=(2, 11, 64))
    vals = gm({"x": x}, record=True)
    q, k, v = (vals[t] for t in node.inputs[:3])
    mask = np.ones((2, 11), np.int64)
    mask[0, 8:] = 0          # sentence 0: 3 padding tokens
    mask[1, 5:] = 0          # sentence 1: 6 padding tokens
    want = golden._attention(gm, node, [q, k, v, mask], GoldenState())
    hd = node.attrs["head_dim"]
    eng = AttentionEngine.for_node(g, node, max_seq=16, lanes=4)
    passes, expect = [], []
    for b in range(2):
        for h in (0, 3):
            passes.append(eng.pack(_split(q, b, h, hd), _split(k, b, h, hd), _split(v, b, h, hd),
                                   mask[b]))
            expect.append(_split(want, b, h, hd))
    got, cycles = run_passes(eng, passes)
    assert any(np.abs(w).max() > 0 for w in expect)
    _check("bert block attention (encoder, padding)", got, expect)
    assert cycles == [eng.cycles(11, 11)] * len(passes)


def test_tiny_decoder_causal_kv_cache_vs_golden(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    node = next(n for n in g.nodes if n.op == "attention" and n.layer == 1)
    gm = GoldenModel(g, workers=1)
    ids = tiny_decoder_feeds(1, b=1, s=9)[0]["ids"]
    state = GoldenState()
    steps = [ids[:, :6], ids[:, 6:7], ids[:, 7:8], ids[:, 8:9]]    # prefill 6, then 3 tokens
    recs = [gm({"ids": s}, state, record=True) for s in steps]
    hd, heads = node.attrs["head_dim"], node.attrs["heads"]
    engines = [AttentionEngine.for_node(g, node.name, lanes=4) for _ in range(heads)]
    assert engines[0].max_seq == node.attrs["max_positions"] and engines[0].causal
    assert unused(AttentionEngine.for_node(g, node, lanes=8)).lanes == 8
    for h, eng in enumerate(engines):
        passes, expect, offset = [], [], 0
        for r in recs:
            q, k, v = (_split(r[t], 0, h, hd) for t in node.inputs[:3])
            passes.append(eng.pack(q, k, v, offset=offset))
            expect.append(_split(r[node.outputs[0]], 0, h, hd))
            offset += q.shape[0]
        got, cycles = run_passes(eng, passes)
        _check(f"tiny decoder layer 1 head {h} (prefill 6 + 3 cached steps)", got, expect)
        assert cycles == [eng.cycles(6, 6), eng.cycles(1, 7), eng.cycles(1, 8), eng.cycles(1, 9)]


# ----------------------------------------------------------------------------
# corner cases vs the contract
# ----------------------------------------------------------------------------

def test_masked_rows_single_token_and_ragged_lanes():
    rng = np.random.default_rng(1)
    cases = []
    enc = engine(hd=4, max_seq=12, lanes=4)
    # all padded: every row fully masked -> all-zero probabilities and outputs
    cases.append((enc, 5, np.zeros(5, np.int64)))
    cases.append((enc, 7, np.array([1, 0, 0, 1, 1, 0, 1])))     # 7 keys on 4 lanes
    cases.append((enc, 1, np.ones(1, np.int64)))                 # a single token
    cases.append((enc, 12, rng.integers(0, 2, 12)))              # full cache
    dec = engine(hd=4, max_seq=12, lanes=4, causal=True)
    # causal + padding on key 0: row 0 is fully masked
    cases.append((dec, 6, np.array([0, 1, 1, 0, 1, 1])))
    for eng, s, valid in cases:
        q, k, v = (_rand(rng, I8, s, 4) for _ in range(3))
        got, cycles = run_passes(eng, [eng.pack(q, k, v, valid)])
        want = contract_head(eng, q, k, v, valid)
        _check(f"corner s={s} valid={valid.tolist()} causal={eng.causal}", got, [want])
        assert cycles == [eng.cycles(s, s)]
        if not valid.any():
            assert not got[0].any()
    assert not got[0][0].any()    # the causal row 0 that sees only a padded key


def test_saturating_scores_and_outputs_other_modes():
    """Extreme codes: scores far beyond the exp table (index saturation), an
    output format that saturates / wraps, truncating and convergent rounding."""
    rng = np.random.default_rng(2)
    q_f = FixedType(8, 8, True, "AP_RND", "AP_SAT")            # integer codes: huge scores
    v_f = FixedType(8, 4, True, "AP_RND", "AP_SAT")
    for out, prob in [(FixedType(6, 2, True, "AP_RND", "AP_SAT"), P8),
                      (FixedType(5, 3, True, "AP_TRN", "AP_WRAP"),
                       FixedType(7, 1, False, "AP_RND_CONV", "AP_SAT")),
                      (FixedType(8, 6, False, "AP_RND_ZERO", "AP_SAT_SYM"),
                       FixedType(6, 0, False, "AP_TRN_ZERO", "AP_SAT"))]:
        eng = engine(hd=3, max_seq=9, lanes=2, q=q_f, k=q_f, v=v_f, out=out, prob=prob,
                     exp=C.ExpTable(in_frac=3, out_bits=10), recip=C.RecipTable(5, 9))
        s = 9
        q = rng.choice([-128, 127, -127, 0, 5], (s, 3))
        k = rng.choice([-128, 127, 1, -3], (s, 3))
        v = rng.choice([-128, 127, 100, -99, 3], (s, 3))
        got, _ = run_passes(eng, [eng.pack(q, k, v)])
        want = contract_head(eng, q, k, v, np.ones(s))
        _check(f"saturation out={out.ctype()} prob={prob.ctype()}", got, [want])


def test_backpressure_and_cache_across_passes():
    """Random i.valid gaps and o.ready stalls give the same integers; a
    non-causal cached decode (offset > 0) attends to all earlier positions."""
    rng = np.random.default_rng(4)
    eng = engine(hd=4, max_seq=16, lanes=4)
    q, k, v = (_rand(rng, I8, 10, 4) for _ in range(3))
    valid = rng.integers(0, 2, 10)
    valid[:2] = 1
    passes = [eng.pack(q[:6], k[:6], v[:6], valid[:6]),
              eng.pack(q[6:7], k[6:7], v[6:7], valid[6:7], offset=6),
              eng.pack(q[7:], k[7:], v[7:], valid[7:], offset=7)]
    want = [contract_head(eng, q[:6], k[:6], v[:6], valid[:6]),
            contract_head(eng, q[6:7], k[:7], v[:7], valid[:7], 6),
            contract_head(eng, q[7:], k, v, valid, 7)]
    got, cycles = run_passes(eng, passes, in_gap=0.3, out_stall=0.5, seed=5)
    _check("back-pressure, cached non-causal passes", got, want)
    got2, cycles2 = run_passes(eng, passes)
    _check("same, no back-pressure", got2, want)
    assert cycles2 == [eng.cycles(6, 6), eng.cycles(1, 7), eng.cycles(3, 10)]
    assert all(c >= c2 for c, c2 in zip(cycles, cycles2)) and sum(cycles) > sum(cycles2)


def unused(eng):
    """An engine built only for its manifest, cycles or packing (never elaborated)."""
    eng._MustUse__silence = True
    return eng


def test_cycles_formula_and_manifest():
    eng = engine(hd=4, max_seq=12, lanes=4)
    for s_q, s_kv in [(1, 1), (4, 4), (5, 5), (2, 9)]:
        rng = np.random.default_rng(s_q)
        q, k, v = (_rand(rng, I8, s_kv, 4) for _ in range(3))
        passes = [eng.pack(q[:s_kv - s_q], k[:s_kv - s_q], v[:s_kv - s_q])] if s_kv > s_q else []
        passes.append(eng.pack(q[s_kv - s_q:], k[s_kv - s_q:], v[s_kv - s_q:], offset=s_kv - s_q))
        _, cycles = run_passes(eng, passes)
        assert cycles[-1] == eng.cycles(s_q, s_kv)
    man = unused(AttentionEngine(32, 128, 16, I8, I8, I8, I8, P8, C.ExpTable(), C.RecipTable(),
                                 False)).manifest(128, 128)
    assert man["op"] == "attention" and man["kernel"] == "attention"
    # load; super-phases: A alone 8 + 3, A+B 8 + 5, 126 of 2 G, B+C and C alone 8 + 5; output
    assert man["cycles"] == 128 + 11 + 13 + 126 * 16 + 13 + 13 + 1
    assert man["ideal_cycles"] == 2 * 128 * 128 * 32 // (16 * 32)
    assert man["utilization"] == round(man["ideal_cycles"] / man["cycles"], 4)
    assert man["tables"]["exp"]["entries"] == C.ExpTable().size
    assert man["memories"]["k"] == {"banks": 16, "depth": 8, "width": 32 * 8 + 1}
    assert man["memories"]["score"]["depth"] == man["memories"]["e"]["depth"] == 2 * 8
    assert man["ports"]["i"]["fields"] == {"q": 256, "k": 256, "v": 256, "valid": 1, "pos": 7,
                                          "last": 1}
    assert man["formats"]["score"]["width"] == C.acc_width(I8, I8, 32)


# ----------------------------------------------------------------------------
# bad parameters and inputs
# ----------------------------------------------------------------------------

def test_constructor_validation():
    cases = [
        (dict(hd=0), "head_dim must be a positive integer, got 0"),
        (dict(max_seq=-1), "max_seq must be a positive integer, got -1"),
        (dict(lanes=3), "lanes must be a power of two, got 3"),
        (dict(lanes=16, max_seq=12), r"lanes \(16\) must not exceed max_seq \(12\)"),
        (dict(q="int8"), "q format must be a hwgen.fixed.FixedType, got 'int8'"),
        (dict(exp=(6, 15)), r"exp must be a hwgen.contract.ExpTable, got \(6, 15\)"),
        (dict(recip=None), "recip must be a hwgen.contract.RecipTable, got None"),
        (dict(causal=1), "causal must be a bool, got 1"),
        (dict(hd=1, q=FixedType(48, 10), k=FixedType(48, 10)), "needs 96 bits"),
    ]
    for kw, msg in cases:
        with pytest.raises(RTLError, match=msg):
            engine(**kw)
    eng = unused(engine())
    with pytest.raises(RTLError, match=r"s_kv \(13\) exceeds the engine's max_seq \(12\)"):
        eng.cycles(1, 13)
    with pytest.raises(RTLError, match=r"s_q \(3\) must not exceed s_kv \(2\)"):
        eng.cycles(3, 2)
    z = np.zeros((2, 4), np.int64)
    with pytest.raises(RTLError, match=r"q codes 200\.\.200 are outside the format"):
        eng.pack(z + 200, z, z)
    with pytest.raises(RTLError, match=r"k must be an integer array of shape \(s_q, 4\)"):
        eng.pack(z, np.zeros((2, 3), np.int64), z)
    with pytest.raises(RTLError, match=r"positions offset=11 \.\. offset\+2-1 must lie"):
        eng.pack(z, z, z, offset=11)
    with pytest.raises(RTLError, match="valid must be 2 values of 0/1"):
        eng.pack(z, z, z, valid=[1, 2])


def test_for_node_errors(tiny_decoder_fixed, bert_block_graph):
    g = tiny_decoder_fixed
    lin = next(n for n in g.nodes if n.op == "linear")
    with pytest.raises(RTLError, match=f"node '{lin.name}': op 'linear' is not 'attention'"):
        AttentionEngine.for_node(g, lin)
    with pytest.raises(RTLError, match="has no node 'nope'"):
        AttentionEngine.for_node(g, "nope")
    bert = Graph.load(bert_block_graph)
    att = next(n for n in bert.nodes if n.op == "attention")
    with pytest.raises(RTLError, match="has no max_positions: pass max_seq"):
        AttentionEngine.for_node(bert, att)
    eng = unused(AttentionEngine.for_node(bert, att, max_seq=8, lanes=2))
    assert eng.name == "attention_attn" and not eng.causal
    with pytest.raises(RTLError, match="float graph"):
        AttentionEngine.for_node(Graph(name="f"), att)


def test_verilog_generation():
    eng = engine(hd=4, max_seq=12, lanes=4, causal=True)
    t = time.perf_counter()
    text = verilog.convert(eng, name="attention_small")
    print(f"verilog: {len(text.splitlines())} lines in {time.perf_counter() - t:.1f} s")
    assert "module attention_small" in text and "exp_rom" in text


@pytest.mark.slow
def test_minilm_shape_elaboration():
    """MiniLM's head (seq 128, head_dim 32) with 16 lanes: Verilog and cycles."""
    eng = AttentionEngine(32, 128, 16, I8, I8, I8, I8, P8, C.ExpTable(), C.RecipTable(), False)
    t = time.perf_counter()
    text = verilog.convert(eng, name="attention_minilm")
    el = time.perf_counter() - t
    man = eng.manifest(128, 128)
    print(f"MiniLM head: verilog {len(text.splitlines())} lines in {el:.1f} s; cycles "
          f"{man['cycles']}, ideal {man['ideal_cycles']}, utilization {man['utilization']}")
    assert "module attention_minilm" in text


@pytest.mark.slow
def test_minilm_shape_simulated():
    """seq 128, head_dim 32, 16 lanes, padding: bit-exact and cycles() in Amaranth's simulator."""
    eng = AttentionEngine(32, 128, 16, I8, I8, I8, I8, P8, C.ExpTable(), C.RecipTable(), False)
    rng = np.random.default_rng(7)
    q, k, v = (_rand(rng, I8, 128, 32) for _ in range(3))
    valid = (np.arange(128) < 100).astype(np.int64)
    t = time.perf_counter()
    got, cycles = run_passes(eng, [eng.pack(q, k, v, valid)])
    el = time.perf_counter() - t
    _check(f"MiniLM shape, {cycles[0]} cycles simulated in {el:.0f} s", got,
           [contract_head(eng, q, k, v, valid)])
    assert cycles == [eng.cycles(128, 128)]


def test_schedule_sweep_lanes_and_offsets():
    """Both period regimes (G + 5 for short rows, 2 G once G > 5), one lane,
    odd head_dim, causal and not, multi-token passes at offsets > 0."""
    rng = np.random.default_rng(9)
    for lanes, hd, causal, max_seq, splits in [(1, 3, True, 9, [4, 3, 1]),
                                                (2, 1, False, 16, [13, 1]),
                                                (2, 2, True, 16, [3, 10, 1]),
                                                (4, 3, True, 32, [1, 24])]:
        eng = engine(hd=hd, max_seq=max_seq, lanes=lanes, causal=causal)
        total = sum(splits)
        q, k, v = (_rand(rng, I8, total, hd) for _ in range(3))
        valid = rng.integers(0, 2, total)
        passes, want, shapes, off = [], [], [], 0
        for s in splits:
            sl = slice(off, off + s)
            passes.append(eng.pack(q[sl], k[sl], v[sl], valid[sl], offset=off))
            want.append(contract_head(eng, q[sl], k[:off + s], v[:off + s], valid[:off + s], off))
            shapes.append((s, off + s))
            off += s
        got, cycles = run_passes(eng, passes)
        _check(f"sweep lanes={lanes} hd={hd} causal={causal} passes={splits}", got, want)
        assert cycles == [eng.cycles(*sh) for sh in shapes]
