"""Model zoo: bundles for the CLI (feeds, reference outputs) and clear load errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hwgen import zoo
from hwgen.float_exec import run_float
from hwgen.frontend import UnsupportedOpError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check_reference(bundle, feed, tol=1e-4):
    got = run_float(bundle.graph, feed)[bundle.graph.outputs[0]].numpy()
    ref = bundle.reference(feed)
    assert isinstance(ref, np.ndarray) and ref.shape == got.shape
    assert np.abs(got - ref).max() < tol


def test_bert_block_bundle():
    b = zoo.load("bert-block")
    assert b.name == "bert-block" and b.kind == "block"
    assert not b.module.training
    assert len(b.calib_feeds) == 1 and b.calib_feeds[0]["x"].shape == (2, 16, 64)
    assert b.eval_feeds[0]["x"].dtype == np.float32
    _check_reference(b, b.eval_feeds[0])
    with pytest.raises(ValueError, match="not text"):
        b.encode("hello")


@pytest.fixture(scope="module")
def minilm():
    return zoo.load("minilm")


def test_minilm_bundle(minilm):
    b = minilm
    assert b.kind == "encoder" and b.graph.outputs == ["embedding"]
    n_calib = len(zoo._read_lines(zoo.DATA_DIR / "sentences_calib.txt", "x"))
    n_eval = len(zoo._read_lines(zoo.DATA_DIR / "sentences_eval.txt", "x"))
    assert sum(f["ids"].shape[0] for f in b.calib_feeds) == n_calib
    assert sum(f["ids"].shape[0] for f in b.eval_feeds) == n_eval
    for f in b.calib_feeds + b.eval_feeds:
        assert f["ids"].shape == f["mask"].shape and f["ids"].shape[0] <= 16
        assert f["ids"].dtype == np.int64
        assert f["mask"].sum(1).max() == f["ids"].shape[1]  # padded to the batch's longest
    feed = {k: v[:4] for k, v in b.eval_feeds[0].items()}
    _check_reference(b, feed)
    assert b.reference(feed).shape == (4, 384)


def test_minilm_eval_text_and_encode(minilm, tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("first sentence here\n\nsecond one, a bit longer than the first\n")
    b = zoo.load("minilm", eval_text=p)
    assert len(b.eval_feeds) == 1 and b.eval_feeds[0]["ids"].shape[0] == 2
    f = b.encode(["hello world"])
    assert f["ids"][0, 0] == 101 and b.decode(f["ids"]) == "hello world"
    g = zoo.feeds_from_text("minilm", "hello world\nsecond")
    assert g["ids"].shape[0] == 2 and g["mask"].shape == g["ids"].shape


def _tiny_checkpoint(path, ctx=128):
    tg = zoo._builtin_module("tiny_gpt")
    torch.manual_seed(0)
    model = tg.TinyGPT(tg.TinyGPTConfig(ctx=ctx, d=32, heads=4, layers=2, ffn=64))
    tg.save_tiny_gpt(model, path)
    return path


def test_tiny_gpt_bundle_from_checkpoint(tmp_path):
    b = zoo.load(_tiny_checkpoint(tmp_path / "small.pt"))
    assert b.kind == "decoder" and b.graph.outputs == ["logits"]
    n_bytes = len((zoo.DATA_DIR / "tiny_corpus_eval.txt").read_bytes())
    assert sum(f["ids"].shape[0] for f in b.eval_feeds) == n_bytes // 128
    assert all(f["ids"].shape[1] == 128 and f["ids"].shape[0] <= 16 for f in b.eval_feeds)
    assert sum(f["ids"].shape[0] for f in b.calib_feeds) == zoo.GPT_CALIB_WINDOWS
    assert b.eval_feeds[0]["ids"].max() < 256
    _check_reference(b, {"ids": b.eval_feeds[0]["ids"][:2]})
    assert b.decode(b.encode("héllo")["ids"]) == "héllo"
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat sat\nx\n" + "long line " * 40 + "\n")
    b2 = zoo.load(tmp_path / "small.pt", eval_text=lines)
    assert [f["ids"].shape for f in b2.eval_feeds] == [(1, 11), (1, 128)]
    assert zoo.feeds_from_text("tiny-gpt", "abc")["ids"].tolist() == [[97, 98, 99]]


def test_shipped_tiny_gpt():
    if not (zoo.MODELS_DIR / "tiny_gpt.pt").is_file():
        with pytest.raises(zoo.ModelLoadError, match="tiny_gpt.pt"):
            zoo.load("tiny-gpt")
        pytest.skip("models/tiny_gpt.pt is not trained yet")
    b = zoo.load("tiny-gpt")
    _check_reference(b, {"ids": b.eval_feeds[0]["ids"][:2]})


FACTORY = '''
import torch, torch.nn as nn
def factory():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=False).eval()
    x = torch.randn(5, 2, 16)          # (S, B, H): batch_first=False
    mask = torch.ones(2, 5, dtype=torch.long); mask[1, 3:] = 0
    return layer, (x, mask)
def not_a_pair():
    return nn.Linear(2, 2)
def boom():
    raise RuntimeError("no weights")
def conv():
    return nn.Sequential(nn.Conv1d(4, 4, 1)), torch.randn(1, 3, 4)
'''


def test_factory_file(tmp_path):
    p = tmp_path / "user_model.py"
    p.write_text(FACTORY)
    b = zoo.load(f"{p}:factory")
    assert b.name == "user_model" and b.kind == "block" and b.graph.meta["seq_first"]
    assert b.calib_feeds[0]["x"].shape == (2, 5, 16) and b.calib_feeds[0]["mask"].shape == (2, 5)
    _check_reference(b, b.eval_feeds[0])
    assert zoo.load(str(p)).graph.inputs == ["x", "mask"]  # ":factory" is the default


@pytest.mark.parametrize("spec, pattern", [
    ("{d}/missing.py:factory", r"missing\.py: no such file"),
    ("{d}/user_model.py:nothing", r"user_model\.py: has no function 'nothing'"),
    ("{d}/user_model.py:not_a_pair", r"user_model\.py:not_a_pair: must return \(torch\.nn\.Module, example_input\)"),
    ("{d}/user_model.py:boom", r"user_model\.py:boom: raised RuntimeError: no weights"),
    ("{d}/broken.py:factory", r"broken\.py: failed to import \(SyntaxError"),
    ("no-such-model", r"unknown model 'no-such-model'"),
    ("{d}/nope.pt", r"nope\.pt: TinyGPT checkpoint not found"),
    ("{d}/garbage.pt", r"garbage\.pt: unreadable TinyGPT checkpoint"),
])
def test_load_errors(tmp_path, spec, pattern):
    (tmp_path / "user_model.py").write_text(FACTORY)
    (tmp_path / "broken.py").write_text("def factory(:\n")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(zoo.ModelLoadError, match=pattern):
        zoo.load(spec.format(d=tmp_path))


def test_load_error_eval_text_and_unsupported(tmp_path):
    with pytest.raises(zoo.ModelLoadError, match=r"missing\.txt: evaluation text file not found"):
        zoo.load("bert-block", eval_text=tmp_path / "missing.txt")
    t = tmp_path / "t.txt"
    t.write_text("hello\n")
    with pytest.raises(zoo.ModelLoadError, match="eval_text applies to minilm and tiny-gpt"):
        zoo.load("bert-block", eval_text=t)
    (tmp_path / "user_model.py").write_text(FACTORY)
    with pytest.raises(UnsupportedOpError, match=r"torch\.nn\.Conv1d at module path '0'"):
        zoo.load(f"{tmp_path}/user_model.py:conv")
    with pytest.raises(zoo.ModelLoadError, match="takes tensors"):
        zoo.feeds_from_text("bert-block", "hello")
