"""`hwgen gen --target hls` and `hwgen verify --target hls` end to end on the
bert-block model: the project folder (kernels, testbench, vectors, Vitis HLS
script, manifest), C-simulation with zero mismatches, and bad input."""
import json


from conftest import last_json
from conftest import run_cli as run




def test_gen_hls_project(bert_block_graph, capsys, tmp_path):
    out = tmp_path / "hls"
    code, stdout, _ = run(capsys, "gen", "--graph", bert_block_graph, "--target", "hls", "--out", out,
                          "--clock-ns", "4", "--json")
    assert code == 0
    r = last_json(stdout)
    assert r["target"] == "hls" and r["out"] == str(out)
    assert set(r["kernels"]) >= {"attn_q", "attn", "ln1", "act", "add"}
    assert r["files"] == sum(1 for p in out.rglob("*") if p.is_file())
    man = json.loads((out / "manifest.json").read_text())
    assert [k["name"] for k in man["kernels"]] == r["kernels"]
    for k in man["kernels"]:
        for f in k["files"]:
            assert (out / f).is_file(), f
        assert (out / k["vectors"]["in"]).is_file() and (out / k["vectors"]["golden"]).is_file()
        assert k["formats"]["output"]
    assert (out / "hwgen_tb.cpp").is_file()
    tcl = (out / "run_hls.tcl").read_text()
    lines = tcl.splitlines()
    for cmd in ("open_project", "set_top", "add_files -tb hwgen_tb.cpp", "open_solution",
                "set_part {xcu250-figd2104-2L-e}", "create_clock -period 4", "csim_design",
                "csynth_design", "cosim_design", "export_design -format ip_catalog"):
        assert sum(ln.startswith(cmd) for ln in lines) == len(r["kernels"]), cmd
    assert "-cflags" in tcl
    # the whole layer as one top chaining the kernels; INTERFACE pragmas on every top
    blocks = [k for k in man["kernels"] if k["op"] == "block"]
    assert [b["name"] for b in blocks] == ["block0"] and "attn" in blocks[0]["chains"]
    assert "set_top block0_top" in tcl
    top = (out / "block0.cpp").read_text()
    assert "#pragma HLS INTERFACE m_axi port=" in top and "s_axilite port=return" in top
    row = (out / "attn_q.cpp").read_text()
    assert "#pragma HLS INTERFACE axis port=x" in row and "#pragma HLS INTERFACE axis port=y" in row
    # no temporary folders left next to the output
    assert [p.name for p in tmp_path.iterdir()] == ["hls"]


def test_verify_hls_bit_exact(bert_block_graph, capsys):
    code, stdout, err = run(capsys, "verify", "--graph", bert_block_graph, "--target", "hls", "--json")
    assert code == 0, err
    r = last_json(stdout)
    assert r["target"] == "hls" and r["mismatches"] == 0
    assert len(r["kernels"]) >= 12
    assert all(k["vectors"] > 0 and k["mismatches"] == 0 for k in r["kernels"])
    assert {k["op"] for k in r["kernels"]} == {"linear", "attention", "layernorm", "gelu", "add", "block"}
    block = [k for k in r["kernels"] if k["op"] == "block"]
    assert len(block) == 1 and block[0]["vectors"] > 0 and block[0]["mismatches"] == 0
    assert all("reason" in s for s in r["skipped"])
    assert r["wall_s"] > 0 and "mismatches" in err


def test_hls_errors(bert_block_graph, capsys, tmp_path):
    code, out, err = run(capsys, "verify", "--graph", tmp_path / "missing", "--target", "hls", "--json")
    assert code == 1 and out == "" and err.startswith("hwgen: error:") and "graph.json" in err
    code, _, err = run(capsys, "gen", "--graph", bert_block_graph, "--target", "vhdl",
                       "--out", tmp_path / "o")
    assert code == 1 and "unknown target 'vhdl'" in err and not (tmp_path / "o").exists()
    code, _, err = run(capsys, "verify", "--graph", bert_block_graph, "--target", "hls", "--layer", "7")
    assert code == 1 and "no nodes in layer 7" in err
    # refuses to replace a folder that is not an hwgen project (here: the graph itself)
    code, _, err = run(capsys, "gen", "--graph", bert_block_graph, "--target", "hls",
                       "--out", bert_block_graph)
    assert code == 1 and "not an hwgen HLS project" in err
    assert (bert_block_graph / "graph.json").is_file()


def test_verify_exit_status_on_mismatch(bert_block_graph, capsys, monkeypatch):
    import hwgen.hls.project as project

    real = project.run_kernels

    def off_by_one(kernels, files, xs, *a, **kw):
        outs = real(kernels, files, xs, *a, **kw)
        name = next(iter(outs))
        outs[name] = outs[name].copy()
        outs[name].reshape(-1)[0] += 1
        return outs

    monkeypatch.setattr(project, "run_kernels", off_by_one)
    code, stdout, _ = run(capsys, "verify", "--graph", bert_block_graph, "--target", "hls", "--json")
    r = last_json(stdout)
    assert code == 1 and r["mismatches"] == 1
    assert sum(k["mismatches"] for k in r["kernels"]) == 1


def test_synthesis_tops_compile_and_match(bert_block_graph, capsys, tmp_path):
    """The synthesis tops (<name>.cpp, with their INTERFACE pragmas) built the way Vitis
    co-simulation builds them (testbench compiled with -DHWGEN_TOP_<NAME>, so it calls
    <name>_top) reproduce the golden vectors: a row kernel (axis ports), the attention
    kernel and the block top (m_axi ports). One binary, cached like every C-sim build."""
    import subprocess

    from hwgen.hls.csim import build

    out = tmp_path / "hls"
    code, stdout, err = run(capsys, "gen", "--graph", bert_block_graph, "--target", "hls", "--out", out, "--json")
    assert code == 0, err
    tops = ("attn_q", "attn", "block0")
    files = {p.name: p.read_text() for p in out.iterdir() if p.is_file() and p.suffix in (".h", ".cpp")}
    exe = build(files, tops=tops)
    for name in tops:
        v = out / "vectors"
        r = subprocess.run([str(exe), name, str(v / f"{name}.in"), str(tmp_path / f"{name}.out"),
                            str(v / f"{name}.golden")], capture_output=True, text=True)
        assert r.returncode == 0 and "output codes match" in r.stderr, (name, r.stderr)
