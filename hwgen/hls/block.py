"""The whole transformer block as one HLS top function that chains its kernels.

:func:`emit_block` takes the nodes of one layer of a fixed graph (a MiniLM /
BERT layer: q/k/v projections, attention, o projection, residual add,
layernorm, FFN up, GELU, FFN down, add, layernorm; or a pre-norm decoder
block of tiny-gpt with a KV-cache attention) and writes ``block<N>.h``: an
inline function ``block<N>`` that runs every node's kernel (:mod:`hwgen.hls.emit`,
:mod:`hwgen.hls.kernels`, emitted with the same ``par`` and ``max_seq``) in the
graph's node order over one sequence of ``s`` positions.

Contract:

* Ports are integer *codes* (``ap_int<W>``/``ap_uint<W>`` of each tensor's
  width): the block's activation inputs (tensors its nodes read that no node of
  the block writes; e.g. the previous layer's output), the padding mask
  (``bool valid[S_MAX]``, if the attention has one) and its outputs (tensors
  read outside the block, or graph outputs), each ``[S_MAX][D]``. A tensor
  with per-channel formats has one code per channel, so codes are the one
  interface every kernel agrees on; each kernel call converts a row of codes
  to the kernel's own ``ap_fixed`` types by a bit copy (``.range()``), never by
  value.
* Every intermediate tensor lives in a static ``[S_MAX][D]`` code buffer.
  Row kernels (linear, layernorm, gelu, add) run once per position; attention
  runs once per sequence.
* Decoders (attention with ``kv_cache=True``): the attention kernels own their
  caches; ``reset`` empties them, each call appends ``s`` positions, and
  ``cache_len`` returns the positions cached after the call (-1: the call did
  not fit and nothing was computed). Prefill is a call with ``s`` = prompt
  length, each decoding step a call with ``s`` = 1 -- the golden model's
  :class:`~hwgen.golden.GoldenState` sequence, call for call.

The block is bit-exact with the golden model exactly when each kernel is:
it only moves codes between them (``tests/test_hls_block.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir import Graph, Node
from .emit import DEFAULT_PAR, HLS_OPS, HLSError, KernelSources, _int_ctype, check_par, emit_node, sanitize


@dataclass
class BlockPorts:
    """What a layer's block top reads and writes (tensor names)."""

    inputs: list[str]          # activation tensors from outside the block
    mask: str | None           # the padding-mask input of its attention, if any
    outputs: list[str]         # tensors read outside the block (or graph outputs)
    internal: list[str]        # tensors produced and consumed inside only
    kv: bool                   # an attention kernel keeps a KV cache


def block_name(layer: int) -> str:
    return f"block{int(layer)}"


def block_ports(graph: Graph, nodes: list[Node]) -> BlockPorts:
    """The block's ports, read off the graph's edges."""
    produced = [n.outputs[0] for n in nodes]
    mine = set(produced)
    names = {n.name for n in nodes}
    inputs: list[str] = []
    mask = None
    for n in nodes:
        data = n.inputs[:3] if n.op == "attention" else (n.inputs[:2] if n.op == "add" else n.inputs[:1])
        for t in data:
            if t and t not in mine and t not in inputs:
                inputs.append(t)
        if n.op == "attention" and len(n.inputs) > 3 and n.inputs[3]:
            if mask is not None and mask != n.inputs[3]:
                raise HLSError(f"block of layer {n.layer}: two padding masks ({mask}, {n.inputs[3]})")
            mask = n.inputs[3]
    used_outside = {t for n in graph.nodes if n.name not in names for t in n.inputs}
    outputs = [t for t in produced if t in used_outside or t in graph.outputs]
    if not outputs:
        outputs = [produced[-1]]
    internal = [t for t in produced if t not in outputs]
    kv = any(n.op == "attention" and n.attrs.get("kv_cache") for n in nodes)
    return BlockPorts(inputs, mask, outputs, internal, kv)


