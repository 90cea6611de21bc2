"""C-simulation of emitted HLS kernels with g++ against the ap_fixed headers.

:func:`csim` emits the kernels for some nodes of a fixed graph, compiles them
with one shared testbench (``g++ -O2 -std=c++14 -I <ap_types>``) into a build
directory named by the sha256 of everything that decides the binary (sources,
flags, compiler version, header contents), and runs it on integer input codes.
A build whose hash matches is reused; any change gives a new directory, so a
stale binary is never run. Directories are written under a temporary name and
renamed, so a failed build leaves nothing behind.

The compiler is ``$HWGEN_CXX`` or ``g++``; the headers come from the hls4ml
package (``templates/vivado/ap_types``) or ``$HWGEN_AP_TYPES``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..ir import Graph, Node
from .emit import DEFAULT_PAR, HLSError, KernelSources, emit_kernels

CXXFLAGS = ("-O2", "-std=c++14", "-w")
_REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = _REPO / ".hwgen-cache" / "hls"


def ap_types_dir() -> Path:
    """The ap_fixed headers: ``$HWGEN_AP_TYPES`` or hls4ml's templates/vivado/ap_types."""
    env = os.environ.get("HWGEN_AP_TYPES")
    if env:
        d = Path(env)
    else:
        spec = importlib.util.find_spec("hls4ml")
        if spec is None or not spec.submodule_search_locations:
            raise HLSError("the ap_fixed headers were not found: install hls4ml "
                           "(pip install hls4ml) or set HWGEN_AP_TYPES to a folder holding ap_fixed.h")
        d = Path(list(spec.submodule_search_locations)[0]) / "templates" / "vivado" / "ap_types"
    if not (d / "ap_fixed.h").is_file() or not (d / "ap_int.h").is_file():
        raise HLSError(f"the ap_fixed headers (ap_fixed.h, ap_int.h) are missing from {d}: "
                       "reinstall hls4ml or set HWGEN_AP_TYPES")
    return d


def compiler() -> str:
    cxx = os.environ.get("HWGEN_CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise HLSError(f"C++ compiler '{cxx}' not found: HLS C-simulation needs g++ "
                       "(apt-get install g++, or set HWGEN_CXX)")
    return path


@lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise HLSError(f"C++ compiler '{cxx}' cannot run: {e}") from None
    return r.stdout.splitlines()[0] if r.stdout else cxx


@lru_cache(maxsize=None)
def _headers_digest(d: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(d).rglob("*.h")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def build_key(files: dict[str, str], cxx: str, inc: Path) -> str:
    h = hashlib.sha256()
    for part in (_compiler_id(cxx), " ".join(CXXFLAGS), _headers_digest(str(inc))):
        h.update(part.encode() + b"\0")
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()


def _first_errors(text: str, n: int = 8) -> str:
    lines = text.splitlines()
    errs = [i for i, ln in enumerate(lines) if "error" in ln]
    start = errs[0] if errs else 0
    return "\n".join(lines[start:start + n])


def build(files: dict[str, str], cache: Path | None = None) -> Path:
    """Compile ``files`` (one ``*_tb.cpp`` among them) and return the binary's path."""
    cxx = compiler()
    inc = ap_types_dir()
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    key = build_key(files, cxx, inc)
    final = cache / key[:24]
    exe = final / "csim"
    if exe.is_file():
        return exe
    tbs = [f for f in files if f.endswith("_tb.cpp")]
    if len(tbs) != 1:
        raise HLSError(f"expected one testbench (*_tb.cpp) among the sources, got {tbs}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        cmd = [cxx, *CXXFLAGS, "-I", str(inc), "-I", str(tmp), str(tmp / tbs[0]), "-o", str(tmp / "csim")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise HLSError(f"g++ failed on the generated HLS sources ({tbs[0]}):\n"
                           f"{_first_errors(r.stderr)}")
        try:
            os.rename(tmp, final)
        except OSError:
            if not exe.is_file():  # lost a race to an identical build: use that one
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return exe


def _check_codes(ks: KernelSources, x: np.ndarray, k: int | None = None, fmt=None,
                 what: str = "input") -> np.ndarray:
    k = ks.k if k is None else k
    fmt = ks.x_fmt if fmt is None else fmt
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise HLSError(f"kernel '{ks.name}': {what} codes must be integers, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise HLSError(f"kernel '{ks.name}': {what} has shape {list(x.shape)}; the last axis "
                       f"must be {'K = ' if what == 'input' else ''}{k}")
    x = x.astype(np.int64)
    lo, hi = fmt.min_code, fmt.max_code
    if x.size and (x.min() < lo or x.max() > hi):
        raise HLSError(f"kernel '{ks.name}': {what} codes outside {fmt} [{lo}, {hi}]")
    return x


def _pack(ks: KernelSources, x) -> tuple[np.ndarray, tuple[int, ...]]:
    """Input rows (one testbench record per row) and the output shape of one kernel.

    Row kernels (linear, layernorm, gelu): codes (..., K). ``add``: a pair
    ``(a, b)`` of codes (..., H). ``attention``: ``(q, k, v)`` or
    ``(q, k, v, mask)`` or ``(q, k, v, mask, offset)``: q (B, S_q, DM), k and v
    (B, S_kv, DM), mask (B, S_kv) 0/1 (None: every key valid), offset the
    causal position of query 0.
    """
    if ks.op == "add":
        if not isinstance(x, (tuple, list)) or len(x) != 2:
            raise HLSError(f"kernel '{ks.name}' (add) takes a pair (a, b) of code arrays")
        af, bf = ks.meta["in_fmts"]
        a = _check_codes(ks, x[0], ks.n, af, "input a")
        b = _check_codes(ks, x[1], ks.n, bf, "input b")
        if a.shape != b.shape:
            raise HLSError(f"kernel '{ks.name}': inputs have shapes {list(a.shape)} and {list(b.shape)}")
        return np.concatenate([a, b], axis=-1).reshape(-1, 2 * ks.n), a.shape
    if ks.op == "attention":
        if not isinstance(x, (tuple, list)) or not 3 <= len(x) <= 5:
            raise HLSError(f"kernel '{ks.name}' (attention) takes (q, k, v[, mask[, offset]])")
        qf, kf, vf = ks.meta["in_fmts"]
        q = _check_codes(ks, x[0], ks.k, qf, "q")
        k = _check_codes(ks, x[1], ks.k, kf, "k")
        v = _check_codes(ks, x[2], ks.k, vf, "v")
        mask = x[3] if len(x) > 3 else None
        offset = int(x[4]) if len(x) > 4 else 0
        if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or k.shape[0] != q.shape[0]:
            raise HLSError(f"kernel '{ks.name}': q {list(q.shape)}, k {list(k.shape)}, v "
                           f"{list(v.shape)}: expected (B, S_q, DM), (B, S_kv, DM) twice")
        b, sq, skv = q.shape[0], q.shape[1], k.shape[1]
        if max(sq, skv) > ks.meta["s_max"]:
            raise HLSError(f"kernel '{ks.name}': sequence of {max(sq, skv)} positions; the kernel "
                           f"holds at most S_MAX = {ks.meta['s_max']} (emit it with a larger max_seq)")
        parts = [np.tile([sq, skv, offset], (b, 1)), q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1)]
        if ks.meta["has_mask"]:
            m = np.ones((b, skv), np.int64) if mask is None else (np.asarray(mask) != 0).astype(np.int64)
            if m.shape != (b, skv):
                raise HLSError(f"kernel '{ks.name}': mask has shape {list(m.shape)}, expected {[b, skv]}")
            parts.append(m)
        elif mask is not None:
            raise HLSError(f"kernel '{ks.name}': the node has no padding-mask input")
        return np.concatenate(parts, axis=1), q.shape
    xx = _check_codes(ks, x)
    return xx.reshape(-1, ks.k), (*xx.shape[:-1], ks.n)


