"""Emit Vitis-HLS-style C++ for the kernels of a fixed graph.

This module holds ``linear`` (:func:`emit_linear`), the shared testbench and
the dispatch (:func:`emit_node`); ``attention``, ``layernorm``, ``gelu`` and
``add`` are in :mod:`hwgen.hls.kernels` and follow the same conventions.
The ``linear`` kernel's integer semantics are
exactly :func:`hwgen.contract.linear` as the golden model calls it
(``hwgen.golden._linear``):

* the MAC array sees the input *codes* unchanged. A per-channel x format is
  already folded into the weight rows (``hwgen.quant.linear_row_shift``), so
  the codes are read at the finest channel's fractional bits ``xf``;
* ``acc[n] = bias_code[n] + sum_k x_code[k] * w_code[k][n]`` in an
  ``ap_int<acc_bits>`` (``node.attrs["acc_bits"]``: :func:`hwgen.contract.acc_width`
  chose it so that nothing can overflow);
* column ``n`` of the accumulator has ``xf + w_frac[n]`` fractional bits. Its
  code is reinterpreted as ``ap_fixed<acc_bits, acc_bits - (xf + w_frac[n])>``
  and *assigned* to the output format, so the ap_fixed headers themselves do
  the rounding and saturation (modes from the output tensor's format).
  Columns are grouped into requantization classes, one per distinct
  (accumulator fractional bits, output integer bits) pair; a ``switch`` on
  the column's class picks the template instance.

Weights and biases are the graph's integer codes (``graph.weights``), written
out as constant arrays; nothing is re-quantized here.

Files for a kernel named ``<name>`` (the node name made a C identifier):
``<name>.h`` (types, requantization helper, the kernel function),
``<name>_weights.h`` (constant arrays), and a testbench (``<name>_tb.cpp``, or
one shared testbench for several kernels, :func:`emit_testbench`) that reads
input codes from a text file and writes output codes to one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..fixed import FixedType
from ..ir import Graph, Node

#: ops that have an HLS kernel (all but ``linear`` live in :mod:`hwgen.hls.kernels`)
HLS_OPS = ("linear", "attention", "layernorm", "gelu", "add")

#: default number of output columns computed per cycle (ARRAY_PARTITION factor)
DEFAULT_PAR = 4


class HLSError(ValueError):
    """The HLS backend cannot emit, build or run something; the message names what."""


def check_par(par) -> int:
    """The parallelism setting: a positive int (columns/channels/MACs per cycle)."""
    if isinstance(par, bool) or not isinstance(par, int) or par < 1:
        raise HLSError(f"par (the parallelism setting) must be a positive int, got {par!r}")
    return par


def sanitize(name: str) -> str:
    """A C identifier for a node name (``n4.linear`` -> ``n4_linear``)."""
    s = re.sub(r"[^0-9A-Za-z_]", "_", name)
    if not s or s[0].isdigit():
        s = "k_" + s
    return s


@dataclass
class KernelSources:
    """The generated files of one kernel and what its testbench needs."""

    name: str                 # C function name (and file stem)
    node: str                 # graph node name
    k: int                    # input features
    n: int                    # output features
    x_fmt: FixedType
    y_fmt: FixedType
    files: dict[str, str] = field(default_factory=dict)   # file name -> text (no testbench)
    op: str = "linear"
    run: str = ""             # testbench driver ``run_<name>``; empty: the row driver (x[K] -> y[N])
    meta: dict = field(default_factory=dict)              # what the csim packer needs (per op)


def _fixed_ctype(width: int, int_bits: int, signed: bool, q: str | None = None, o: str | None = None) -> str:
    kind = "ap_fixed" if signed else "ap_ufixed"
    modes = f", {q}, {o}" if q is not None else ""
    return f"{kind}<{width}, {int_bits}{modes}>"


def _int_ctype(width: int, signed: bool) -> str:
    return f"ap_int<{width}>" if signed else f"ap_uint<{width}>"


def _c_int(width: int) -> str:
    """The smallest standard signed C integer type holding ``width`` bits."""
    for bits, name in ((8, "signed char"), (16, "short"), (32, "int")):
        if width <= bits:
            return name
    return "long long"


def _lit(v: int) -> str:
    v = int(v)
    return str(v) if -(2 ** 31) < v < 2 ** 31 else f"{v}LL"


def _array_1d(values, per_line: int = 16, indent: str = "    ") -> str:
    vals = [_lit(v) for v in np.asarray(values).reshape(-1)]
    lines = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    return "{\n" + ",\n".join(indent + ln for ln in lines) + "\n}"


def _array_2d(values, indent: str = "    ") -> str:
    rows = ["{" + ", ".join(_lit(v) for v in row) + "}" for row in np.asarray(values)]
    return "{\n" + ",\n".join(indent + r for r in rows) + "\n}"


def _per_column(frac, n: int, what: str) -> np.ndarray:
    a = np.asarray(frac, dtype=np.int64).reshape(-1)
    if a.size == 1:
        return np.full(n, int(a[0]), dtype=np.int64)
    if a.size != n:
        raise HLSError(f"{what}: {a.size} per-channel formats for {n} columns")
    return a


def _resolve_node(graph: Graph, node: Node | str) -> Node:
    """The node (by name or as given), checked to have a kernel in a fixed graph."""
    if isinstance(node, str):
        node = graph.node(node)
    if node.op not in HLS_OPS:
        raise HLSError(f"node '{node.name}': op '{node.op}' has no HLS kernel "
                       f"(HLS kernels exist for: {', '.join(HLS_OPS)})")
    if not graph.is_fixed:
        raise HLSError(f"graph '{graph.name}' is a float graph; quantize it first (`hwgen quantize`)")
    return node


def requant_template(src_t: str, src_bits: str, src_signed: bool, out: FixedType) -> str:
    """C++ ``requant<SRC_FRAC, OUT_INT>(v)``: the code ``v`` of type ``src_t``
    (``src_bits`` wide), read as a fixed value with SRC_FRAC fractional bits and
    assigned to ``out``'s width and modes with OUT_INT integer bits, so the
    ap_fixed header does the rounding and saturation (``hwgen.fixed.requantize``).
    Every kernel's requantization is this one template."""
    src_fx = "ap_fixed" if src_signed else "ap_ufixed"
    out_fx = "ap_fixed" if out.signed else "ap_ufixed"
    return f"""\
// v's code read as a fixed value with SRC_FRAC fractional bits, assigned to the
// output format: the ap_fixed header rounds ({out.q}) and saturates ({out.o}).
template <int SRC_FRAC, int OUT_INT>
inline y_t requant({src_t} v) {{
#pragma HLS INLINE
  {src_fx}<{src_bits}, {src_bits} - SRC_FRAC> a;
  a.range() = v.range();
  {out_fx}<{out.width}, OUT_INT, {out.q}, {out.o}> r = a;
  y_t y;
  y.range() = r.range();
  return y;
}}
"""


