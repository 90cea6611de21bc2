"""The golden model: integer-exact NumPy execution of a fixed graph.

This is the reference every other stage is checked against. It reads each
tensor's format and each node's attributes from the :class:`~hwgen.ir.Graph`
and calls :mod:`hwgen.contract` for every operation; it decides nothing of its
own. Graph inputs of dtype ``float`` are quantized by their ``quantize`` node;
``index`` inputs (token ids, masks) are taken as they are. Outputs are integer
codes; :func:`dequantize` turns them into floats with the tensor's format.

Decoders keep a :class:`GoldenState` (KV cache per attention node and the
position offset) across calls: a prefill call over the prompt, then
single-token calls, give the same integers as one call over the whole
sequence.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import contract as C
from .fixed import FixedType
from .ir import Graph, GraphError, Node


class InputError(ValueError):
    """Feeds that do not match the graph's inputs; the message names the input."""


@dataclass
class GoldenState:
    """KV caches (codes, shaped (B, heads, T, head_dim)) and the position offset."""

    kv: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    offset: int = 0

    def reset(self) -> None:
        self.kv.clear()
        self.offset = 0

    def truncate(self, n: int) -> None:
        """Forget every position from ``n`` on (a rejected draft): the caches keep
        positions ``0 .. n-1`` and the next pass starts at position ``n``."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot truncate a cache of {self.offset} positions to {n}")
        self.kv = {name: (k[:, :, :n], v[:, :, :n]) for name, (k, v) in self.kv.items()}
        self.offset = n


def fmt_of(graph: Graph, name: str) -> FixedType:
    t = graph.tensors[name]
    if t.fmt is None:
        raise GraphError(f"tensor '{name}' has no fixed-point format (is the graph quantized?)")
    return t.fmt


class GoldenModel:
    """Executes one fixed graph; weights are converted for the GEMMs once.

    Batch rows never interact (every op is per row), so a stateless call with
    several rows runs its rows in ``workers`` threads (NumPy releases the GIL
    in its kernels); results are identical to one pass.
    """

    def __init__(self, graph: Graph, workers: int | None = None):
        if not graph.is_fixed:
            raise GraphError(f"graph '{graph.name}' is a float graph; quantize it first "
                             "(`hwgen quantize`)")
        self.graph = graph
        self._gemm_w: dict[str, np.ndarray] = {}
        self._i64: dict[str, np.ndarray] = {}
        self.workers = workers if workers is not None else min(2, os.cpu_count() or 1)
        self._stateful = any(n.op == "attention" and n.attrs.get("kv_cache") for n in graph.nodes)

    # -- weights, converted once -------------------------------------------
    def weight_gemm(self, name: str) -> np.ndarray:
        """A matmul weight as the float type its exact GEMM runs in."""
        w = self._gemm_w.get(name)
        if w is None:
            t = self.graph.tensors[name]
            dtype = np.float32 if t.fmt.width <= 24 else np.float64
            w = self._gemm_w[name] = np.ascontiguousarray(self.graph.weights[name], dtype=dtype)
        return w

    def weight_i64(self, name: str) -> np.ndarray:
        w = self._i64.get(name)
        if w is None:
            w = self._i64[name] = self.graph.weights[name].astype(np.int64)
        return w

    # -- running ------------------------------------------------------------
    def __call__(self, feeds: dict[str, np.ndarray], state: GoldenState | None = None,
                 record: bool = False) -> dict[str, np.ndarray]:
        feeds = check_feeds(self.graph, feeds)
        rows = len(feeds[self.graph.inputs[0]]) if self.graph.inputs else 0
        if self.workers > 1 and rows > 1 and not self._stateful and not record and state is None:
            n = min(self.workers, rows)
            parts = [{k: np.asarray(v)[i::n] for k, v in feeds.items()} for i in range(n)]
            with ThreadPoolExecutor(n) as ex:
                outs = list(ex.map(self._run, parts))
            order = np.argsort(np.concatenate([np.arange(rows)[i::n] for i in range(n)]), kind="stable")
            return {k: np.concatenate([o[k] for o in outs])[order] for k in outs[0]}
        return self._run(feeds, state, record)

    def _run(self, feeds: dict[str, np.ndarray], state: GoldenState | None = None,
             record: bool = False) -> dict[str, np.ndarray]:
        g = self.graph
        vals: dict[str, np.ndarray] = dict(g.weights)
        vals.update(feeds)
        state = state if state is not None else GoldenState()
        for node in g.nodes:
            fn = _OPS.get(node.op)
            if fn is None:
                raise GraphError(f"node '{node.name}': op '{node.op}' has no golden kernel")
            outs = fn(self, node, [vals[t] if t else None for t in node.inputs], state)
            vals[node.outputs[0]] = outs
        state.offset += _seq_len(g, feeds)
        if record:
            return vals
        return {name: vals[name] for name in g.outputs}


def run_node(graph: Graph, node: Node | str, ins: list, state: GoldenState | None = None,
             trace: dict | None = None, model: "GoldenModel | None" = None) -> np.ndarray:
    """One node of ``graph`` on input codes ``ins`` (in ``node.inputs`` order,
    ``None`` for absent optional inputs). ``trace`` (a dict) receives the
    contract's intermediate values for the ops that record them (linear,
    attention, layernorm, add): the golden computation itself, not a copy."""
    node = graph.node(node) if isinstance(node, str) else node
    fn = _OPS.get(node.op)
    if fn is None:
        raise GraphError(f"node '{node.name}': op '{node.op}' has no golden kernel")
    m = model if model is not None else GoldenModel(graph, workers=1)
    state = state if state is not None else GoldenState()
    if trace is not None and node.op in ("linear", "attention", "layernorm", "add"):
        return fn(m, node, ins, state, trace=trace)
    return fn(m, node, ins, state)


def run(graph: Graph, feeds: dict[str, np.ndarray], state: GoldenState | None = None,
        record: bool = False) -> dict[str, np.ndarray]:
    """One-shot convenience: ``GoldenModel(graph)(feeds, state, record)``."""
    return GoldenModel(graph)(feeds, state, record)


def frac_of(graph: Graph, name: str) -> int | np.ndarray:
    """Fractional bits of a fixed tensor: an int, or a broadcastable per-channel array."""
    fmt_of(graph, name)
    return graph.tensors[name].frac_bits()


def dequantize(graph: Graph, name: str, codes: np.ndarray) -> np.ndarray:
    """Real values of a fixed tensor's codes (per-channel formats included)."""
    return np.ldexp(np.asarray(codes, dtype=np.float64), -np.asarray(frac_of(graph, name), dtype=np.int64))


