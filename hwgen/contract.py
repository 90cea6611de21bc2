"""The arithmetic contract: every integer operation of hwgen, defined once.

All integer kernels the golden model runs, the QAT forward reproduces, and
the HLS and RTL generators implement live here, together with the
construction of every lookup table they use. Values are integer *codes*
(``int64`` NumPy arrays) together with their number of fractional bits: a
code ``c`` with ``f`` fractional bits means ``c * 2**-f``. The only rounding
and overflow primitive is :func:`hwgen.fixed.requantize` (ap_fixed
assignment); every other step is exact integer arithmetic.

Kernels and their contracts
---------------------------
``linear``        y = requant(sum_k x*w + bias) with a wide accumulator whose
                  width :func:`linear_acc_width` computes exactly (no overflow
                  by construction); per-channel weight formats give
                  per-column fractional bits.
``matmul_act``    activation x activation product (QK^T, PV), same rule.
``softmax``       over the last axis, masked: d = max - s, an exp table
                  indexed by d at ``ExpTable.in_frac`` fractional bits, a sum,
                  a normalized reciprocal table, and p = e * r requantized.
``layernorm``     num = H*x - sum(x), D = H*sum(x^2) - sum(x)^2 + eps term,
                  a normalized inverse-square-root table, z = num/sqrt(D)
                  requantized, y = z*gamma + beta requantized.
``gelu``          a table over every input code (input width <= 16).
``relu``, ``add`` (fractional-bit alignment), masks, ``embedding``,
``kv_append``, ``mean_pool``.

Tables are built by cached constructors (:func:`exp_table`,
:func:`recip_table`, :func:`isqrt_table`, :func:`gelu_table`) from the small
parameter records stored in the graph, so every consumer reads the same
integers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from .fixed import MAX_WIDTH, FixedType, bits_for_range, requantize

#: exact-integer headroom of float32 / float64 (a GEMM is exact while sums stay below)
FLOAT32_EXACT = 2 ** 24
FLOAT64_EXACT = 2 ** 53
#: widest accumulator the contract allows: a fixed-point format like any other
MAX_ACC_WIDTH = MAX_WIDTH
#: largest GELU/activation lookup table input width
MAX_TABLE_INPUT_WIDTH = 16


class ContractError(ValueError):
    """Formats or shapes the contract cannot execute exactly; names the limit."""


def requant(codes: np.ndarray, frac_in: int | np.ndarray, out: FixedType,
            out_frac: int | np.ndarray | None = None) -> np.ndarray:
    """``out.quantize`` with an optional per-channel ``out_frac`` array."""
    if out_frac is None:
        return out.quantize(codes, frac_in)
    return requantize(codes, frac_in, out.width, out_frac, out.signed, out.q, out.o)


# ----------------------------------------------------------------------------
# exact integer matrix products
# ----------------------------------------------------------------------------

def code_bound(fmt: FixedType) -> int:
    """Largest magnitude a code of ``fmt`` can have."""
    return max(abs(fmt.min_code), abs(fmt.max_code))


def matmul_int(a: np.ndarray, b: np.ndarray, max_product: int) -> np.ndarray:
    """Exact integer ``a @ b`` (int64 result), as fast as exactness allows.

    ``max_product`` bounds ``|a_ik * b_kj|`` (from the operand formats). Every
    partial sum of a float GEMM is an integer, so the GEMM is exact while
    ``K * max_product`` stays below 2**24 (float32) or 2**53 (float64). When
    only a single product fits float32, the reduction runs in float32 chunks
    short enough to stay exact, summed in float64. Otherwise int64.
    """
    k = a.shape[-1]
    if k * max_product < FLOAT32_EXACT:
        return _gemm(a, b, np.float32).astype(np.int64)
    if max_product < FLOAT32_EXACT and k * max_product < FLOAT64_EXACT:
        step = FLOAT32_EXACT // max(max_product, 1)
        acc = None
        for i in range(0, k, step):
            part = _gemm(a[..., i:i + step], b[..., i:i + step, :], np.float32).astype(np.float64)
            acc = part if acc is None else acc + part
        return acc.astype(np.int64)
    if k * max_product < FLOAT64_EXACT:
        return _gemm(a, b, np.float64).astype(np.int64)
    return _gemm(a, b, np.int64)


def _gemm(a: np.ndarray, b: np.ndarray, dtype) -> np.ndarray:
    # NumPy reaches BLAS only for contiguous operands, and for stacked
    # (..., K) @ (K, N) only through one 2-D product.
    a = np.ascontiguousarray(a, dtype=dtype)
    b = np.ascontiguousarray(b, dtype=dtype)
    if b.ndim == 2 and a.ndim > 2:
        return (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1])
    return np.matmul(a, b)


def product_range(a: FixedType, b: FixedType) -> tuple[int, int]:
    """Smallest and largest code product of one element of ``a`` and ``b``."""
    corners = [x * y for x in (a.min_code, a.max_code) for y in (b.min_code, b.max_code)]
    return min(corners), max(corners)


def acc_width(a: FixedType, b: FixedType, k: int, bias_lo: int = 0, bias_hi: int = 0) -> int:
    """Bits of a signed accumulator that holds any sum of ``k`` products of
    ``a`` and ``b`` codes plus a bias in ``[bias_lo, bias_hi]``: never overflows."""
    lo, hi = product_range(a, b)
    width = bits_for_range(min(0, k * lo + bias_lo), max(0, k * hi + bias_hi), True)
    if width > MAX_ACC_WIDTH:
        raise ContractError(f"accumulator of {k} products of {a} x {b} needs {width} bits; "
                            f"the contract supports at most {MAX_ACC_WIDTH}")
    return width


def linear(x: np.ndarray, x_frac: int, w: np.ndarray, w_frac: int | np.ndarray,
           bias: np.ndarray | None, out: FixedType, acc_bits: int,
           max_product: int | None = None, out_frac: np.ndarray | None = None,
           trace: dict | None = None) -> np.ndarray:
    """Linear layer ``y[..., n] = requant(sum_k x[..., k] w[k, n] + bias[n])``.

    ``w_frac`` is an int or a per-column array of shape ``(N,)``; ``bias``
    holds codes with ``x_frac + w_frac`` fractional bits (the accumulator's).
    The sum lives in an ``acc_bits`` register; :func:`acc_width` chose that
    width so that no input in the formats can overflow it, so no wrap-around
    step exists here (``tests/test_contract.py`` drives the worst case).
    ``max_product`` (the largest code product, from the formats) only selects
    the exact GEMM path. ``out_frac`` (per-column output formats) overrides
    ``out.frac_bits``. ``trace`` (a dict), when given, receives the
    intermediate values (``acc``, ``acc_frac``): the same computation, recorded,
    for diagnostics such as :mod:`hwgen.mismatch`.
    """
    if max_product is None:
        max_product = 2 ** (acc_bits - 1)
    acc = matmul_int(x, w, max_product)
    if bias is not None:
        acc += bias.astype(np.int64, copy=False)
    acc_frac = x_frac + np.asarray(w_frac, dtype=np.int64)
    if trace is not None:
        trace.update(acc=acc, acc_frac=acc_frac)
    if out_frac is not None:
        return requant(acc, acc_frac, out, out_frac)
    return out.quantize(acc, acc_frac, in_bits=acc_bits)


def matmul_act(a: np.ndarray, a_fmt: FixedType, b: np.ndarray, b_fmt: FixedType,
               out: FixedType | None = None) -> np.ndarray:
    """Activation x activation product over the last axis of ``a`` and the
    second-to-last of ``b`` (batched). Returns the exact accumulator
    (``a_fmt.frac_bits + b_fmt.frac_bits`` fractional bits) or, with ``out``,
    its requantization."""
    acc = matmul_int(a, b, max(abs(v) for v in product_range(a_fmt, b_fmt)))
    if out is None:
        return acc
    return out.quantize(acc, a_fmt.frac_bits + b_fmt.frac_bits,
                        in_bits=acc_width(a_fmt, b_fmt, a.shape[-1]))


# ----------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------

def _table_codes(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integer table entries: ``values * 2**bits`` rounded half up."""
    return FixedType(bits + 2, 2, signed=False, q="AP_RND", o="AP_SAT").from_float(values)


@dataclass(frozen=True)
class ExpTable:
    """exp(-d) for d >= 0 sampled every 2**-in_frac, scaled by 2**out_bits.

    Entry ``i`` is ``round(exp(-i / 2**in_frac) * 2**out_bits)``; the table
    ends at the first entry that rounds to 0, and larger indices saturate
    onto it.
    """

    in_frac: int = 6
    out_bits: int = 15

    @property
    def size(self) -> int:
        # first i with exp(-i/2^f) * 2^b < 1/2  ->  i > (b+1) ln2 * 2^f
        return math.floor((self.out_bits + 1) * math.log(2) * 2 ** self.in_frac) + 2

    def index_format(self) -> FixedType:
        """The format d = max - s is requantized to: unsigned, ``in_frac``
        fractional bits, just wide enough to address the table (round half
        up, saturating; indices beyond the table then clamp onto its zero)."""
        width = bits_for_range(0, self.size - 1, False)
        return FixedType(width, width - self.in_frac, False, "AP_RND", "AP_SAT")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RecipTable:
    """Normalized reciprocal: for m in [1, 2) taken from ``index_bits`` bits
    below the leading one, entry ``j = round(2**out_bits / (1 + (j + 0.5) / 2**index_bits))``."""

    index_bits: int = 8
    out_bits: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class IsqrtTable:
    """Normalized inverse square root: D = m * 4**k with m in [1, 4), the
    ``index_bits`` bits below the leading one(s) of m select entry
    ``j = round(2**out_bits / sqrt(1 + (j + 0.5) / 2**index_bits))`` for
    ``j < 3 * 2**index_bits``."""

    index_bits: int = 8
    out_bits: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=None)
