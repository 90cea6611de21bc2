"""HLS C++ attention, layernorm, gelu and add kernels vs the golden model:
C-simulation with g++ against the ap_fixed headers, every output integer equal
(mismatch counts reported, 0 is the only pass).

Two graphs: the tiny decoder quantized without KV cache (causal attention) and
a small encoder built here with the IR API (padding-mask attention, 4 heads).
All kernels of one graph compile into one binary (cached under
.hwgen-cache/hls/ by the sha256 of sources, flags, compiler and headers); the
corner-case tests reuse those binaries.
"""
import copy
import time

import numpy as np
import pytest
from conftest import GraphBuilder, build_tiny_decoder, tiny_decoder_feeds

from hwgen import golden
from hwgen.golden import GoldenModel, GoldenState
from hwgen.hls import HLSError, run_csim
from hwgen.hls.csim import _pack
from hwgen.hls.kernels import emit_attention
from hwgen.ir import Graph
from hwgen.quant import QuantConfig, quantize

OPS = ("attention", "layernorm", "gelu", "add")


def build_tiny_encoder(vocab=30, ctx=16, d=32, heads=4, ffn=48, seed=3) -> Graph:
    """Post-norm encoder layer with a padding mask (B, S) input, in float."""
    b = GraphBuilder("tiny-encoder", seed, prefix="e", layer=0)
    w, act, node = b.w, b.act, b.node
    b.input("ids", "B", "S")
    b.input("mask", "B", "S")
    h = ("B", "S", d)
    tok = node("embedding", ["ids", w("tok", vocab, d, scale=1.0)], act("tok_e", *h))
    pos = node("embedding", ["ids", w("pos", ctx, d, scale=0.3)], act("pos_e", *h), positions=True)
    x = node("add", [tok, pos], act("x0", *h))
    q = node("linear", [x, w("q.w", d, d), w("q.b", d, scale=0.1)], act("q", *h))
    k = node("linear", [x, w("k.w", d, d), w("k.b", d, scale=0.1)], act("k", *h))
    v = node("linear", [x, w("v.w", d, d), w("v.b", d, scale=0.1)], act("v", *h))
    o = node("attention", [q, k, v, "mask"], act("attn", *h), heads=heads, head_dim=d // heads,
             causal=False, scale=1 / np.sqrt(d // heads), kv_cache=False)
    o = node("linear", [o, w("o.w", d, d), w("o.b", d, scale=0.1)], act("o", *h))
    x = node("add", [x, o], act("r1", *h))
    x = node("layernorm", [x, b.gamma("ln1.g", d), w("ln1.b", d, scale=0.1)], act("ln1", *h), eps=1e-12)
    f = node("linear", [x, w("fc1.w", d, ffn), w("fc1.b", ffn, scale=0.1)], act("fc1", "B", "S", ffn))
    f = node("gelu", [f], act("gelu", "B", "S", ffn), approximate="none")
    f = node("linear", [f, w("fc2.w", ffn, d), w("fc2.b", d, scale=0.1)], act("fc2", *h))
    x = node("add", [x, f], act("r2", *h))
    node("layernorm", [x, b.gamma("ln2.g", d), w("ln2.b", d, scale=0.1)], act("out", *h), eps=1e-12)
    return b.done("out")


def encoder_feeds(n=3, b=4, s=12, vocab=30, seed=5):
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        lens = rng.integers(1, s + 1, b)
        lens[0] = s
        mask = (np.arange(s)[None, :] < lens[:, None]).astype(np.int64)
        feeds.append({"ids": rng.integers(0, vocab, (b, s)), "mask": mask})
    return feeds


@pytest.fixture(scope="module")
def decoder():
    g = copy.deepcopy(build_tiny_decoder())
    for n in g.nodes:
        if n.op == "attention":
            n.attrs["kv_cache"] = False
    fixed, _ = quantize(g, tiny_decoder_feeds(), QuantConfig.from_bits("w8a8"))
    return fixed


@pytest.fixture(scope="module")
def encoder():
    fixed, _ = quantize(build_tiny_encoder(), encoder_feeds(), QuantConfig.from_bits("w8a8"))
    return fixed


def _nodes(g, ops=OPS):
    return [n for n in g.nodes if n.op in ops]


def _kernel_inputs(node, vals):
    if node.op == "attention":
        return tuple(vals[t] for t in node.inputs[:4] if t)
    if node.op == "add":
        return (vals[node.inputs[0]], vals[node.inputs[1]])
    return vals[node.inputs[0]]


def _cat(parts):
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(p) for p in zip(*parts))
    return np.concatenate(parts)


def _golden_io(g, feeds):
    m = GoldenModel(g)
    xs = {n.name: [] for n in _nodes(g)}
    ys = {n.name: [] for n in _nodes(g)}
    for feed in feeds:
        vals = m(feed, record=True)
        for n in _nodes(g):
            xs[n.name].append(_kernel_inputs(n, vals))
            ys[n.name].append(vals[n.outputs[0]])
    return {k: _cat(v) for k, v in xs.items()}, {k: np.concatenate(v) for k, v in ys.items()}


def _golden_direct(g, xs):
    """The golden kernels (hwgen.golden._attention, ...) on arbitrary input codes."""
    m = GoldenModel(g)
    fns = {"attention": golden._attention, "layernorm": golden._layernorm,
           "gelu": golden._gelu, "add": golden._add}
    ys = {}
    for name, x in xs.items():
        node = g.node(name)
        ins = list(x) if isinstance(x, tuple) else [x]
        ys[name] = fns[node.op](m, node, ins, GoldenState())
    return ys


def _compare(g, label, xs, ys, out=None):
    """Mismatch count of the C-sim outputs ``out`` (default: run now) against ``ys``."""
    out = run_csim(g, xs) if out is None else out
    report, total = [], 0
    for k in ys:
        bad = int((out[k] != ys[k]).sum())
        total += bad
        node = g.node(k)
        report.append(f"  {k:16s} {node.op:10s} {str(g.tensors[node.outputs[0]].fmt):28s} "
                      f"{ys[k].size:6d} codes  mismatches {bad}")
    print(f"\n[{label}] C-sim vs golden, {len(ys)} kernels:\n" + "\n".join(report) +
          f"\n  total mismatches {total}")
    return total, out


def _run(g, feeds, label):
    xs, ys = _golden_io(g, feeds)
    t = time.perf_counter()
    out = run_csim(g, xs)
    dt = time.perf_counter() - t
    print(f"\n[{label}] csim call {dt:.1f} s (incl. the g++ build unless cached)")
    total, _ = _compare(g, label, xs, ys, out)
    return total, ys


def test_decoder_kernels_bit_exact(decoder):
    total, ys = _run(decoder, tiny_decoder_feeds(3), "decoder, causal attention")
    ops = {decoder.node(k).op for k in ys}
    assert ops == set(OPS)
    assert sum(v.size for v in ys.values()) > 15000
    assert any(np.abs(ys[n.name]).max() > 0 for n in _nodes(decoder, ("attention",)))
    assert total == 0


def test_encoder_kernels_bit_exact(encoder):
    feeds = encoder_feeds(3)
    assert any((f["mask"] == 0).any() for f in feeds), "the feeds should pad some rows"
    att = _nodes(encoder, ("attention",))[0]
    assert len(att.inputs) == 4 and not att.attrs["causal"]
    total, ys = _run(encoder, feeds, "encoder, padding-mask attention")
    assert total == 0


def _full_range(rng, fmt, shape):
    return rng.integers(fmt.min_code, fmt.max_code + 1, shape)


def _fmt(g, t):
    return g.tensors[t].fmt


def _attention_corners(g, node, rng, b=6, s=12):
    qf, kf, vf = (_fmt(g, t) for t in node.inputs[:3])
    dm = node.attrs["heads"] * node.attrs["head_dim"]
    q, k, v = (_full_range(rng, f, (b, s, dm)) for f in (qf, kf, vf))
    q[1], k[1] = qf.max_code, kf.max_code                  # largest scores, all equal
    q[2], k[2] = qf.min_code, kf.max_code                  # most negative scores
    v[3] = vf.max_code                                     # PV saturates the output
    q[4] = np.where(np.arange(dm) % 2, qf.max_code, qf.min_code)
    x = (q, k, v)
    if len(node.inputs) > 3 and node.inputs[3]:
        mask = rng.integers(0, 2, (b, s))
        mask[0] = 0                                        # a fully masked batch row
        mask[5] = 0
        mask[5, -1] = 1                                    # a single valid key
        x = x + (mask,)
    return x


def test_corner_cases(decoder, encoder):
    rng = np.random.default_rng(11)
    stats = {}
    for g, label in ((decoder, "decoder"), (encoder, "encoder")):
        xs = {}
        for n in _nodes(g):
            if n.op == "attention":
                xs[n.name] = _attention_corners(g, n, rng)
            elif n.op == "add":
                fa, fb = _fmt(g, n.inputs[0]), _fmt(g, n.inputs[1])
                h = g.tensors[n.outputs[0]].shape[-1]
                a, b = _full_range(rng, fa, (8, h)), _full_range(rng, fb, (8, h))
                a[0], b[0] = fa.max_code, fb.max_code
                a[1], b[1] = fa.min_code, fb.min_code
                xs[n.name] = (a, b)
            elif n.op == "layernorm":
                f = _fmt(g, n.inputs[0])
                h = g.weights[n.inputs[1]].size
                x = _full_range(rng, f, (8, h))
                x[0] = 0                                   # D = eps only
                x[1] = f.max_code
                x[2] = np.where(np.arange(h) % 2, f.max_code, f.min_code)
                x[3] = f.min_code
                x[3, 0] = f.max_code                       # one outlier: |z| near sqrt(H-1)
                xs[n.name] = x
            else:                                          # gelu: every input code
                f = _fmt(g, n.inputs[0])
                h = g.tensors[n.outputs[0]].shape[-1]
                codes = np.arange(f.min_code, f.max_code + 1)
                xs[n.name] = np.stack([np.roll(codes, c)[:len(codes) // h * h] for c in range(h)],
                                      axis=-1).reshape(-1, h)
        ys = _golden_direct(g, xs)
        total, out = _compare(g, f"{label} corners", xs, ys, None)
        assert total == 0
        for n in _nodes(g):
            yf = g.tensors[n.outputs[0]].fmt
            y = ys[n.name]
            stats[n.op] = stats.get(n.op, 0) + int(np.isin(y, [yf.min_code, yf.max_code]).sum())
            if n.op == "attention" and len(xs[n.name]) > 3:
                assert (y[0] == 0).all(), "a fully masked row gives all-zero probabilities"
    print(f"\n[corners] saturated output codes per op: {stats}")
    assert all(stats[op] > 0 for op in ("attention", "layernorm", "add"))


def test_attention_errors(decoder, encoder, tmp_path):
    att = _nodes(encoder, ("attention",))[0]
    dm = att.attrs["heads"] * att.attrs["head_dim"]
    with pytest.raises(HLSError, match="S_MAX = 4"):
        g = copy.deepcopy(encoder)
        z = np.zeros((1, 6, dm), np.int64)
        _pack(emit_attention(g, g.node(att.name), max_seq=4), (z, z, z, np.ones((1, 6))))
    node = _nodes(decoder, ("attention",))[0]
    with pytest.raises(HLSError, match="outside"):
        run_csim(decoder, {node.name: (np.full((1, 2, 16), 1000),) * 3}, cache=tmp_path)
    with pytest.raises(HLSError, match="takes"):
        run_csim(decoder, {node.name: np.zeros((1, 2, 16), np.int64)}, cache=tmp_path)


def test_causal_offset_decode_step(decoder):
    """A decode step: 3 new queries at absolute positions 9..11 over 12 cached+new keys.

    The reference is the golden kernel itself with a KV cache (kv_cache=True on a
    copy of the node, the past K/V preloaded in its GoldenState); the C kernel gets
    the concatenated K/V and the causal offset."""
    rng = np.random.default_rng(7)
    node = _nodes(decoder, ("attention",))[0]
    heads, hd = node.attrs["heads"], node.attrs["head_dim"]
    qf, kf, vf = (_fmt(decoder, t) for t in node.inputs[:3])
    b, past, new = 3, 9, 3
    q = _full_range(rng, qf, (b, new, heads * hd)) // 2
    k = _full_range(rng, kf, (b, past + new, heads * hd)) // 2
    v = _full_range(rng, vf, (b, past + new, heads * hd))
    kv_node = copy.deepcopy(node)
    kv_node.attrs["kv_cache"] = True
    state = GoldenState(offset=past)
    state.kv[node.name] = tuple(golden._split_heads(t[:, :past], heads, hd) for t in (k, v))
    want = golden._attention(GoldenModel(decoder), kv_node, [q, k[:, past:], v[:, past:]], state)
    got = run_csim(decoder, {node.name: (q, k, v, None, past)})[node.name]
    bad = int((got != want).sum())
    print(f"\n[decode step, offset {past}] {want.size} codes, mismatches {bad}")
    assert bad == 0
