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
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..files import installed_package_dir
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
        pkg = installed_package_dir("hls4ml")
        if pkg is None:
            raise HLSError("the ap_fixed headers were not found: install hls4ml "
                           "(pip install hls4ml) or set HWGEN_AP_TYPES to a folder holding ap_fixed.h")
        d = pkg / "templates" / "vivado" / "ap_types"
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


def build_key(files: dict[str, str], cxx: str, inc: Path, extra: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for part in (_compiler_id(cxx), " ".join(CXXFLAGS + tuple(extra)), _headers_digest(str(inc))):
        h.update(part.encode() + b"\0")
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()


def _first_errors(text: str, n: int = 8) -> str:
    lines = text.splitlines()
    errs = [i for i, ln in enumerate(lines) if "error" in ln]
    start = errs[0] if errs else 0
    return "\n".join(lines[start:start + n])


def build(files: dict[str, str], cache: Path | None = None, tops: tuple[str, ...] = ()) -> Path:
    """Compile ``files`` (one ``*_tb.cpp`` among them) and return the binary's path.
    ``tops``: kernels whose synthesis top ``<name>.cpp`` is compiled in and called by
    the testbench (``-DHWGEN_TOP_<NAME>``), as Vitis co-simulation builds it."""
    cxx = compiler()
    inc = ap_types_dir()
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    extra = tuple(f"-DHWGEN_TOP_{t.upper()}" for t in tops) + tuple(f"{t}.cpp" for t in tops)
    missing = [f"{t}.cpp" for t in tops if f"{t}.cpp" not in files]
    if missing:
        raise HLSError(f"synthesis top source(s) {missing} are not among the files")
    key = build_key(files, cxx, inc, extra)
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
        cmd = [cxx, *CXXFLAGS, *(f"-DHWGEN_TOP_{t.upper()}" for t in tops), "-I", str(inc), "-I", str(tmp),
               str(tmp / tbs[0]), *(str(tmp / f"{t}.cpp") for t in tops), "-o", str(tmp / "csim")]
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
    if ks.op == "block":
        from .block import pack_block
        return pack_block(ks, x)
    if ks.op == "attention" and ks.meta.get("kv_cache"):
        return _pack_kv(ks, x)
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


def _pack_kv(ks: KernelSources, x) -> tuple[np.ndarray, tuple[int, ...]]:
    """Records of the KV-cache attention kernel: ``(q, k, v)`` or ``(q, k, v, reset)``
    with q, k, v (B, S, DM) the new positions of B calls made in order (the kernel keeps
    its cache between them); ``reset`` (bool or (B,) bools, default True: every row is a
    fresh sequence) empties the cache before that call. Record: ``reset S`` q k v."""
    if not isinstance(x, (tuple, list)) or not 3 <= len(x) <= 4:
        raise HLSError(f"kernel '{ks.name}' (attention with a KV cache) takes (q, k, v[, reset])")
    qf, kf, vf = ks.meta["in_fmts"]
    q = _check_codes(ks, x[0], ks.k, qf, "q")
    k = _check_codes(ks, x[1], ks.k, kf, "k")
    v = _check_codes(ks, x[2], ks.k, vf, "v")
    if q.ndim != 3 or q.shape != k.shape or k.shape != v.shape:
        raise HLSError(f"kernel '{ks.name}': q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}: "
                       "expected three (B, S, DM) arrays of the new positions")
    b, s = q.shape[0], q.shape[1]
    if s > ks.meta["s_max"]:
        raise HLSError(f"kernel '{ks.name}': {s} new positions; the KV cache holds at most "
                       f"S_MAX = {ks.meta['s_max']}")
    reset = np.broadcast_to(np.asarray(True if len(x) < 4 else x[3]).astype(np.int64), (b,))
    parts = [np.stack([reset, np.full(b, s)], axis=1), q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1)]
    return np.concatenate(parts, axis=1), q.shape


def write_rows(path: Path, rows) -> None:
    """A testbench input file: the number of rows, then one record per line
    (``rows``: a 2-D array, or a list of 1-D records of any lengths)."""
    with open(path, "w") as f:
        f.write(f"{len(rows)}\n")
        if isinstance(rows, np.ndarray):
            np.savetxt(f, rows, fmt="%d")
        else:
            for r in rows:
                f.write(" ".join(str(int(v)) for v in np.asarray(r).reshape(-1)) + "\n")


