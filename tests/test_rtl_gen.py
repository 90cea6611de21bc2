"""hwgen.rtl.generate: the op -> engine registry, Verilog + manifests written
atomically, Verilator lint clean with the listed waivers, the errors a user
can cause, and the committed reference configuration rtl/ (MiniLM W8A8
layer 0 on a 16 x 16 array) regenerated and compared file by file."""
import copy
import json
from pathlib import Path

import pytest

from hwgen.fixed import FixedType
from hwgen.rtl import RTLError
from hwgen.rtl.generate import (BUILDERS, WAIVERS_FILE, RTLOptions, lint, plan, write)

REPO = Path(__file__).resolve().parents[1]
RTL_DIR = REPO / "rtl"
SMALL = RTLOptions(rows=4, cols=4, max_seq=24, lanes=4, block_k=8)


def test_registry_and_plan(tiny_decoder_fixed):
    assert set(BUILDERS) == {"linear", "attention"}
    kernels, skipped = plan(tiny_decoder_fixed, 0, SMALL)
    ops = [k.op for k in kernels]
    assert ops.count("linear") == 6 and ops.count("attention") == 1
    assert {s["op"] for s in skipped} == {"layernorm", "add", "gelu"}
    assert all("no RTL kernel" in s["reason"] for s in skipped)
    att = next(k for k in kernels if k.op == "attention")
    assert att.manifest["heads"] == 2 and att.manifest["kv_cache"]
    assert att.manifest["cycles"] == att.engine.cycles(24, 24)
    lin = next(k for k in kernels if k.op == "linear")
    assert lin.manifest["cycles"] == lin.engine.cycles(24)
    assert lin.manifest["utilization"] == lin.manifest["ideal_cycles"] / lin.manifest["cycles"]


def test_write_and_lint(tiny_decoder_fixed, tmp_path):
    kernels, skipped = plan(tiny_decoder_fixed, 0, SMALL)
    pick = [k for k in kernels if k.op == "attention"] + [k for k in kernels if k.op == "linear"][:1]
    index = write(tiny_decoder_fixed, pick, skipped, tmp_path / "out", SMALL, 0)
    out = tmp_path / "out"
    assert json.loads((out / "manifest.json").read_text()) == index
    assert (out / WAIVERS_FILE.name).read_text() == WAIVERS_FILE.read_text()
    for k in index["kernels"]:
        v = (out / k["verilog"]).read_text()
        assert f"module {k['top']}(" in v
        man = json.loads((out / k["manifest"]).read_text())
        assert man["node"] == k["node"] and man["op"] == k["op"] and man["cycles"] > 0
        warnings = lint(out / k["verilog"], k["top"], out / WAIVERS_FILE.name)
        assert warnings == [], warnings[:5]


def test_lint_catches_a_real_problem(tmp_path):
    bad = tmp_path / "bad.v"
    bad.write_text("module bad(input clk, input [3:0] a, output [1:0] y);\n"
                   "  wire [3:0] unused_w = a;\n  assign y = a + 4'h1;\nendmodule\n")
    warnings = lint(bad, "bad")
    assert warnings and any("WIDTHTRUNC" in w for w in warnings)   # truncation of a + 1 is not waived


def test_bad_input(tiny_decoder, tiny_decoder_fixed, tmp_path):
    with pytest.raises(RTLError, match="float graph; quantize it first"):
        plan(tiny_decoder, 0, SMALL)
    with pytest.raises(RTLError, match="no nodes in layer 7"):
        plan(tiny_decoder_fixed, 7, SMALL)
    with pytest.raises(RTLError, match="rows must be a positive integer"):
        RTLOptions(rows=0)
    g = copy.deepcopy(tiny_decoder_fixed)
    node = next(n for n in g.nodes if n.op == "linear" and n.layer == 0)
    t = g.tensors[node.outputs[0]]
    t.fmt = FixedType(t.fmt.width, t.fmt.int_bits, t.fmt.signed, "AP_TRN", "AP_WRAP")
    with pytest.raises(RTLError, match=f"node '{node.name}'.*AP_RND"):
        plan(g, 0, SMALL)
    kernels, skipped = plan(tiny_decoder_fixed, 0, SMALL)
    other = tmp_path / "notrtl"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(RTLError, match="not an hwgen RTL folder"):
        write(tiny_decoder_fixed, kernels[:1], skipped, other, SMALL, 0)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    with pytest.raises(RTLError, match="no node of layer 0 has an RTL kernel"):
        write(tiny_decoder_fixed, [], skipped, tmp_path / "empty", SMALL, 0)
    assert not (tmp_path / "empty").exists()


# ----------------------------------------------------------------------------
# the committed reference configuration
# ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def minilm_w8a8(tmp_path_factory):
    """all-MiniLM-L6-v2 quantized W8A8 by the CLI (as `hwgen quantize` writes it)."""
    from hwgen.cli import main

    out = tmp_path_factory.mktemp("minilm") / "g"
    assert main(["quantize", "--model", "minilm", "--bits", "w8a8", "--out", str(out), "--quiet"]) == 0
    return out


def test_reference_rtl_is_current(minilm_w8a8, tmp_path):
    """rtl/ == `hwgen gen --graph <minilm w8a8> --target rtl --layer 0 --out rtl` now.
    Regenerate it with that command after changing an engine or the quantizer."""
    from hwgen.ir import Graph

    ref = json.loads((RTL_DIR / "manifest.json").read_text())
    g = Graph.load(minilm_w8a8)
    opt = RTLOptions(rows=ref["rows"], cols=ref["cols"], max_seq=ref["max_seq"], lanes=ref["lanes"],
                     block_k=ref["block_k"])
    assert (opt.rows, opt.cols, ref["layer"]) == (16, 16, 0)
    kernels, skipped = plan(g, ref["layer"], opt)
    index = write(g, kernels, skipped, tmp_path / "rtl", opt, ref["layer"])
    new = sorted(p.name for p in (tmp_path / "rtl").iterdir())
    assert sorted(p.name for p in RTL_DIR.iterdir()) == new
    stale = [n for n in new if (tmp_path / "rtl" / n).read_bytes() != (RTL_DIR / n).read_bytes()]
    assert not stale, f"rtl/ is stale in {stale}: regenerate with `hwgen gen --graph G --target rtl " \
                      "--layer 0 --out rtl` (G: `hwgen quantize --model minilm --bits w8a8`)"
    assert len(index["kernels"]) == 7


@pytest.mark.slow
def test_reference_rtl_lints_clean():
    """Every kernel in rtl/ passes `verilator --lint-only -Wall` with rtl/lint_waivers.vlt."""
    index = json.loads((RTL_DIR / "manifest.json").read_text())
    left = {k["name"]: lint(RTL_DIR / k["verilog"], k["top"], RTL_DIR / WAIVERS_FILE.name)
            for k in index["kernels"]}
    assert not any(left.values()), {n: w[:3] for n, w in left.items() if w}