def _dim(graph: Graph, t: str, where: str) -> int:
    d = graph.tensors[t].shape[-1] if graph.tensors[t].shape else None
    if not isinstance(d, int):
        raise HLSError(f"{where}: tensor '{t}' has no fixed feature dimension ({graph.tensors[t].shape})")
    return d


def emit_block(graph: Graph, layer: int, par: int = DEFAULT_PAR, max_seq: int | None = None
               ) -> tuple[KernelSources, list[KernelSources]]:
    """The block top of ``layer`` and the kernels it chains (emitted here with the same
    ``par`` and ``max_seq``). Every node of the layer must have an HLS kernel."""
    check_par(par)
    if not graph.is_fixed:
        raise HLSError(f"graph '{graph.name}' is a float graph; quantize it first (`hwgen quantize`)")
    nodes = graph.layer_nodes(layer, HLSError)
    where = f"block of layer {layer}"
    for n in nodes:
        if n.op not in HLS_OPS:
            raise HLSError(f"{where}: node '{n.name}': op '{n.op}' has no HLS kernel "
                           f"(HLS kernels exist for: {', '.join(HLS_OPS)})")
    kernels = [emit_node(graph, n, par, max_seq) for n in nodes]
    s_maxes = {k.meta["s_max"] for k in kernels if k.op == "attention"}
    if len(s_maxes) > 1:
        raise HLSError(f"{where}: attention kernels of different S_MAX {sorted(s_maxes)}; pass max_seq")
    s_max = s_maxes.pop() if s_maxes else int(max_seq or 64)
    ports = block_ports(graph, nodes)
    name = block_name(layer)
    ns = f"{name}_ns"
    dims = {t: _dim(graph, t, where) for t in ports.inputs + ports.outputs + ports.internal}
    code_t = {}
    for t in dims:
        f = graph.tensors[t].fmt
        if f is None:
            raise HLSError(f"{where}: tensor '{t}' has no fixed-point format")
        code_t[t] = _int_ctype(f.width, f.signed)
    var = {t: f"in_{sanitize(t)}" for t in ports.inputs}
    var.update({t: f"out_{sanitize(t)}" for t in ports.outputs})
    var.update({t: f"buf_{sanitize(t)}" for t in ports.internal})
    if ports.mask:
        var[ports.mask] = f"valid_{sanitize(ports.mask)}"
    ctype = {t: f"{sanitize(t)}_code_t" for t in dims}

    typedefs = "\n".join(f"typedef {code_t[t]} {ctype[t]};  // '{t}': {graph.tensors[t].fmt}"
                         + (" per channel" if graph.tensors[t].per_channel else "") for t in dims)
    statics = "\n".join(f"  static {ctype[t]} {var[t]}[S_MAX][{dims[t]}];" for t in ports.internal)

    def row_copy_in(dst: str, src: str, n: str, label: str) -> str:
        return (f"    {label}:\n    for (int c = 0; c < {n}; c++) {{\n#pragma HLS PIPELINE II=1\n"
                f"      {dst}[c].range() = {src}[i][c].range();\n    }}\n")

    steps = []
    for n, k in zip(nodes, kernels):
        kns = f"{k.name}_ns"
        out = var[n.outputs[0]]
        label = k.name.upper()
        if n.op in ("linear", "layernorm", "gelu"):
            src = var[n.inputs[0]]
            steps.append(f"""\
  // {n.name} ({n.op})
{label}_ROWS:
  for (int i = 0; i < s; i++) {{
    {kns}::x_t x[{kns}::K];
    {kns}::y_t y[{kns}::N];
{row_copy_in("x", src, f"{kns}::K", label + "_IN")}    {k.name}(x, y);
    {label}_OUT:
    for (int c = 0; c < {kns}::N; c++) {{
#pragma HLS PIPELINE II=1
      {out}[i][c].range() = y[c].range();
    }}
  }}
""")
        elif n.op == "add":
            sa, sb = var[n.inputs[0]], var[n.inputs[1]]
            steps.append(f"""\
  // {n.name} (add)
{label}_ROWS:
  for (int i = 0; i < s; i++) {{
    {kns}::a_t a[{kns}::N];
    {kns}::b_t b[{kns}::N];
    {kns}::y_t y[{kns}::N];
    {label}_IN:
    for (int c = 0; c < {kns}::N; c++) {{
#pragma HLS PIPELINE II=1
      a[c].range() = {sa}[i][c].range();
      b[c].range() = {sb}[i][c].range();
    }}
    {k.name}(a, b, y);
    {label}_OUT:
    for (int c = 0; c < {kns}::N; c++) {{
#pragma HLS PIPELINE II=1
      {out}[i][c].range() = y[c].range();
    }}
  }}
""")
        else:  # attention
            sq, sk, sv = (var[t] for t in n.inputs[:3])
            if k.meta.get("kv_cache"):
                call = (f"    int len = 0;\n    {k.name}(reset, s, q, k, v, o, len);\n"
                        f"    if (len < 0) {{\n      cache_len = -1;\n      return;\n    }}\n"
                        f"    cache_len = len;\n")
                valid = ""
            else:
                call = f"    {k.name}(s, s, 0, q, k, v, valid, o);\n"
                valid = (f"    static bool valid[{kns}::S_MAX];\n    for (int j = 0; j < s; j++) "
                         + (f"valid[j] = {var[ports.mask]}[j];\n" if ports.mask else "valid[j] = true;\n"))
            steps.append(f"""\
  // {n.name} (attention{", KV cache" if k.meta.get("kv_cache") else ""})
  {{
    static {kns}::q_t q[{kns}::S_MAX][{kns}::DM];
    static {kns}::k_t k[{kns}::S_MAX][{kns}::DM];
    static {kns}::v_t v[{kns}::S_MAX][{kns}::DM];
    static {kns}::o_t o[{kns}::S_MAX][{kns}::DM];
{valid}  {label}_IN:
    for (int i = 0; i < s; i++) {{
      for (int c = 0; c < {kns}::DM; c++) {{
#pragma HLS PIPELINE II=1
        q[i][c].range() = {sq}[i][c].range();
        k[i][c].range() = {sk}[i][c].range();
        v[i][c].range() = {sv}[i][c].range();
      }}
    }}
{call}  {label}_OUT:
    for (int i = 0; i < s; i++) {{
      for (int c = 0; c < {kns}::DM; c++) {{
#pragma HLS PIPELINE II=1
        {out}[i][c].range() = o[i][c].range();
      }}
    }}
  }}
""")
    params = (["bool reset"] if ports.kv else []) + ["int s"]
    params += [f"const {ns}::{ctype[t]} {var[t]}[{ns}::S_MAX][{dims[t]}]" for t in ports.inputs]
    if ports.mask:
        params.append(f"const bool {var[ports.mask]}[{ns}::S_MAX]")
    params += [f"{ns}::{ctype[t]} {var[t]}[{ns}::S_MAX][{dims[t]}]" for t in ports.outputs]
    if ports.kv:
        params.append("int& cache_len")
    incs = "\n".join(f'#include "{k.name}.h"' for k in kernels)
    guard = f"HWGEN_HLS_{name.upper()}_H"
    doc_nodes = "\n".join(f"//   {n.name:48s} {n.op:10s} -> {k.name}" for n, k in zip(nodes, kernels))
    header = f"""\
// {name}.h -- generated by hwgen.hls from graph '{graph.name}': layer {layer} as one top function
// chaining its kernels in the graph's node order (bit-exact with the golden model's layer output):
{doc_nodes}
// Ports are integer codes of each tensor's format; s <= S_MAX positions per call.{'''
// KV cache: the attention kernels own it; reset empties it, each call appends s positions;
// cache_len = positions cached after the call, -1 if they did not fit (nothing computed).''' if ports.kv else ""}
#ifndef {guard}
#define {guard}

#include <ap_fixed.h>
#include <ap_int.h>

{incs}

namespace {ns} {{

static const int S_MAX = {s_max};
{typedefs}

}}  // namespace {ns}

inline void {name}({", ".join(params)}) {{
  using namespace {ns};
{statics}
{"".join(steps)}}}

#endif  // {guard}
"""
    # testbench driver: record = [reset] s, inputs (s*D codes each), mask (s), -> outputs
    reads = "\n".join(
        f"    for (int i = 0; i < s; i++)\n      for (int c = 0; c < {dims[t]}; c++) "
        f"if (!hwgen_read<{ctype[t]}>(fi, {var[t]}[i][c])) return 3;" for t in ports.inputs)
    if ports.mask:
        reads += (f"\n    for (int i = 0; i < s; i++) {{\n      long long c;\n"
                  f"      if (fscanf(fi, \"%lld\", &c) != 1) return 3;\n      {var[ports.mask]}[i] = c != 0;\n    }}")
    writes = "\n".join(
        f"    for (int i = 0; i < s; i++)\n      for (int c = 0; c < {dims[t]}; c++) "
        f"fprintf(fo, \"%lld \", hwgen_code<{ctype[t]}>({var[t]}[i][c]));" for t in ports.outputs)
    decls = "\n".join(f"  static {ctype[t]} {var[t]}[S_MAX][{dims[t]}];" for t in ports.inputs + ports.outputs)
    if ports.mask:
        decls += f"\n  static bool {var[ports.mask]}[S_MAX];"
    args = (["rs != 0"] if ports.kv else []) + ["(int)s"] + [var[t] for t in ports.inputs]
    args += ([var[ports.mask]] if ports.mask else []) + [var[t] for t in ports.outputs]
    args += ["len"] if ports.kv else []
    head = ('    long long rs, s;\n    if (fscanf(fi, "%lld %lld", &rs, &s) != 2) return 3;'
            if ports.kv else '    long long s;\n    if (fscanf(fi, "%lld", &s) != 1) return 3;')
    run = f"""\
static int run_{name}(FILE* fi, FILE* fo, long rows) {{
  using namespace {ns};
{decls}
  for (long r = 0; r < rows; r++) {{
{head}
    if (s < 0 || s > S_MAX) return 5;
{reads}
{"    int len = 0;" if ports.kv else ""}
    {name}({", ".join(args)});
{"    if (len < 0) return 5;" if ports.kv else ""}
{writes}
    fprintf(fo, "\\n");
  }}
  return 0;
}}
"""
    depth = {var[t]: s_max * dims[t] for t in ports.inputs + ports.outputs}
    if ports.mask:
        depth[var[ports.mask]] = s_max
    first = graph.tensors[ports.inputs[0]].fmt if ports.inputs else None
    last = graph.tensors[ports.outputs[0]].fmt
    bks = KernelSources(name=name, node=f"layer {layer}", k=dims[ports.inputs[0]] if ports.inputs else 0,
                        n=dims[ports.outputs[0]], x_fmt=first, y_fmt=last,
                        files={f"{name}.h": header}, op="block", run=run,
                        meta={"layer": layer, "ports": ports, "dims": dims, "s_max": s_max,
                              "nodes": [n.name for n in nodes], "kernels": [k.name for k in kernels],
                              "port_depth": depth, "par": par})
    return bks, kernels


