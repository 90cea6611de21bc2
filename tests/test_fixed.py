"""Fast unit tests of hwgen.fixed (the ap_fixed arithmetic contract).

The bit-for-bit comparison against the C++ headers lives in test_fixed_parity.py; here:
validation messages, hand-computed rounding / overflow examples, per-channel formats,
huge shifts, round trips, and a small exact (Fraction-based) reference model.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from hwgen.fixed import (
    MAX_WIDTH,
    OVERFLOW_MODES,
    QUANT_MODES,
    FixedFormatError,
    FixedType,
    bits_for_range,
    overflow,
    requantize,
    round_shift,
)

Q_LIST = "AP_TRN, AP_TRN_ZERO, AP_RND, AP_RND_ZERO, AP_RND_MIN_INF, AP_RND_INF, AP_RND_CONV"
O_LIST = "AP_WRAP, AP_SAT, AP_SAT_ZERO, AP_SAT_SYM"


# ---------------------------------------------------------------------------------------
# an independent exact reference: Python ints and Fractions, one value at a time


def ref_round(y: Fraction, q: str) -> int:
    fl = math.floor(y)
    frac = y - fl
    if frac == 0:
        return fl
    half = Fraction(1, 2)
    if q == "AP_TRN":
        return fl
    if q == "AP_TRN_ZERO":
        return fl if y > 0 else fl + 1
    if frac != half:
        return fl + (frac > half)
    return {"AP_RND": fl + 1, "AP_RND_ZERO": fl + (y < 0), "AP_RND_MIN_INF": fl,
            "AP_RND_INF": fl + (y > 0), "AP_RND_CONV": fl + (fl & 1)}[q]


def ref_overflow(r: int, w: int, signed: bool, o: str) -> int:
    lo, hi = (-(1 << (w - 1)), (1 << (w - 1)) - 1) if signed else (0, (1 << w) - 1)
    if o == "AP_SAT_SYM" and signed and w > 1:
        lo = -hi
    if lo <= r <= hi:
        return r
    if o == "AP_WRAP":
        r &= (1 << w) - 1
        return r - (1 << w) if signed and r >> (w - 1) else r
    if o == "AP_SAT_ZERO":
        return 0
    return hi if r > hi else lo


def ref_convert(value: Fraction, t: FixedType) -> int:
    return ref_overflow(ref_round(value * Fraction(2) ** t.frac_bits, t.q), t.width, t.signed, t.o)


# ---------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 64, "int_bits": 3}, "FixedType width must be an int in 1..48, got 64"),
        ({"width": 0, "int_bits": 0}, "FixedType width must be an int in 1..48, got 0"),
        ({"width": 8.0, "int_bits": 3}, "FixedType width must be an int in 1..48, got 8.0"),
        ({"width": True, "int_bits": 3}, "FixedType width must be an int in 1..48, got True"),
        ({"width": 8, "int_bits": "3"}, "FixedType int_bits must be an int, got '3'"),
        ({"width": 8, "int_bits": 3, "signed": 1}, "FixedType signed must be a bool, got 1"),
        ({"width": 8, "int_bits": 3, "q": "AP_FOO"}, f"FixedType q must be one of {Q_LIST}, got 'AP_FOO'"),
        ({"width": 8, "int_bits": 3, "o": "AP_WRAP_SM"}, f"FixedType o must be one of {O_LIST}, got 'AP_WRAP_SM'"),
    ],
)
def test_fixedtype_validation_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(FixedFormatError) as exc:
        FixedType(**kwargs)
    assert str(exc.value) == message
    assert isinstance(exc.value, ValueError)


def test_fixedtype_accepts_ap_fixed_corner_formats() -> None:
    for w, i in [(1, 0), (1, 1), (MAX_WIDTH, 0), (8, -3), (8, 13), (4, -1000)]:
        t = FixedType(w, i)
        assert t.frac_bits == w - i
    t = FixedType(np.int64(8), np.int32(3), np.bool_(False))
    assert (type(t.width), type(t.int_bits), type(t.signed)) == (int, int, bool)


def test_fixedtype_properties_and_serialization() -> None:
    t = FixedType(8, 3, q="AP_RND", o="AP_SAT")
    assert (t.frac_bits, t.min_code, t.max_code, t.lsb) == (5, -128, 127, 1 / 32)
    u = FixedType(8, 10, signed=False)
    assert (u.frac_bits, u.min_code, u.max_code, u.lsb) == (-2, 0, 255, 4.0)
    assert t.ctype() == str(t) == "ap_fixed<8,3,AP_RND,AP_SAT>"
    assert u.ctype() == "ap_ufixed<8,10,AP_TRN,AP_WRAP>"
    assert t.to_dict() == {"width": 8, "int_bits": 3, "signed": True, "q": "AP_RND", "o": "AP_SAT"}
    assert FixedType.from_dict(t.to_dict()) == t
    assert FixedType.from_dict({"width": 4, "int_bits": 2}) == FixedType(4, 2)
    assert t.with_modes(q="AP_RND_CONV") == FixedType(8, 3, True, "AP_RND_CONV", "AP_SAT")
    assert t.with_modes(o="AP_WRAP") == FixedType(8, 3, True, "AP_RND", "AP_WRAP")
    with pytest.raises(FixedFormatError, match="missing int_bits"):
        FixedType.from_dict({"width": 4})
    with pytest.raises(FixedFormatError, match="unknown keys frac"):
        FixedType.from_dict({"width": 4, "int_bits": 2, "frac": 2})
    with pytest.raises(FixedFormatError, match="q must be one of"):
        t.with_modes(q="RND")


def test_primitive_argument_errors() -> None:
    with pytest.raises(FixedFormatError, match="requantize width must be an int in 1..63, got 64"):
        requantize([1], 0, 64, 0)
    with pytest.raises(FixedFormatError, match="requantize o must be one of"):
        requantize([1], 0, 8, 0, o="SAT")
    with pytest.raises(ValueError, match="shift must be >= 0"):
        round_shift([1, 2], [1, -1], "AP_RND")
    with pytest.raises(TypeError, match="codes must be integers"):
        requantize([1.5], 0, 8, 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        FixedType(8, 3).from_float([1.0, np.nan])
    with pytest.raises(ValueError, match="NaN or Inf"):
        FixedType(8, 3).from_float(-np.inf)


# ---------------------------------------------------------------------------------------
# rounding modes, hand-computed: ap_fixed<8,4> has an LSB of 1/16


ROUND_CASES = {
    # value in LSBs:     0.5, -0.5, 1.5, -1.5, 1.6, -1.6, 2.5, -2.5, 0.25, -0.25
    "AP_TRN":         [0, -1, 1, -2, 1, -2, 2, -3, 0, -1],
    "AP_TRN_ZERO":    [0, 0, 1, -1, 1, -1, 2, -2, 0, 0],
    "AP_RND":         [1, 0, 2, -1, 2, -2, 3, -2, 0, 0],
    "AP_RND_ZERO":    [0, 0, 1, -1, 2, -2, 2, -2, 0, 0],
    "AP_RND_MIN_INF": [0, -1, 1, -2, 2, -2, 2, -3, 0, 0],
    "AP_RND_INF":     [1, -1, 2, -2, 2, -2, 3, -3, 0, 0],
    "AP_RND_CONV":    [0, 0, 2, -2, 2, -2, 2, -2, 0, 0],
}
ROUND_LSBS = [0.5, -0.5, 1.5, -1.5, 1.6, -1.6, 2.5, -2.5, 0.25, -0.25]


@pytest.mark.parametrize("q", QUANT_MODES)
def test_rounding_modes_by_hand(q: str) -> None:
    t = FixedType(8, 4, q=q)
    x = np.array(ROUND_LSBS) / 16
    assert t.from_float(x).tolist() == ROUND_CASES[q]
    # the same through the integer path: codes with 4 more fractional bits
    codes = np.round(np.array(ROUND_LSBS) * 16).astype(np.int64)
    assert requantize(codes, 8, 8, 4, True, q).tolist() == ROUND_CASES[q]
    assert round_shift(codes, 4, q).tolist() == ROUND_CASES[q]
    assert t.quantize(codes, 8).tolist() == ROUND_CASES[q]


def test_round_shift_zero_and_exact() -> None:
    c = np.array([-7, -1, 0, 1, 7, 2**62, -(2**63)])
    for q in QUANT_MODES:
        assert round_shift(c, 0, q).tolist() == c.tolist()
        exact = np.array([-64, -32, 0, 32, 64, 96, -96])
        assert round_shift(exact, 5, q).tolist() == [-2, -1, 0, 1, 2, 3, -3]


# ---------------------------------------------------------------------------------------
# overflow modes, hand-computed


OVF_CASES = {
    # ap_fixed<4,4>: codes -8..7; inputs 9, -9, -8, 7, 16, -17
    ("AP_WRAP", True): [-7, 7, -8, 7, 0, -1],
    ("AP_SAT", True): [7, -8, -8, 7, 7, -8],
    ("AP_SAT_ZERO", True): [0, 0, -8, 7, 0, 0],
    ("AP_SAT_SYM", True): [7, -7, -7, 7, 7, -7],
    # ap_ufixed<4,4>: codes 0..15
    ("AP_WRAP", False): [9, 7, 8, 7, 0, 15],
    ("AP_SAT", False): [9, 0, 0, 7, 15, 0],
    ("AP_SAT_ZERO", False): [9, 0, 0, 7, 0, 0],
    ("AP_SAT_SYM", False): [9, 0, 0, 7, 15, 0],
}


@pytest.mark.parametrize("o", OVERFLOW_MODES)
@pytest.mark.parametrize("signed", [True, False])
def test_overflow_modes_by_hand(o: str, signed: bool) -> None:
    vals = [9, -9, -8, 7, 16, -17]
    want = OVF_CASES[(o, signed)]
    assert overflow(vals, 4, signed, o).tolist() == want
    assert requantize(vals, 0, 4, 0, signed, "AP_TRN", o).tolist() == want
    assert FixedType(4, 4, signed, o=o).from_float(np.array(vals, dtype=float)).tolist() == want
    # exact left shift then overflow: the same values with one fractional bit less
    doubled = overflow(np.array(vals) * 2, 5, signed, o).tolist()
    assert requantize(vals, -1, 5, 0, signed, "AP_TRN", o).tolist() == doubled


def test_sat_sym_width_one_mirrors_header() -> None:
    # ap_fixed<1,I,.,AP_SAT_SYM>: max_code is 0, yet the header saturates negatives to -1
    # (overflow_adjust: V = 1 << (W-1); V |= 1), i.e. SAT_SYM == SAT at width 1.
    assert overflow([-5, -1, 0, 3], 1, True, "AP_SAT_SYM").tolist() == [-1, -1, 0, 0]
    assert FixedType(1, 0, o="AP_SAT_SYM").from_float([-0.75, -0.25, 0.25]).tolist() == [-1, -1, 0]


def test_rounding_carry_into_overflow() -> None:
    t = FixedType(4, 4, q="AP_RND", o="AP_SAT")
    assert t.from_float([7.5, 7.49, -8.5, -8.51]).tolist() == [7, 7, -8, -8]
    assert t.with_modes(o="AP_WRAP").from_float([7.5, -8.51]).tolist() == [-8, 7]
    u = FixedType(4, 4, False, q="AP_RND_CONV", o="AP_SAT")
    assert u.from_float([15.5, 14.5, -0.5, -0.51]).tolist() == [15, 14, 0, 0]


# ---------------------------------------------------------------------------------------
# per-channel formats, large shifts, extreme doubles


def test_per_channel_frac_arrays_match_scalar_calls() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(-(1 << 20), 1 << 20, size=(200, 5))
    frac_in = np.array([0, 4, 9, 13, 20])
    for q in QUANT_MODES:
        for o in OVERFLOW_MODES:
            got = requantize(codes, frac_in, 10, 6, True, q, o)
            want = np.stack([requantize(codes[:, k], int(frac_in[k]), 10, 6, True, q, o) for k in range(5)], axis=1)
            assert np.array_equal(got, want)
            fo = np.tile([[3], [7]], (100, 5))  # a different frac_out per element too
            got2 = requantize(codes, frac_in, 12, fo, False, q, o)
            want2 = np.vectorize(lambda c, fi, f2: int(requantize(c, fi, 12, f2, False, q, o)))(codes, frac_in, fo)
            assert np.array_equal(got2, want2)


def test_large_shifts() -> None:
    c = np.array([-(2**63), -(2**62) - 1, -5, -1, 0, 1, 5, 2**62, 2**63 - 1], dtype=np.int64)
    for shift in (62, 63, 64, 65, 100, 10_000):
        for q in QUANT_MODES:
            want = [ref_round(Fraction(int(v), 2**shift), q) for v in c]
            assert round_shift(c, shift, q).tolist() == want, (shift, q)
    # -2**63 / 2**64 is an exact tie at -1/2
    assert round_shift(np.int64(-(2**63)), 64, "AP_RND_INF").item() == -1
    assert round_shift(np.int64(-(2**63)), 64, "AP_RND").item() == 0
    # left shifts beyond int64 saturate / wrap exactly
    for d in (40, 63, 64, 200):
        assert requantize(c, 0, 16, d, True, "AP_TRN", "AP_SAT").tolist() == [-32768] * 4 + [0] + [32767] * 4
        assert requantize(c, 0, 16, d, True, "AP_TRN", "AP_SAT_SYM").tolist() == [-32767] * 4 + [0] + [32767] * 4
        assert requantize(c, 0, 16, d, True, "AP_TRN", "AP_WRAP").tolist() == [0] * 9
        assert requantize(c, 0, 16, d, False, "AP_TRN", "AP_SAT").tolist() == [0] * 5 + [65535] * 4
    assert requantize([3], 0, 8, 5, False, "AP_TRN", "AP_SAT").tolist() == [96]
    assert requantize([3], 0, 8, 6, False, "AP_TRN", "AP_SAT").tolist() == [192]
    assert requantize([3], 0, 8, 7, False, "AP_TRN", "AP_SAT").tolist() == [255]
    assert requantize([-3], 0, 8, 6, True, "AP_TRN", "AP_SAT").tolist() == [-128]
    assert requantize([-1], 0, 8, 7, True, "AP_TRN", "AP_SAT").tolist() == [-128]
    assert requantize([-1], 0, 8, 7, True, "AP_TRN", "AP_SAT_SYM").tolist() == [-127]


def test_from_float_extreme_doubles() -> None:
    t = FixedType(8, 3, q="AP_RND", o="AP_SAT")
    x = [1e30, -1e30, 1e-30, -1e-30, 0.0, -0.0, 5e-324, -5e-324, np.finfo(float).max, -np.finfo(float).max]
    assert t.from_float(x).tolist() == [127, -128, 0, 0, 0, 0, 0, 0, 127, -128]
    assert t.with_modes(q="AP_RND_MIN_INF").from_float([-1e-30]).tolist() == [0]
    assert t.with_modes(q="AP_TRN").from_float([-1e-30, -5e-324]).tolist() == [-1, -1]
    assert t.with_modes(q="AP_RND_INF", o="AP_WRAP").from_float([1e30, 3.0 * 2**60]).tolist() == [0, 0]
    assert FixedType(8, 3).from_float(1.3).shape == ()
    assert FixedType(8, 3).from_float(1.3).dtype == np.int64


def test_from_float_subnormal_quirk() -> None:
    # ap_fixed_base(double) always sets the implicit mantissa bit, so a subnormal with
    # mantissa field f reads as (2**52 + f) * 2**-1075; visible only with > 1022 frac bits.
    t = FixedType(16, -1060, signed=False)  # frac_bits 1076
    sub = np.array([5e-324])                 # f = 1: true value 2**-1074 would give code 4
    assert t.from_float(sub).tolist() == [((2**52 + 1) * 2) % 2**16]  # = 2, what the header stores
    assert FixedType(16, 0).from_float(sub).tolist() == [0]


def test_round_trip_representable_values() -> None:
    rng = np.random.default_rng(2)
    for w, i, s in [(8, 3, True), (12, -2, False), (16, 20, True), (48, 10, True), (1, 0, True), (33, 33, False)]:
        t = FixedType(w, i, s)
        codes = rng.integers(t.min_code, t.max_code, size=2000, endpoint=True)
        codes[:2] = [t.min_code, t.max_code]
        x = t.to_float(codes)
        assert x.dtype == np.float64
        assert np.array_equal(x, codes * 2.0 ** -t.frac_bits)
        for q in QUANT_MODES:
            for o in OVERFLOW_MODES:
                if o == "AP_SAT_SYM" and s and w > 1:
                    want = np.maximum(codes, -t.max_code)
                else:
                    want = codes
                assert np.array_equal(t.with_modes(q, o).from_float(x), want)


def test_matches_exact_reference_model() -> None:
    rng = np.random.default_rng(3)
    formats = [FixedType(w, i, s) for w, i, s in [(2, -3, True), (5, 0, False), (8, 3, True), (12, 12, False),
                                                  (16, 21, True), (24, 7, True), (1, 0, True), (47, 30, False)]]
    for t0 in formats:
        lsb_exp = -t0.frac_bits
        k = rng.integers(-4 * (t0.max_code + 1), 4 * (t0.max_code + 1), size=60)
        x = np.concatenate([np.ldexp(k + 0.5, lsb_exp), np.ldexp(k.astype(float), lsb_exp),
                            rng.standard_normal(60) * 2.0 ** (t0.int_bits - 1), [0.0, -0.0, 1e-300, -1e-300]])
        for q in QUANT_MODES:
            for o in OVERFLOW_MODES:
                t = t0.with_modes(q, o)
                want = [ref_convert(Fraction(float(v)), t) for v in x]
                assert t.from_float(x).tolist() == want, t
                codes = rng.integers(-(2**40), 2**40, size=50)
                for fin in (-3, 0, 7, 45):
                    want = [ref_convert(Fraction(int(c)) / Fraction(2) ** fin, t) for c in codes]
                    assert t.quantize(codes, fin).tolist() == want, (t, fin)


def test_bits_for_range() -> None:
    assert bits_for_range(0, 0, True) == 1
    assert bits_for_range(-1, 0, True) == 1
    assert bits_for_range(0, 1, True) == 2
    assert bits_for_range(-128, 127, True) == 8
    assert bits_for_range(-129, 127, True) == 9
    assert bits_for_range(-128, 128, True) == 9
    assert bits_for_range(-(2**47), 2**47 - 1, True) == 48
    assert bits_for_range(0, 0, False) == 1
    assert bits_for_range(0, 255, False) == 8
    assert bits_for_range(3, 256, False) == 9
    assert bits_for_range(np.int64(-5), np.int64(5), True) == 4
    with pytest.raises(ValueError, match="unsigned integer cannot hold lo=-1"):
        bits_for_range(-1, 0, False)
    with pytest.raises(ValueError, match="lo <= hi"):
        bits_for_range(2, 1, True)
