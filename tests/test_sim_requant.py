"""cocotb bench of hwgen.rtl.Requant (on Icarus: instant builds; the
engines that contain it run on Verilator in test_sim_matmul.py): AP_RND / AP_SAT
corner codes (rounding ties of both signs, saturation at both ends, per-lane
shifts of both signs) bit-exact against hwgen.fixed.requantize, and the
mutation check: a variant that truncates instead of rounding must make the
bench report mismatches > 0 (so the bench can fail)."""
import numpy as np
from amaranth import Module, Mux, Signal, signed

from hwgen.rtl import Requant
from hwgen.rtl.verify import _sim_package

_sim_package()
from sim.kernels import requant_bench  # noqa: E402

SHIFTS = [3, 0, -2, 7]


def corner_codes(in_width=20, shifts=SHIFTS, n_random=64, seed=0):
    """Ties (+-0.5 LSB after the shift), values next to them, both saturation
    ends and random codes, for every lane's shift."""
    lo, hi = -(1 << (in_width - 1)), (1 << (in_width - 1)) - 1
    rows = []
    for s in shifts:
        half = 1 << (s - 1) if s > 0 else 0
        base = [0, 1, -1, lo, hi, lo + 1, hi - 1]
        if s > 0:
            for q in (-3, -1, 0, 1, 2, 127, -128, 200, -200):
                t = (q << s) + half  # exact tie
                base += [t, t - 1, t + 1]
        rows.append(base)
    n = max(len(r) for r in rows)
    cols = [np.resize(np.array(r, np.int64), n) for r in rows]
    rng = np.random.default_rng(seed)
    rand = rng.integers(lo, hi + 1, (n_random, len(shifts)))
    return np.clip(np.concatenate([np.stack(cols, 1), rand]), lo, hi)


def test_requant_corner_cases():
    x = corner_codes()
    r = requant_bench(20, SHIFTS, 8, x, lanes=4, registered=True, sim="icarus")
    print("requant:", {k: r[k] for k in ("mismatches", "vectors", "cycles")})
    assert r["vectors"] == x.size
    assert r["mismatches"] == 0, r["first_mismatches"]
    assert r["cycles"] == len(x) + 1  # latency 1


def test_requant_icarus_combinational_unsigned():
    x = corner_codes(shifts=[4, -1], n_random=16)
    r = requant_bench(20, [4, -1], 6, x, out_signed=False, lanes=2, registered=False, sim="icarus")
    assert r["vectors"] == x.size and r["simulator"] == "icarus"
    assert r["mismatches"] == 0, r["first_mismatches"]


class TruncatingRequant(Requant):
    """Mutant: AP_TRN (floor) instead of AP_RND -- the bench must catch it."""

    def elaborate(self, platform):
        m = Module()
        dom = m.d.sync if self.registered else m.d.comb
        for lane, s in enumerate(self.shifts):
            c = self.i[lane]
            r = c >> s if s > 0 else (c if s == 0 else c << -s)
            rv = Signal(signed(max(len(r), self.out_width + 1, 2)), name=f"r_{lane}")
            m.d.comb += rv.eq(r)
            dom += self.o[lane].eq(Mux(rv > self.hi, self.hi, Mux(rv < self.lo, self.lo, rv[:self.out_width])))
        return m


def test_mutation_truncation_is_caught():
    x = corner_codes()
    mutant = TruncatingRequant(20, SHIFTS, 8, True, 4, True)
    r = requant_bench(20, SHIFTS, 8, x, lanes=4, registered=True, component=mutant, sim="icarus")
    print("mutant mismatches:", r["mismatches"], r["first_mismatches"][:2])
    assert r["mismatches"] > 0
    m = r["first_mismatches"][0]
    assert m["expected"] == m["actual"] + 1  # rounding up vs truncating down: one code apart
