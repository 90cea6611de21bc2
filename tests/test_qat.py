"""QAT: the straight-through forward is the golden model, bit for bit, before
and after fine-tuning, and fine-tuning actually moves the weights."""
import numpy as np
import pytest
import torch

from conftest import tiny_decoder_feeds
from hwgen.golden import GoldenModel
from hwgen.golden import dequantize
from hwgen.qat import QATModel, finetune
from hwgen.quant import QuantConfig, prepare, quantize


def _ce(feed, step):
    y = step.outputs["logits"]
    ids = torch.as_tensor(feed["ids"]).long()
    return torch.nn.functional.cross_entropy(y[:, :-1].reshape(-1, y.shape[-1]), ids[:, 1:].reshape(-1))


def test_qat_forward_is_golden_bit_for_bit(tiny_decoder):
    cfg = QuantConfig.from_bits("w8a8")
    feeds = tiny_decoder_feeds()
    fixed, fmts = quantize(tiny_decoder, feeds, cfg)
    model = QATModel(prepare(tiny_decoder), fmts, cfg)
    probe = tiny_decoder_feeds(1, seed=11)[0]

    # before training: the QAT export is exactly the quantizer's graph
    exported = model.export()
    for k, v in fixed.weights.items():
        assert np.array_equal(exported.weights[k], v), k

    losses = finetune(model, feeds, _ce, steps=4, lr=1e-3)
    assert len(losses) == 4 and all(np.isfinite(losses))
    step = model.step(probe)
    golden = GoldenModel(model.export())(probe, record=True)
    mismatches = 0
    for name, codes in step.codes.items():
        mismatches += int(np.sum(golden[name] != codes))
    assert mismatches == 0
    # the differentiable output carries exactly the golden values
    out = step.outputs["logits"].detach().numpy()
    assert np.array_equal(out, dequantize(step.fixed, "logits", golden["logits"]))
    # and training changed the integer weights
    changed = sum(int(np.sum(step.fixed.weights[k] != fixed.weights[k])) for k in fixed.weights)
    assert changed > 0


def test_straight_through_gradients_reach_every_weight(tiny_decoder):
    cfg = QuantConfig.from_bits("w8a8")
    feeds = tiny_decoder_feeds(1)
    _, fmts = quantize(tiny_decoder, feeds, cfg)
    model = QATModel(prepare(tiny_decoder), fmts, cfg, train_embeddings=True)
    loss = _ce(feeds[0], model.step(feeds[0]))
    loss.backward()
    for name, p in zip(model.names, model.weights):
        if name == "pos":  # only rows 0..S-1 are used
            assert p.grad[:12].abs().sum() > 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_embeddings_frozen_by_default(tiny_decoder):
    cfg = QuantConfig.from_bits("w8a8")
    feeds = tiny_decoder_feeds(1)
    fixed, fmts = quantize(tiny_decoder, feeds, cfg)
    model = QATModel(prepare(tiny_decoder), fmts, cfg)
    assert "tok" not in model.names and "pos" not in model.names and "L0.q.w" in model.names
    finetune(model, feeds, _ce, steps=2, lr=1e-2)
    out = model.export()
    assert np.array_equal(out.weights["tok"], fixed.weights["tok"])
    assert not np.array_equal(out.weights["L0.q.w"], fixed.weights["L0.q.w"])


def test_adam_steps_cycles_feeds_and_refuses_none():
    """The one training loop: step i reads feeds[i % len(feeds)], runs before_step
    first and progress after, and descends; no feeds is an error, not a hang."""
    from hwgen.qat import adam_steps

    p = torch.nn.Parameter(torch.tensor([4.0]))
    seen, before, prog = [], [], []

    def loss_of(feed):
        seen.append(feed["k"])
        return ((p - feed["k"]) ** 2).sum()

    losses = adam_steps([p], [{"k": 0.0}, {"k": 1.0}], loss_of, 5, lr=0.5,
                        progress=lambda i, l: prog.append(i), before_step=before.append)
    assert seen == [0.0, 1.0, 0.0, 1.0, 0.0] and before == [0, 1, 2, 3, 4] and prog == [1, 2, 3, 4, 5]
    assert len(losses) == 5 and float(p.detach()) < 4.0
    with pytest.raises(ValueError, match=r"^3 training step\(s\) need at least one input batch$"):
        adam_steps([p], [], loss_of, 3, lr=0.1)
    assert adam_steps([p], [], loss_of, 0, lr=0.1) == []


def test_adam_steps_learning_rate_schedules():
    """A linear loss makes every Adam update exactly the step's learning rate,
    so the parameter's moves read the schedule off: constant, or half a cosine."""
    import math

    from hwgen.qat import adam_steps, lr_at

    for schedule, want in (("constant", [0.5] * 4),
                           ("cosine", [0.5 * (1 + math.cos(math.pi * i / 4)) / 2 for i in range(4)])):
        p = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
        trace = []
        adam_steps([p], [{}], lambda f: p.sum(), 4, lr=0.5, schedule=schedule,
                   progress=lambda i, l: trace.append(float(p.detach())))
        moves = [a - b for a, b in zip([0.0] + trace, trace)]
        assert moves == pytest.approx(want, rel=1e-6)
        assert [lr_at(0.5, i, 4, schedule) for i in range(4)] == pytest.approx(want, rel=1e-12)
    assert lr_at(0.5, 4, 4, "cosine") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"^learning-rate schedule 'linear': expected one of constant, cosine$"):
        adam_steps([p], [{}], lambda f: p.sum(), 1, lr=0.5, schedule="linear")