# ----------------------------------------------------------------------------- C-sim records

def pack_block(bks: KernelSources, x) -> tuple[np.ndarray, tuple[int, ...]]:
    """Testbench records of a block top. ``x``: a dict with one (B, S, D) code array per
    input tensor of the block, the mask tensor (B, S) if it has one, and for KV blocks
    optionally ``"reset"`` (bool or (B,) bools; default True). Each batch row is one
    call. Output shape: (B, S, sum of the output widths) -- the outputs side by side."""
    ports: BlockPorts = bks.meta["ports"]
    dims = bks.meta["dims"]
    where = f"block '{bks.name}'"
    if not isinstance(x, dict):
        raise HLSError(f"{where} takes a dict of input codes: {ports.inputs + ([ports.mask] if ports.mask else [])}")
    missing = [t for t in ports.inputs + ([ports.mask] if ports.mask else []) if t not in x]
    if missing:
        raise HLSError(f"{where}: missing inputs {missing}")
    arrs = []
    b = s = None
    for t in ports.inputs:
        a = np.asarray(x[t])
        if not np.issubdtype(a.dtype, np.integer) or a.ndim != 3 or a.shape[-1] != dims[t]:
            raise HLSError(f"{where}: input '{t}' must be integer codes shaped (B, S, {dims[t]}), "
                           f"got {a.dtype} {list(a.shape)}")
        if b is None:
            b, s = a.shape[:2]
        elif a.shape[:2] != (b, s):
            raise HLSError(f"{where}: inputs disagree on (B, S): {[b, s]} and {list(a.shape[:2])}")
        arrs.append(a.astype(np.int64).reshape(b, -1))
    if s > bks.meta["s_max"]:
        raise HLSError(f"{where}: {s} positions; the block holds at most S_MAX = {bks.meta['s_max']} "
                       "(emit it with a larger max_seq)")
    if ports.mask:
        m = (np.asarray(x[ports.mask]) != 0).astype(np.int64)
        if m.shape != (b, s):
            raise HLSError(f"{where}: mask has shape {list(m.shape)}, expected {[b, s]}")
        arrs.append(m)
    head = [np.full((b, 1), s)]
    if ports.kv:
        reset = np.broadcast_to(np.asarray(x.get("reset", True)).astype(np.int64), (b,))
        head.insert(0, reset.reshape(b, 1))
    width = sum(dims[t] for t in ports.outputs)
    return np.concatenate(head + arrs, axis=1), (b, s, width)


