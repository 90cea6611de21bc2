"""The whole layer as one HLS top (hwgen.hls.block) and the KV-cache attention
kernel, C-simulated with g++ against the golden model: every output integer
equal (mismatch counts printed, 0 is the only pass).

* an encoder layer (padding mask): block output == the golden layer output;
* the tiny decoder's two blocks and their cache-owning attention kernels over a
  prefill and single-token decoding steps, then a reset and a second sequence;
* the shipped tiny-gpt (4 layers, KV cache) through `hwgen verify`: prefill +
  single-token steps, every kernel and every block top;
* bad input: an op without a kernel, a tensor without a fixed-point format, a
  cache overflow, a mask on a cached attention.
"""
import copy

import numpy as np
import pytest
from conftest import build_tiny_decoder, last_json, run_cli, tiny_decoder_feeds
from test_hls_kernels import build_tiny_encoder, encoder_feeds

from hwgen.golden import GoldenModel, GoldenState
from hwgen.hls import HLSError
from hwgen.hls.block import block_files, block_io, block_ports, emit_block
from hwgen.hls.csim import run_csim, run_kernels
from hwgen.hls.kernels import emit_attention
from hwgen.hls.project import all_files, golden_io, plan
from hwgen.quant import QuantConfig, quantize


@pytest.fixture(scope="module")
def encoder():
    fixed, _ = quantize(build_tiny_encoder(), encoder_feeds(), QuantConfig.from_bits("w8a8"))
    for n in fixed.nodes:
        if n.op == "embedding" or n.outputs[0] == "x0":
            n.layer = None                      # the embeddings are not part of the block
    return fixed


@pytest.fixture(scope="module")
def decoder():
    fixed, _ = quantize(build_tiny_decoder(), tiny_decoder_feeds(), QuantConfig.from_bits("w8a8"))
    return fixed


def _bad(got, want):
    return sum(int((g != w).sum()) for g, w in zip(got, want))


def test_encoder_block_bit_exact(encoder):
    blocks, kernels, files = block_files(encoder, [0])
    b = blocks[0]
    ports = block_ports(encoder, [n for n in encoder.nodes if n.layer == 0])
    assert ports.inputs == ["x0"] and ports.mask == "mask" and ports.outputs == ["out"]
    assert len(kernels) == 12 and "e6_attention(s, s, 0, q, k, v, valid, o);" in b.files["block0.h"]
    xs, ys = [], []
    for feed in encoder_feeds(2):
        vals = GoldenModel(encoder)(feed, record=True)
        x, y = block_io(b, vals)
        assert (y == vals["out"]).all()     # the golden layer output itself
        xs.append(x)
        ys.append(y)
    assert any((x["mask"] == 0).any() for x in xs)
    got = run_kernels(blocks, files, {b.node: xs})[b.node]
    bad = _bad(got, ys)
    print(f"\n[encoder block] {sum(y.size for y in ys)} output codes, mismatches {bad}")
    assert bad == 0


def test_decoder_blocks_decode_bit_exact(decoder):
    """Prefill 8 positions, 6 single-token steps, then reset and a second sequence:
    both blocks and both cache-owning attention kernels, call for call."""
    blocks, _, files = block_files(decoder, [0, 1])
    assert all(b.meta["ports"].kv for b in blocks)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 40, (1, 14)), rng.integers(0, 40, (1, 5))]
    att = [n for n in decoder.nodes if n.op == "attention"]
    xs = {k: [] for k in [b.node for b in blocks] + [n.name for n in att]}
    ys = {k: [] for k in xs}
    model = GoldenModel(decoder)
    for ids in seqs:
        state = GoldenState()
        calls = [ids[:, :min(8, ids.shape[1] - 1)]] + [ids[:, i:i + 1] for i in range(min(8, ids.shape[1] - 1),
                                                                                     ids.shape[1])]
        for ci, call in enumerate(calls):
            vals = model({"ids": call}, state=state, record=True)
            for b in blocks:
                x, y = block_io(b, vals, reset=ci == 0)
                xs[b.node].append(x)
                ys[b.node].append(y)
            for n in att:
                xs[n.name].append(tuple(vals[t] for t in n.inputs[:3]) + (ci == 0,))
                ys[n.name].append(vals[n.outputs[0]])
    got = run_kernels(blocks, files, {b.node: xs[b.node] for b in blocks})
    got.update(run_csim(decoder, {n.name: xs[n.name] for n in att}))
    report = {k: (_bad(got[k], ys[k]), sum(y.size for y in ys[k])) for k in xs}
    print(f"\n[decoder decode, {len(ys[att[0].name])} calls] (mismatches, codes): {report}")
    assert all(bad == 0 for bad, _ in report.values())
    assert len(ys[att[0].name]) == (1 + 6) + (1 + 1)


def test_tiny_gpt_decoding_verify(capsys, tmp_path):
    """The shipped tiny-gpt, quantized here: `hwgen verify --layer 1` runs a prefill and
    DECODE_STEPS single-token steps through every kernel of the layer and its block top."""
    from hwgen import zoo
    from hwgen.hls.project import DECODE_STEPS

    bundle = zoo.load("tiny-gpt")
    fixed, _ = quantize(bundle.graph, bundle.calib_feeds[:1], QuantConfig.from_bits("w8a8"))
    fixed.meta["model"] = "tiny-gpt"
    fixed.save(tmp_path / "tg")
    code, out, err = run_cli(capsys, "verify", "--graph", tmp_path / "tg", "--target", "hls",
                             "--layer", "1", "--json")
    assert code == 0, err
    r = last_json(out)
    ops = {k["op"] for k in r["kernels"]}
    assert ops == {"linear", "attention", "layernorm", "gelu", "add", "block"}
    assert r["mismatches"] == 0 and r["vectors"] > 0 and not r["skipped"]
    assert f"{DECODE_STEPS} single-token decoding steps" in err


