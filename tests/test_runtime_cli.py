"""`hwgen run` and `hwgen plan`: JSON keys, trace file, and every bad input (one clear
error line, exit 1, nothing written)."""
import json

import pytest
import torch

from conftest import last_json, run_cli


def test_run_tiny_gpt_generates_bitexact_with_trace(capsys, tmp_path):
    trace = tmp_path / "sub" / "trace.json"
    code, out, err = run_cli(capsys, "run", "--model", "tiny-gpt", "--prompt", "def main():\n    ",
                             "--max-new-tokens", "4", "--trace", trace, "--json", "--quiet")
    assert code == 0, err
    r = last_json(out)
    for key in ("backend", "device", "placement", "bytes_to_accel", "bytes_from_accel", "accel_cycles",
                "cosine_vs_float", "bitexact_vs_golden", "wall_s", "tokens", "tokens_per_s", "text"):
        assert key in r, key
    assert r["backend"] == "golden" and r["device"] == "cpu" and r["bitexact_vs_golden"] is True
    assert r["tokens"] == 4 and r["text"].startswith("def main():\n    ") and r["tokens_per_s"] > 0
    assert set(r["placement"]["linear"]) == {"accel"} and set(r["placement"]["layernorm"]) == {"host"}
    assert r["bytes_to_accel"] > 0 and r["bytes_from_accel"] > 0 and r["accel_cycles"] > 0
    assert r["cosine_vs_float"] > 0.95
    doc = json.loads(trace.read_text())
    assert any(e.get("ph") == "X" and e["args"].get("op") == "linear" for e in doc["traceEvents"])


def test_run_minilm_embeddings(capsys):
    code, out, err = run_cli(capsys, "run", "--model", "minilm", "--text",
                             "The cat sat on the mat.\nA dog runs in the park.\nhi", "--batch", "2",
                             "--json", "--quiet")
    assert code == 0, err
    r = last_json(out)
    assert r["bitexact_vs_golden"] is True and r["mismatches"] == 0
    assert r["sentences"] == 3 and r["batches"] == 2
    assert r["placement"]["attention"] == {"accel": 6} and r["placement"]["mean_pool"] == {"host": 1}
    assert r["cosine_vs_float"] > 0.97


def test_plan_prints_table_and_json(capsys):
    code, out, err = run_cli(capsys, "plan", "--model", "tiny-gpt", "--text", "hello", "--json", "--quiet")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["node", "op", "device", "pred"]
    r = json.loads(lines[-1])
    assert r["accel_cycles"] > 0 and r["dims"] == {"B": 1, "S": 5}
    assert {x["device"] for x in r["rows"] if x["op"] == "linear"} == {"accel"}


@pytest.mark.parametrize("argv,msg", [
    (["run", "--model", "minilm", "--text", "  \n "], "--text is empty"),
    (["run", "--model", "tiny-gpt", "--prompt", ""], "--prompt is empty"),
    (["run", "--model", "tiny-gpt", "--prompt", "x", "--backend", "vhdl"], "unknown backend 'vhdl'"),
    (["run", "--model", "tiny-gpt", "--prompt", "x", "--device", "tpu"], "--device tpu: unknown device, expected one of cpu, cuda"),
    (["run", "--model", "tiny-gpt", "--prompt", "x" * 200], "--prompt is 200 bytes; the model's context holds 128"),
    (["run", "--model", "minilm", "--text", "word " * 400], "tokens long; the model takes at most"),
    (["run", "--model", "tiny-gpt", "--prompt", "x", "--place", "embedding=accel", "--backend", "hls"],
     "forced onto the accelerator, but this backend has kernels only for"),
    (["run", "--model", "tiny-gpt", "--prompt", "x", "--place", "linear"], "expected NODE_OR_OP=host|accel"),
    (["run", "--model", "minilm", "--text", "x", "--batch", "0"], "--batch must be >= 1"),
    (["run", "--model", "bert-block", "--text", "x"], "`hwgen run` takes minilm or tiny-gpt"),
    (["plan", "--model", "tiny-gpt", "--clock-mhz", "0"], "clock must be > 0"),
    (["run", "--model", "tiny-gpt", "--prompt", "x", "--policy", "fastest"], "unknown placement policy"),
])
def test_bad_input_is_one_clear_error(capsys, tmp_path, argv, msg):
    trace = tmp_path / "t.json"
    code, out, err = run_cli(capsys, *argv, "--quiet", *(["--trace", trace] if argv[0] == "run" else []))
    assert code == 1, (out, err)
    assert err.startswith("hwgen: error: ") and msg in err, err
    assert len(err.strip().splitlines()) == 1 and not trace.exists()


def test_run_with_cost_placement(capsys):
    code, out, err = run_cli(capsys, "run", "--model", "tiny-gpt", "--prompt", "hi", "--max-new-tokens", "2",
                             "--policy", "cost", "--no-float", "--json", "--quiet")
    assert code == 0, err
    r = last_json(out)
    assert r["bitexact_vs_golden"] is True and r["cosine_vs_float"] is None
    # only ops with engine cycles can win on cost; the rest stays on the host
    assert set(r["placement"]["layernorm"]) == {"host"} and set(r["placement"]["gelu"]) == {"host"}


def test_graph_of_another_model_is_refused(capsys, bert_block_graph):
    code, _, err = run_cli(capsys, "run", "--graph", bert_block_graph, "--text", "hi", "--quiet")
    assert code == 1 and "runs graphs of minilm and tiny-gpt" in err


def test_corrupted_graph_is_refused(capsys, tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "graph.json").write_text("{not json")
    code, _, err = run_cli(capsys, "run", "--graph", tmp_path / "g", "--text", "hi", "--quiet")
    assert code == 1 and "not valid JSON" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_cuda_without_gpu_is_refused(capsys):
    code, _, err = run_cli(capsys, "run", "--model", "tiny-gpt", "--prompt", "x", "--device", "cuda", "--quiet")
    assert code == 1 and "torch sees no CUDA GPU" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_host_is_bitexact(capsys):
    code, out, err = run_cli(capsys, "run", "--model", "tiny-gpt", "--prompt", "def ", "--max-new-tokens",
                             "3", "--device", "cuda", "--json", "--quiet")
    assert code == 0, err
    assert last_json(out)["bitexact_vs_golden"] is True
