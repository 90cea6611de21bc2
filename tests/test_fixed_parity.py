"""hwgen.fixed against the real C++ ap_fixed headers (the external oracle of the contract).

The headers ship in hls4ml (templates/vivado/ap_types). tests/apfixed_harness/harness.cpp
is compiled with g++ against them for a generated table of formats x all 28
(quantization, overflow) pairs; the binaries are cached under .hwgen-cache/apfixed/
keyed by a hash of the source, the generated table, the headers, the flags and the
compiler version, so reruns skip compilation.

Cases, every one compared integer for integer (0 mismatches is the only pass):
  * double -> ap_[u]fixed<W,I,Q,O> vs FixedType.from_float, >= 100,000 values per case;
  * ap_[u]fixed<W1,I1> -> ap_[u]fixed<W,I,Q,O> vs FixedType.quantize;
  * per channel: one requantize call with per-element frac_in / frac_out arrays over
    all (source, destination) pairs of a destination width, vs the same header outputs.
The per-case mismatch table goes to .hwgen-cache/apfixed/parity_report.txt.
A missing g++ or missing headers is a failure, not a skip.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from hwgen.fixed import OVERFLOW_MODES, QUANT_MODES, FixedType, requantize

REPO = Path(__file__).resolve().parents[1]
HARNESS_SRC = Path(__file__).resolve().parent / "apfixed_harness" / "harness.cpp"
CACHE = REPO / ".hwgen-cache" / "apfixed"
CXX = os.environ.get("HWGEN_CXX", "/usr/bin/g++")
CXXFLAGS = ["-O1", "-std=c++14", "-w"]
N_PARTS = 4  # the table is split over this many binaries, built and run in parallel
MIN_VALUES = 100_000
MODE_PAIRS = [(q, o) for q in QUANT_MODES for o in OVERFLOW_MODES]  # order of harness.cpp rows

# ---------------------------------------------------------------------------------------
# the case table


def _spread_formats() -> list[tuple[int, int, bool]]:
    """(width, int_bits, signed): every width with int_bits negative / zero / inside /
    equal to the width / beyond it, rotated so each category meets both signs at
    several widths; plus width 1 and formats whose LSB or MSB sits at the ends of the
    double range (they exercise the header's subnormal handling and huge shifts)."""
    widths = (2, 3, 5, 8, 12, 16, 24, 32)
    cats = ("neg", "zero", "inside", "equal", "beyond")

    def ib(w: int, cat: str) -> int:
        return {"neg": -3, "zero": 0, "inside": max(1, w // 3), "equal": w, "beyond": w + 5}[cat]

    fmts = []
    for i, w in enumerate(widths):
        for signed, offset in ((True, 0), (False, 2)):
            for k in (0, 1):
                cat = cats[(2 * i + k + offset) % len(cats)]
                fmts.append((w, ib(w, cat), signed))
    fmts += [(1, 0, True), (1, 1, False), (1, 3, True),
             (12, -1030, True), (8, -1070, False), (16, 1000, True), (20, 10, True)]
    return fmts


# fixed -> fixed: sources (W1, I1, signed) and destinations (W, I, signed).
SOURCES = {"A": (16, 6, True), "B": (12, 4, False), "C": (32, 12, True), "D": (8, 8, True)}
DESTS = {"d1": (8, 3, True), "d2": (8, -1, True), "d3": (8, 10, True), "d4": (10, 5, False)}
# The header's operator= reads bit F1-F-1 of the source with an assert, so a right shift
# longer than the source width aborts in C simulation; every pair keeps F1 - F <= W1.
PAIRS = [("A", "d1"), ("A", "d2"), ("A", "d3"), ("A", "d4"), ("B", "d1"), ("B", "d4"),
         ("C", "d1"), ("C", "d3"), ("D", "d2"), ("D", "d4")]


def _ctype(w: int, i: int, s: bool) -> str:
    return f"{'ap_fixed' if s else 'ap_ufixed'}<{w},{i}>"


@dataclass(eq=False)
class Group:
    kind: str  # "double" or "fixed"
    dst: tuple[int, int, bool]
    src: tuple[int, int, bool] | None = None
    pair: tuple[str, str] | None = None
    inputs: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def row(self) -> str:
        w, i, s = self.dst
        sb = "true" if s else "false"
        if self.kind == "double":
            fns = [f"&from_double<{w},{i},{sb},{q},{o}>" for q, o in MODE_PAIRS]
        else:
            w1, i1, s1 = self.src
            fns = [f"&from_fixed<{w1},{i1},{'true' if s1 else 'false'},{w},{i},{sb},{q},{o}>" for q, o in MODE_PAIRS]
        return "  {{" + ", ".join(fns) + "}},"

    def name(self, q: str, o: str) -> str:
        dst = FixedType(*self.dst, q=q, o=o).ctype()
        return f"{dst} = double" if self.kind == "double" else f"{dst} = {_ctype(*self.src)}"


def _values_for(w: int, i: int, s: bool, seed: int) -> np.ndarray:
    """>= MIN_VALUES doubles aimed at one format: ties, +-1 ulp around ties, boundary codes,
    out-of-range and tiny values, signed zeros, subnormals, random spreads."""
    rng = np.random.default_rng(seed)
    f = w - i
    mn, mx = (-(1 << (w - 1)), (1 << (w - 1)) - 1) if s else (0, (1 << w) - 1)
    span = mx - mn + 1
    lo_k, hi_k = mn - span, mx + span  # codes one format-range beyond each side
    edge = np.concatenate([np.arange(mn - 3, mn + 4), np.arange(mx - 3, mx + 4), np.arange(-3, 4)])
    edge = edge.astype(np.float64)  # min/max codes and 1..3 LSB beyond, codes around 0
    rk = rng.integers(lo_k, hi_k + 1, size=12_000).astype(np.float64)
    ties = np.ldexp(np.concatenate([2 * edge + 1, 2 * edge - 1, 2 * rk + 1]), -(f + 1))  # (k + 1/2) LSB
    quarters = np.ldexp(np.concatenate([4 * edge + 1, 4 * edge + 3, 4 * rk[:4000] + 1, 4 * rk[4000:8000] + 3]),
                        -(f + 2))
    codes = np.ldexp(np.concatenate([edge, rk[:6000]]), -f)
    near = np.concatenate([ties, codes])
    sign = rng.choice([-1.0, 1.0], 20_000)
    subnormal_bits = rng.integers(1, 2**52, 2000, dtype=np.uint64)
    subnormal_bits |= (sign[:2000] < 0).astype(np.uint64) << np.uint64(63)
    parts = [
        ties, quarters, codes,
        np.nextafter(near, np.inf), np.nextafter(near, -np.inf),                      # one ulp either side
        np.ldexp(rng.uniform(lo_k, hi_k, 15_000), -f),                                # uniform over 3x the range
        np.ldexp(sign[:15_000] * 2.0 ** rng.uniform(-12, np.log2(span) + 12, 15_000), -f),  # log-uniform
        np.ldexp(sign[15_000:19_000] * float(span) * 10.0 ** rng.uniform(0, 3, 4000), -f),  # up to 1e3x range
        rng.standard_normal(3000) * 10.0 ** rng.uniform(-6, 6, 3000),                 # absolute scales
        np.frombuffer(rng.bytes(8 * 3000), dtype=np.float64),                         # any bit pattern
        subnormal_bits.view(np.float64),
        np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e30, -1e30, 1e-30, -1e-30, 1e300, -1e300,
                  5e-324, -5e-324, 2.2250738585072014e-308, -2.2250738585072014e-308,
                  2.225073858507201e-308, -2.225073858507201e-308,
                  np.finfo(np.float64).max, -np.finfo(np.float64).max, 2.0**-1023, -(2.0**-1023)]),
    ]
    x = np.concatenate(parts)
    x = x[np.isfinite(x)]
    if x.size < MIN_VALUES:  # formats at the edge of the double range lose some of the above to inf
        extra = rng.standard_normal(MIN_VALUES - x.size) * 10.0 ** rng.uniform(-300, 300, MIN_VALUES - x.size)
        x = np.concatenate([x, extra])
    return x


def _source_codes(w: int, s: bool, seed: int) -> np.ndarray:
    mn, mx = (-(1 << (w - 1)), (1 << (w - 1)) - 1) if s else (0, (1 << w) - 1)
    if w <= 16:
        return np.arange(mn, mx + 1, dtype=np.int64)  # exhaustive
    rng = np.random.default_rng(seed)
    edge = np.concatenate([np.arange(mn, mn + 64), np.arange(mx - 63, mx + 1), np.arange(-64, 64)])
    small = rng.integers(-(1 << 20), 1 << 20, 20_000)  # fine structure near zero
    return np.concatenate([edge, small, rng.integers(mn, mx + 1, MIN_VALUES)]).astype(np.int64)


def _groups() -> list[Group]:
    gs = [Group("double", fmt, inputs=_values_for(*fmt, seed=1000 + n)) for n, fmt in enumerate(_spread_formats())]
    for n, (a, d) in enumerate(PAIRS):
        src = SOURCES[a]
        gs.append(Group("fixed", DESTS[d], src=src, pair=(a, d), inputs=_source_codes(src[0], src[2], seed=2000 + n)))
    return gs


# ---------------------------------------------------------------------------------------
# building and running the harness


def _headers_dir() -> Path:
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("hls4ml is not installed: its ap_fixed headers are the oracle of this test "
                    "(pip install hls4ml, see pyproject.toml)")
    d = Path(list(spec.submodule_search_locations)[0]) / "templates" / "vivado" / "ap_types"
    if not (d / "ap_fixed.h").is_file() or not (d / "ap_int.h").is_file():
        pytest.fail(f"ap_fixed headers not found in {d} (expected ap_fixed.h and ap_int.h there)")
    return d


def _compiler() -> str:
    cxx = shutil.which(CXX)
    if cxx is None:
        pytest.fail(f"C++ compiler {CXX!r} not found: the ap_fixed parity test needs g++ "
                    "(apt-get install g++, or set HWGEN_CXX)")
    return cxx


def _build(groups_by_part: list[list[Group]]) -> list[Path]:
    """Compile one binary per part (in parallel), or reuse the cached ones."""
    hdr, cxx = _headers_dir(), _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    h.update(HARNESS_SRC.read_bytes())
    h.update(" ".join(CXXFLAGS).encode() + version.encode())
    for p in sorted(hdr.rglob("*.h")):
        h.update(p.name.encode() + p.read_bytes())
    incs = ["static const Group GROUPS[] = {\n" + "\n".join(g.row() for g in part) + "\n};\n"
            for part in groups_by_part]
    for inc in incs:
        h.update(inc.encode())
    out = CACHE / h.hexdigest()[:20]
    bins = [out / f"harness{k}" for k in range(len(incs))]
    if all(b.is_file() for b in bins):
        return bins
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # concurrent sessions build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        _compile_parts(cxx, hdr, out, incs, bins)
    return bins


def _compile_parts(cxx: str, hdr: Path, out: Path, incs: list[str], bins: list[Path]) -> None:
    """g++ each part's table into its binary (written under a temp name, then renamed)."""

    def compile_part(k: int) -> None:
        if bins[k].is_file():
            return
        src_dir = out / f"part{k}"
        src_dir.mkdir(exist_ok=True)
        (src_dir / "cases.inc").write_text(incs[k])
        tmp = bins[k].with_name(f"{bins[k].name}.tmp{os.getpid()}")
        cmd = [cxx, *CXXFLAGS, f"-I{hdr}", f"-I{src_dir}", str(HARNESS_SRC), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling the ap_fixed harness failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.replace(tmp, bins[k])

    with ThreadPoolExecutor(max_workers=max(1, min(len(incs), os.cpu_count() or 1))) as ex:
        for fut in [ex.submit(compile_part, k) for k in range(len(incs))]:
            fut.result()


def _split(groups: list[Group]) -> list[list[Group]]:
    """Balance parts by instantiation count (compile time) and values (run time)."""
    parts: list[list[Group]] = [[] for _ in range(N_PARTS)]
    load = [0.0] * N_PARTS
    for g in sorted(groups, key=lambda g: -g.inputs.size):
        k = load.index(min(load))
        parts[k].append(g)
        load[k] += 1.0 + g.inputs.size / MIN_VALUES
    return parts


@dataclass
class CaseResult:
    name: str
    kind: str
    n: int
    mismatches: int
    examples: list[str]


def _expected(g: Group, q: str, o: str) -> np.ndarray:
    t = FixedType(*g.dst, q=q, o=o)
    if g.kind == "double":
        return t.from_float(g.inputs)
    return t.quantize(g.inputs, g.src[0] - g.src[1])


def _run_part(
    binary: Path, part: list[Group], workdir: Path, results: dict, kept: dict, lock: threading.Lock
) -> None:
    """Run one harness binary and compare each case with hwgen.fixed as its output streams in."""
    inp = workdir / f"{binary.name}.in"
    with open(inp, "wb") as fh:
        for g in part:
            fh.write(np.int64(g.inputs.size).tobytes())
            fh.write(np.ascontiguousarray(g.inputs).view(np.int64).tobytes())
    proc = subprocess.Popen([str(binary), str(inp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for g in part:
            for q, o in MODE_PAIRS:
                nbytes = 8 * g.inputs.size
                buf = proc.stdout.read(nbytes)
                if len(buf) != nbytes:
                    proc.wait()
                    raise RuntimeError(f"harness {binary} stopped early (exit {proc.returncode}) at "
                                       f"{g.name(q, o)}: {proc.stderr.read().decode()[-2000:]}")
                got = np.frombuffer(buf, dtype=np.int64)
                exp = _expected(g, q, o)
                bad = np.flatnonzero(got != exp)
                ex = [f"in={g.inputs[j].item()!r} header={got[j]} numpy={exp[j]}" for j in bad[:3]]
                with lock:
                    results[(id(g), q, o)] = CaseResult(g.name(q, o), g.kind, g.inputs.size, bad.size, ex)
                    if g.kind == "fixed":  # kept for the per-channel check (destinations are <= 16 bits)
                        kept[(id(g), q, o)] = got.astype(np.int16)
    finally:
        proc.stdout.close()
        rc = proc.wait()
        err = proc.stderr.read().decode()
        proc.stderr.close()
    if rc != 0:
        raise RuntimeError(f"harness {binary} exited with {rc}: {err[-2000:]}")


def _per_channel(groups: list[Group], kept: dict) -> list[CaseResult]:
    """One requantize call per (destination width/sign, q, o) with per-element frac_in and
    frac_out arrays (several sources and destinations mixed) against the header outputs."""
    fixed = [g for g in groups if g.kind == "fixed"]
    out = []
    for w, s in sorted({(g.dst[0], g.dst[2]) for g in fixed}):
        members = [g for g in fixed if (g.dst[0], g.dst[2]) == (w, s)]
        codes = np.concatenate([g.inputs for g in members])
        fin = np.concatenate([np.full(g.inputs.size, g.src[0] - g.src[1]) for g in members])
        fout = np.concatenate([np.full(g.inputs.size, g.dst[0] - g.dst[1]) for g in members])
        for q, o in MODE_PAIRS:
            want = np.concatenate([kept[(id(g), q, o)] for g in members])
            got = requantize(codes, fin, w, fout, s, q, o)
            bad = np.flatnonzero(got != want)
            ex = [f"code={codes[j]} frac_in={fin[j]} frac_out={fout[j]} header={want[j]} numpy={got[j]}"
                  for j in bad[:3]]
            out.append(CaseResult(f"requantize(width={w}, signed={s}, {q}, {o}) over {len(members)} pairs",
                                  "per-channel", codes.size, bad.size, ex))
    return out


def test_ap_fixed_header_parity(tmp_path: Path) -> None:
    """Every case of the table, one run (a single test so pytest-xdist runs it once)."""
    t0 = time.perf_counter()
    groups = _groups()
    parts = _split(groups)
    bins = _build(parts)
    t_build = time.perf_counter() - t0
    results: dict = {}
    kept: dict = {}
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=len(bins)) as ex:
        for fut in [ex.submit(_run_part, b, p, tmp_path, results, kept, lock) for b, p in zip(bins, parts)]:
            fut.result()
    cases = [results[(id(g), q, o)] for g in groups for q, o in MODE_PAIRS] + _per_channel(groups, kept)
    t_total = time.perf_counter() - t0

    lines = []
    for kind in ("double", "fixed", "per-channel"):
        cs = [c for c in cases if c.kind == kind]
        lines.append(f"{kind}: {len(cs)} cases, {min(c.n for c in cs)}..{max(c.n for c in cs)} values per case, "
                     f"{sum(c.n for c in cs)} values, {sum(c.mismatches for c in cs)} mismatches")
    summary = "\n".join(lines) + f"\n(build {t_build:.1f}s, total {t_total:.1f}s)"
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "parity_report.txt").write_text(
        summary + "\n\n" + "\n".join(f"{c.mismatches:>8} / {c.n:<8} {c.name}" for c in cases) + "\n")
    print("\nap_fixed header parity (per case: .hwgen-cache/apfixed/parity_report.txt)\n" + summary)

    n_double = sum(g.kind == "double" for g in groups)
    assert sum(c.kind == "double" for c in cases) == n_double * len(MODE_PAIRS)
    assert sum(c.kind == "fixed" for c in cases) == len(PAIRS) * len(MODE_PAIRS)
    assert min(c.n for c in cases if c.kind == "double") >= MIN_VALUES
    bad = [c for c in cases if c.mismatches]
    report = [f"{len(bad)} of {len(cases)} cases mismatch, {sum(c.mismatches for c in cases)} values in all:"]
    report += [f"  {c.name}: {c.mismatches}/{c.n}  e.g. " + "; ".join(c.examples) for c in bad[:40]]
    assert not bad, "\n".join(report)
