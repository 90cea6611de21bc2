"""The quantizer's passes and decisions."""
import numpy as np
import pytest

from conftest import build_tiny_decoder, tiny_decoder_feeds
from hwgen import contract as C
from hwgen.fixed import FixedType
from hwgen.quant import (QuantConfig, QuantError, choose_format, fold_attention_scale,
                         int_bits_for, quantize, quantize_per_channel)


def test_bits_parsing():
    cfg = QuantConfig.from_bits("W4A8")
    assert (cfg.weight_bits, cfg.act_bits, cfg.residual_bits, cfg.name) == (4, 8, 16, "w4a8")
    assert QuantConfig.from_bits("w16a16").table_in_bits == 12
    assert [QuantConfig.from_bits(f"w{w}a8").smooth_bits for w in (2, 4, 6, 8, 16)] == [1, 1, 2, 4, 4]
    with pytest.raises(QuantError, match="--bits must look like w8a8"):
        QuantConfig.from_bits("int8")
    with pytest.raises(QuantError, match="weight bits 32 unsupported"):
        QuantConfig.from_bits("w32a8")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_int_bits_cover_absmax_without_clipping():
    for a in [0.3, 1.0, 1.5, 3.99, 4.0, 100.0, 127.9]:
        t = FixedType(8, int_bits_for(a, 8, True))
        assert t.to_float(np.array([t.max_code]))[0] + t.lsb / 2 >= a
        tighter = FixedType(8, t.int_bits - 1)
        assert tighter.to_float(np.array([tighter.max_code]))[0] + tighter.lsb / 2 < a


def test_choose_format_clips_outliers_when_that_lowers_error():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 100000), [60.0]])
    t = choose_format(x, 60.0, 8, True, "AP_RND", "AP_SAT")
    assert t.int_bits < int_bits_for(60.0, 8, True)


def test_fold_attention_scale_is_a_float_identity():
    from hwgen.float_exec import run_float

    g = build_tiny_decoder()
    folded = fold_attention_scale(g)
    feed = tiny_decoder_feeds(1)[0]
    a, b = run_float(g, feed)["logits"], run_float(folded, feed)["logits"]
    assert float((a - b).abs().max()) < 1e-4
    assert all(n.attrs["scale"] == 1 for n in folded.nodes if n.op == "attention")
    assert folded.meta["passes"] == ["fold_attention_scale"]


def test_per_channel_weights_and_exact_accumulators(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    for node in g.nodes:
        if node.op != "linear":
            continue
        w = g.tensors[node.inputs[1]]
        assert w.per_channel and len(w.channel_int_bits) == w.shape[1]
        x_fmt = g.tensors[node.inputs[0]].fmt
        b = g.weights[node.inputs[2]]
        assert node.attrs["acc_bits"] == C.acc_width(x_fmt, w.fmt, w.shape[0], int(b.min()), int(b.max()))


def test_per_channel_quantization_matches_scalar_formats():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (20, 4)) * np.array([0.01, 0.3, 2.0, 9.0])
    ib = np.array([int_bits_for(float(a), 8, True) for a in np.abs(w).max(0)])
    codes = quantize_per_channel(w, 8, ib, 1)
    for j in range(4):
        assert np.array_equal(codes[:, j], FixedType(8, int(ib[j]), True, "AP_RND", "AP_SAT").from_float(w[:, j]))


def test_roles_give_widths(tiny_decoder_fixed):
    t = tiny_decoder_fixed.tensors
    assert t["L0.ln1"].fmt.width == 8       # feeds q/k/v
    assert t["L0.fc1"].fmt.width == 10      # feeds the GELU table
    assert t["L0.r1"].fmt.width == 16       # residual stream
    assert t["L0.gelu"].fmt.width == 8      # feeds fc2


def test_nan_weights_and_too_wide_formats_rejected():
    g = build_tiny_decoder()
    g.weights["L0.fc1.w"] = g.weights["L0.fc1.w"].copy()
    g.weights["L0.fc1.w"][1, 1] = np.inf
    with pytest.raises(QuantError, match="weight 'L0.fc1.w' contains NaN or Inf"):
        quantize(g, tiny_decoder_feeds(1), QuantConfig.from_bits("w8a8"))
    with pytest.raises(QuantError, match="layernorm over 16 channels"):
        quantize(build_tiny_decoder(), tiny_decoder_feeds(1),
                 QuantConfig.from_bits("w8a8", residual_bits=40))


def test_weight_formats_minimize_squared_error_per_column():
    from hwgen.quant import per_channel_int_bits

    rng = np.random.default_rng(5)
    w = rng.uniform(-1, 1, (256, 3))
    w[0, 1] = 2.5  # one outlier: clipping it to 1.75 costs less than a 2x coarser LSB for 255 weights
    ib = per_channel_int_bits(w, 4, 1, True)
    top = [int_bits_for(float(a), 4, True) for a in np.abs(w).max(0)]
    assert ib[1] < top[1]
    for j in range(3):
        err = lambda i: float(np.sum((FixedType(4, i, True, "AP_RND", "AP_SAT").to_float(
            FixedType(4, i, True, "AP_RND", "AP_SAT").from_float(w[:, j])) - w[:, j]) ** 2))
        assert err(int(ib[j])) <= min(err(top[j] - c) for c in range(3))


def test_bias_beyond_the_widest_accumulator_is_refused():
    from hwgen.quant import accumulator_codes

    codes, width = accumulator_codes(np.array([1.5, -3.0]), np.array([2, 4]), "b")
    assert codes.tolist() == [6, -48] and width == 7
    with pytest.raises(QuantError, match="bias needs more than 48 bits"):
        accumulator_codes(np.array([1e10]), 30, "node 'fc': bias")
