"""Fake quantization of the float stage: linear weights take exactly the values
of their codes in the quantized graph, activations land on their formats'
grids, the fake-quantized forward is nearer the golden model than the float
one, and gradients pass straight through."""
import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_decoder_feeds
from hwgen.distill import FloatStudent
from hwgen.fake_quant import FakeQuant, linear_weight_values
from hwgen.golden import GoldenModel, dequantize
from hwgen.ir import GraphError
from hwgen.qat import dequantize_weight
from hwgen.quant import QuantConfig, linear_row_shift, prepare, quantize, quantize_weights


def _student(tiny_decoder, seed=3, scale=0.3):
    """The tiny decoder with its linear weights moved off the calibrated ones
    (the float stage's weights differ from those the formats were set for)."""
    g = prepare(tiny_decoder)
    rng = np.random.default_rng(seed)
    lin = [n.inputs[1] for n in g.nodes if n.op == "linear"]
    return g.with_weights({k: (v * (1 + scale * rng.standard_normal(v.shape))).astype(np.float32)
                           for k, v in g.weights.items() if k in lin})


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_weights_are_the_values_of_their_codes(tiny_decoder, bits, per_channel):
    """``FakeQuant.weight`` of the float weights equals, value for value, the
    dequantized codes :func:`quantize_weights` gives those weights (integer bits
    chosen per column, row pre-scale of per-channel inputs, saturation)."""
    cfg = dataclasses.replace(QuantConfig.from_bits(bits), per_channel=per_channel)
    feeds = tiny_decoder_feeds()
    _, fmts = quantize(tiny_decoder, feeds, cfg)
    g = _student(tiny_decoder)
    fixed = quantize_weights(g, fmts, cfg)
    fq = FakeQuant(fixed)
    linears = [n for n in fixed.nodes if n.op == "linear"]
    assert any(linear_row_shift(fixed, n).any() for n in linears)        # the row pre-scale is covered
    for n in linears:
        name = n.inputs[1]
        got = fq.weight(name, torch.from_numpy(g.weights[name])).numpy()
        assert np.array_equal(got, dequantize_weight(fixed, name).astype(np.float32)), name
    other = next(k for k in g.weights if k not in {n.inputs[1] for n in linears})
    w = torch.from_numpy(g.weights[other])
    assert fq.weight(other, w) is w


def test_weight_columns_of_zeros_and_clipping():
    """Columns of zeros and heavy-tailed columns whose least-error format clips
    their largest values: the same values as the NumPy quantizer's."""
    from hwgen.quant import int_bits_for, per_channel_int_bits, quantize_per_channel

    rng = np.random.default_rng(0)
    w = rng.standard_t(1.5, size=(64, 32)) * 0.05
    w[:, 0] = 0
    shift = rng.integers(0, 3, size=64)
    ws = np.ldexp(w, shift[:, None])
    for width in (4, 8):
        ib = per_channel_int_bits(ws, width, 1, True)
        want = np.ldexp(np.ldexp(quantize_per_channel(ws, width, ib, 1).astype(np.float64), -(width - ib)),
                        -shift[:, None])
        got = linear_weight_values(torch.from_numpy(w), torch.from_numpy(shift.astype(np.float64)), width).numpy()
        assert np.array_equal(got, want), width
        assert np.all(got[:, 0] == 0)
        assert any(ib[j] < int_bits_for(float(np.abs(ws[:, j]).max()), width, True) for j in range(32))


