"""HLS C++ linear kernel vs the golden model: C-simulation with g++ against the
ap_fixed headers, every output integer equal (mismatch counts reported, 0 is the
only pass).

All linears of a graph compile into one binary (cached under
.hwgen-cache/hls/ by the sha256 of the sources, flags, compiler and headers),
so the whole file compiles two graphs' kernels plus one small variant.
"""
import copy
import time

import numpy as np
import pytest
from conftest import build_tiny_decoder, tiny_decoder_feeds

from hwgen import golden
from hwgen.golden import GoldenModel
from hwgen.hls import HLSError, csim_linear, emit_linear, run_csim
from hwgen.hls.csim import build
from hwgen.quant import QuantConfig, quantize


def _fixed(bits: str):
    g = build_tiny_decoder()
    fixed, _ = quantize(g, tiny_decoder_feeds(), QuantConfig.from_bits(bits))
    return fixed


@pytest.fixture(scope="module")
def w8a8():
    return _fixed("w8a8")


@pytest.fixture(scope="module")
def w4a8():
    return _fixed("w4a8")


def _linears(g):
    return [n for n in g.nodes if n.op == "linear"]


def _golden_io(g):
    """Every linear's input and output codes over three feeds (golden, record=True)."""
    m = GoldenModel(g)
    xs = {n.name: [] for n in _linears(g)}
    ys = {n.name: [] for n in _linears(g)}
    for feed in tiny_decoder_feeds(3):
        vals = m(feed, record=True)
        for n in _linears(g):
            xs[n.name].append(vals[n.inputs[0]])
            ys[n.name].append(vals[n.outputs[0]])
    return ({k: np.concatenate(v) for k, v in xs.items()},
            {k: np.concatenate(v) for k, v in ys.items()})


def _csim_all(g):
    """C-sim of every linear of ``g`` (one binary) on the golden inputs."""
    xs, ys = _golden_io(g)
    t = time.perf_counter()
    out = run_csim(g, xs)
    return out, ys, time.perf_counter() - t


@pytest.fixture(scope="module")
def w8a8_run(w8a8):
    return _csim_all(w8a8)


def _compare(g, label, run, nodes=None):
    out, ys, dt = run
    names = [n.name for n in (nodes or _linears(g))]
    report = []
    total = 0
    for k in names:
        bad = int((out[k] != ys[k]).sum())
        total += bad
        report.append(f"  {k:12s} {str(g.tensors[g.node(k).outputs[0]].fmt):28s} "
                      f"{ys[k].size:6d} codes  mismatches {bad}")
    print(f"\n[{label}] C-sim vs golden, {len(names)} linear kernels; csim call {dt:.1f} s "
          f"(incl. the g++ build unless cached):\n" + "\n".join(report) + f"\n  total mismatches {total}")
    return total, out, ys


def test_linear_w8a8_bit_exact(w8a8, w8a8_run):
    total, _, ys = _compare(w8a8, "w8a8", w8a8_run)
    assert sum(v.size for v in ys.values()) > 10000
    assert total == 0


def test_linear_per_channel_x_bit_exact(w8a8, w8a8_run):
    nodes = [n for n in _linears(w8a8) if w8a8.tensors[n.inputs[0]].per_channel]
    assert len(nodes) >= 6, "the tiny decoder's layernorm/GELU outputs should be per-channel"
    # the folded formats really differ: several accumulator fractional bits per kernel
    src = emit_linear(w8a8, nodes[0]).files[f"{nodes[0].name.replace('.', '_')}.h"]
    assert "case 1:" in src and "per-channel format" in src
    total, _, _ = _compare(w8a8, "w8a8 per-channel x", w8a8_run, nodes)
    assert total == 0


def test_linear_w4a8_bit_exact(w4a8):
    w = w4a8.tensors[_linears(w4a8)[0].inputs[1]]
    assert w.fmt.width == 4
    total, _, _ = _compare(w4a8, "w4a8", _csim_all(w4a8))
    assert total == 0


