"""cocotb bench of hwgen.rtl.attention.AttentionEngine: the tiny decoder's
causal attention with its KV cache (a prefill pass, then single-token passes)
against the golden model on Icarus, and contract corner cases (fully masked
rows, one token, a sequence that does not fill the lanes, back-pressure) on
Verilator. Every output code compared; cycles against engine.cycles()."""
import numpy as np
from conftest import tiny_decoder_feeds

from hwgen import contract as C
from hwgen.fixed import FixedType
from hwgen.golden import GoldenModel, GoldenState
from hwgen.rtl.attention import AttentionEngine
from hwgen.rtl.verify import _sim_package

_sim_package()
from sim.kernels import attention_bench  # noqa: E402

I8 = FixedType(8, 3, True, "AP_RND", "AP_SAT")
P8 = FixedType(8, 0, False, "AP_RND", "AP_SAT")


def _split(x, b, h, hd):
    return x[b, :, h * hd:(h + 1) * hd]


def test_tiny_decoder_kv_cache_icarus_vs_golden(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    node = next(n for n in g.nodes if n.op == "attention" and n.layer == 0)
    gm = GoldenModel(g, workers=1)
    ids = tiny_decoder_feeds(1, b=1, s=8)[0]["ids"]
    state = GoldenState()
    recs = [gm({"ids": s}, state, record=True) for s in (ids[:, :6], ids[:, 6:7], ids[:, 7:8])]
    hd = node.attrs["head_dim"]
    eng = AttentionEngine.for_node(g, node, lanes=4)
    h = 1
    passes, want, off = [], [], 0
    for r in recs:
        q, k, v = (_split(r[t], 0, h, hd) for t in node.inputs[:3])
        passes.append({"q": q, "k": k, "v": v, "offset": off})
        want.append(_split(r[node.outputs[0]], 0, h, hd))
        off += q.shape[0]
    res = attention_bench(eng, passes, want, sim="icarus")
    print("tiny decoder attention (icarus):", {k: res[k] for k in ("mismatches", "vectors", "cycles")})
    assert res["vectors"] == 8 * hd and res["mismatches"] == 0, res["first_mismatches"]
    assert res["pass_cycles"] == res["model_pass_cycles"]


def contract_head(eng, q, k, v, valid, offset=0):
    s = C.matmul_act(q, eng.q_fmt, k.T, eng.k_fmt)
    ok = C.causal_mask(s.shape[0], s.shape[1], offset) if eng.causal else np.ones(s.shape, bool)
    ok = ok & (np.asarray(valid)[None, :] != 0)
    p = C.softmax(s, eng.s_frac, ok, eng.exp, eng.recip, eng.prob_fmt)
    return C.matmul_act(p, eng.prob_fmt, v, eng.v_fmt, eng.out_fmt)


def test_corner_cases_verilator():
    rng = np.random.default_rng(7)
    eng = AttentionEngine(4, 12, 4, I8, I8, I8, I8, P8, C.ExpTable(in_frac=4, out_bits=12),
                          C.RecipTable(6, 12), causal=True, name="attention_corners")
    r = lambda *s: rng.integers(-128, 128, s)
    q, k, v = r(12, 4), r(12, 4), r(12, 4)
    q[2:4] = 127                          # extreme scores: exp index saturates
    k[2:4] = -128
    valid = np.ones(12, np.int64)
    valid[0] = 0                          # causal + key 0 padded: query 0 fully masked
    valid[9] = 0
    cuts = [(0, 7), (7, 8), (8, 12)]      # 7 tokens on 4 lanes, one token, then 4 more
    passes, want = [], []
    for a, b in cuts:
        passes.append({"q": q[a:b], "k": k[a:b], "v": v[a:b], "valid": valid[a:b], "offset": a})
        want.append(contract_head(eng, q[a:b], k[:b], v[:b], valid[:b], a))
    assert not want[0][0].any()          # the fully masked row is all zeros
    res = attention_bench(eng, passes, want, valid_prob=0.6, ready_prob=0.5, seed=2)
    print("attention corners (verilator, back-pressure):",
          {k: res[k] for k in ("mismatches", "vectors", "cycles", "model_cycles")})
    assert res["vectors"] == 12 * 4 and res["mismatches"] == 0, res["first_mismatches"]
    assert res["cycles"] > res["model_cycles"]  # stalls cost cycles