def test_activations_land_on_their_formats(tiny_decoder):
    """Every op output ``act`` rounds is a code of its format (per channel where
    it has one) and is the code :meth:`FixedType.from_float` gives it."""
    cfg = QuantConfig.from_bits("w8a8")
    fixed, _ = quantize(tiny_decoder, tiny_decoder_feeds(), cfg)
    fq = FakeQuant(fixed)
    assert set(fq.activations) == {n.outputs[0] for n in fixed.nodes}
    student = FloatStudent(prepare(tiny_decoder), fake_quant=fq)
    vals = student(tiny_decoder_feeds(1, seed=5)[0])
    per_channel = 0
    for name in fq.activations:
        t = fixed.tensors[name]
        per_channel += t.per_channel
        v = vals[name].detach().numpy().astype(np.float64)
        codes = np.ldexp(v, t.frac_bits())
        assert np.array_equal(codes, np.round(codes)), name
        assert codes.min() >= t.fmt.min_code and codes.max() <= t.fmt.max_code, name
    assert per_channel > 0


def test_activations_stay_on_their_grids_under_bf16_autocast(tiny_decoder):
    """Under ``--distill-precision bf16`` the rounded outputs come back float32,
    so a 16-bit format's codes are not rounded again to bfloat16's 8 bits."""
    from hwgen.distill import autocast

    fixed, _ = quantize(tiny_decoder, tiny_decoder_feeds(), QuantConfig.from_bits("w8a8"))
    fq = FakeQuant(fixed)
    student = FloatStudent(prepare(tiny_decoder), fake_quant=fq)
    with autocast(torch.device("cpu"), "bf16"):
        vals = student(tiny_decoder_feeds(1, seed=5)[0])
    wide = 0
    for name in fq.activations:
        t = fixed.tensors[name]
        assert vals[name].dtype == torch.float32, name
        codes = np.ldexp(vals[name].detach().numpy().astype(np.float64), t.frac_bits())
        assert np.array_equal(codes, np.round(codes)), name
        wide += bool(np.any((np.abs(codes) > 256) & (codes % 2 == 1)))
    assert wide > 0          # odd codes above 256: not bfloat16 values (8-bit significand)


def test_forward_is_nearer_the_golden_model(tiny_decoder):
    """The fake-quantized forward of the student is nearer the golden model of
    its quantized graph than the plain float forward, at every op output (at
    the logits: 0.017 against 0.031 mean absolute error when written)."""
    cfg = QuantConfig.from_bits("w8a8")
    g = _student(tiny_decoder)
    fixed, _ = quantize(g, tiny_decoder_feeds(), cfg)
    feed = tiny_decoder_feeds(1, seed=7)[0]
    golden = GoldenModel(fixed)(feed, record=True)
    fake = FloatStudent(g, fake_quant=FakeQuant(fixed))(feed)
    plain = FloatStudent(g)(feed)
    for node in fixed.nodes:
        out = node.outputs[0]
        ref = dequantize(fixed, out, golden[out])
        e_fake = np.abs(fake[out].detach().numpy() - ref).mean()
        e_plain = np.abs(plain[out].detach().numpy() - ref).mean()
        assert e_fake <= e_plain, out
    out = fixed.outputs[0]
    ref = dequantize(fixed, out, golden[out])
    assert np.abs(fake[out].detach().numpy() - ref).mean() < 0.7 * np.abs(plain[out].detach().numpy() - ref).mean()


def test_gradients_pass_straight_through(tiny_decoder):
    """Rounding has no gradient of its own: every trained weight gets the float
    forward's gradient at the rounded point, finite and nonzero."""
    cfg = QuantConfig.from_bits("w8a8")
    fixed, _ = quantize(tiny_decoder, tiny_decoder_feeds(), cfg)
    student = FloatStudent(prepare(tiny_decoder), fake_quant=FakeQuant(fixed), train_embeddings=True)
    feed = tiny_decoder_feeds(1)[0]
    y = student(feed)["logits"]
    ids = torch.as_tensor(feed["ids"]).long()
    torch.nn.functional.cross_entropy(y[:, :-1].reshape(-1, y.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    for name, p in zip(student.names, student.weights):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_needs_a_quantized_graph(tiny_decoder):
    with pytest.raises(GraphError, match="FakeQuant needs a quantized graph"):
        FakeQuant(prepare(tiny_decoder))
