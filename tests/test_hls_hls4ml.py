"""hls4ml interoperation (hwgen.hls.hls4ml_interop): the bert-block graph's layers
converted by hls4ml's PyTorch frontend with the graph's precisions, compiled by
hls4ml (cached under .hwgen-cache/hls4ml/) and run through hls4ml's own
C-simulation (predict), compared code by code with the golden model.

Dense and add must agree bit for bit (0 mismatches); hls4ml's softmax and
layernorm use their own tables, so their differences are measured and bounded
by what the README states. Four layers only (each hls4ml compile is ~10 s).
"""
import json

import numpy as np
import pytest
from conftest import last_json, run_cli

from hwgen.hls import hls4ml_interop as I
from hwgen.ir import Graph

LAYERS = ["attn_q", "add", "attn_softmax", "ln1"]


@pytest.fixture(scope="module")
def bert(bert_block_graph):
    return Graph.load(bert_block_graph)


@pytest.fixture(scope="module")
def report(bert):
    from hwgen.hls.project import builtin_feeds

    feeds, _ = builtin_feeds(bert)
    rep, skipped = I.verify(bert, feeds, only=LAYERS)
    return {r["name"]: r for r in rep}, skipped


def test_layers_vs_golden(report):
    rep, skipped = report
    print("\n[hls4ml vs golden] " + json.dumps(rep, indent=1))
    assert sorted(rep) == sorted(LAYERS)
    assert all(r["vectors"] > 0 for r in rep.values())
    # Dense (exact accumulator) and the add: bit-exact
    for name in ("attn_q", "add"):
        assert rep[name]["exact"] and rep[name]["mismatches"] == 0 and rep[name]["max_abs_diff_lsb"] == 0
    # hls4ml's softmax: its reciprocal table is indexed by the top bits of the raw sum
    sm = rep["attn_softmax"]
    assert not sm["exact"] and sm["max_abs_diff_lsb"] <= 2
    # hls4ml's layernorm: var >= 1 clamps to the end of its 1/sqrt table
    ln = rep["ln1"]
    assert not ln["exact"] and ln["mismatches"] > 0
    d = ln["detail"]
    assert d["rows_var_ge_1"] > 0 and d["max_abs_diff_lsb_var_lt_1"] <= 2
    assert d["max_abs_diff_lsb_var_ge_1"] > d["max_abs_diff_lsb_var_lt_1"]
    reasons = {s["op"]: s["reason"] for s in skipped}
    assert "GELU" in reasons["gelu"] and "attention" in reasons["attention"]


def test_cached_build_reused(bert, report):
    from hwgen.hls.project import builtin_feeds

    feeds, _ = builtin_feeds(bert)
    rep, _ = I.verify(bert, feeds, only=["attn_q"])
    assert rep[0]["cached"] and rep[0]["mismatches"] == 0


def _only(monkeypatch, names):
    """Keep the CLI to the layers compiled above (each cold hls4ml compile is ~10 s)."""
    real = I.plan

    def plan(*a, **kw):
        layers, skipped = real(*a, **kw)
        return [ly for ly in layers if ly.name in names], skipped
    monkeypatch.setattr(I, "plan", plan)


def test_cli_verify_and_gen(bert_block_graph, report, capsys, tmp_path, monkeypatch):
    _only(monkeypatch, ["attn_q", "ln1"])
    code, out, err = run_cli(capsys, "verify", "--graph", bert_block_graph, "--target", "hls4ml", "--json")
    assert code == 0, err
    r = last_json(out)
    assert r["target"] == "hls4ml" and [k["name"] for k in r["kernels"]] == ["attn_q", "ln1"]
    assert all({"name", "vectors", "mismatches", "max_abs_diff_lsb"} <= set(k) for k in r["kernels"])
    assert r["mismatches"] == sum(k["mismatches"] for k in r["kernels"]) > 0 and r["mismatches_exact"] == 0
    # a layer claimed exact that differs: exit status 1
    real = I.predict

    def off(layer, hm, xs):
        y = real(layer, hm, xs)
        return y + (layer.op == "linear")
    monkeypatch.setattr(I, "predict", off)
    code, out, _ = run_cli(capsys, "verify", "--graph", bert_block_graph, "--target", "hls4ml", "--json")
    assert code == 1 and last_json(out)["mismatches_exact"] > 0
    monkeypatch.undo()

    dest = tmp_path / "h4"
    code, out, err = run_cli(capsys, "gen", "--graph", bert_block_graph, "--target", "hls4ml", "--out", dest,
                             "--json")
    assert code == 0, err
    r = last_json(out)
    man = json.loads((dest / "manifest.json").read_text())
    assert r["kernels"] == [e["name"] for e in man["layers"]] and "attn_q" in r["kernels"]
    assert "act" in r["skipped"] and "attn" in r["skipped"]
    for e in man["layers"]:
        assert (dest / e["dir"] / "firmware" / "myproject.cpp").is_file(), e["dir"]
        assert (dest / e["dir"] / "build_prj.tcl").is_file()
    defines = (dest / "attn_q" / "firmware" / "defines.h").read_text()
    assert "typedef ap_fixed<8,3,AP_RND,AP_SAT,0> input_t;" in defines     # the graph's quant_x format
    assert [p.name for p in tmp_path.iterdir()] == ["h4"]