def exp_table(p: ExpTable) -> np.ndarray:
    i = np.arange(p.size, dtype=np.float64)
    t = _table_codes(np.exp(-i / 2.0 ** p.in_frac), p.out_bits)
    assert t[-1] == 0 and t[0] == 2 ** p.out_bits
    t.setflags(write=False)
    return t


@lru_cache(maxsize=None)
def recip_table(p: RecipTable) -> np.ndarray:
    j = np.arange(2 ** p.index_bits, dtype=np.float64)
    t = _table_codes(1.0 / (1.0 + (j + 0.5) / 2.0 ** p.index_bits), p.out_bits)
    t.setflags(write=False)
    return t


@lru_cache(maxsize=None)
def isqrt_table(p: IsqrtTable) -> np.ndarray:
    j = np.arange(3 * 2 ** p.index_bits, dtype=np.float64)
    t = _table_codes(1.0 / np.sqrt(1.0 + (j + 0.5) / 2.0 ** p.index_bits), p.out_bits)
    t.setflags(write=False)
    return t


def _gelu_float(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if approximate == "none":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    raise ContractError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")


@lru_cache(maxsize=None)
def gelu_table(in_fmt: FixedType, out_fmt: FixedType, approximate: str = "none") -> np.ndarray:
    """``table[c - in_fmt.min_code]`` = output code of gelu(input code c)."""
    if in_fmt.width > MAX_TABLE_INPUT_WIDTH:
        raise ContractError(f"gelu input {in_fmt} is {in_fmt.width} bits wide; the contract's "
                            f"tables take at most {MAX_TABLE_INPUT_WIDTH}")
    codes = np.arange(in_fmt.min_code, in_fmt.max_code + 1, dtype=np.int64)
    t = out_fmt.from_float(_gelu_float(in_fmt.to_float(codes), approximate))
    t.setflags(write=False)
    return t


# ----------------------------------------------------------------------------
# normalized-table helpers (leading-one detection, as hardware does it)
# ----------------------------------------------------------------------------

def bit_length(v: np.ndarray) -> np.ndarray:
    """Number of bits of each non-negative int64 (0 for 0), exactly."""
    v = np.asarray(v, dtype=np.int64)
    n = np.zeros(v.shape, dtype=np.int64)
    w = v.copy()
    for s in (32, 16, 8, 4, 2, 1):
        big = w >= (np.int64(1) << s)
        n += np.where(big, s, 0)
        w = np.where(big, w >> s, w)
    return n + (w > 0)


def _shift(v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """v * 2**s for integer s of either sign, truncating (exact bit selection)."""
    return np.where(s >= 0, v << np.maximum(s, 0), v >> np.maximum(-s, 0))


def reciprocal(total: np.ndarray, p: RecipTable) -> tuple[np.ndarray, np.ndarray]:
    """``(r, f)`` with ``1/total ~= r * 2**-f`` for positive integers ``total``.

    n = bit_length(total) - 1; the ``index_bits`` bits below the leading one
    (truncated) select ``r`` from :func:`recip_table`; ``f = out_bits + n``.
    ``total == 0`` gives ``r = 0``.
    """
    total = np.asarray(total, dtype=np.int64)
    n = np.maximum(bit_length(total) - 1, 0)
    j = _shift(total, p.index_bits - n) - (np.int64(1) << p.index_bits)
    j = np.clip(j, 0, 2 ** p.index_bits - 1)
    r = np.where(total > 0, recip_table(p)[j], 0)
    return r, p.out_bits + n


def inv_sqrt(d: np.ndarray, p: IsqrtTable) -> tuple[np.ndarray, np.ndarray]:
    """``(r, f)`` with ``1/sqrt(d) ~= r * 2**-f`` for positive integers ``d``.

    k = (bit_length(d) - 1) // 2 so that d = m * 4**k, m in [1, 4); the
    ``index_bits`` bits below m's leading one position (truncated) select the
    entry; ``f = out_bits + k``. ``d == 0`` gives ``r = 0``.
    """
    d = np.asarray(d, dtype=np.int64)
    k = np.maximum(bit_length(d) - 1, 0) // 2
    j = _shift(d, p.index_bits - 2 * k) - (np.int64(1) << p.index_bits)
    j = np.clip(j, 0, 3 * 2 ** p.index_bits - 1)
    r = np.where(d > 0, isqrt_table(p)[j], 0)
    return r, p.out_bits + k


# ----------------------------------------------------------------------------
# nonlinearities
# ----------------------------------------------------------------------------

# Masked scores in softmax: far outside any accumulator (<= MAX_ACC_WIDTH bits),
# yet every difference stays far inside int64.
_MASKED = -(1 << (MAX_ACC_WIDTH + 2))
_EMPTY_ROW = 1 << (MAX_ACC_WIDTH + 2)


def softmax(s: np.ndarray, s_frac: int, valid: np.ndarray | None, exp: ExpTable,
            recip: RecipTable, out: FixedType, trace: dict | None = None) -> np.ndarray:
    """Integer softmax over the last axis of codes ``s`` (``s_frac`` fractional bits).

    ``valid`` (broadcastable bool) excludes masked positions: they get
    probability 0 and do not enter the max; a row with no valid position is
    all zeros. Steps: m = max(valid s); d = m - s; index = d requantized to
    ``exp.in_frac`` fractional bits (round half up, saturating at the table's
    last, zero, entry); e = table[index]; total = sum(e);
    (r, f) = reciprocal(total); p = requant(e * r, f, out). ``trace`` (a dict)
    receives ``max``, ``index``, ``exp``, ``total``, ``recip``, ``recip_frac``.
    """
    s = np.asarray(s, dtype=np.int64)
    if valid is not None:
        # A masked score becomes _MASKED: its distance to the row max saturates the
        # table index onto the table's last entry, which is 0. A row with no valid
        # score gets max _EMPTY_ROW, so every entry of it saturates the same way.
        s = np.where(valid, s, _MASKED)
    m = np.max(s, axis=-1, keepdims=True)
    if valid is not None:
        m[m == _MASKED] = _EMPTY_ROW
    table = exp_table(exp)
    idx = exp.index_format().quantize(m - s, s_frac, in_bits=MAX_ACC_WIDTH + 4)
    np.minimum(idx, exp.size - 1, out=idx)
    e = table[idx]
    total = e.sum(axis=-1, keepdims=True)
    r, f = reciprocal(total, recip)
    if trace is not None:
        trace.update(max=m, index=idx, exp=e, total=total, recip=r, recip_frac=f)
    return out.quantize(e * r, f, in_bits=exp.out_bits + recip.out_bits + 2)


def attention(q: np.ndarray, q_fmt: FixedType, k: np.ndarray, k_fmt: FixedType, v: np.ndarray,
              v_fmt: FixedType, valid: np.ndarray | None, exp: ExpTable, recip: RecipTable,
              p_fmt: FixedType, out: FixedType, trace: dict | None = None) -> np.ndarray:
    """Scaled dot-product attention on codes (the scale is folded into q):
    ``q`` ``[..., s_q, hd]``, ``k``/``v`` ``[..., s_kv, hd]``. S = q k^T exact;
    P = :func:`softmax` (S, ``valid``) in ``p_fmt``; O = requant(P v, out).
    ``trace`` receives ``scores``, ``prob``, ``pv_acc`` and the softmax's
    values prefixed ``softmax_``."""
    scores = matmul_act(q, q_fmt, np.swapaxes(k, -1, -2), k_fmt)
    sm: dict | None = {} if trace is not None else None
    p = softmax(scores, q_fmt.frac_bits + k_fmt.frac_bits, valid, exp, recip, p_fmt, trace=sm)
    acc = matmul_act(p, p_fmt, v, v_fmt)
    if trace is not None:
        trace.update(scores=scores, prob=p, pv_acc=acc, **{f"softmax_{n}": x for n, x in sm.items()})
    return out.quantize(acc, p_fmt.frac_bits + v_fmt.frac_bits,
                        in_bits=acc_width(p_fmt, v_fmt, p.shape[-1]))


def layernorm(x: np.ndarray, x_frac: int, gamma: np.ndarray, gamma_frac: int,
              beta: np.ndarray, eps_code: int, isqrt: IsqrtTable, norm: FixedType,
              out: FixedType, out_frac: int | np.ndarray | None = None,
              trace: dict | None = None) -> np.ndarray:
    """Integer layer normalization over the last axis (H channels).

    s1 = sum x, s2 = sum x^2, num = H*x - s1, D = H*s2 - s1^2 + eps_code
    (eps_code = :func:`layernorm_eps_code`); (r, f) = inv_sqrt(D);
    z = requant(num * r, f, norm); y = requant(z * gamma + beta,
    norm.frac_bits + gamma_frac, out). ``beta`` holds codes with
    ``norm.frac_bits + gamma_frac`` fractional bits. ``out_frac`` (per-channel
    output formats) overrides ``out.frac_bits``. ``trace`` receives ``s1``,
    ``s2``, ``num``, ``d``, ``isqrt``, ``isqrt_frac``, ``z``.
    """
    x = np.asarray(x, dtype=np.int64)
    h = x.shape[-1]
    s1 = x.sum(axis=-1, keepdims=True)
    s2 = (x * x).sum(axis=-1, keepdims=True)
    num = h * x - s1
    d = h * s2 - s1 * s1 + eps_code
    r, f = inv_sqrt(d, isqrt)
    z = norm.quantize(num * r, f)
    if trace is not None:
        trace.update(s1=s1, s2=s2, num=num, d=d, isqrt=r, isqrt_frac=f, z=z)
    return requant(z * gamma.astype(np.int64) + beta.astype(np.int64),
                   norm.frac_bits + gamma_frac, out, out_frac)


def layernorm_eps_code(eps: float, h: int, x_frac: int) -> int:
    """eps in the units of D = H^2 * var * 4**x_frac, rounded half up."""
    return int(math.floor(eps * h * h * 4.0 ** x_frac + 0.5))


def layernorm_check(x_fmt: FixedType, h: int) -> None:
    """Raise :class:`ContractError` if H*sum(x^2) could leave int64."""
    need = 2 * (code_bound(x_fmt).bit_length()) + 2 * h.bit_length() + 1
    if need > 63:
        raise ContractError(f"layernorm over {h} channels of {x_fmt} needs {need}-bit sums; "
                            "the contract supports 63 (narrow the residual format)")


def layernorm_norm_format(h: int, width: int) -> FixedType:
    """Format of the normalized value z: |z| <= sqrt(H-1) always."""
    int_bits = math.ceil(math.log2(math.sqrt(max(h - 1, 1)) + 1)) + 1
    return FixedType(width, int_bits, signed=True, q="AP_RND", o="AP_SAT")


def gelu_fine_format(out_fmt: FixedType, out_frac: np.ndarray) -> FixedType:
    """Table format for per-channel GELU outputs: the finest channel's
    fractional bits and the widest channel's integer bits."""
    out_frac = np.asarray(out_frac)
    frac, int_bits = int(out_frac.max()), out_fmt.width - int(out_frac.min())
    return FixedType(int_bits + frac, int_bits, out_fmt.signed, out_fmt.q, "AP_SAT")


def gelu(x: np.ndarray, in_fmt: FixedType, out_fmt: FixedType, approximate: str,
         out_frac: np.ndarray | None = None) -> np.ndarray:
    """GELU as a table over every input code.

    With per-channel output formats (``out_frac``), the table holds codes of
    :func:`gelu_fine_format` and each channel requantizes them (one rounding
    shift and saturation per lane).
    """
    idx = np.asarray(x, dtype=np.int64) - in_fmt.min_code
    if out_frac is None:
        return gelu_table(in_fmt, out_fmt, approximate)[idx]
    fine = gelu_fine_format(out_fmt, out_frac)
    return requant(gelu_table(in_fmt, fine, approximate)[idx], fine.frac_bits, out_fmt, out_frac)


def relu(x: np.ndarray, x_frac: int, out: FixedType) -> np.ndarray:
    return out.quantize(np.maximum(np.asarray(x, dtype=np.int64), 0), x_frac)


def add(a: np.ndarray, a_frac: int | np.ndarray, b: np.ndarray, b_frac: int | np.ndarray,
        out: FixedType, out_frac: np.ndarray | None = None, trace: dict | None = None) -> np.ndarray:
    """Residual add: align both (per channel, if their formats are) to the finest
    fractional bits exactly, add, requantize (per channel with ``out_frac``).
    ``trace`` receives the aligned sum ``acc`` and its ``acc_frac``."""
    f = int(max(np.max(a_frac), np.max(b_frac)))
    acc = (np.asarray(a, dtype=np.int64) << (f - np.asarray(a_frac))) + \
        (np.asarray(b, dtype=np.int64) << (f - np.asarray(b_frac)))
    if trace is not None:
        trace.update(acc=acc, acc_frac=f)
    return requant(acc, f, out, out_frac)


# ----------------------------------------------------------------------------
# masks, lookups, cache, pooling
# ----------------------------------------------------------------------------

def causal_mask(s_q: int, s_kv: int, offset: int = 0) -> np.ndarray:
    """(s_q, s_kv) bool: query i (at absolute position offset + i) sees key j <= offset + i."""
    return np.arange(s_kv)[None, :] <= (offset + np.arange(s_q))[:, None]


def padding_mask(mask: np.ndarray) -> np.ndarray:
    """(B, S_kv) 0/1 -> (B, 1, 1, S_kv) bool, broadcastable over heads and queries."""
    return (np.asarray(mask) != 0)[:, None, None, :]


def embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ContractError(f"embedding index out of range [0, {table.shape[0]}): "
                            f"got {int(ids.min())}..{int(ids.max())}")
    return table[ids].astype(np.int64)


def kv_append(cache: np.ndarray | None, new: np.ndarray, capacity: int | None = None) -> np.ndarray:
    """Append ``new`` (B, heads, S, d) to ``cache`` along the sequence axis."""
    out = new if cache is None else np.concatenate([cache, new], axis=2)
    if capacity is not None and out.shape[2] > capacity:
        raise ContractError(f"KV cache holds at most {capacity} positions, "
                            f"{out.shape[2]} requested")
    return out


def mean_pool(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of codes over valid positions, rounded half up: (B, S, H) -> (B, H).

    Same fractional bits as ``x``; a row with no valid position gives 0.
    """
    m = (np.asarray(mask) != 0)
    total = (np.asarray(x, dtype=np.int64) * m[..., None]).sum(axis=1)
    n = np.maximum(m.sum(axis=1), 1)[:, None].astype(np.int64)
    return (2 * total + n) // (2 * n)
