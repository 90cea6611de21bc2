"""Accelerator backends behind one interface.

An :class:`AccelBackend` runs single nodes of a fixed graph on integer codes
(NumPy int64 arrays in, int64 codes out) and keeps the state of the kernels it
owns (the KV caches of decoder attention):

``golden``  the functional model: the golden model's own op kernels.
``hls``     the HLS C++ kernels of :mod:`hwgen.hls`, compiled with g++ against the
            ap_fixed headers into one shared library per run (the kernels its
            accelerator segments need) and called in-process
            through ctypes. The library is the generated kernel header plus the
            generated C-simulation testbench (its ``run_<name>`` driver reads
            the records :func:`hwgen.hls.csim._pack` writes) plus this module's
            ``extern "C"`` wrapper, which hands the driver in-memory streams
            (``fmemopen``/``open_memstream``) instead of files. Builds are cached
            under ``.hwgen-cache/runtime/hls/`` by a hash of every source, the flags,
            the compiler and the headers (never a stale library).
``rtl``     the generated Verilog through Verilator: needs the RTL engines
            (``hwgen.rtl.matmul.MatmulEngine``, ``hwgen.rtl.attention.AttentionEngine``)
            and the sim/ runner; refused with a clear error while they are missing.

All backends give identical integers (``tests/test_runtime_backends.py``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..ir import Graph, Node
from .partition import DriverError

BACKENDS = ("golden", "hls", "rtl")
_REPO = Path(__file__).resolve().parents[2]
CACHE = _REPO / ".hwgen-cache" / "runtime"


@dataclass
class AccelState:
    """What an accelerator keeps across calls: per attention node its KV cache."""

    kv: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


class AccelBackend:
    """One accelerator. ``prepare`` builds what ``nodes`` need (once);
    ``run(node, ins, offset, state)`` computes one node: ``ins`` are the node's input
    arrays in graph order (weights included, as the graph holds them; absent optional
    inputs ``None``), ``offset`` the decoding position of the first row."""

    name = ""
    kernel_ops: tuple[str, ...] = ()

    def __init__(self, graph: Graph):
        self.graph = graph

    def prepare(self, nodes: list[Node], say=None) -> None:
        bad = [n for n in nodes if n.op not in self.kernel_ops]
        if bad:
            raise DriverError(f"backend '{self.name}' has no kernel for node '{bad[0].name}' "
                              f"({bad[0].op}); its kernels: {', '.join(self.kernel_ops)}")

    def run(self, node: Node, ins: list, offset: int, state: AccelState) -> np.ndarray:
        raise NotImplementedError


class GoldenAccel(AccelBackend):
    """The bit-exact functional model as the accelerator."""

    name = "golden"

    def __init__(self, graph: Graph):
        super().__init__(graph)
        from ..golden import _OPS, GoldenModel

        self.model = GoldenModel(graph, workers=1)
        self._ops = _OPS
        self.kernel_ops = tuple(op for op in _OPS if op != "quantize")

    def run(self, node, ins, offset, state):
        from ..golden import GoldenState

        gs = GoldenState(kv=state.kv, offset=offset)
        return self._ops[node.op](self.model, node, ins, gs)


# ----------------------------------------------------------------------------
# hls: the C-simulated kernels as a shared library
# ----------------------------------------------------------------------------

_WRAPPER = """\
// hwgen.runtime: the C-simulation drivers of the kernels of one run, as a shared library.
#define main hwgen_tb_main
#include "{tb}"
#undef main
#include <cstdio>
#include <cstdlib>
#include <cstring>

// kernel: its name; in: the testbench input records (rows, then the rows), in_len bytes;
// out: the output codes as text, malloc'ed (free with hwgen_rt_free).
// Returns the driver's status (0 = ok, 2 = unknown kernel or no stream).
extern "C" int hwgen_rt_run(const char* kernel, const char* in, long in_len, char** out,
                            long* out_len) {{
  FILE* fi = fmemopen((void*)in, (size_t)in_len, "r");
  if (!fi) return 2;
  char* buf = nullptr;
  size_t len = 0;
  FILE* fo = open_memstream(&buf, &len);
  if (!fo) {{ fclose(fi); return 2; }}
  long rows = 0;
  int rc = 3;
  if (fscanf(fi, "%ld", &rows) == 1) {{
{dispatch}
    rc = 2;
  }}
  fclose(fi);
  fclose(fo);
  *out = buf;
  *out_len = (long)len;
  return rc;
}}

