"""The arithmetic contract's kernels against independent references.

Exact kernels (matmuls, accumulators, adds, pooling, masks) are checked
against Python-integer references with 0 mismatches; table-based
nonlinearities against float math within stated error bounds, plus their
structural guarantees (masking, saturation, cached read-only tables).
"""
import math

import numpy as np
import pytest

from hwgen import contract as C
from hwgen.fixed import FixedType, requantize

RNG = np.random.default_rng(1234)
RND_SAT = dict(q="AP_RND", o="AP_SAT")


def rand_codes(fmt: FixedType, shape) -> np.ndarray:
    return RNG.integers(fmt.min_code, fmt.max_code + 1, size=shape, dtype=np.int64)


@pytest.mark.parametrize("bits, k", [(8, 64), (8, 1536), (12, 3000), (20, 33), (28, 40)])
def test_matmul_int_every_path_is_exact(bits, k):
    """float32 single, float32 chunked, float64 and int64 paths, at their limits."""
    hi = 2 ** (bits - 1)
    a = RNG.integers(-hi, hi, (2, 3, k))
    b = RNG.integers(-hi, hi, (k, 4))
    a[0, 0, :] = -hi  # worst case: every product at its bound, all the same sign
    b[:, 0] = -hi
    exact = np.array([[[sum(int(x) * int(y) for x, y in zip(row, col)) for col in b.T]
                       for row in batch] for batch in a], dtype=object)
    got = C.matmul_int(a, b, hi * hi)
    assert got.dtype == np.int64
    assert np.array_equal(got.astype(object), exact)


def test_acc_width_is_minimal_and_sufficient():
    x, w = FixedType(8, 2), FixedType(8, 1)
    k = 384
    width = C.acc_width(x, w, k)
    worst = k * x.min_code * w.min_code  # (-128 * -128) * k is the largest sum
    assert worst <= 2 ** (width - 1) - 1
    assert worst > 2 ** (width - 2) - 1  # one bit fewer would overflow
    with pytest.raises(C.ContractError, match="accumulator of .* needs"):
        C.acc_width(FixedType(32, 2), FixedType(32, 2), 1 << 20)


def test_linear_worst_case_accumulator_fits_acc_width():
    """Every product at its extreme and the bias at its extreme: the exact sum
    still fits the acc_bits register, so the kernel needs no wrap step."""
    x_fmt, w_fmt, k = FixedType(8, 3), FixedType(8, 0), 1536
    for xv, wv, b in [(x_fmt.min_code, w_fmt.min_code, 900), (x_fmt.min_code, w_fmt.max_code, -900)]:
        acc_bits = C.acc_width(x_fmt, w_fmt, k, -900, 900)
        acc = C.matmul_int(np.full((1, k), xv), np.full((k, 1), wv), 128 * 128) + b
        assert -2 ** (acc_bits - 1) <= int(acc[0, 0]) < 2 ** (acc_bits - 1)
        wide = FixedType(acc_bits, acc_bits)
        assert C.linear(np.full((1, k), xv), 0, np.full((k, 1), wv), 0, np.array([b]), wide,
                        acc_bits)[0, 0] == int(acc[0, 0])


def test_linear_equals_python_integer_reference_per_channel():
    x_fmt = FixedType(8, 3)
    k, n = 19, 6
    x = rand_codes(x_fmt, (4, k))
    w = rand_codes(FixedType(8, 0), (k, n))
    w_frac = RNG.integers(5, 10, n)
    bias = RNG.integers(-5000, 5000, n)
    out = FixedType(8, 4, **RND_SAT)
    acc_bits = C.acc_width(x_fmt, FixedType(8, 0), k, int(bias.min()), int(bias.max()))
    got = C.linear(x, x_fmt.frac_bits, w, w_frac, bias, out, acc_bits)
    for i in range(4):
        for j in range(n):
            acc = sum(int(x[i, t]) * int(w[t, j]) for t in range(k)) + int(bias[j])
            want = requantize(np.array([acc]), x_fmt.frac_bits + int(w_frac[j]), out.width,
                              out.frac_bits, True, out.q, out.o)[0]
            assert got[i, j] == want


