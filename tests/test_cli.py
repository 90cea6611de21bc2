"""The `hwgen quantize` and `hwgen golden` verbs end to end, and every kind of
bad input the quantizer must refuse: one `hwgen: error:` line naming the
problem, exit status 1, and no output directory left behind."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from conftest import last_json
from conftest import run_cli as run

REPO = Path(__file__).resolve().parents[1]




def test_quantize_json_keys_and_output(bert_block_graph, capsys, tmp_path):
    code, out, err = run(capsys, "quantize", "--model", "bert-block", "--bits", "w8a8",
                         "--out", tmp_path / "g", "--json")
    assert code == 0
    r = last_json(out)
    for key in ("model", "bits", "layers", "cosine_mean", "cosine_min"):
        assert key in r
    assert r["model"] == "bert-block" and r["bits"] == "w8a8" and r["layers"] == 1
    assert 0.99 < r["cosine_min"] <= r["cosine_mean"] <= 1.0
    assert (tmp_path / "g" / "graph.json").is_file() and (tmp_path / "g" / "weights.npz").is_file()
    assert "calibrating" in err  # progress on stderr


def test_golden_verb_runs_saved_graph(bert_block_graph, capsys, tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 5, 64))
    np.savez(tmp_path / "in.npz", x=x)
    code, out, _ = run(capsys, "golden", bert_block_graph, "--inputs", tmp_path / "in.npz",
                       "--out", tmp_path / "o.npz", "--json")
    assert code == 0
    r = last_json(out)
    assert r["outputs"]["y"]["shape"] == [2, 5, 64]
    saved = np.load(tmp_path / "o.npz")
    from hwgen.golden import run as golden_run
    from hwgen.ir import Graph

    g = Graph.load(bert_block_graph)
    assert np.array_equal(saved["y"], golden_run(g, {"x": x})["y"])


def test_decoder_reports_perplexity(capsys, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n"
                    "Lists are mutable sequences, typically used to store collections.\n")
    code, out, _ = run(capsys, "quantize", "--model", "tiny-gpt", "--bits", "w8a8", "--out",
                       tmp_path / "gpt", "--eval-text", text, "--json", "--quiet")
    assert code == 0
    r = last_json(out)
    assert r["layers"] >= 1 and r["ppl_float"] > 1 and r["ppl_quant"] > 1
    assert abs(r["ppl_quant"] / r["ppl_float"] - 1) < 0.1


def test_qat_steps_in_cli(capsys, tmp_path):
    code, out, _ = run(capsys, "quantize", "--model", "bert-block", "--bits", "w4a8", "--out",
                       tmp_path / "g", "--qat-steps", "3", "--lr", "1e-3", "--json", "--quiet")
    assert code == 0
    r = last_json(out)
    assert r["qat_steps"] == 3 and r["qat_loss_first"] is not None


USER_MODEL = '''
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.ln = nn.LayerNorm(16)
        {extra}

    def forward(self, x):
        {body}

def factory():
    torch.manual_seed(0)
    m = Block().eval()
    {poison}
    return m, torch.randn(2, 6, 16)
'''


def user_model(tmp_path, extra="", body="return self.ln(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))",
               poison="pass", name="user.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(USER_MODEL).format(extra=extra, body=body, poison=poison))
    return p


def test_user_model_factory(capsys, tmp_path):
    p = user_model(tmp_path)
    code, out, _ = run(capsys, "quantize", "--model", f"{p}:factory", "--out", tmp_path / "g",
                       "--json", "--quiet")
    assert code == 0
    assert last_json(out)["cosine_mean"] > 0.99


def expect_error(capsys, tmp_path, argv, *needles):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, *argv, "--out", out_dir, "--quiet")
    assert code == 1
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("hwgen: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out_dir.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_unsupported_op(capsys, tmp_path):
    p = user_model(tmp_path, extra="self.conv = nn.Conv1d(6, 6, 1)",
                   body="return self.ln(x + self.conv(x))")
    expect_error(capsys, tmp_path, ["quantize", "--model", f"{p}:factory"], "Conv1d", "'conv'")


def test_nan_weights(capsys, tmp_path):
    p = user_model(tmp_path, poison="m.fc1.weight.data[0, 0] = float('nan')")
    expect_error(capsys, tmp_path, ["quantize", "--model", f"{p}:factory"], "fc1", "NaN or Inf")


def test_format_wider_than_contract(capsys, tmp_path):
    expect_error(capsys, tmp_path, ["quantize", "--model", "bert-block", "--bits", "w8a24"],
                 "activation bits 24 unsupported")


def test_unreadable_model_file(capsys, tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("this is not python (")
    expect_error(capsys, tmp_path, ["quantize", "--model", f"{bad}:factory"], "broken.py")
    expect_error(capsys, tmp_path, ["quantize", "--model", f"{tmp_path / 'missing.py'}:factory"],
                 "missing.py")


def test_golden_shape_mismatch_and_corrupt_graph(bert_block_graph, capsys, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 5, 63)))
    code, _, err = run(capsys, "golden", bert_block_graph, "--inputs", tmp_path / "in.npz")
    assert code == 1 and "input 'x' has shape [2, 5, 63]" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "graph.json").write_text("{}")
    code, _, err = run(capsys, "golden", broken, "--inputs", tmp_path / "in.npz")
    assert code == 1 and "schema_version" in err


def test_console_script_help():
    exe = Path(sys.executable).parent / "hwgen"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "quantize" in r.stdout and "golden" in r.stdout
