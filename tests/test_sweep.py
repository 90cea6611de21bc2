"""`hwgen sweep`: points evaluated locally and on a Ray instance the test starts,
exact cycles from the engines' specs, resources/Fmax from the tools, accuracy from
the quantizer, failing points marked with their reason, the CSV/JSON/PNG outputs,
the point cache and the resume of an interrupted sweep. Tiny designs only: the
bert-block layer's attn.q linear on 1x1 / 2x2 arrays at 4 tokens."""
import csv
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import last_json, run_cli

from hwgen.impl.sweep import SweepConfig, cache_dir, run_sweep

SMALL = ["--model", "bert-block", "--bits", "w8a8", "--kernel", "attn.q", "--seq", "4"]


def _layer_cycles_by_hand(graph_dir, seq, rows, cols, engines):
    """Sum of the specs' cycles with N split over the engines, plus attention."""
    from hwgen.impl.roofline import design_cycles
    from hwgen.ir import Graph
    from hwgen.rtl.matmul import MatmulSpec

    g = Graph.load(graph_dir)
    total = 0
    for n in g.nodes:
        if n.op == "linear":
            s = MatmulSpec.for_linear(g, n, rows=rows, cols=cols, max_m=seq)
            total += dataclasses.replace(s, n=-(-s.n // engines)).cycles(seq)
    for k in design_cycles(g, 0, seq, rows, cols)["kernels"]:
        if k["op"] == "attention":
            total += -(-k["heads"] // engines) * (k["cycles"] // k["heads"])
    return total


def test_sweep_local_resume_and_failures(capsys, tmp_path, monkeypatch, bert_block_graph):
    monkeypatch.setenv("HWGEN_CACHE", str(tmp_path / "cache"))
    # the point keys hash the RTL sources, which others edit in this shared tree meanwhile
    monkeypatch.setattr("hwgen.impl.sweep._source_hash", lambda: "fixed-for-this-test")
    out = tmp_path / "sw"
    code, stdout, err = run_cli(capsys, "sweep", *SMALL, "--shapes", "2x2,0x2", "--engines", "1,2",
                                "--jobs", "2", "--out", out, "--json")
    assert code == 0, err
    r = last_json(stdout)
    print(f"\n[sweep local] {json.dumps({k: r[k] for k in ('points', 'ok', 'failed', 'cached', 'wall_s')})}")
    assert r["points"] == 4 and r["ok"] == 2 and r["failed"] == 2 and r["cached"] == 0
    assert {f["reason"] for f in r["failures"]} == {"rows must be a positive integer, got 0"}
    assert sorted(os.listdir(out)) == ["pareto.png", "sweep.csv", "sweep.json"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pts = json.loads((out / "sweep.json").read_text())["points"]
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and [x["status"] for x in rows] == [p["status"] for p in pts]
    ok = {p["engines"]: p for p in pts if p["status"] == "ok"}
    # cycles exact from the specs; resources scale with the engines; accuracy from the quantizer
    for e, p in ok.items():
        assert p["cycles"] == _layer_cycles_by_hand(bert_block_graph, 4, 2, 2, e)
        assert p["latency_s"] == pytest.approx(p["cycles"] / (p["fmax_mhz"] * 1e6))
        assert 0.99 < p["accuracy"] <= 1.0 and p["kernel"] == "attn.q"
    assert ok[2]["cycles"] < ok[1]["cycles"]
    assert ok[2]["lut"] == 2 * ok[1]["lut"] or ok[2]["dsp"] == 2 * ok[1]["dsp"]
    assert any(p["pareto"] for p in ok.values())

    # an interrupted sweep: one finished point's record missing -> only that point runs again
    files = sorted((cache_dir() / "points").glob("*.json"))
    assert len(files) == 4
    files[0].unlink()
    code, stdout, err = run_cli(capsys, "sweep", *SMALL, "--shapes", "2x2,0x2", "--engines", "1,2",
                                "--jobs", "1", "--out", out, "--json")
    again = last_json(stdout)
    assert code == 0 and again["cached"] == 3 and again["ok"] == 2
    keys = ("rows", "cols", "bits", "engines", "status", "cycles", "accuracy")
    pts2 = json.loads((out / "sweep.json").read_text())["points"]
    assert [{k: p.get(k) for k in keys} for p in pts2] == [{k: p.get(k) for k in keys} for p in pts]
    assert sum(p["cached"] for p in pts2) == 3


def test_sweep_bad_input(capsys, tmp_path):
    for argv, msg in [(["--shapes", "4by4"], "hwgen: error: --shapes: cannot read '4by4'"),
                      (["--bits", "w3a99"], "hwgen: error: "),
                      (["--part", "LFE5U-99F"], "hwgen: error: unknown part 'LFE5U-99F'")]:
        code, out, err = run_cli(capsys, "sweep", "--out", tmp_path / "x", *argv)
        assert code == 1 and err.startswith(msg) and out == ""
        assert not (tmp_path / "x").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A local Ray head started by this test (`ray start --head --block`), ended
    by its process group id afterwards."""
    port = _free_port()
    short = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's unix socket paths must stay short
    ray = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                          "--node-ip-address=127.0.0.1",
                          "--include-dashboard=false", f"--temp-dir={short}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                         start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:  # the head takes a while to come up on a busy machine
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert p.poll() is None, "ray start --head exited"
                assert time.time() < deadline, "the Ray head did not come up in 180 s"
                time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        import ray as ray_mod

        if ray_mod.is_initialized():
            ray_mod.shutdown()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)


def test_sweep_on_ray(tmp_path, monkeypatch, bert_block_graph, ray_head):
    """The same sweep as Ray tasks on the local instance: a 1x1 point (runs the
    tools in a Ray worker) and a failing point; results equal a local run's."""
    monkeypatch.setenv("HWGEN_CACHE", str(tmp_path / "cache"))
    cfg = SweepConfig(model="bert-block", shapes=[(1, 1), (2, -1)], bits=["w8a8"], engines=[1],
                      seq=4, kernel="attn.q")
    r = run_sweep(cfg, tmp_path / "ray_out", ray_address=ray_head)
    print(f"\n[sweep ray] {json.dumps({k: r[k] for k in ('points', 'ok', 'failed', 'wall_s')})}")
    assert r["ray"] == ray_head and r["points"] == 2 and r["ok"] == 1 and r["failed"] == 1
    assert r["failures"][0]["reason"] == "cols must be a positive integer, got -1"
    pts = json.loads((tmp_path / "ray_out" / "sweep.json").read_text())["points"]
    ok = next(p for p in pts if p["status"] == "ok")
    assert ok["cycles"] == _layer_cycles_by_hand(bert_block_graph, 4, 1, 1, 1)
    assert ok["dsp"] == 1 and ok["fmax_mhz"] > 0 and not ok["cached"]
    # the local run of the same sweep finds every point cached
    local = run_sweep(cfg, tmp_path / "local_out", jobs=1)
    assert local["cached"] == 2 and local["ok"] == 1
