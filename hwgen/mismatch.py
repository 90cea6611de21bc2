"""Where and why a kernel disagrees with the golden model.

Contract
--------
:func:`explain` takes one graph node, the input codes a kernel was given,
the golden model's output codes and the kernel's output codes. For the first
``limit`` elements that differ (in C order of the output) it returns:

``index``     the element's position in the output tensor
``expected``  the golden model's integer, ``actual`` the kernel's
``operands``  the input codes that element depends on (rows and columns cut to
              their first :data:`HEAD` entries, with their full length)
``contract``  the contract's intermediate values for that element: the
              accumulator and its fractional bits for ``linear`` and ``add``;
              for ``attention`` the head, the query's scores, max, exp-table
              indices and entries, their sum, the reciprocal and the
              probabilities, and the P·V accumulator; for ``layernorm`` the
              row sums, the variance term, its inverse square root and the
              normalized value; for ``gelu`` the table index

The intermediate values come from the golden computation itself
(:func:`hwgen.golden.run_node` with a ``trace``), run on the slice of the
inputs that the element depends on: never a second implementation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .golden import GoldenModel
    from .ir import Graph, Node

#: how many entries of a row/column operand a report shows
HEAD = 16

#: how many mismatching elements a comparison lists
FIRST_MISMATCHES = 10


class Comparison:
    """Accumulates exact comparisons of output arrays: every integer counted."""

    def __init__(self, limit: int = FIRST_MISMATCHES):
        self.limit = limit
        self.mismatches = 0
        self.vectors = 0
        self.first: list[dict] = []

    def add(self, output: str, expected, actual, index_prefix: tuple = ()) -> int:
        """Compare ``actual`` with ``expected`` (same shape required: a shape
        difference counts every expected integer as a mismatch)."""
        e = np.asarray(expected, dtype=np.int64)
        a = np.asarray(actual, dtype=np.int64)
        self.vectors += int(e.size)
        if a.shape != e.shape:
            self.mismatches += int(e.size)
            if len(self.first) < self.limit:
                self.first.append({"output": output, "index": list(index_prefix),
                                   "expected": f"shape {list(e.shape)}", "actual": f"shape {list(a.shape)}"})
            return int(e.size)
        bad = np.argwhere(a != e)
        for idx in bad[: max(0, self.limit - len(self.first))]:
            t = tuple(int(i) for i in idx)
            self.first.append({"output": output, "index": list(index_prefix) + list(t),
                               "expected": int(e[t]), "actual": int(a[t])})
        self.mismatches += len(bad)
        return len(bad)

    def as_dict(self) -> dict:
        return {"mismatches": self.mismatches, "vectors": self.vectors, "first_mismatches": self.first}



def _head(a) -> dict:
    a = np.asarray(a).reshape(-1)
    return {"len": int(a.size), "head": [int(v) for v in a[:HEAD]]}


def _int(v):
    a = np.asarray(v)
    return int(a.reshape(-1)[0]) if a.size == 1 else [int(x) for x in a.reshape(-1)]


def _full_inputs(graph: Graph, node: Node, acts: list) -> list:
    """``node.inputs`` in order: weights from the graph, activations from ``acts``."""
    it = iter(acts)
    out = []
    for t in node.inputs:
        if not t:
            out.append(None)
        elif t in graph.weights:
            out.append(graph.weights[t])
        else:
            out.append(next(it, None))
    return out


def _element(graph: Graph, node: Node, acts: list, idx: tuple, model: GoldenModel,
             offset: int) -> tuple[dict, dict]:
    """(operands, contract intermediates) of output element ``idx``."""
    from .golden import GoldenState, fmt_of, run_node

    op = node.op
    if op == "linear":
        x = np.asarray(acts[0])
        row, n = idx[:-1], idx[-1]
        xr = x[row][None]
        tr: dict = {}
        run_node(graph, node, _full_inputs(graph, node, [xr]), trace=tr, model=model)
        w = model.weight_i64(node.inputs[1])
        b_name = graph.node_input(node, "bias")
        acc_frac = np.asarray(tr["acc_frac"]).reshape(-1)
        return ({"x_row": _head(xr), "w_column": _head(w[:, n]),
                 "bias": int(model.weight_i64(b_name)[n]) if b_name else None},
                {"acc": int(tr["acc"].reshape(-1, tr["acc"].shape[-1])[0, n]),
                 "acc_frac": int(acc_frac[n] if acc_frac.size > 1 else acc_frac[0]),
                 "out_format": str(fmt_of(graph, node.outputs[0]))})
    if op == "attention":
        heads, hd = node.attrs["heads"], node.attrs["head_dim"]
        b, s, c = idx
        h, d = divmod(c, hd)
        sl = [None if a is None else np.asarray(a)[b:b + 1] for a in acts]
        tr = {}
        state = GoldenState(offset=offset)
        run_node(graph, node, _full_inputs(graph, node, sl), state=state, trace=tr, model=model)
        pick = (0, h, s)
        return ({"head": h, "dim": d, "query_position": s, "q": _head(tr["heads_q"][pick]),
                 "v_column": _head(tr["heads_v"][0, h, :, d])},
                {"scores": _head(tr["scores"][pick]), "valid": _head(np.asarray(tr["valid"])[..., s, :]),
                 "max": _int(tr["softmax_max"][pick]), "exp_index": _head(tr["softmax_index"][pick]),
                 "exp": _head(tr["softmax_exp"][pick]), "exp_sum": _int(tr["softmax_total"][pick]),
                 "recip": _int(tr["softmax_recip"][pick]), "recip_frac": _int(tr["softmax_recip_frac"][pick]),
                 "prob": _head(tr["prob"][pick]), "pv_acc": int(tr["pv_acc"][0, h, s, d]),
                 "heads": heads})
    if op == "layernorm":
        x = np.asarray(acts[0])
        row, ch = idx[:-1], idx[-1]
        tr = {}
        run_node(graph, node, _full_inputs(graph, node, [x[row][None]]), trace=tr, model=model)
        return ({"x_row": _head(x[row]), "gamma": int(model.weight_i64(node.inputs[1])[ch]),
                 "beta": int(model.weight_i64(node.inputs[2])[ch])},
                {"s1": _int(tr["s1"]), "s2": _int(tr["s2"]), "num": int(tr["num"].reshape(-1)[ch]),
                 "d": _int(tr["d"]), "isqrt": _int(tr["isqrt"]), "isqrt_frac": _int(tr["isqrt_frac"]),
                 "z": int(tr["z"].reshape(-1)[ch])})
    if op == "add":
        a, b = (np.asarray(v) for v in acts[:2])
        tr = {}
        run_node(graph, node, _full_inputs(graph, node, [a[idx][None], b[idx][None]]), trace=tr, model=model)
        return ({"a": int(a[idx]), "b": int(b[idx])},
                {"acc": _int(tr["acc"]), "acc_frac": _int(tr["acc_frac"])})
    if op == "gelu":
        x = np.asarray(acts[0])
        code = int(x[idx])
        return ({"x": code}, {"table_index": code - fmt_of(graph, node.inputs[0]).min_code})
    return ({f"in{i}": int(np.asarray(a)[idx]) for i, a in enumerate(acts) if a is not None
             and np.asarray(a).shape == np.asarray(acts[0]).shape}, {})


def explain_element(graph: Graph, node: Node | str, acts: list | tuple | np.ndarray, index,
                    offset: int = 0) -> dict:
    """``{"operands": ..., "contract": ...}`` of one output element ``index``
    of ``node`` on inputs ``acts`` (see :func:`explain`)."""
    from .golden import GoldenModel

    node = graph.node(node) if isinstance(node, str) else node
    acts = [acts] if isinstance(acts, np.ndarray) else list(acts)
    operands, contract = _element(graph, node, acts, tuple(int(i) for i in index),
                                  GoldenModel(graph, workers=1), offset)
    return {"operands": operands, "contract": contract}


def explain(graph: Graph, node: Node | str, acts: list | tuple | np.ndarray, expected: np.ndarray,
            actual: np.ndarray, limit: int = 5, offset: int = 0) -> dict:
    """The first ``limit`` mismatching elements of one kernel (see module doc).

    ``acts``: the kernel's activation inputs in ``node.inputs`` order (one array
    for single-input ops). ``offset``: the decode position of the first query
    (KV-cache attention)."""
    node = graph.node(node) if isinstance(node, str) else node
    if isinstance(acts, np.ndarray):
        acts = [acts]
    acts = list(acts)
    expected, actual = np.asarray(expected), np.asarray(actual)
    res = {"kernel": node.name, "op": node.op, "mismatches": 0, "first": []}
    if expected.shape != actual.shape:
        res.update(mismatches=int(expected.size),
                   shape_error=f"expected shape {list(expected.shape)}, got {list(actual.shape)}")
        return res
    from .golden import GoldenModel

    bad = np.argwhere(expected != actual)
    res["mismatches"] = int(len(bad))
    model = GoldenModel(graph, workers=1)
    for pos in bad[:limit]:
        idx = tuple(int(i) for i in pos)
        operands, contract = _element(graph, node, acts, idx, model, offset)
        res["first"].append({"index": list(idx), "expected": int(expected[idx]), "actual": int(actual[idx]),
                             "operands": operands, "contract": contract})
    return res


def format_explanation(ex: dict) -> str:
    """A few lines for a terminal: one per reported element."""
    lines = [f"{ex['kernel']} ({ex['op']}): {ex['mismatches']} mismatching output code(s)"]
    if "shape_error" in ex:
        lines.append(f"  {ex['shape_error']}")
    for e in ex["first"]:
        c = ", ".join(f"{k}={v['head'] if isinstance(v, dict) else v}" for k, v in e["contract"].items()
                      if not isinstance(v, dict) or v["len"] <= 4)
        lines.append(f"  at {e['index']}: expected {e['expected']}, got {e['actual']}"
                     + (f"; contract: {c}" if c else ""))
    return "\n".join(lines)