def test_golden_io_decode_calls(decoder):
    kernels, skipped = plan(decoder, 0)
    assert not skipped and kernels[-1].op == "block"
    xs, ys = golden_io(decoder, kernels, {"ids": np.arange(10)[None] % 40})
    att = next(k for k in kernels if k.op == "attention")
    assert [x[0].shape[1] for x in xs[att.node]] == [6, 1, 1, 1, 1]
    assert [x[3] for x in xs[att.node]] == [True, False, False, False, False]
    got = run_kernels(kernels, all_files(kernels), xs)
    assert all(_bad(got[k.node], ys[k.node]) == 0 for k in kernels)


def test_block_errors(decoder, encoder, tmp_path):
    g = copy.deepcopy(decoder)
    n = next(n for n in g.nodes if n.op == "gelu" and n.layer == 0)
    n.op = "relu"
    with pytest.raises(HLSError, match=r"node 'n\d+.gelu': op 'relu' has no HLS kernel"):
        emit_block(g, 0)
    with pytest.raises(HLSError, match="no nodes in layer 9"):
        emit_block(decoder, 9)
    g = copy.deepcopy(decoder)
    g.tensors["L0.q"].fmt = None
    with pytest.raises(HLSError, match="tensor 'L0.q' has no fixed-point format"):
        emit_block(g, 0)
    # the cache holds max_positions = 24 positions: a 25th is refused (the golden model too)
    att = next(n for n in decoder.nodes if n.op == "attention")
    z = np.zeros((1, 20, 16), np.int64)
    with pytest.raises(HLSError, match="S_MAX"):
        run_csim(decoder, {att.name: [(z, z, z, True), (z[:, :5], z[:, :5], z[:, :5], False)]},
                 cache=tmp_path)
    g = copy.deepcopy(decoder)
    node = g.node(att.name)
    node.inputs.append("ids")
    with pytest.raises(HLSError, match="KV cache and a padding mask"):
        emit_attention(g, node)
    del node.attrs["max_positions"]
    node.inputs.pop()
    g.meta.pop("max_positions", None)
    with pytest.raises(HLSError, match="needs a capacity"):
        emit_attention(g, node)
    with pytest.raises(HLSError, match="positive int"):
        emit_block(decoder, 0, par=0)


def test_pragmas_par_and_files(encoder):
    """The parallelism setting reaches every kernel (ARRAY_PARTITION / UNROLL factors),
    inner loops are pipelined at II=1, constants sit in their own header, every top has
    INTERFACE pragmas; a par that divides nothing (3) still C-simulates bit-exact."""
    from hwgen.hls.emit import emit_top

    kernels, skipped = plan(encoder, 0, par=3)
    assert not skipped and [k.op for k in kernels].count("block") == 1
    for k in kernels:
        h = k.files[f"{k.name}.h"]
        if k.op == "block":
            assert "PIPELINE II=1" in h
            top = emit_top(k)
            assert "m_axi port=in_x0 offset=slave bundle=gmem depth=" in top
            assert "s_axilite port=s" in top and "s_axilite port=return" in top
            continue
        assert f"#define {k.name.upper()}_PAR 3" in h, k.name
        assert "#pragma HLS PIPELINE II=1" in h and "#pragma HLS UNROLL" in h, k.name
        assert "ARRAY_PARTITION" in h and "factor=PAR" in h, k.name
        consts = [f for f in k.files if f != f"{k.name}.h"]
        assert consts in ([f"{k.name}_weights.h"], [f"{k.name}_tables.h"]), (k.name, consts)
        assert f'#include "{consts[0]}"' in h
        top = emit_top(k)
        if k.op == "attention":
            assert "m_axi port=q offset=slave bundle=gmem depth=" in top and "s_axilite port=s_q" in top
        else:
            assert "#pragma HLS INTERFACE axis port=" in top and "PIPELINE II=1" in top
    xs, ys = golden_io(encoder, kernels, encoder_feeds(1)[0])
    got = run_kernels(kernels, all_files(kernels), xs)
    bad = {k.name: int((got[k.node] != ys[k.node]).sum()) for k in kernels}
    print(f"\n[par=3] mismatches per kernel: {bad}")
    assert sum(bad.values()) == 0


def test_formats_beyond_ap_fixed(decoder):
    """A format the ap_fixed headers cannot take: the emitter refuses with one message
    naming the node (HLS target), or the hls4ml layer is skipped naming the type."""
    from hwgen.fixed import FixedType
    from hwgen.hls import emit_linear
    from hwgen.hls import hls4ml_interop as I

    g = copy.deepcopy(decoder)
    lin = next(n for n in g.nodes if n.op == "linear")
    g.tensors[lin.outputs[0]].fmt = FixedType(8, 60, True, "AP_RND", "AP_SAT")   # 52 bits above the width
    with pytest.raises(HLSError, match=rf"node '{lin.name}': column 0 drops \d+ fractional bits .* abort"):
        emit_linear(g, lin)
    with pytest.raises(I.HLS4MLError, match="2000-bit type is beyond what ap_fixed allows"):
        I._AP(2000, 10)
