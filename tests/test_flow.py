"""hwgen flow: stages run in order into one folder, unchanged stages are
reused (content hashes), a changed input reruns what depends on it, a failing
stage is recorded and the stages after it that need it are skipped."""
import json

import pytest
from conftest import last_json, run_cli

from hwgen import flow as F

FAST = "quantize,accuracy,gen-hls,verify-hls"


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "bert"
    cfg = F.FlowConfig(model="bert-block", out=out, only=tuple(FAST.split(",")))
    record = F.run_flow(cfg)
    return cfg, record


def test_stages_run_in_order_and_write_results(flow_dir):
    cfg, record = flow_dir
    assert record["order"] == FAST.split(",")
    for name in record["order"]:
        assert record["stages"][name]["status"] == "ok", record["stages"][name]
        res = json.loads((cfg.out / "results" / f"{name}.json").read_text())
        assert isinstance(res, dict)
    ver = json.loads((cfg.out / "results" / "verify-hls.json").read_text())
    assert ver["mismatches"] == 0 and ver["vectors"] > 0
    acc = json.loads((cfg.out / "results" / "accuracy.json").read_text())
    assert [r["bits"] for r in acc["bits"]] == ["w4a8", "w8a8", "w8a16"]
    assert acc["layers"][0]["layer"] == 0 and 0.9 < acc["layers"][0]["cosine_mean"] <= 1.0
    assert (cfg.out / "graph" / "graph.json").is_file() and (cfg.out / "hls" / "manifest.json").is_file()


def test_unchanged_stages_are_reused_and_changes_rerun(flow_dir, monkeypatch):
    cfg, _ = flow_dir
    said = []
    rec = F.run_flow(cfg, said.append)
    assert all(rec["stages"][n]["status"] == "cached" for n in rec["order"]), said
    assert all("reused" in s for s in said)
    # a different option changes the quantize stage's argv: it and everything reading the
    # graph it rewrites run again
    cfg2 = F.FlowConfig(model="bert-block", out=cfg.out, bits="w8a16", only=cfg.only)
    rec2 = F.run_flow(cfg2)
    assert all(rec2["stages"][n]["status"] == "ok" for n in rec2["order"])
    # a code change invalidates every stage
    monkeypatch.setattr(F, "_SOURCE_DIGEST", "a different hwgen")
    rec3 = F.run_flow(cfg2)
    assert all(rec3["stages"][n]["status"] == "ok" for n in rec3["order"])


def test_failed_stage_skips_dependents_and_exit_status(tmp_path, capsys):
    # a model that does not exist: quantize fails, every later stage needs it
    code, out, err = run_cli(capsys, "flow", "--model", str(tmp_path / "nope.py:factory"),
                             "--out", tmp_path / "f", "--only", "quantize,gen-hls", "--json")
    res = last_json(out)
    assert code == 1
    st = {r["stage"]: r for r in res["stages"]}
    assert st["quantize"]["status"] == "failed" and "nope.py" in st["quantize"]["detail"]
    assert st["gen-hls"]["status"] == "skipped" and "quantize" in st["gen-hls"]["detail"]
    assert res["failed"] == ["quantize", "gen-hls"]
    assert "stage" in err and "FAILED" in err        # the summary table and progress on stderr


def test_unknown_stage_is_an_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "flow", "--out", tmp_path / "f", "--only", "quantise")
    assert code == 1 and "unknown stage 'quantise'" in err and "quantize" in err


def test_impl_stage_feeds_the_plan_clock(tmp_path):
    """The impl stage (yosys + nextpnr on a 2x2 engine of one kernel) writes its
    result where the plan stage reads its Fmax as the accelerator clock."""
    from hwgen.runtime.cost import clock_from_impl

    cfg = F.FlowConfig(model="bert-block", out=tmp_path / "f", rows=2, cols=2, impl_kernels="attn.q",
                       impl_max_m=4, only=("quantize", "impl"))
    rec = F.run_flow(cfg)
    assert rec["stages"]["impl"]["status"] == "ok", rec["stages"]["impl"]
    path = cfg.out / "results" / "impl.json"
    res = json.loads(path.read_text())
    assert [k["name"] for k in res["kernels"]] == ["attn.q"] and res["fmax_mhz"] > 0
    assert clock_from_impl(path) == res["fmax_mhz"]
    plan = next(s for s in F.STAGES if s.name == "plan")
    argv = plan.argv(cfg)
    assert argv[argv.index("--impl") + 1] == str(path)