extern "C" void hwgen_rt_free(char* p) {{ free(p); }}
"""


def _hls_node(graph: Graph, node: Node) -> Node:
    """The node the HLS kernel is emitted from. Attention with a KV cache: the same node
    without ``kv_cache`` (the stateless kernel); this backend keeps the cache and hands the
    kernel every cached key and value with the causal offset, which is what the
    cache-owning kernel computes."""
    if node.op == "attention" and node.attrs.get("kv_cache"):
        n = deepcopy(node)
        n.attrs["kv_cache"] = False
        return n
    return node


class HLSAccel(AccelBackend):
    """The HLS C++ kernels, g++-compiled, called through ctypes."""

    name = "hls"

    def __init__(self, graph: Graph, cache: Path | None = None):
        super().__init__(graph)
        from ..hls import HLS_OPS

        self.kernel_ops = tuple(HLS_OPS)
        self.cache = Path(cache) if cache is not None else CACHE / "hls"
        self._libs: dict[str, tuple] = {}
        self.max_seq = int(graph.meta.get("max_positions") or 0) or None

    def _emit(self, node: Node):
        from ..hls.emit import emit_node

        opts = {"max_seq": self.max_seq} if node.op == "attention" and self.max_seq else {}
        return emit_node(self.graph, _hls_node(self.graph, node), **opts)

    def prepare(self, nodes, say=None):
        """Build one library holding the kernels of ``nodes`` not built yet (cached)."""
        super().prepare(nodes)
        todo = [n for n in nodes if n.name not in self._libs]
        if not todo:
            return
        if say:
            say(f"hls: building {len(todo)} kernel(s) into one library (cached by source hash)")
        kss = [self._emit(n) for n in todo]
        so = self._build(kss)
        for n, ks in zip(todo, kss):
            self._libs[n.name] = (ks, so)

    def _build(self, kss):
        from ..hls import csim
        from ..hls.emit import HLSError, emit_testbench

        files: dict[str, str] = {}
        for ks in kss:
            files.update(ks.files)
        tb = "hwgen_rt_tb.cpp"
        files[tb] = emit_testbench(kss)
        dispatch = "\n".join(f'    if (!strcmp(kernel, "{ks.name}")) {{ rc = run_{ks.name}(fi, fo, rows); }} else'
                             for ks in kss)
        files["hwgen_rt.cpp"] = _WRAPPER.format(tb=tb, dispatch=dispatch)
        cxx, inc = csim.compiler(), csim.ap_types_dir()
        key = hashlib.sha256((csim.build_key(files, cxx, inc) + "|shared -fPIC").encode()).hexdigest()
        final = self.cache / key[:24]
        lib = final / "kernels.so"
        if not lib.is_file():
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=self.cache))
            try:
                for name, text in files.items():
                    (tmp / name).write_text(text)
                cmd = [cxx, *csim.CXXFLAGS, "-shared", "-fPIC", "-I", str(inc), "-I", str(tmp),
                       str(tmp / "hwgen_rt.cpp"), "-o", str(tmp / "kernels.so")]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise HLSError("g++ failed building the runtime library of the HLS kernels:\n"
                                   f"{csim._first_errors(r.stderr)}")
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not lib.is_file():
                        raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        so = ctypes.CDLL(str(lib))
        so.hwgen_rt_run.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_long,
                                    ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_long)]
        so.hwgen_rt_run.restype = ctypes.c_int
        so.hwgen_rt_free.argtypes = [ctypes.c_void_p]
        return so

    def run(self, node, ins, offset, state):
        from ..hls.csim import _pack
        from ..hls.emit import HLSError

        if node.name not in self._libs:
            self.prepare([node])
        ks, so = self._libs[node.name]
        if node.op == "attention":
            q, k, v = ins[:3]
            mask = ins[3] if len(ins) > 3 else None
            off = 0
            if node.attrs.get("kv_cache"):
                off = offset
                past = state.kv.get(node.name)
                if past is not None:
                    k, v = np.concatenate([past[0], k], axis=1), np.concatenate([past[1], v], axis=1)
                state.kv[node.name] = (k, v)
            x = (q, k, v, mask, off)
        elif node.op == "add":
            x = (ins[0], ins[1])
        else:
            x = ins[0]
        rows, shape = _pack(ks, x)
        text = (f"{len(rows)}\n" + " ".join(map(str, np.asarray(rows, dtype=np.int64).ravel().tolist()))
                + "\n").encode()
        out, n = ctypes.c_void_p(), ctypes.c_long()
        rc = so.hwgen_rt_run(ks.name.encode(), text, len(text), ctypes.byref(out), ctypes.byref(n))
        try:
            data = ctypes.string_at(out, n.value) if out.value else b""
        finally:
            if out.value:
                so.hwgen_rt_free(out)
        if rc != 0:
            raise HLSError(f"HLS kernel '{ks.name}' (node '{node.name}') failed with status {rc}")
        y = np.array(data.split(), dtype=np.int64)
        if y.size != int(np.prod(shape)):
            raise HLSError(f"HLS kernel '{ks.name}' returned {y.size} codes, expected {int(np.prod(shape))}")
        return y.reshape(shape)


# ----------------------------------------------------------------------------
# rtl
# ----------------------------------------------------------------------------

def rtl_available() -> str | None:
    """None when the RTL engines and the simulation runner are importable, else what is missing."""
    import importlib.util

    try:
        from ..rtl.verify import _sim_package
        _sim_package()  # puts the checkout's sim/ (the cocotb benches) on sys.path
    except Exception as e:  # noqa: BLE001 -- reported as what is missing
        return f"sim/ ({e})"
    missing = [m for m in ("hwgen.rtl.matmul", "hwgen.rtl.attention", "sim.kernels", "sim.runner")
               if importlib.util.find_spec(m) is None]
    return ", ".join(missing) if missing else None


def make_backend(name: str, graph: Graph, cycles=None) -> AccelBackend:
    """The accelerator backend ``name``; ``cycles`` (a :class:`~hwgen.runtime.cost.CycleModel`)
    gives the rtl backend its engine configuration, so cost model and hardware agree."""
    if name == "golden":
        return GoldenAccel(graph)
    if name == "hls":
        return HLSAccel(graph)
    if name == "rtl":
        missing = rtl_available()
        if missing:
            raise DriverError(f"backend 'rtl' needs the RTL engines and the Verilator runner, which "
                              f"this checkout lacks ({missing}); use --backend golden or hls")
        from .rtl_backend import RTLAccel

        return RTLAccel(graph, cycles)
    raise DriverError(f"unknown backend '{name}': expected one of {', '.join(BACKENDS)}")
