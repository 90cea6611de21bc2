"""Fixed-point core: the single source of truth for ap_fixed semantics in hwgen.

Contract
--------
Every integer quantize / requantize in the project (golden model, QAT fake-quant,
HLS emitter, RTL generator) goes through this module. A fixed-point tensor is a
pair (codes, frac_bits): int64 ``codes`` whose real value is
``codes * 2**-frac_bits``. ``frac_bits`` is an int or an integer array that
broadcasts against ``codes`` (per-channel formats).

The semantics are exactly those of the Xilinx ``ap_fixed`` / ``ap_ufixed`` C++
headers (shipped in hls4ml, ``templates/vivado/ap_types``), checked bit for bit by
``tests/test_fixed_parity.py``:

Quantization, applied to the exact value y = value * 2**F (F = target frac bits):
  AP_TRN          floor(y)
  AP_TRN_ZERO     toward zero
  AP_RND          nearest, ties toward +inf
  AP_RND_ZERO     nearest, ties toward zero
  AP_RND_MIN_INF  nearest, ties toward -inf
  AP_RND_INF      nearest, ties away from zero
  AP_RND_CONV     nearest, ties to even
Overflow, applied to the rounded integer r (W = width):
  AP_WRAP      keep the low W bits (two's complement for signed, mod 2**W unsigned)
  AP_SAT       clip to [min_code, max_code]
  AP_SAT_ZERO  0 if r is outside [min_code, max_code]
  AP_SAT_SYM   signed: clip to [-max_code, max_code] (so -2**(W-1) itself becomes
               -max_code); unsigned: same as AP_SAT.

Header quirks reproduced here (line numbers: hls4ml's ap_fixed_base.h):
  * Signed width 1 with AP_SAT_SYM: max_code is 0, yet negatives saturate to -1, not 0
    (overflow_adjust, l.356: ``V = 1 << (W-1); V |= 1`` is -1 in one bit), i.e. it
    behaves as AP_SAT.
  * double -> fixed (l.519-534): the implicit mantissa bit is set unconditionally, so
    a subnormal double with mantissa field f is read as (2**52 + f) * 2**-1075 instead
    of f * 2**-1074. Only formats with more than ~1020 fractional bits can see it.
  * fixed -> fixed (l.680): operator= reads source bit F_src - F_dst - 1 through an
    asserting get_bit, so a right shift longer than the source width aborts the
    C simulation. There is no header result to mirror; requantize returns the exactly
    rounded value, as the header's double constructor does for any shift.
NaN and Inf are rejected (the header only warns, then converts them as if finite).

All arithmetic is on int64 (through uint64 views for bit manipulation), vectorized,
with no float rounding anywhere; shifts of any size (also >= 64) are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Union

import numpy as np
import numpy.typing as npt

__all__ = [
    "QUANT_MODES",
    "OVERFLOW_MODES",
    "MAX_WIDTH",
    "FixedFormatError",
    "FixedType",
    "requantize",
    "round_shift",
    "overflow",
    "bits_for_range",
]

QUANT_MODES = ("AP_TRN", "AP_TRN_ZERO", "AP_RND", "AP_RND_ZERO", "AP_RND_MIN_INF", "AP_RND_INF", "AP_RND_CONV")
OVERFLOW_MODES = ("AP_WRAP", "AP_SAT", "AP_SAT_ZERO", "AP_SAT_SYM")
MAX_WIDTH = 48  # codes live in int64; exact float64 GEMMs need |values| < 2**53

IntLike = Union[int, np.integer, npt.NDArray[np.integer]]

_U1 = np.uint64(1)


class FixedFormatError(ValueError):
    """An impossible or unsupported fixed-point format (the message names the field)."""


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, (bool, np.bool_))


def _check_mode(name: str, value: Any, allowed: tuple[str, ...], who: str) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise FixedFormatError(f"{who} {name} must be one of {', '.join(allowed)}, got {value!r}")


def _check_width(width: Any, who: str) -> None:
    """Widths the integer primitives handle in int64 (FixedType narrows this to MAX_WIDTH)."""
    if not _is_int(width) or not 1 <= width <= 63:
        raise FixedFormatError(f"{who} width must be an int in 1..63, got {width!r}")


def _as_codes(codes: IntLike) -> np.ndarray:
    a = np.asarray(codes)
    if a.dtype == np.int64:
        return a
    if a.dtype.kind not in "iub" and a.size and not (a.dtype == object and all(_is_int(v) for v in a.ravel())):
        raise TypeError(f"codes must be integers, got dtype {a.dtype}")
    if a.dtype == np.uint64 and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError("codes must fit in int64")
    return a.astype(np.int64)


def _as_shift(shift: IntLike, name: str) -> np.ndarray:
    a = np.asarray(shift)
    if a.dtype.kind not in "iu" and a.size:
        raise TypeError(f"{name} must be an int or an integer array, got dtype {a.dtype}")
    return a.astype(np.int64)


# ----------------------------------------------------------------------------------------
# integer primitives


def round_shift(codes: IntLike, shift: IntLike, q: str = "AP_TRN") -> np.ndarray:
    """Exact arithmetic right shift of ``codes`` by ``shift`` >= 0 bits with rounding mode ``q``.

    Returns round_q(codes / 2**shift) as int64 (no overflow handling: the result
    always fits). ``shift`` may be an int or an array broadcastable to ``codes``, of
    any size (>= 64 included).
    """
    _check_mode("q", q, QUANT_MODES, "round_shift")
    c = _as_codes(codes)
    s = _as_shift(shift, "shift")
    if s.size and int(s.min()) < 0:
        raise ValueError(f"round_shift shift must be >= 0, got {int(s.min())}")
    return _round_shift(c, s, q)


def round_increment(q: str, qb, r, neg, lsb):
    """The one rounding rule of a right shift in ap_fixed mode ``q`` (not
    ``AP_TRN``, whose increment is 0): 1 where the truncated result ``floor``
    must go up by one LSB, from the dropped half bit ``qb``, whether any bit
    below it is set (``r``), the sign ``neg`` and ``floor``'s own LSB ``lsb``.
    Written with ``&``, ``|`` and ``~`` only, so the same rule runs on NumPy
    and torch booleans (the golden model, the torch host ops) and on 1-bit
    Amaranth values (the RTL rounders)."""
    if q == "AP_TRN_ZERO":
        return neg & (qb | r)                       # negative and inexact: toward zero
    if q == "AP_RND":
        return qb
    if q == "AP_RND_ZERO":
        return qb & (neg | r)
    if q == "AP_RND_MIN_INF":
        return qb & r
    if q == "AP_RND_INF":
        return qb & (~neg | r)
    if q == "AP_RND_CONV":
        return qb & (lsb | r)
    raise FixedFormatError(f"unknown quantization mode {q!r} (choose one of {', '.join(QUANT_MODES)})")


def _round_shift(c: np.ndarray, s: np.ndarray, q: str) -> np.ndarray:
    """round_shift on validated int64 codes and int64 shifts >= 0 (scalar or array)."""
    scalar = s.ndim == 0
    if scalar and int(s) == 0:
        return np.array(c, dtype=np.int64)
    # floor: for s >= 63, |c| <= 2**63 <= 2**s, so floor(c / 2**s) is c >> 63 (0 or -1).
    floor = c >> np.minimum(s, 63)
    if q == "AP_TRN":
        return np.asarray(floor, dtype=np.int64)
    # qb: bit s-1 of the sign-extended code (the half bit); r: any bit below it.
    # Bit positions >= 63 hold copies of the sign bit.
    m = np.clip(s - 1, 0, 63)
    qb = ((c >> m) & 1) == 1
    # mask of bits 0..s-2: (1 << (s-1)) - 1, all 64 bits once s-1 >= 64
    low_mask = np.where(s - 1 >= 64, ~np.uint64(0), (_U1 << m.astype(np.uint64)) - _U1)
    r = (c.view(np.uint64) & low_mask) != 0
    if not scalar:
        qb &= s >= 1
    inc = round_increment(q, qb, r, c < 0, (floor & 1) == 1)
    return np.asarray(floor + inc, dtype=np.int64)


def _limits(width: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (width - 1)), (1 << (width - 1)) - 1
    return 0, (1 << width) - 1


def _wrap(u: np.ndarray, width: int, signed: bool) -> np.ndarray:
    """Low ``width`` bits of the uint64 bit patterns ``u``, sign-extended if ``signed``."""
    if signed:
        k = np.uint64(64 - width)
        return ((u << k).view(np.int64) >> np.int64(64 - width)).astype(np.int64)
    return (u & np.uint64((1 << width) - 1)).view(np.int64)


def _saturate(
    wrapped: np.ndarray, over: np.ndarray, under: np.ndarray, width: int, signed: bool, o: str
) -> np.ndarray:
    """Apply overflow mode ``o`` given the wrapped bits and the out-of-range flags."""
    lo, hi = _limits(width, signed)
    if o == "AP_SAT_ZERO":
        return np.where(over | under, 0, wrapped).astype(np.int64)
    if o == "AP_SAT_SYM" and signed and width > 1:
        lo = -hi  # under was computed against -max by the caller
    return np.where(over, hi, np.where(under, lo, wrapped)).astype(np.int64)


def _sym_lo(width: int, signed: bool, o: str) -> int:
    """Lowest code not treated as underflow for mode ``o``."""
    lo, hi = _limits(width, signed)
    if o == "AP_SAT_SYM" and signed and width > 1:
        return -hi
    return lo


def overflow(codes: IntLike, width: int, signed: bool = True, o: str = "AP_WRAP") -> np.ndarray:
    """Apply overflow mode ``o`` to exact integers ``codes`` for a ``width``-bit (un)signed target."""
    _check_width(width, "overflow")
    _check_mode("o", o, OVERFLOW_MODES, "overflow")
    c = _as_codes(codes)
    wrapped = _wrap(c.view(np.uint64), width, signed)
    if o == "AP_WRAP":
        return wrapped
    _, hi = _limits(width, signed)
    return _saturate(wrapped, c > hi, c < _sym_lo(width, signed, o), width, signed, o)


def requantize(
    codes: IntLike,
    frac_in: IntLike,
    width: int,
    frac_out: IntLike,
    signed: bool = True,
    q: str = "AP_TRN",
    o: str = "AP_WRAP",
    in_bits: int | None = None,
) -> np.ndarray:
    """ap_fixed assignment between fixed-point formats, on integer codes.

    ``codes`` (int64, value = codes * 2**-frac_in) are moved to ``frac_out``
    fractional bits, rounding with mode ``q`` when bits are dropped (exact when
    bits are added), then overflow mode ``o`` maps the result into ``width`` bits.
    ``frac_in`` / ``frac_out``: ints or integer arrays broadcastable to ``codes``.
    Left shifts that leave int64 are still handled exactly (saturation compares
    against shifted limits; wrap keeps the low bits). ``in_bits``, when the
    caller knows from the formats that every code fits that many signed bits,
    spares the range scan of the fast path (a wrong claim gives wrong results).
    """
    _check_width(width, "requantize")
    _check_mode("q", q, QUANT_MODES, "requantize")
    _check_mode("o", o, OVERFLOW_MODES, "requantize")
    c = _as_codes(codes)
    d = _as_shift(frac_out, "frac_out") - _as_shift(frac_in, "frac_in")
    _, hi = _limits(width, signed)
    lo = _sym_lo(width, signed, o)
    fast = _requantize_fast(c, d, width, signed, q, o, lo, hi, in_bits)
    if fast is not None:
        return fast
    if d.ndim == 0 and int(d) <= 0:  # common case: one right shift (or none)
        r = _round_shift(c, -d, q)
        wrapped = _wrap(r.view(np.uint64), width, signed)
        return wrapped if o == "AP_WRAP" else _saturate(wrapped, r > hi, r < lo, width, signed, o)
    if d.ndim:
        c, d = np.broadcast_arrays(c, d)
    # right shifts (d < 0): the rounded value fits int64
    r = _round_shift(c, np.maximum(-d, 0), q)
    # left shifts (d > 0): the value c * 2**d may leave int64; only its low bits are kept
    dl = np.clip(d, 0, 63)
    left = d > 0
    u = np.where(left, np.where(d >= 64, np.uint64(0), c.view(np.uint64) << dl.astype(np.uint64)), r.view(np.uint64))
    wrapped = _wrap(u, width, signed)
    if o == "AP_WRAP":
        return wrapped
    # out of range <=> c*2**d > hi <=> c > floor(hi / 2**d); c*2**d < lo <=> c < ceil(lo / 2**d)
    over = np.where(left, c > (hi >> dl), r > hi)
    under = np.where(left, c < -((-lo) >> dl), r < lo)
    return _saturate(wrapped, over, under, width, signed, o)


_FAST_LIMIT = 1 << 61


def _requantize_fast(c: np.ndarray, d: np.ndarray, width: int, signed: bool, q: str, o: str,
                     lo: int, hi: int, in_bits: int | None = None) -> np.ndarray | None:
    """The kernels' hot case, in a few array passes: AP_TRN or AP_RND, AP_WRAP or
    AP_SAT, every shift a right shift of 0..62 bits, |codes| < 2**61 (so
    ``c + 2**(s-1)`` cannot overflow). Returns None when the case does not apply;
    identical results to the general path (the ap_fixed parity test covers both)."""
    if q not in ("AP_TRN", "AP_RND") or o not in ("AP_WRAP", "AP_SAT") or not c.size:
        return None
    s = -d
    if (int(s.min()) if s.ndim else int(s)) < 0 or (int(s.max()) if s.ndim else int(s)) > 62:
        return None
    if in_bits is None or in_bits > 62:
        if int(c.max()) >= _FAST_LIMIT or int(c.min()) < -_FAST_LIMIT:
            return None
    if q == "AP_RND":
        r = c + ((np.int64(1) << s) >> 1)  # + half an output LSB (0 when s == 0)
        r >>= s
    else:
        r = c >> s
    r = np.asarray(r, dtype=np.int64)
    if o == "AP_SAT":
        if r.ndim == 0:
            return np.asarray(min(max(int(r), lo), hi), dtype=np.int64)
        np.minimum(r, hi, out=r)
        np.maximum(r, lo, out=r)
        return r
    return _wrap(r.view(np.uint64), width, signed)


def bits_for_range(lo: int, hi: int, signed: bool) -> int:
    """Minimal width W >= 1 of a (un)signed integer holding every integer in [lo, hi]."""
    lo, hi = int(lo), int(hi)
    if lo > hi:
        raise ValueError(f"bits_for_range needs lo <= hi, got lo={lo}, hi={hi}")
    if signed:
        return max(1, hi.bit_length() + 1 if hi > 0 else 1, (-lo - 1).bit_length() + 1 if lo < 0 else 1)
    if lo < 0:
        raise ValueError(f"bits_for_range: an unsigned integer cannot hold lo={lo}")
    return max(1, hi.bit_length())


# ----------------------------------------------------------------------------------------
# the format


@dataclass(frozen=True)
class FixedType:
    """``ap_fixed<width, int_bits, q, o>`` (signed) or ``ap_ufixed<...>`` (unsigned)."""

    width: int
    int_bits: int
    signed: bool = True
    q: str = "AP_TRN"
    o: str = "AP_WRAP"

    def __post_init__(self) -> None:
        if not _is_int(self.width) or not 1 <= self.width <= MAX_WIDTH:
            raise FixedFormatError(f"FixedType width must be an int in 1..{MAX_WIDTH}, got {self.width!r}")
        if not _is_int(self.int_bits):
            raise FixedFormatError(f"FixedType int_bits must be an int, got {self.int_bits!r}")
        if not isinstance(self.signed, (bool, np.bool_)):
            raise FixedFormatError(f"FixedType signed must be a bool, got {self.signed!r}")
        _check_mode("q", self.q, QUANT_MODES, "FixedType")
        _check_mode("o", self.o, OVERFLOW_MODES, "FixedType")
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "int_bits", int(self.int_bits))
        object.__setattr__(self, "signed", bool(self.signed))

    @property
    def frac_bits(self) -> int:
        return self.width - self.int_bits

    @property
    def min_code(self) -> int:
        return _limits(self.width, self.signed)[0]

    @property
    def max_code(self) -> int:
        return _limits(self.width, self.signed)[1]

    @property
    def lsb(self) -> float:
        return 2.0 ** -self.frac_bits

    def from_float(self, x: npt.ArrayLike) -> np.ndarray:
        """The stored integer of ``ap_[u]fixed<W,I,Q,O> v = (double)x`` (exact for every double).

        Mirrors ``ap_fixed_base(double d)`` (ap_fixed_base.h l.519-534): the double is
        split into its raw fields and the value taken as +-(2**52 | mantissa) *
        2**(E - 1075) (E the biased exponent field), the implicit bit *always* set
        (``man.V = _AP_ROOT_op_set_bit(man.V, DOUBLE_MAN, 1)``), so a subnormal is read
        as (1.f) * 2**-1023 -- the header quirk reproduced here (visible only for formats
        with more than ~1020 fractional bits). +-0.0 -> 0. NaN/Inf raise ValueError.
        The integer (mantissa, exponent) pair then goes through ``requantize``.
        """
        a = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError("FixedType.from_float: NaN or Inf cannot be converted to fixed point")
        bits = a.view(np.uint64)
        exp = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64) - 1023
        man = ((bits & np.uint64((1 << 52) - 1)) | np.uint64(1 << 52)).astype(np.int64)
        man = np.where(bits >> np.uint64(63) == 1, -man, man)
        zero = (bits & np.uint64(0x7FFF_FFFF_FFFF_FFFF)) == 0
        man = np.where(zero, 0, man)
        return requantize(man, 52 - exp, self.width, self.frac_bits, self.signed, self.q, self.o)

    def to_float(self, codes: IntLike) -> np.ndarray:
        """codes * 2**-frac_bits as float64 (exact: |codes| < 2**48)."""
        return np.ldexp(np.asarray(codes, dtype=np.int64).astype(np.float64), -self.frac_bits)

    def quantize(self, codes: IntLike, frac_bits: IntLike, in_bits: int | None = None) -> np.ndarray:
        """``ap_fixed<W,I,Q,O> v = src`` for source codes with ``frac_bits`` fractional bits
        (``in_bits``: see :func:`requantize`)."""
        return requantize(codes, frac_bits, self.width, self.frac_bits, self.signed, self.q, self.o,
                          in_bits=in_bits)

    def with_modes(self, q: str | None = None, o: str | None = None) -> "FixedType":
        return FixedType(self.width, self.int_bits, self.signed,
                         self.q if q is None else q, self.o if o is None else o)

    def to_dict(self) -> dict:
        return {"width": self.width, "int_bits": self.int_bits, "signed": self.signed, "q": self.q, "o": self.o}

    @classmethod
    def from_dict(cls, d: dict) -> "FixedType":
        if not isinstance(d, dict):
            raise FixedFormatError(f"FixedType.from_dict needs a dict, got {type(d).__name__}")
        keys = {"width", "int_bits", "signed", "q", "o"}
        missing = sorted({"width", "int_bits"} - set(d))
        if missing:
            raise FixedFormatError(f"FixedType dict is missing {', '.join(missing)}")
        extra = sorted(set(d) - keys)
        if extra:
            raise FixedFormatError(f"FixedType dict has unknown keys {', '.join(extra)}")
        return cls(**d)

    def ctype(self) -> str:
        kind = "ap_fixed" if self.signed else "ap_ufixed"
        return f"{kind}<{self.width},{self.int_bits},{self.q},{self.o}>"

    def __str__(self) -> str:
        return self.ctype()
