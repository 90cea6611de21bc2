"""Fast checks of the model zoo in models/: BertBlock, TinyGPT (+ shipped checkpoint), text sets."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # models/ is not an installed package
    sys.path.insert(0, str(ROOT))

from models import bert_block  # noqa: E402
from models.tiny_gpt import (  # noqa: E402
    DATA_DIR,
    DEFAULT_CHECKPOINT,
    TinyGPT,
    TinyGPTConfig,
    decode,
    encode,
    eval_perplexity,
    generate,
    generate_ids,
    load_tiny_gpt,
)


@pytest.fixture(scope="module")
def shipped():
    return load_tiny_gpt()


def _incremental_logits(model, ids, first):
    """Feed ids[:, :first] at once, then one token at a time through the KV cache."""
    logits, past = model(ids[:, :first])
    out = [logits]
    for i in range(first, ids.shape[1]):
        logits, past = model(ids[:, i : i + 1], past)
        out.append(logits)
    return torch.cat(out, dim=1), past


# ----------------------------------------------------------------------------- BertBlock


def test_bert_block_factory_shapes_and_determinism():
    m1, x1 = bert_block.factory()
    m2, x2 = bert_block.factory()
    assert not m1.training
    assert x1.shape == (2, 16, 64) and x1.dtype == torch.float32
    assert torch.equal(x1, x2)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with torch.no_grad():
        y = m1(x1)
    assert y.shape == x1.shape and torch.isfinite(y).all()
    assert torch.equal(y, m2(x2).detach())
    a = m1.attn
    assert (a.heads, a.head_dim) == (4, 16)
    assert all(isinstance(getattr(a, n), torch.nn.Linear) for n in "qkvo")
    assert not torch.equal(bert_block.factory(seed=1)[1], x1)


def test_bert_block_mask():
    m, x = bert_block.factory()
    with torch.no_grad():
        ones = torch.ones(2, 16)
        assert torch.allclose(m(x, ones), m(x), atol=1e-6)
        mask = ones.clone()
        mask[1, 10:] = 0  # pad the last 6 positions of the second sequence
        y = m(x, mask)
        x_changed = x.clone()
        x_changed[1, 10:] += 5.0  # padded keys must not influence the real positions
        assert torch.allclose(m(x_changed, mask)[1, :10], y[1, :10], atol=1e-5)


def test_bert_block_fx_traceable():
    m, x = bert_block.factory()
    gm = torch.fx.symbolic_trace(m, concrete_args={"attention_mask": None})
    mask = torch.ones(2, 16)
    mask[0, 12:] = 0
    gm_mask = torch.fx.symbolic_trace(m)  # the mask becomes a graph input
    with torch.no_grad():
        assert torch.allclose(gm(x), m(x), atol=1e-6)
        assert torch.allclose(gm_mask(x, mask), m(x, mask), atol=1e-6)


# ----------------------------------------------------------------------------- TinyGPT


def test_tiny_gpt_kv_cache_matches_full_forward_random_config():
    torch.manual_seed(0)
    cfg = TinyGPTConfig(ctx=32, d=48, heads=3, layers=2, ffn=96)
    model = TinyGPT(cfg).eval()
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        full, full_kv = model(ids)
        inc, past = _incremental_logits(model, ids, first=5)
    assert full.shape == (2, 32, 256)
    assert torch.allclose(inc, full, atol=1e-5, rtol=1e-5)
    assert len(past) == cfg.layers and past[0][0].shape == (2, 3, 32, 16)
    for (k1, v1), (k2, v2) in zip(past, full_kv):
        assert torch.allclose(k1, k2, atol=1e-6) and torch.allclose(v1, v2, atol=1e-6)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 1, dtype=torch.long), past)  # past the context


def test_tiny_gpt_block_fx_traceable():
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(ctx=16, d=32, heads=4, layers=1, ffn=64)).eval()
    blk = model.blocks[0]
    gm = torch.fx.symbolic_trace(blk, concrete_args={"past": None})
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.allclose(gm(x)[0], blk(x)[0], atol=1e-6)


def test_shipped_checkpoint_loads(shipped):
    assert DEFAULT_CHECKPOINT.stat().st_size < 6_000_000
    cfg = shipped.cfg
    assert cfg.vocab == 256 and not shipped.training
    assert len(shipped.blocks) == cfg.layers
    a = shipped.blocks[0].attn
    assert a.heads * a.head_dim == cfg.d
    meta = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)["train"]
    assert meta["eval_ppl_per_byte"] < 8


def test_shipped_checkpoint_kv_cache(shipped):
    ids = encode("The \"with\" statement is used to wrap the execution of a block.")[None]
    with torch.no_grad():
        full, _ = shipped(ids)
        inc, _ = _incremental_logits(shipped, ids, first=4)
    assert torch.allclose(inc, full, atol=1e-5, rtol=1e-5)


def test_encode_decode_roundtrip():
    text = "caf\u00e9 \u2014 \"x.name\""
    ids = encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1 and int(ids.max()) < 256
    assert decode(ids) == text
    assert decode([0xFF]) == "\ufffd"


def test_generate(shipped):
    out = generate(shipped, "The ", 40)
    assert isinstance(out, str) and out.startswith("The ")
    assert generate_ids(shipped, encode("The "), 40).shape == (40,)
    assert out == generate(shipped, "The ", 40)  # greedy is deterministic
    g = torch.Generator().manual_seed(0)
    assert isinstance(generate(shipped, "The ", 10, greedy=False, generator=g), str)


def test_generate_past_context():
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(ctx=16, d=32, heads=4, layers=1, ffn=64)).eval()
    assert generate_ids(model, encode("x" * 20), 40).shape == (40,)


def test_shipped_checkpoint_eval_perplexity(shipped):
    text = (DATA_DIR / "tiny_corpus_eval.txt").read_text(encoding="utf-8")
    ppl = eval_perplexity(shipped, text)
    assert 1.0 < ppl < 8.0


# ----------------------------------------------------------------------------- text sets


def test_sentence_sets():
    ev = (DATA_DIR / "sentences_eval.txt").read_text(encoding="utf-8").splitlines()
    cal = (DATA_DIR / "sentences_calib.txt").read_text(encoding="utf-8").splitlines()
    assert len(ev) >= 150 and len(cal) == 64
    assert not set(ev) & set(cal) and len(set(ev)) == len(ev) and len(set(cal)) == len(cal)
    for s in ev + cal:
        assert s == s.strip() and 4 <= len(s.split()) <= 60


def _words(s):
    return re.findall(r"[a-z0-9']+", s.lower())


def test_distill_sentences_held_out_from_eval_and_calibration():
    """The distillation corpus shares no 5-word run with, and is never a close
    rewording (word-set Jaccard >= 0.4) of, an evaluation or calibration sentence."""
    from hwgen.zoo import DISTILL_SENTENCES

    lines = DISTILL_SENTENCES.read_text(encoding="ascii").splitlines()
    assert len(lines) >= 4000 and len(set(lines)) == len(lines)
    assert all(s == s.strip() and s for s in lines)
    held = [s for f in ("sentences_eval.txt", "sentences_calib.txt")
            for s in (DATA_DIR / f).read_text(encoding="utf-8").splitlines()]
    grams = lambda s: {tuple(w[i:i + 5]) for w in [_words(s)] for i in range(len(w) - 4)}
    held_grams = set().union(*map(grams, held))
    held_sets = [set(_words(s)) for s in held]
    for s in lines:
        ws = set(_words(s))
        assert not grams(s) & held_grams, s
        assert all(len(ws & h) < 0.4 * len(ws | h) for h in held_sets), s