def write_rows(path: Path, rows: np.ndarray) -> None:
    """A testbench input file: the number of rows, then one record per line."""
    with open(path, "w") as f:
        f.write(f"{len(rows)}\n")
        np.savetxt(f, rows, fmt="%d")


def write_vectors(ks: KernelSources, x, y: np.ndarray, stem: Path) -> int:
    """``<stem>.in`` (testbench input records for inputs ``x``, as :func:`run_csim` takes
    them) and ``<stem>.golden`` (the expected output codes ``y``, one line per record);
    returns the number of records."""
    rows, shape = _pack(ks, x)
    y = np.asarray(y).astype(np.int64)
    if tuple(y.shape) != tuple(shape):
        raise HLSError(f"kernel '{ks.name}': expected outputs have shape {list(y.shape)}, "
                       f"the inputs give {list(shape)}")
    write_rows(Path(f"{stem}.in"), rows)
    with open(f"{stem}.golden", "w") as f:
        np.savetxt(f, y.reshape(max(len(rows), 1), -1) if y.size else np.zeros((0, 0)), fmt="%d")
    return len(rows)


def run_csim(graph: Graph, inputs: dict[str, np.ndarray], par: int = DEFAULT_PAR,
         cache: Path | None = None) -> dict[str, np.ndarray]:
    """C-simulate the kernels of the nodes named in ``inputs`` (node name -> input
    codes: for linear, layernorm, gelu an array shaped (..., K); for add and
    attention a tuple, see :func:`_pack`); returns node name -> output codes.
    All kernels are compiled into one binary (cached by the hash of its sources)."""
    ks, files = emit_kernels(graph, list(inputs), par)
    xs = {k.node: _pack(k, inputs[k.node]) for k in ks}
    exe = build(files, cache)
    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="hwgen-csim-") as td:
        for k in ks:
            rows, shape = xs[k.node]
            fin, fout = Path(td) / f"{k.name}.in", Path(td) / f"{k.name}.out"
            write_rows(fin, rows)
            r = subprocess.run([str(exe), k.name, str(fin), str(fout)], capture_output=True, text=True)
            if r.returncode != 0:
                raise HLSError(f"C-simulation of '{k.name}' failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-2000:]}")
            n = int(np.prod(shape)) // max(len(rows), 1)
            y = np.loadtxt(fout, dtype=np.int64, ndmin=2) if len(rows) and n else np.zeros((0, n), np.int64)
            out[k.node] = y.reshape(shape)
    return out


def csim_linear(graph: Graph, node: Node | str, x: np.ndarray, par: int = DEFAULT_PAR,
                cache: Path | None = None) -> np.ndarray:
    """C-simulate one linear node on input codes ``x`` (..., K) -> output codes (..., N)."""
    name = node.name if isinstance(node, Node) else node
    return run_csim(graph, {name: x}, par, cache)[name]
