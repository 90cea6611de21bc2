"""Debugging a mismatch: a kernel generated with one wrong constant is
C-simulated, and hwgen.mismatch must point at exactly the elements that
constant feeds, with the operands and the contract's intermediate values of
the golden computation at that element."""
import re

import numpy as np
import pytest

from hwgen import contract as C
from hwgen.golden import GoldenModel, fmt_of
from hwgen.hls.csim import run_kernels
from hwgen.hls.emit import emit_kernels
from hwgen.ir import Graph
from hwgen.mismatch import HEAD, explain, format_explanation


@pytest.fixture(scope="module")
def bert(bert_block_graph):
    g = Graph.load(bert_block_graph)
    rng = np.random.default_rng(3)
    feeds = {"x": rng.normal(0, 1, (2, 8, 64)).astype(np.float32)}
    return g, GoldenModel(g)(feeds, record=True)


def _plant(text: str, k: int, n: int) -> tuple[str, int, int]:
    """Replace W[k][n] in a linear kernel's weights header by a far-away code."""
    start = text.index("W[K][N] = {")
    rows = list(re.finditer(r"\{([^{}]*)\}", text[start + len("W[K][N] = {"):]))
    row = rows[k]
    vals = [int(v) for v in row.group(1).split(",")]
    old = vals[n]
    vals[n] = 127 if old < 0 else -128
    at = start + len("W[K][N] = {")
    new_row = "{" + ", ".join(str(v) for v in vals) + "}"
    return text[:at + row.start()] + new_row + text[at + row.end():], old, vals[n]


def test_planted_weight_fault_is_pinned_to_its_column(bert):
    g, vals = bert
    node = g.node("attn.q")
    ks, files = emit_kernels(g, [node.name])
    name = f"{ks[0].name}_weights.h"
    k, n = 3, 5
    files = dict(files)
    files[name], old, new = _plant(files[name], k, n)
    x, y = vals[node.inputs[0]], vals[node.outputs[0]]
    got = run_kernels(ks, files, {node.name: x})[node.name]

    ex = explain(g, node, [x], y, got)
    assert ex["mismatches"] == int((got != y).sum()) > 0
    assert np.all(np.argwhere(got != y)[:, -1] == n)         # the fault feeds column n only
    assert len(ex["first"]) == min(5, ex["mismatches"])
    m = GoldenModel(g)
    w, bias = m.weight_i64(node.inputs[1]), m.weight_i64(node.inputs[2])
    for e in ex["first"]:
        idx = tuple(e["index"])
        assert idx[-1] == n and e["expected"] == y[idx] and e["actual"] == got[idx]
        row = x[idx[:-1]]
        assert e["operands"]["x_row"] == {"len": row.size, "head": [int(v) for v in row[:HEAD]]}
        assert e["operands"]["w_column"]["head"] == [int(v) for v in w[:HEAD, n]]
        assert e["operands"]["bias"] == bias[n]
        acc = int(row.astype(np.int64) @ w[:, n] + bias[n])
        assert e["contract"]["acc"] == acc
        # the hardware's value is what the planted constant gives: acc moved by x[k] * (new - old)
        faulty = acc + int(row[k]) * (new - old)
        out = fmt_of(g, node.outputs[0])
        assert e["actual"] == out.quantize(np.array([faulty]), e["contract"]["acc_frac"])[0]
    text = format_explanation(ex)
    assert f"at {ex['first'][0]['index']}" in text and "acc=" in text


def test_attention_explanation_matches_the_contract(bert):
    g, vals = bert
    node = g.node("attn")
    acts = [vals[t] for t in node.inputs[:3]]
    y = vals[node.outputs[0]]
    bad = y.copy()
    bad[1, 2, 37] += 1                          # one element: batch 1, query 2, channel 37
    ex = explain(g, node, acts, y, bad)
    assert ex["mismatches"] == 1
    e = ex["first"][0]
    hd = node.attrs["head_dim"]
    assert e["index"] == [1, 2, 37] and e["operands"]["head"] == 37 // hd and e["operands"]["dim"] == 37 % hd
    c = e["contract"]
    # the reported softmax row: its probabilities come from exp entries over their sum
    q = acts[0][1, 2, (37 // hd) * hd:(37 // hd + 1) * hd].astype(np.int64)
    kk = acts[1][1, :, (37 // hd) * hd:(37 // hd + 1) * hd].astype(np.int64)
    assert c["scores"]["head"] == [int(v) for v in (kk @ q)[:HEAD]]
    assert c["max"] == max(c["scores"]["head"]) or c["scores"]["len"] > HEAD
    assert c["exp_sum"] > 0 and c["recip"] > 0
    table = C.exp_table(C.ExpTable(**node.attrs["exp"]))
    assert c["exp"]["head"] == [int(table[i]) for i in c["exp_index"]["head"]]


def test_layernorm_and_shape_mismatch(bert):
    g, vals = bert
    node = g.node("ln1")
    x, y = vals[node.inputs[0]], vals[node.outputs[0]]
    bad = y.copy()
    bad[0, 0, 0] -= 1
    e = explain(g, node, [x], y, bad)["first"][0]
    assert e["contract"]["s1"] == int(x[0, 0].astype(np.int64).sum())
    assert e["contract"]["d"] > 0 and e["contract"]["isqrt"] > 0
    short = explain(g, node, [x], y, y[:, :-1])
    assert short["mismatches"] == y.size and "shape" in short["shape_error"]


def test_hls_verify_reports_the_planted_fault(bert):
    """`hwgen verify --target hls` (hls.project.verify) on a kernel set in which
    one linear was generated with a wrong weight: that kernel, and only it,
    reports mismatches, each pinned to the planted column with the contract's
    accumulator."""
    from hwgen.hls.project import plan, verify

    g, _ = bert
    kernels, _ = plan(g, 0)
    ks = next(k for k in kernels if k.node == "attn.v")
    name = f"{ks.name}_weights.h"
    ks.files[name], _, _ = _plant(ks.files[name], 7, 11)
    rng = np.random.default_rng(5)
    report = verify(g, [k for k in kernels if k.op == "linear"],
                    {"x": rng.normal(0, 1, (1, 8, 64)).astype(np.float32)})
    bad = [r for r in report if r["mismatches"]]
    assert [r["node"] for r in bad] == ["attn.v"]
    first = bad[0]["first_mismatches"]
    assert first and all(e["index"][-1] == 11 for e in first)
    assert all("acc" in e["contract"] and e["expected"] != e["actual"] for e in first)