def test_linear_per_column_output_formats():
    x_fmt, w_fmt = FixedType(8, 3), FixedType(8, 0)
    x = rand_codes(x_fmt, (3, 10))
    w = rand_codes(w_fmt, (10, 4))
    out = FixedType(8, 4, **RND_SAT)
    out_frac = np.array([2, 4, 5, 7])
    got = C.linear(x, 5, w, 7, None, out, 20, out_frac=out_frac)
    for j, f in enumerate(out_frac):
        col = FixedType(8, 8 - int(f), **RND_SAT)
        assert np.array_equal(got[:, j], C.linear(x, 5, w[:, j:j + 1], 7, None, col, 20)[:, 0])


def test_matmul_act_batched():
    a_fmt, b_fmt = FixedType(8, 3), FixedType(8, 2)
    a = rand_codes(a_fmt, (2, 3, 5, 16))
    b = rand_codes(b_fmt, (2, 3, 16, 7))
    acc = C.matmul_act(a, a_fmt, b, b_fmt)
    assert np.array_equal(acc, np.einsum("bhik,bhkj->bhij", a, b))
    out = FixedType(8, 5, **RND_SAT)
    assert np.array_equal(C.matmul_act(a, a_fmt, b, b_fmt, out),
                          out.quantize(acc, a_fmt.frac_bits + b_fmt.frac_bits))


def test_exp_table_shape_and_values():
    p = C.ExpTable(in_frac=6, out_bits=15)
    t = C.exp_table(p)
    assert t[0] == 2 ** 15 and t[-1] == 0 and t[-2] > 0
    i = np.arange(p.size)
    assert np.array_equal(t, np.floor(np.exp(-i / 64) * 2 ** 15 + 0.5).astype(np.int64))
    assert C.exp_table(p) is t and not t.flags.writeable


@pytest.mark.parametrize("p", [C.RecipTable(8, 16), C.RecipTable(6, 12)])
def test_reciprocal_relative_error(p):
    total = np.arange(1, 200000, dtype=np.int64)
    r, f = C.reciprocal(total, p)
    approx = r * np.exp2(-f.astype(np.float64))
    rel = np.abs(approx * total - 1)
    assert rel.max() < 2.0 ** -(p.index_bits + 1) + 2.0 ** -(p.out_bits - 1)
    assert C.reciprocal(np.array([0]), p)[0][0] == 0


def test_inv_sqrt_relative_error():
    p = C.IsqrtTable(8, 16)
    d = np.concatenate([np.arange(1, 100000), RNG.integers(1, 2**60, 100000)]).astype(np.int64)
    r, f = C.inv_sqrt(d, p)
    rel = np.abs(r * np.exp2(-f.astype(np.float64)) * np.sqrt(d.astype(np.float64)) - 1)
    assert rel.max() < 2.0 ** -(p.index_bits + 1) + 2.0 ** -(p.out_bits - 1)


def test_bit_length_exact():
    v = np.concatenate([np.arange(0, 70000), 2 ** np.arange(62) - 1, 2 ** np.arange(62)]).astype(np.int64)
    assert np.array_equal(C.bit_length(v), [int(x).bit_length() for x in v])


def test_softmax_close_to_float_and_masks():
    s_frac = 10
    s = RNG.normal(0, 3, (3, 4, 9, 23))
    codes = np.floor(s * 2 ** s_frac).astype(np.int64)
    out = FixedType(8, 0, False, "AP_RND", "AP_SAT")
    valid = RNG.random((3, 1, 1, 23)) > 0.3
    valid[0, 0, 0, :] = False  # one fully masked sequence
    p = C.softmax(codes, s_frac, valid, C.ExpTable(), C.RecipTable(), out)
    x = codes / 2 ** s_frac
    e = np.where(valid, np.exp(x - np.where(valid, x, -np.inf).max(-1, keepdims=True)), 0)
    ref = np.divide(e, e.sum(-1, keepdims=True), out=np.zeros_like(e), where=e.sum(-1, keepdims=True) > 0)
    assert np.all(p[np.broadcast_to(~valid, p.shape)] == 0)
    assert np.all(p[0] == 0)
    err = np.abs(out.to_float(p) - ref)
    assert err.max() <= 1.5 / 256  # table + reciprocal error stays within ~1 LSB