def block_outputs(bks: KernelSources, y: np.ndarray) -> dict[str, np.ndarray]:
    """Split a block's C-sim output (B, S, sum of widths) into its output tensors."""
    ports: BlockPorts = bks.meta["ports"]
    out, at = {}, 0
    b, s = y.shape[:2]
    flat = y.reshape(b, -1)
    for t in ports.outputs:
        d = bks.meta["dims"][t]
        out[t] = flat[:, at:at + s * d].reshape(b, s, d)
        at += s * d
    return out


def block_io(bks: KernelSources, vals: dict[str, np.ndarray], reset=True):
    """The block's inputs (for :func:`pack_block`) and expected output (B, S, widths) from
    the golden model's recorded values ``vals``."""
    ports: BlockPorts = bks.meta["ports"]
    x = {t: vals[t] for t in ports.inputs}
    if ports.mask:
        x[ports.mask] = vals[ports.mask]
    if ports.kv:
        x["reset"] = reset
    ys = [np.asarray(vals[t]) for t in ports.outputs]
    b, s = ys[0].shape[:2]
    y = np.concatenate([v.reshape(b, -1) for v in ys], axis=1).reshape(b, s, -1)
    return x, y


def block_files(graph: Graph, layers: list[int], par: int = DEFAULT_PAR, max_seq: int | None = None,
                tb_name: str = "csim") -> tuple[list[KernelSources], list[KernelSources], dict[str, str]]:
    """Blocks of ``layers``, their kernels and all files with one testbench."""
    from .emit import emit_testbench

    blocks, kernels = [], []
    for layer in layers:
        b, ks = emit_block(graph, layer, par, max_seq)
        blocks.append(b)
        kernels.extend(ks)
    files: dict[str, str] = {}
    for k in kernels + blocks:
        files.update(k.files)
    files[f"{tb_name}_tb.cpp"] = emit_testbench(kernels + blocks)
    return blocks, kernels, files