def _extreme_rows(w: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows of min/max input codes: all max, all min, and per column the input
    that drives it to its largest and to its smallest accumulator."""
    k, n = w.shape
    rows = [np.full(k, hi), np.full(k, lo), np.where(np.arange(k) % 2, hi, lo)]
    for col in range(n):
        rows.append(np.where(w[:, col] > 0, hi, lo))
        rows.append(np.where(w[:, col] > 0, lo, hi))
    return np.array(rows, dtype=np.int64)


def test_linear_saturating_corners(w8a8):
    g = w8a8
    m = GoldenModel(g)
    xs, ys, total, sat = {}, {}, 0, 0
    for n in _linears(g):
        fmt = g.tensors[n.inputs[0]].fmt
        xs[n.name] = _extreme_rows(g.weights[n.inputs[1]].astype(np.int64), fmt.min_code, fmt.max_code)
        ys[n.name] = golden._linear(m, n, [xs[n.name]], None)
    out = run_csim(g, xs)                                         # same binary as the w8a8 test
    for n in _linears(g):
        yf = g.tensors[n.outputs[0]].fmt
        total += int((out[n.name] != ys[n.name]).sum())
        sat += int(np.isin(ys[n.name], [yf.min_code, yf.max_code]).sum())
    print(f"\n[corners] {sum(v.size for v in ys.values())} codes, {sat} saturated, mismatches {total}")
    assert sat > 100, "the corner inputs should drive outputs into saturation"
    assert total == 0


def test_changed_weights_rebuild(w8a8, tmp_path):
    """A changed weight code changes the sources' hash: a new build, never the stale one."""
    g = copy.deepcopy(w8a8)
    node = _linears(g)[0]
    xs, _ = _golden_io(g)
    x = xs[node.name][:4]
    before = csim_linear(g, node, x, cache=tmp_path)
    w = g.weights[node.inputs[1]]
    w[:, 0] = np.where(w[:, 0] < 100, w[:, 0] + 20, w[:, 0] - 20)
    after = csim_linear(g, node, x, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    want = golden._linear(GoldenModel(g), node, [x], None)
    assert int((after != want).sum()) == 0
    assert (before[..., 0] != after[..., 0]).any()
    t = time.perf_counter()
    csim_linear(g, node, x, cache=tmp_path)                   # hash matches: reused
    assert time.perf_counter() - t < 1.0
    assert len(list(tmp_path.iterdir())) == 2


def test_errors(w8a8, tmp_path, monkeypatch):
    emb = next(n for n in w8a8.nodes if n.op == "embedding")
    with pytest.raises(HLSError, match="op 'embedding' has no HLS kernel"):
        run_csim(w8a8, {emb.name: np.zeros((1, 16), np.int64)})
    lin = _linears(w8a8)[0]
    with pytest.raises(HLSError, match="outside"):
        csim_linear(w8a8, lin, np.full((1, 16), 1000), cache=tmp_path)
    with pytest.raises(HLSError, match="g\\+\\+ failed.*\n.*error"):
        build({"bad_tb.cpp": "int main() { return undeclared; }\n"}, cache=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]
    monkeypatch.setenv("HWGEN_AP_TYPES", str(tmp_path))
    with pytest.raises(HLSError, match="ap_fixed headers"):
        csim_linear(w8a8, lin, np.zeros((1, 16), np.int64), cache=tmp_path)
    monkeypatch.delenv("HWGEN_AP_TYPES")
    monkeypatch.setenv("HWGEN_CXX", "no-such-gxx")
    with pytest.raises(HLSError, match="compiler 'no-such-gxx' not found"):
        csim_linear(w8a8, lin, np.zeros((1, 16), np.int64), cache=tmp_path)
    assert isinstance(HLSError("x"), ValueError)