def linear_blocks(graph: Graph, node: Node, par: int) -> tuple[int, int, list[tuple[int, int]]] | None:
    """The weight blocks a pruned linear's kernel visits: ``(block_k, block_n,
    [(k0, n0), ...])`` for the blocks that hold a nonzero code, in row-major
    order, read from the graph's sparsity record (:func:`hwgen.prune.linear_bitmap`
    at the record's block shape). ``None`` (the dense loop) when the linear has
    no record, is recorded dense, has no empty block, or ``par`` does not divide
    ``block_n`` (the lanes would straddle blocks)."""
    from ..prune import linear_bitmap

    rec = node.attrs.get("sparsity")
    if not rec or rec.get("pattern") == "dense" or rec["block_n"] % par:
        return None
    bk, bn = int(rec["block_k"]), int(rec["block_n"])
    bm = linear_bitmap(graph, node, bk, bn)
    if bm.all():
        return None
    return bk, bn, [(int(i) * bk, int(j) * bn) for i, j in zip(*np.nonzero(bm))]


def mac_iterations(k: int, n: int, par: int, blocks: tuple[int, int, list[tuple[int, int]]] | None) -> int:
    """Iterations of a linear kernel's pipelined MAC loop (II = 1) per input row:
    ``K * ceil(N / par)`` dense; with ``blocks``, ``sum over visited blocks of
    min(block_k, K - k0) * block_n / par``. The C-simulation counts them too
    (``MAC_ITERATIONS``)."""
    if blocks is None:
        return k * -(-n // par)
    bk, bn, visit = blocks
    return sum(min(bk, k - k0) for k0, _ in visit) * (bn // par)


def _mac_row(ind: str, n_end: str, n_base: str) -> str:
    """The MAC loop over one input row ``k``: columns ``n_base + 0 .. n_end - 1``,
    ``PAR`` lanes per pipelined iteration, counted in C-simulation."""
    return f"""\
{ind}x_code_t xc;
{ind}xc.range() = x[k].range();
{ind[:-2]}MAC_N:
{ind}for (int n0 = 0; n0 < {n_end}; n0 += PAR) {{
#pragma HLS PIPELINE II=1
#ifndef __SYNTHESIS__
{ind}  MAC_ITERATIONS++;
#endif
{ind}LANE:
{ind}  for (int p = 0; p < PAR; p++) {{
#pragma HLS UNROLL
{ind}    const int n = {n_base}n0 + p;
{ind}    if (n < N) acc[n] += xc * w_t(W[k][n]);
{ind}  }}
{ind}}}"""


def emit_linear(graph: Graph, node: Node | str, par: int = DEFAULT_PAR) -> KernelSources:
    """Kernel header and weights header of one ``linear`` node (see the module doc).
    A block-pruned linear (:func:`linear_blocks`) gets a MAC loop over its
    nonzero blocks only, so its empty blocks cost no loop iterations."""
    node = _resolve_node(graph, node)
    check_par(par)
    name = sanitize(node.name)
    ns = f"{name}_ns"
    where = f"node '{node.name}'"
    xt = graph.tensors[node.inputs[0]]
    wname = node.inputs[1]
    wt = graph.tensors[wname]
    bname = graph.node_input(node, "bias")
    yt = graph.tensors[node.outputs[0]]
    for t in (xt, wt, yt):
        if t.fmt is None:
            raise HLSError(f"{where}: tensor '{t.name}' has no fixed-point format")
    w = np.asarray(graph.weights[wname]).astype(np.int64)
    if w.ndim != 2:
        raise HLSError(f"{where}: weight '{wname}' has shape {list(w.shape)}, expected (K, N)")
    k, n = (int(v) for v in w.shape)
    if xt.shape and isinstance(xt.shape[-1], int) and xt.shape[-1] != k:
        raise HLSError(f"{where}: input has {xt.shape[-1]} features, weight has {k} rows")
    acc_bits = int(node.attrs["acc_bits"])
    xf, wf, yf = xt.fmt, wt.fmt, yt.fmt

    # fractional bits: x at its finest channel (rows pre-scaled), w and y per column
    x_frac = int(np.max(np.asarray(xt.frac_bits())))
    w_frac = _per_column(wt.frac_bits(), n, f"{where}: weight '{wname}'")
    acc_frac = x_frac + w_frac
    y_int = yf.width - _per_column(yt.frac_bits(), n, f"{where}: output '{yt.name}'")
    for col in range(n):
        shift = int(acc_frac[col]) - (yf.width - int(y_int[col]))
        if shift >= acc_bits:
            # ap_fixed_base.h operator= reads source bit (shift - 1) through an asserting get_bit
            raise HLSError(f"{where}: column {col} drops {shift} fractional bits from a "
                           f"{acc_bits}-bit accumulator; the ap_fixed headers abort on a right "
                           "shift longer than the source width")
    pairs = sorted({(int(a), int(i)) for a, i in zip(acc_frac, y_int)})
    cls_of = {p: c for c, p in enumerate(pairs)}
    col_class = np.array([cls_of[(int(a), int(i))] for a, i in zip(acc_frac, y_int)])

    bias = None
    if bname:
        bias = np.asarray(graph.weights[bname]).astype(np.int64).reshape(-1)
        if bias.size != n:
            raise HLSError(f"{where}: bias '{bname}' has {bias.size} entries for {n} columns")
        bt = graph.tensors[bname]
        b_width = bt.fmt.width if bt.fmt is not None else 48
    else:
        b_width = 1

    blocks = linear_blocks(graph, node, par)
    iters = mac_iterations(k, n, par, blocks)
    if blocks is None:
        mac_loop = f"""\
MAC_K:
  for (int k = 0; k < K; k++) {{
{_mac_row("    ", "N", "")}
  }}"""
    else:
        mac_loop = f"""\
  // block-sparse: only the {len(blocks[2])} weight blocks holding a nonzero code (BLK_K0/BLK_N0)
MAC_BLK:
  for (int b = 0; b < NBLK; b++) {{
  MAC_K:
    for (int kk = 0; kk < BK; kk++) {{
      const int k = BLK_K0[b] + kk;
      if (k < K) {{
{_mac_row("        ", "BN", "BLK_N0[b] + ")}
      }}
    }}
  }}"""
    blk_arrays = "" if blocks is None else (
        "\n// first row and column of each weight block the MAC loop visits (the nonzero ones)\n"
        f"static const unsigned short BLK_K0[NBLK] = {_array_1d(np.array([b[0] for b in blocks[2]]), per_line=32)};\n"
        f"static const unsigned short BLK_N0[NBLK] = {_array_1d(np.array([b[1] for b in blocks[2]]), per_line=32)};\n")

    # ---------------------------------------------------------------- types
    x_int = xf.width - x_frac
    guard = f"HWGEN_HLS_{name.upper()}_H"
    par_macro = f"{name.upper()}_PAR"
    x_note = (f"per-channel format {xf.ctype()} (int bits {min(xt.channel_int_bits)}.."
              f"{max(xt.channel_int_bits)}): its codes are read at the finest channel's "
              f"{x_frac} fractional bits; the weight rows were pre-scaled to match"
              if xt.per_channel else xf.ctype())
    y_note = (f"per-channel format {yf.ctype()} (int bits {int(y_int.min())}..{int(y_int.max())}): "
              "y_t holds each column's code; requant() applies that column's format"
              if yt.per_channel else yf.ctype())
    yw, ys = yf.width, yf.signed
    class_doc = "\n".join(
        f"//   class {c}: accumulator {a} fractional bits -> {_fixed_ctype(yw, i, ys, yf.q, yf.o)}"
        f" ({int((col_class == c).sum())} column(s))" for c, (a, i) in enumerate(pairs))
    cases = "\n".join(
        f"      case {c}: y[n] = requant<{a}, {i}>(acc[n]); break;" for c, (a, i) in enumerate(pairs))
    src = node.source or node.op
    header = f"""\
// {name}.h -- generated by hwgen.hls from graph '{graph.name}', node '{node.name}' ({src})
// y[n] = requant(sum_k x[k] * w[k][n] + b[n])   (hwgen.contract.linear, bit-exact)
//
// x: {x_note}
// y: {y_note}
// Requantization classes (column -> class in COL_CLASS):
{class_doc}
#ifndef {guard}
#define {guard}

#include <ap_fixed.h>
#include <ap_int.h>

#ifndef {par_macro}
#define {par_macro} {par}  // output columns per cycle (ARRAY_PARTITION / unroll factor)
#endif

namespace {ns} {{

static const int K = {k};
static const int N = {n};
static const int PAR = {par_macro};
static const int ACC_BITS = {acc_bits};
{f"static const int BK = {blocks[0]}, BN = {blocks[1]}, NBLK = {len(blocks[2])};  // weight blocks visited" if blocks else ""}
#ifndef __SYNTHESIS__
static long long MAC_ITERATIONS = 0;  // C-simulation: MAC loop iterations run so far
#endif

typedef {_fixed_ctype(xf.width, x_int, xf.signed, xf.q, xf.o)} x_t;
typedef {_int_ctype(xf.width, xf.signed)} x_code_t;  // x's integer code
typedef ap_int<{wf.width}> w_t;  // weight codes (per-column fractional bits)
typedef ap_int<{b_width}> b_t;  // bias codes, at the accumulator's fractional bits
typedef ap_int<ACC_BITS> acc_t;  // exact accumulator: acc_width() says nothing overflows
typedef {_fixed_ctype(yw, int(y_int.max()), ys, yf.q, yf.o)} y_t;
typedef {_int_ctype(yw, ys)} y_code_t;  // y's integer code

// ROM element types: the exact widths for synthesis; plain C integers for C-simulation
// (g++ compiles large constant arrays of ap_int objects very slowly: minutes at 384x1536)
#ifdef __SYNTHESIS__
typedef w_t w_rom_t;
typedef b_t b_rom_t;
#else
typedef {_c_int(wf.width)} w_rom_t;
typedef {_c_int(b_width)} b_rom_t;
#endif

{requant_template("acc_t", "ACC_BITS", True, yf)}
}}  // namespace {ns}

#include "{name}_weights.h"

// One row: x[K] -> y[N].
inline void {name}(const {ns}::x_t x[{ns}::K], {ns}::y_t y[{ns}::N]) {{
  using namespace {ns};
#pragma HLS ARRAY_PARTITION variable=W cyclic factor=PAR dim=2
  acc_t acc[N];
#pragma HLS ARRAY_PARTITION variable=acc cyclic factor=PAR dim=1
INIT:
  for (int n = 0; n < N; n++) {{
#pragma HLS PIPELINE II=1
    acc[n] = {"b_t(B[n])" if bias is not None else "0"};
  }}
{mac_loop}
OUT:
  for (int n = 0; n < N; n++) {{
#pragma HLS PIPELINE II=1
    switch (COL_CLASS[n]) {{
{cases}
      default: y[n] = 0;
    }}
  }}
}}

#endif  // {guard}
"""
    weights = f"""\
// {name}_weights.h -- integer codes of '{wname}'{f" and '{bname}'" if bias is not None else ""} (graph '{graph.name}'), as stored
#ifndef HWGEN_HLS_{name.upper()}_WEIGHTS_H
#define HWGEN_HLS_{name.upper()}_WEIGHTS_H

namespace {ns} {{

// W[k][n]: {wf.width}-bit codes; column n has {"fractional bits " + ", ".join(str(int(v)) for v in w_frac) if np.unique(w_frac).size > 1 else f"{int(w_frac[0])} fractional bits"}
static const w_rom_t W[K][N] = {_array_2d(w)};
{f'''
// B[n]: codes at the accumulator's fractional bits of column n
static const b_rom_t B[N] = {_array_1d(bias)};
''' if bias is not None else ""}
// requantization class of each column (see {name}.h)
static const unsigned char COL_CLASS[N] = {_array_1d(col_class, per_line=32)};
{blk_arrays}
}}  // namespace {ns}

#endif
"""
    yfmt_codes = FixedType(yw, int(y_int.max()), ys, yf.q, yf.o)
    xfmt_codes = FixedType(xf.width, x_int, xf.signed, xf.q, xf.o)
    return KernelSources(name=name, node=node.name, k=k, n=n, x_fmt=xfmt_codes, y_fmt=yfmt_codes,
                         files={f"{name}.h": header, f"{name}_weights.h": weights},
                         meta={"par": par, "mac_iterations": iters,
                               "mac_iterations_dense": mac_iterations(k, n, par, None),
                               "blocks": None if blocks is None else
                               {"block_k": blocks[0], "block_n": blocks[1], "visited": len(blocks[2])}})


def emit_node(graph: Graph, node: Node, par: int = DEFAULT_PAR, max_seq: int | None = None) -> KernelSources:
    """The kernel of any node whose op is in :data:`HLS_OPS` (``max_seq``: the longest
    sequence, or KV cache capacity, of an attention kernel)."""
    node = _resolve_node(graph, node)
    if node.op == "linear":
        return emit_linear(graph, node, par)
    from . import kernels
    if node.op == "attention":
        return kernels.emit_attention(graph, node, max_seq=max_seq, par=par)
    return getattr(kernels, f"emit_{node.op}")(graph, node, par=par)


def kernel_signature(ks: KernelSources) -> tuple[str, list[str]]:
    """The parameter list of ``ks``'s kernel function (as written in ``<name>.h``)
    and the parameter names, for the synthesis top wrapper (:func:`emit_top`)."""
    text = ks.files.get(f"{ks.name}.h", "")
    m = re.search(r"^inline void " + re.escape(ks.name) + r"\(([^)]*)\)", text, re.M)
    if m is None:
        raise HLSError(f"kernel '{ks.name}': no 'inline void {ks.name}(...)' in {ks.name}.h")
    params = " ".join(m.group(1).split())
    names = []
    for p in params.split(","):
        pm = re.search(r"(\w+)\s*(\[[^\]]*\]\s*)*$", p.strip())
        if pm is None:
            raise HLSError(f"kernel '{ks.name}': cannot parse parameter '{p.strip()}'")
        names.append(pm.group(1))
    return params, names


_PARAM = re.compile(r"^(const\s+)?(?P<type>[\w:<>, ]+?)\s*(?P<ref>&)?\s*(?P<name>\w+)\s*"
                    r"(?P<dims>(\[[^\]]*\]\s*)*)$")


def kernel_params(ks: KernelSources) -> list[dict]:
    """Each parameter of ``ks``'s kernel: ``name``, ``type``, ``const``, ``ref``, ``dims``
    (the C++ extents as written, e.g. ``["q_ns::S_MAX", "q_ns::DM"]``)."""
    params, _ = kernel_signature(ks)
    out = []
    for p in params.split(","):
        m = _PARAM.match(p.strip())
        if m is None:
            raise HLSError(f"kernel '{ks.name}': cannot parse parameter '{p.strip()}'")
        out.append({"name": m["name"], "type": m["type"].strip(), "const": bool(m.group(1)),
                    "ref": bool(m["ref"]), "dims": re.findall(r"\[([^\]]*)\]", m["dims"] or "")})
    return out


def emit_top(ks: KernelSources) -> str:
    """``<name>.cpp``: the synthesis top ``<name>_top`` (a plain, non-inline function
    with the kernel's interface) calling the header's inline kernel, with its
    INTERFACE pragmas.

    Row kernels (one row in, one row out: linear, layernorm, gelu, add) get
    AXI-Stream ports: the top copies each stream into a local row in order
    (one element per cycle), calls the kernel and streams the result out, so
    every port is read or written exactly once, in order, whatever the kernel's
    own access pattern. Sequence kernels (attention, the block top) get m_axi
    ports (``bundle=gmem``, ``depth`` = the array's elements) and AXI-Lite
    scalars. Every top has an AXI-Lite control interface (``port=return``)."""
    params = kernel_params(ks)
    names = [p["name"] for p in params]
    decl = ", ".join(f"{'const ' if p['const'] else ''}{p['type']}{'&' if p['ref'] else ''} {p['name']}"
                     + "".join(f"[{d}]" for d in p["dims"]) for p in params)
    stream = all(len(p["dims"]) == 1 for p in params)
    lines = []
    body = []
    if stream:
        call = []
        for p in params:
            lines.append(f"#pragma HLS INTERFACE axis port={p['name']}")
            buf = f"{p['name']}_row"
            body.append(f"  {p['type']} {buf}[{p['dims'][0]}];")
            call.append(buf)
        for p in params:
            if p["const"]:
                body.append(f"IN_{p['name']}:\n  for (int i = 0; i < {p['dims'][0]}; i++) {{\n"
                            f"#pragma HLS PIPELINE II=1\n    {p['name']}_row[i] = {p['name']}[i];\n  }}")
        body.append(f"  {ks.name}({', '.join(call)});")
        for p in params:
            if not p["const"]:
                body.append(f"OUT_{p['name']}:\n  for (int i = 0; i < {p['dims'][0]}; i++) {{\n"
                            f"#pragma HLS PIPELINE II=1\n    {p['name']}[i] = {p['name']}_row[i];\n  }}")
    else:
        depths = ks.meta.get("port_depth", {})
        for p in params:
            if p["dims"]:
                depth = depths.get(p["name"])
                lines.append(f"#pragma HLS INTERFACE m_axi port={p['name']} offset=slave bundle=gmem"
                             + (f" depth={depth}" if depth else ""))
            else:
                lines.append(f"#pragma HLS INTERFACE s_axilite port={p['name']}")
        body.append(f"  {ks.name}({', '.join(names)});")
    lines.append("#pragma HLS INTERFACE s_axilite port=return")
    pragmas = "\n".join(lines)
    body_text = "\n".join(body)
    return f"""\
// {ks.name}.cpp -- synthesis top of node '{ks.node}' ({ks.op}), generated by hwgen.hls
#include "{ks.name}.h"

void {ks.name}_top({decl}) {{
{pragmas}
{body_text}
}}
"""


def emit_testbench(kernels: list[KernelSources]) -> str:
    """A C++ testbench driving every kernel in ``kernels``.

    Usage: ``tb KERNEL IN.txt OUT.txt [EXPECTED.txt]``. IN.txt holds the number of rows, then
    the rows: K input codes each for the row kernels (linear, layernorm, gelu),
    or the kernel's own record (``KernelSources.run``: add reads a then b,
    attention ``S_q S_kv offset`` then q, k, v and the mask); OUT.txt receives
    one line of output codes per row. With EXPECTED.txt the output codes are
    compared with it, code by code (exit status 6 on any difference). Compiled
    with ``-DHWGEN_TOP_<NAME>`` the testbench calls ``<name>_top`` (the synthesis
    top of :func:`emit_top`) instead of the inline kernel, for Vitis HLS co-simulation.
    """
    incs = "\n".join(f'#include "{ks.name}.h"' for ks in kernels)
    tops = []
    for ks in kernels:
        params, _ = kernel_signature(ks)
        macro = f"HWGEN_TOP_{ks.name.upper()}"
        tops.append(f"#ifdef {macro}  // Vitis HLS co-simulation: call the synthesized top\n"
                    f"void {ks.name}_top({params});\n#define {ks.name} {ks.name}_top\n#endif")
    incs += "\n\n" + "\n".join(tops)
    runs = []
    for ks in kernels:
        if ks.run:
            runs.append(ks.run)
            continue
        ns = f"{ks.name}_ns"
        # the C-simulation's MAC loop count (linear kernels; read by tests against the model)
        count = '  fprintf(stderr, "mac_iterations %lld\\n", MAC_ITERATIONS);' if ks.op == "linear" else ""
        runs.append(f"""\
static int run_{ks.name}(FILE* fi, FILE* fo, long rows) {{
  using namespace {ns};
  x_t x[K];
  y_t y[N];
  for (long r = 0; r < rows; r++) {{
    for (int k = 0; k < K; k++)
      if (!hwgen_read<x_code_t>(fi, x[k])) return 3;
    {ks.name}(x, y);
    for (int n = 0; n < N; n++)
      fprintf(fo, "%lld%c", hwgen_code<y_code_t>(y[n]), n + 1 < N ? ' ' : '\\n');
  }}
{count}
  return 0;
}}
""")
    table = "\n".join(f'  if (!strcmp(argv[1], "{ks.name}")) rc = run_{ks.name}(fi, fo, rows);\n  else'
                      for ks in kernels)
    return f"""\
// C-simulation testbench generated by hwgen.hls
// usage: tb KERNEL IN.txt OUT.txt [EXPECTED.txt]
//   IN: rows, then rows*K input codes; OUT: rows*N output codes; EXPECTED: compared with OUT
#include <cstdio>
#include <cstring>

{incs}

// one input code from the file into a fixed-point value (its bits: the code C)
template <class C, class T>
static bool hwgen_read(FILE* fi, T& x) {{
  long long c;
  if (fscanf(fi, "%lld", &c) != 1) return false;
  C xc = c;
  x.range() = xc.range();
  return true;
}}

// the integer code of a fixed-point value
template <class C, class T>
static long long hwgen_code(const T& y) {{
  C yc;
  yc.range() = y.range();
  return (long long)yc.to_int64();
}}

// compare the output codes written to OUT with EXPECTED, code by code
static int hwgen_compare(const char* out, const char* expected) {{
  FILE* fa = fopen(out, "r");
  if (!fa) {{ perror(out); return 2; }}
  FILE* fb = fopen(expected, "r");
  if (!fb) {{ perror(expected); fclose(fa); return 2; }}
  long long a, b, n = 0, bad = 0;
  int ra, rb;
  for (;;) {{
    ra = fscanf(fa, "%lld", &a);
    rb = fscanf(fb, "%lld", &b);
    if (ra != 1 || rb != 1) break;
    n++;
    if (a != b) {{
      if (bad < 10) fprintf(stderr, "mismatch at output code %lld: got %lld, expected %lld\\n", n - 1, a, b);
      bad++;
    }}
  }}
  fclose(fa);
  fclose(fb);
  if (ra == 1 || rb == 1) {{
    fprintf(stderr, "output has %s codes than %s\\n", ra == 1 ? "more" : "fewer", expected);
    return 6;
  }}
  if (bad) {{
    fprintf(stderr, "%lld of %lld output codes differ from %s\\n", bad, n, expected);
    return 6;
  }}
  fprintf(stderr, "all %lld output codes match %s\\n", n, expected);
  return 0;
}}

{"".join(runs)}
int main(int argc, char** argv) {{
  if (argc != 4 && argc != 5) {{
    fprintf(stderr, "usage: %s KERNEL IN.txt OUT.txt [EXPECTED.txt]\\n", argv[0]);
    return 2;
  }}
  FILE* fi = fopen(argv[2], "r");
  if (!fi) {{ perror(argv[2]); return 2; }}
  FILE* fo = fopen(argv[3], "w");
  if (!fo) {{ perror(argv[3]); return 2; }}
  long rows;
  if (fscanf(fi, "%ld", &rows) != 1) {{ fprintf(stderr, "bad input header\\n"); return 3; }}
  int rc;
{table} {{
    fprintf(stderr, "unknown kernel %s\\n", argv[1]);
    rc = 2;
  }}
  fclose(fi);
  if (fclose(fo) != 0) rc = 4;
  if (rc == 3) fprintf(stderr, "input file ended early\\n");
  if (rc == 5) fprintf(stderr, "sequence longer than the kernel's S_MAX\\n");
  if (rc == 0 && argc == 5) rc = hwgen_compare(argv[3], argv[4]);
  return rc;
}}
"""


def emit_kernels(graph: Graph, nodes: list[Node | str] | None = None, par: int = DEFAULT_PAR,
                 tb_name: str | None = None, max_seq: int | None = None
                 ) -> tuple[list[KernelSources], dict[str, str]]:
    """Kernels for ``nodes`` (default: every node with an HLS kernel) and all their
    files, a shared testbench included (``<tb_name>_tb.cpp``; for one kernel the
    name is the kernel's)."""
    if nodes is None:
        nodes = [n for n in graph.nodes if n.op in HLS_OPS]
    by_name = {n.name: n for n in graph.nodes}
    ks: list[KernelSources] = []
    for nd in nodes:
        if isinstance(nd, str):
            if nd not in by_name:
                raise HLSError(f"graph '{graph.name}' has no node '{nd}'")
            nd = by_name[nd]
        ks.append(emit_node(graph, nd, par, max_seq))
    names = [k.name for k in ks]
    if len(set(names)) != len(names):
        raise HLSError(f"node names collide as C identifiers: {names}")
    files: dict[str, str] = {}
    for k in ks:
        files.update(k.files)
    stem = tb_name or (ks[0].name if len(ks) == 1 else "csim")
    files[f"{stem}_tb.cpp"] = emit_testbench(ks)
    return ks, files