def pack_calls(ks: KernelSources, x) -> tuple[list, list[tuple[int, ...]], list[int]]:
    """Records for one kernel input or a list of them (calls made in order, in one
    process, so a kernel with state keeps it): the records, each call's output shape
    and record count."""
    calls = x if isinstance(x, list) else [x]
    recs, shapes, counts = [], [], []
    for c in calls:
        rows, shape = _pack(ks, c)
        recs.extend(list(rows))
        shapes.append(tuple(shape))
        counts.append(len(rows))
    return recs, shapes, counts


def write_vectors(ks: KernelSources, x, y, stem: Path) -> int:
    """``<stem>.in`` (testbench input records for inputs ``x``, as :func:`run_csim` takes
    them: one input or a list of calls) and ``<stem>.golden`` (the expected output codes
    ``y``, an array or a list of them, one line per record); returns the number of records."""
    recs, shapes, counts = pack_calls(ks, x)
    ys = y if isinstance(y, list) else [y]
    if len(ys) != len(shapes):
        raise HLSError(f"kernel '{ks.name}': {len(ys)} expected outputs for {len(shapes)} calls")
    lines = []
    for yy, shape, n in zip(ys, shapes, counts):
        yy = np.asarray(yy).astype(np.int64)
        if tuple(yy.shape) != tuple(shape):
            raise HLSError(f"kernel '{ks.name}': expected outputs have shape {list(yy.shape)}, "
                           f"the inputs give {list(shape)}")
        lines.extend(yy.reshape(n, -1) if n else [])
    write_rows(Path(f"{stem}.in"), recs)
    with open(f"{stem}.golden", "w") as f:
        for ln in lines:
            f.write(" ".join(str(int(v)) for v in ln) + "\n")
    return len(recs)


def run_csim(graph: Graph, inputs: dict[str, np.ndarray], par: int = DEFAULT_PAR,
             cache: Path | None = None, **opts) -> dict[str, np.ndarray]:
    """C-simulate the kernels of the nodes named in ``inputs`` (node name -> input
    codes: for linear, layernorm, gelu an array shaped (..., K); for add and
    attention a tuple, see :func:`_pack`); returns node name -> output codes.
    All kernels are compiled into one binary (cached by the hash of its sources)."""
    ks, files = emit_kernels(graph, list(inputs), par, **opts)
    return run_kernels(ks, files, {k.node: inputs[k.node] for k in ks}, cache)


def run_kernels(ks: list[KernelSources], files: dict[str, str], inputs: dict, cache: Path | None = None
                ) -> dict:
    """Build ``files`` (cached) and run each kernel of ``ks`` on ``inputs[k.node]`` (one
    input, or a list of calls run in order in one process); returns node -> output codes
    (a list of arrays for a list of calls)."""
    xs = {k.node: pack_calls(k, inputs[k.node]) for k in ks}
    exe = build(files, cache)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="hwgen-csim-") as td:
        for k in ks:
            recs, shapes, counts = xs[k.node]
            fin, fout = Path(td) / f"{k.name}.in", Path(td) / f"{k.name}.out"
            write_rows(fin, recs)
            r = subprocess.run([str(exe), k.name, str(fin), str(fout)], capture_output=True, text=True)
            if r.returncode != 0:
                raise HLSError(f"C-simulation of '{k.name}' failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-2000:]}")
            with open(fout) as f:
                lines = [np.array(ln.split(), dtype=np.int64) for ln in f]
            if len(lines) != len(recs):
                raise HLSError(f"C-simulation of '{k.name}' wrote {len(lines)} records for {len(recs)} inputs")
            res, at = [], 0
            for shape, n in zip(shapes, counts):
                part = lines[at:at + n]
                at += n
                flat = np.concatenate(part) if part else np.zeros(0, np.int64)
                if flat.size != int(np.prod(shape)):
                    raise HLSError(f"C-simulation of '{k.name}' wrote {flat.size} codes, expected "
                                   f"{int(np.prod(shape))}")
                res.append(flat.reshape(shape))
            out[k.node] = res if isinstance(inputs[k.node], list) else res[0]
    return out


def csim_linear(graph: Graph, node: Node | str, x: np.ndarray, par: int = DEFAULT_PAR,
                cache: Path | None = None) -> np.ndarray:
    """C-simulate one linear node on input codes ``x`` (..., K) -> output codes (..., N)."""
    name = node.name if isinstance(node, Node) else node
    return run_csim(graph, {name: x}, par, cache)[name]