def test_errors(bert, bert_block_graph, capsys, tmp_path, monkeypatch):
    import copy

    g = copy.deepcopy(bert)
    g.tensors["attn.q"].channel_axis = -1
    g.tensors["attn.q"].channel_int_bits = [1] * 64
    layers, skipped = I.plan(g, 0)
    why = {s["name"]: s["reason"] for s in skipped}
    assert "per-channel formats" in why["attn.q"] and "attn.q" not in [ly.node for ly in layers]
    g = copy.deepcopy(bert)
    g.tensors["attn.o"].fmt = None
    _, skipped = I.plan(g, 0)
    assert "no fixed-point format" in {s["name"]: s["reason"] for s in skipped}["attn.o"]
    with pytest.raises(I.HLS4MLError, match=r"no hls4ml layer named \['nope'\]"):
        I.verify(bert, {"x": np.zeros((1, 2, 64))}, only=["nope"])
    code, _, err = run_cli(capsys, "gen", "--graph", bert_block_graph, "--target", "hls4ml",
                           "--out", bert_block_graph)
    assert code == 1 and "not an hwgen hls4ml project" in err
    import builtins
    real_import = builtins.__import__

    def no_hls4ml(name, *a, **kw):
        if name == "hls4ml":
            raise ImportError("No module named 'hls4ml'")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_hls4ml)
    with pytest.raises(I.HLS4MLError, match="pip install hls4ml"):
        I.plan(bert, 0)


def test_compile_failure_named(bert, tmp_path, monkeypatch):
    """A g++/build failure inside hls4ml's compile() ends in one error naming the layer,
    and leaves no build marked done in the cache."""
    from hls4ml.model.graph import ModelGraph

    def broken(self):
        print("g++: error: something")
        raise Exception('Failed to compile project "myproject"')
    monkeypatch.setattr(ModelGraph, "compile", broken)
    layers, _ = I.plan(bert, 0)
    lin = next(ly for ly in layers if ly.name == "attn_q")
    with pytest.raises(I.HLS4MLError, match=r"hls4ml compile\(\) of layer 'attn_q' failed.*\n.*g\+\+: error"):
        I.compiled(lin, cache=tmp_path)
    assert not list(tmp_path.rglob("hwgen-done"))


def test_relu_activation_bit_exact():
    """An activation (ReLU, 10-bit input -> 8-bit output: a real requantization) through
    hls4ml's Activation layer: bit-exact with the golden model."""
    from conftest import GraphBuilder

    from hwgen.quant import QuantConfig, quantize

    b = GraphBuilder("relu-ffn", 4, prefix="r", layer=0)
    b.input("x", "B", "S", 16, dtype="float")
    h = ("B", "S", 16)
    x = b.node("quantize", ["x"], b.act("xq", *h), layer=None)
    f = b.node("linear", [x, b.w("fc1.w", 16, 24), b.w("fc1.b", 24, scale=0.1)], b.act("fc1", "B", "S", 24))
    f = b.node("relu", [f], b.act("relu", "B", "S", 24))
    b.node("linear", [f, b.w("fc2.w", 24, 16), b.w("fc2.b", 16, scale=0.1)], b.act("fc2", *h))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(2, 8, 16))} for _ in range(2)]
    g, _ = quantize(b.done("fc2"), feeds, QuantConfig.from_bits("w8a8"))
    assert g.tensors["fc1"].fmt.width > g.tensors["relu"].fmt.width
    rep, _ = I.verify(g, feeds[0], only=["r2.relu"])
    assert rep[0]["op"] == "relu" and rep[0]["exact"] and rep[0]["vectors"] == 2 * 8 * 24
    assert rep[0]["mismatches"] == 0
