"""`hwgen gen --target rtl` and `hwgen verify --target rtl` end to end on the
tiny decoder (layer 0, 4 x 4 array, Icarus: the smallest build): Verilog +
manifests + lint, one JSON line with the documented keys, 0 mismatches on the
golden decode (prefill + single-token KV-cache steps) and the corner cases,
and every bad input a user can give ending in one `hwgen: error:` line."""
import json
import os

from pathlib import Path

import pytest
from conftest import last_json, run_cli

SMALL = ["--rows", "4", "--cols", "4", "--max-seq", "24", "--lanes", "4"]


@pytest.fixture(scope="module")
def tiny_graph(tiny_decoder_fixed, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "g"
    g = tiny_decoder_fixed
    g.meta.setdefault("model", "")
    g.save(d)
    return d


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    import numpy as np

    p = tmp_path_factory.mktemp("in") / "ids.npz"
    np.savez(p, ids=np.array([[5, 17, 2, 33, 8, 1, 21]]))
    return p


def test_gen_rtl_with_lint(capsys, tiny_graph, tmp_path):
    out = tmp_path / "rtl"
    code, so, se = run_cli(capsys, "gen", "--graph", tiny_graph, "--target", "rtl", "--layer", "0",
                           "--out", out, *SMALL, "--lint", "--json")
    assert code == 0, se
    r = last_json(so)
    assert r["target"] == "rtl" and r["array"] == [4, 4] and len(r["kernels"]) == 7
    assert r["lint_warnings"] == 0, r["lint"]
    index = json.loads((out / "manifest.json").read_text())
    assert [k["name"] for k in index["kernels"]] == r["kernels"]
    for k in index["kernels"]:
        assert (out / k["verilog"]).is_file() and (out / k["manifest"]).is_file()


def test_verify_rtl_icarus(capsys, tiny_graph, tiny_inputs):
    code, so, se = run_cli(capsys, "verify", "--graph", tiny_graph, "--target", "rtl", "--layer", "0",
                           *SMALL, "--sim", "icarus", "--inputs", tiny_inputs,
                           "--kernel", "n11.linear", "--kernel", "n7.attention", "--json")
    assert code == 0, se
    r = last_json(so)
    assert r["target"] == "rtl" and r["simulator"] == "icarus" and r["mismatches"] == 0
    assert {k["op"] for k in r["kernels"]} == {"linear", "attention"}
    for k in r["kernels"]:
        for key in ("name", "shape", "vectors", "mismatches", "cycles", "ideal_cycles", "utilization"):
            assert key in k, key
        assert k["mismatches"] == 0 and k["vectors"] > 0, k["first_mismatches"]
        assert k["cycles"] == k["model_cycles"]
        assert 0 < k["utilization"] <= 1
    att = next(k for k in r["kernels"] if k["op"] == "attention")
    assert att["real_runs"] == 2 * 3          # 2 heads x (prefill + 2 single-token steps)
    assert r["vectors"] == sum(k["vectors"] for k in r["kernels"])


def test_errors(capsys, tiny_graph, tmp_path, monkeypatch):
    def err(*argv):
        code, so, se = run_cli(capsys, *argv)
        assert code == 1 and se.startswith("hwgen: error: "), (code, se)
        return se

    assert "unknown target 'vhdl'" in err("gen", "--graph", tiny_graph, "--target", "vhdl", "--out", tmp_path / "x")
    assert "no nodes in layer 5" in err("gen", "--graph", tiny_graph, "--target", "rtl", "--layer", "5",
                                        "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert "rows must be a positive integer" in err("gen", "--graph", tiny_graph, "--target", "rtl",
                                                    "--rows", "0", "--out", tmp_path / "x")
    monkeypatch.setenv("PATH", str(tmp_path))
    from sim.runner import simulator_version
    simulator_version.cache_clear()
    try:
        assert "Icarus Verilog is not installed" in err("verify", "--graph", tiny_graph, "--target", "rtl",
                                                        "--layer", "0", *SMALL, "--sim", "icarus")
    finally:
        monkeypatch.setenv("PATH", os.environ["PATH"])
        simulator_version.cache_clear()


def test_verify_rtl_exit_1_on_mismatch(capsys, tiny_graph, tiny_inputs, monkeypatch):
    """A golden vector that disagrees with the hardware (one code changed) must
    give mismatches > 0 in the JSON and exit status 1."""
    import hwgen.rtl.verify as V

    real = V.golden_steps

    def tampered(graph, feeds, decode_steps=2):
        steps = real(graph, feeds, decode_steps)
        out = graph.node("n11.linear").outputs[0]
        y = steps[0]["vals"][out].copy()
        y[0, 0, 0] = y[0, 0, 0] + 1 if y[0, 0, 0] < 0 else y[0, 0, 0] - 1
        steps[0]["vals"][out] = y
        return steps

    monkeypatch.setattr(V, "golden_steps", tampered)
    code, so, se = run_cli(capsys, "verify", "--graph", tiny_graph, "--target", "rtl", "--layer", "0",
                           *SMALL, "--sim", "icarus", "--inputs", tiny_inputs, "--kernel", "n11.linear",
                           "--no-corners", "--json")
    r = last_json(so)
    assert code == 1 and r["mismatches"] == 1
    first = r["kernels"][0]["first_mismatches"][0]
    assert first["index"] == [0, 0]
    # the golden computation at that element: operands and accumulator (hwgen.mismatch)
    assert first["operands"]["x_row"]["len"] > 0 and "acc" in first["contract"]
    # a waveform of the failing run is kept and its path printed
    waves = r["kernels"][0]["waves"]
    assert waves and Path(waves).is_file() and f"waves of {r['kernels'][0]['name']}: {waves}" in se