def check_feeds(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Match feeds to the graph's inputs: names, ranks, bound dimensions, values."""
    missing = [n for n in graph.inputs if n not in feeds]
    if missing:
        raise InputError(f"missing graph input(s) {missing}; graph '{graph.name}' takes {graph.inputs}")
    extra = [n for n in feeds if n not in graph.inputs]
    if extra:
        raise InputError(f"unknown input(s) {extra}; graph '{graph.name}' takes {graph.inputs}")
    dims: dict[str, int] = {}
    out = {}
    for name in graph.inputs:
        t = graph.tensors[name]
        v = np.asarray(feeds[name])
        if v.ndim != len(t.shape):
            raise InputError(f"input '{name}' has shape {list(v.shape)}; the graph expects "
                             f"{list(t.shape)}")
        for axis, (want, got) in enumerate(zip(t.shape, v.shape)):
            if isinstance(want, str):
                if dims.setdefault(want, got) != got:
                    raise InputError(f"input '{name}' axis {axis} ('{want}') is {got} but another "
                                     f"input bound '{want}' to {dims[want]}")
            elif want != got:
                raise InputError(f"input '{name}' has shape {list(v.shape)}; the graph expects "
                                 f"{list(t.shape)}")
        if t.dtype == "float":
            v = v.astype(np.float64)
            if not np.all(np.isfinite(v)):
                raise InputError(f"input '{name}' contains NaN or Inf")
        else:
            if not np.issubdtype(v.dtype, np.integer):
                raise InputError(f"input '{name}' must hold integers (token ids / mask), got {v.dtype}")
            v = v.astype(np.int64)
        out[name] = v
    return out


def _seq_len(graph: Graph, feeds: dict[str, np.ndarray]) -> int:
    """The S bound by the first input (axis 1) — positions advance by it."""
    first = np.asarray(feeds[graph.inputs[0]])
    return int(first.shape[1]) if first.ndim >= 2 else 0


# ----------------------------------------------------------------------------
# op kernels: read formats/attrs, call the contract
# ----------------------------------------------------------------------------

def _quantize(m: GoldenModel, node: Node, ins, state) -> np.ndarray:
    return fmt_of(m.graph, node.outputs[0]).from_float(ins[0])


def _embedding(m: GoldenModel, node: Node, ins, state) -> np.ndarray:
    ids, _ = ins
    if node.attrs.get("positions"):
        s = ids.shape[1]
        ids = np.broadcast_to(np.arange(state.offset, state.offset + s), ids.shape)
    table = m.graph.weights[node.inputs[1]]
    if node.attrs.get("positions") and ids.size and ids.max() >= table.shape[0]:
        raise InputError(f"position {int(ids.max())} is beyond the model's {table.shape[0]} "
                         f"positions (node '{node.name}')")
    return C.embedding(ids, table)


def _linear(m: GoldenModel, node: Node, ins, state, trace: dict | None = None) -> np.ndarray:
    g = m.graph
    x = ins[0]
    w_name = node.inputs[1]
    b_name = g.node_input(node, "bias")
    # per-channel x formats are folded into the weight rows (quant.linear_row_shift):
    # the accumulator sits at the finest channel's fractional bits
    x_frac = int(np.max(frac_of(g, node.inputs[0])))
    w_frac = np.asarray(g.tensors[w_name].frac_bits()).reshape(-1)
    if w_frac.size == 1:
        w_frac = int(w_frac[0])
    bias = m.weight_i64(b_name) if b_name else None
    x_fmt, w_fmt = fmt_of(g, node.inputs[0]), fmt_of(g, w_name)
    out = g.tensors[node.outputs[0]]
    return C.linear(x, x_frac, m.weight_gemm(w_name), w_frac, bias,
                    fmt_of(g, node.outputs[0]), node.attrs["acc_bits"],
                    max(abs(v) for v in C.product_range(x_fmt, w_fmt)),
                    frac_of(g, node.outputs[0]) if out.per_channel else None, trace=trace)


def _split_heads(x: np.ndarray, heads: int, hd: int) -> np.ndarray:
    b, s, _ = x.shape
    return x.reshape(b, s, heads, hd).transpose(0, 2, 1, 3)


def attention_valid(node: Node, s_q: int, s_kv: int, offset: int = 0,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Which scores of an attention node enter the softmax: the causal mask
    (queries at positions ``offset ..``) and the padding ``mask`` (``[B, s_kv]``)."""
    valid = np.ones((s_q, s_kv), dtype=bool)
    if node.attrs["causal"]:
        valid = C.causal_mask(s_q, s_kv, offset)
    if mask is not None:
        valid = valid & C.padding_mask(mask)
    return valid


def _attention(m: GoldenModel, node: Node, ins, state: GoldenState,
               trace: dict | None = None) -> np.ndarray:
    g, a = m.graph, node.attrs
    if a["scale"] != 1:
        raise GraphError(f"node '{node.name}': attention scale {a['scale']} was not folded "
                         "into the q projection")
    heads, hd = a["heads"], a["head_dim"]
    q_fmt, k_fmt, v_fmt = (fmt_of(g, t) for t in node.inputs[:3])
    q, k, v = (_split_heads(t, heads, hd) for t in ins[:3])
    offset = 0
    if a.get("kv_cache"):
        offset = state.offset
        past = state.kv.get(node.name)
        cap = a.get("max_positions")
        k = C.kv_append(None if past is None else past[0], k, cap)
        v = C.kv_append(None if past is None else past[1], v, cap)
        state.kv[node.name] = (k, v)
    valid = attention_valid(node, q.shape[-2], k.shape[-2], offset, ins[3] if len(ins) > 3 else None)
    o = C.attention(q, q_fmt, k, k_fmt, v, v_fmt, valid, C.ExpTable(**a["exp"]),
                    C.RecipTable(**a["recip"]), FixedType.from_dict(a["prob_format"]),
                    fmt_of(g, node.outputs[0]), trace=trace)
    if trace is not None:
        trace.update(heads_q=q, heads_k=k, heads_v=v, valid=valid)
    b, _, s, _ = o.shape
    return o.transpose(0, 2, 1, 3).reshape(b, s, heads * hd)


def _layernorm(m: GoldenModel, node: Node, ins, state, trace: dict | None = None) -> np.ndarray:
    g, a = m.graph, node.attrs
    x_fmt = fmt_of(g, node.inputs[0])
    return C.layernorm(ins[0], x_fmt.frac_bits, m.weight_i64(node.inputs[1]),
                       fmt_of(g, node.inputs[1]).frac_bits, m.weight_i64(node.inputs[2]),
                       a["eps_code"], C.IsqrtTable(**a["isqrt"]),
                       FixedType.from_dict(a["norm_format"]), fmt_of(g, node.outputs[0]),
                       frac_of(g, node.outputs[0]), trace=trace)


def _gelu(m: GoldenModel, node: Node, ins, state) -> np.ndarray:
    g = m.graph
    out = g.tensors[node.outputs[0]]
    return C.gelu(ins[0], fmt_of(g, node.inputs[0]), fmt_of(g, node.outputs[0]),
                  node.attrs["approximate"], frac_of(g, node.outputs[0]) if out.per_channel else None)


def _relu(m: GoldenModel, node: Node, ins, state) -> np.ndarray:
    g = m.graph
    return C.relu(ins[0], fmt_of(g, node.inputs[0]).frac_bits, fmt_of(g, node.outputs[0]))


def _add(m: GoldenModel, node: Node, ins, state, trace: dict | None = None) -> np.ndarray:
    g = m.graph
    out = g.tensors[node.outputs[0]]
    return C.add(ins[0], frac_of(g, node.inputs[0]), ins[1], frac_of(g, node.inputs[1]),
                 fmt_of(g, node.outputs[0]), frac_of(g, node.outputs[0]) if out.per_channel else None,
                 trace=trace)


def _mean_pool(m: GoldenModel, node: Node, ins, state) -> np.ndarray:
    return C.mean_pool(ins[0], ins[1])


_OPS: dict[str, Callable] = {
    "quantize": _quantize,
    "embedding": _embedding,
    "linear": _linear,
    "attention": _attention,
    "layernorm": _layernorm,
    "gelu": _gelu,
    "relu": _relu,
    "add": _add,
    "mean_pool": _mean_pool,
}