def test_softmax_causal_first_row_is_one_hot():
    s = RNG.integers(-500, 500, (1, 1, 4, 4))
    out = FixedType(8, 0, False, "AP_RND", "AP_SAT")
    p = C.softmax(s, 6, C.causal_mask(4, 4), C.ExpTable(), C.RecipTable(), out)
    assert p[0, 0, 0, 0] == out.max_code  # 1.0 saturates to 255/256
    assert np.all(p[0, 0, 0, 1:] == 0)
    assert np.all(np.triu(p[0, 0], 1) == 0)


def test_causal_mask_with_offset():
    m = C.causal_mask(2, 5, offset=3)
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]


def _layernorm_case(x, gamma, beta, h):
    x_frac = 8
    xc = np.floor(x * 2 ** x_frac).astype(np.int64)
    g_fmt = FixedType(16, 2, **RND_SAT)
    norm = C.layernorm_norm_format(h, 16)
    b_frac = norm.frac_bits + g_fmt.frac_bits
    out = FixedType(16, 5, **RND_SAT)
    y = C.layernorm(xc, x_frac, g_fmt.from_float(gamma), g_fmt.frac_bits,
                    np.floor(beta * 2 ** b_frac + 0.5).astype(np.int64),
                    C.layernorm_eps_code(1e-5, h, x_frac), C.IsqrtTable(), norm, out)
    xq = xc / 2 ** x_frac
    ref = (xq - xq.mean(-1, keepdims=True)) / np.sqrt(xq.var(-1, keepdims=True) + 1e-5) * gamma + beta
    return out.to_float(y), ref


def test_layernorm_close_to_float():
    h = 96
    got, ref = _layernorm_case(RNG.normal(1, 3, (5, 7, h)), RNG.uniform(0.5, 1.5, h),
                               RNG.normal(0, 0.2, h), h)
    assert np.abs(got - ref).max() < 0.01


def test_layernorm_constant_row_gives_beta():
    h = 16
    beta = RNG.normal(0, 1, h)
    got, _ = _layernorm_case(np.full((1, h), 2.5), np.ones(h), beta, h)
    assert np.abs(got[0] - beta).max() < 2 ** -10


def test_layernorm_check_rejects_too_wide():
    with pytest.raises(C.ContractError, match="layernorm over 4096 channels"):
        C.layernorm_check(FixedType(32, 8), 4096)
    C.layernorm_check(FixedType(16, 6), 384)


@pytest.mark.parametrize("approx", ["none", "tanh"])
def test_gelu_table_is_exact_rounding_of_gelu(approx):
    in_fmt, out_fmt = FixedType(10, 4), FixedType(8, 3, **RND_SAT)
    codes = np.arange(in_fmt.min_code, in_fmt.max_code + 1)
    x = in_fmt.to_float(codes)
    if approx == "none":
        g = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    else:
        g = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert np.array_equal(C.gelu(codes, in_fmt, out_fmt, approx), out_fmt.from_float(g))
    with pytest.raises(C.ContractError, match="gelu input"):
        C.gelu_table(FixedType(17, 4), out_fmt, approx)


def test_add_aligns_fractional_bits_exactly():
    a = RNG.integers(-1000, 1000, 50)
    b = RNG.integers(-1000, 1000, 50)
    out = FixedType(16, 8, **RND_SAT)
    got = C.add(a, 3, b, 7, out)
    exact = a * 16 + b  # at 7 fractional bits
    assert np.array_equal(got, out.quantize(exact, 7))


def test_relu_and_mean_pool():
    x = RNG.integers(-100, 100, (2, 5, 3))
    assert np.array_equal(C.relu(x, 4, FixedType(8, 4)), np.clip(x, 0, 127))
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    got = C.mean_pool(x, mask)
    for b in range(2):
        n = mask[b].sum()
        for h in range(3):
            s = int(x[b, :n, h].sum())
            assert got[b, h] == math.floor(s / n + 0.5)


def test_embedding_and_kv_append_limits():
    table = np.arange(12).reshape(4, 3)
    assert C.embedding(np.array([[3, 0]]), table).tolist() == [[[9, 10, 11], [0, 1, 2]]]
    with pytest.raises(C.ContractError, match="embedding index out of range"):
        C.embedding(np.array([[4]]), table)
    k = np.zeros((1, 2, 3, 4), dtype=np.int64)
    assert C.kv_append(k, k[:, :, :1], capacity=4).shape == (1, 2, 4, 4)
    with pytest.raises(C.ContractError, match="KV cache holds at most 4"):
        C.kv_append(k, k[:, :, :2], capacity=4)
