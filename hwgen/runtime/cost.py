"""Cost model and placement plan.

Accelerator time of a node = its kernel's exact cycle count (from the RTL
engines: ``MatmulSpec.for_linear(...).cycles(m)`` in passes of at most ``max_m``
rows, ``AttentionEngine.for_node(...).cycles(s_q, s_kv)`` once per head and batch
row, the heads sharing one engine) at
the accelerator clock (``--clock-mhz``, or ``fmax_mhz`` read from a ``hwgen impl
--json`` result), plus link time of the packed bytes it pulls across
(``bytes / bandwidth + latency`` per transfer). Host time = the node's measured
wall time on the torch host backend (a profile run). Where no engine gives a
node's cycles (the engine is not in this checkout, or the op has no RTL
engine), its accelerator time is unknown (``None``) and never guessed.

:func:`predict_transfers` walks a placement over the tensor shapes and counts,
per consuming node, the bytes that cross the link, with the same residency
rule as the driver (a tensor crosses once per direction; weights are resident).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..ir import Graph, Node
from .pack import DEFAULT_BUS_BITS, tensor_format
from .partition import ACCEL, HOST, DriverError

DEFAULT_CLOCK_MHZ = 200.0
#: PCIe Gen3 x8, effective
DEFAULT_LINK_GBPS = 8.0
DEFAULT_LINK_LATENCY_US = 1.0


@dataclass(frozen=True)
class Link:
    bytes_per_s: float = DEFAULT_LINK_GBPS * 1e9
    latency_s: float = DEFAULT_LINK_LATENCY_US * 1e-6

    def seconds(self, nbytes: int, transfers: int) -> float:
        return nbytes / self.bytes_per_s + transfers * self.latency_s


def clock_from_impl(path: str | Path) -> float:
    """``fmax_mhz`` of a ``hwgen impl --json`` result file (top level or ``total``)."""
    p = Path(path)
    try:
        text = p.read_text()
        try:                        # a JSON file (e.g. hwgen flow's results/impl.json) ...
            doc = json.loads(text)
        except ValueError:          # ... or the verb's stdout: the JSON object is the last line
            lines = [ln for ln in text.splitlines() if ln.strip()]
            doc = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError) as e:
        raise DriverError(f"{p}: cannot read the `hwgen impl --json` result ({e})") from None
    for d in (doc, (doc or {}).get("total") if isinstance(doc, dict) else None):
        if isinstance(d, dict) and isinstance(d.get("fmax_mhz"), (int, float)) and d["fmax_mhz"] > 0:
            return float(d["fmax_mhz"])
    raise DriverError(f"{p}: no positive 'fmax_mhz' in the `hwgen impl --json` result")


class CycleModel:
    """Exact kernel cycles per node from the RTL engines' ``cycles()`` (None where no
    engine exists). Engines are built once per node (``rows`` x ``cols`` PE array,
    attention ``lanes``)."""

    def __init__(self, graph: Graph, rows: int = 16, cols: int = 16, lanes: int | None = None,
                 max_m: int = 128):
        self.graph = graph
        self.rows, self.cols, self.lanes, self.max_m = rows, cols, lanes, max_m
        self._engines: dict[str, object] = {}
        self._memo: dict[tuple, int | None] = {}
        self.max_seq = int(graph.meta.get("max_positions") or 0) or 128

    def _engine(self, node: Node):
        if node.name in self._engines:
            return self._engines[node.name]
        eng = None
        try:
            if node.op == "linear":
                from ..rtl.matmul import MatmulSpec
                eng = MatmulSpec.for_linear(self.graph, node, rows=self.rows, cols=self.cols,
                                            max_m=self.max_m)
            elif node.op == "attention":
                from ..rtl.attention import AttentionEngine
                kw = {"lanes": self.lanes} if self.lanes else {}
                eng = AttentionEngine.for_node(self.graph, node, max_seq=self.max_seq, **kw)
                eng._MustUse__silence = True  # read for its cycle formula, never elaborated
        except ImportError:
            eng = None
        self._engines[node.name] = eng
        return eng

    def node_cycles(self, node: Node, dims: dict[str, int], offset: int = 0) -> int | None:
        key = (node.name, dims["B"], dims["S"], offset if node.attrs.get("kv_cache") else 0)
        if key not in self._memo:
            self._memo[key] = self._cycles(node, dims, offset)
        return self._memo[key]

    def _cycles(self, node: Node, dims: dict[str, int], offset: int) -> int | None:
        eng = self._engine(node)
        if eng is None:
            return None
        b, s = dims["B"], dims["S"]
        if node.op == "linear":
            m, total = b * s, 0
            while m > 0:
                total += int(eng.cycles(min(m, self.max_m)))
                m -= self.max_m
            return total
        s_kv = offset + s if node.attrs.get("kv_cache") else s
        return int(eng.cycles(s, s_kv)) * int(node.attrs["heads"]) * b


def _numel(graph: Graph, name: str, dims: dict[str, int]) -> int:
    n = 1
    for d in graph.tensors[name].shape:
        n *= dims[d] if isinstance(d, str) else int(d)
    return n


def predict_transfers(graph: Graph, placement: dict[str, str], dims: dict[str, int],
                      bus_bits: int = DEFAULT_BUS_BITS) -> dict[str, dict]:
    """Per consuming node (and ``"<outputs>"`` for the graph outputs brought home):
    ``{"to_accel": bytes, "from_accel": bytes, "transfers": n}``."""
    where: dict[str, set] = {t: {HOST} for t in graph.inputs}
    out: dict[str, dict] = {}

    def pull(node_key: str, t: str, side: str) -> None:
        if side in where[t]:
            return
        nbytes = tensor_format(graph, t, bus_bits).nbytes(_numel(graph, t, dims))
        rec = out.setdefault(node_key, {"to_accel": 0, "from_accel": 0, "transfers": 0})
        rec["to_accel" if side == ACCEL else "from_accel"] += nbytes
        rec["transfers"] += 1
        where[t].add(side)

    for n in graph.nodes:
        side = placement[n.name]
        for t in n.inputs:
            if t and graph.tensors[t].kind != "weight":
                pull(n.name, t, side)
        where[n.outputs[0]] = {side}
    for t in graph.outputs:
        pull("<outputs>", t, HOST)
    return out


def plan_rows(graph: Graph, placement: dict[str, str], dims: dict[str, int], offset: int,
              host_s: dict[str, float], cycles: CycleModel, clock_mhz: float, link: Link,
              bus_bits: int = DEFAULT_BUS_BITS) -> list[dict]:
    """One row per node: ``node``, ``op``, ``device``, ``predicted_s`` (host: the profile;
    accel: cycles at the clock plus its transfers' link time; None if cycles unknown),
    ``host_s``, ``cycles``, ``bytes`` (moved for this node), ``transfers``."""
    moves = predict_transfers(graph, placement, dims, bus_bits)
    rows = []
    for n in graph.nodes:
        mv = moves.get(n.name, {"to_accel": 0, "from_accel": 0, "transfers": 0})
        nbytes = mv["to_accel"] + mv["from_accel"]
        link_s = link.seconds(nbytes, mv["transfers"])
        cyc = cycles.node_cycles(n, dims, offset) if placement[n.name] == ACCEL else None
        if placement[n.name] == ACCEL:
            pred = None if cyc is None else cyc / (clock_mhz * 1e6) + link_s
        else:
            pred = host_s.get(n.name, 0.0) + link_s
        rows.append({"node": n.name, "op": n.op, "device": placement[n.name], "predicted_s": pred,
                     "host_s": host_s.get(n.name), "cycles": cyc, "bytes": nbytes,
                     "transfers": mv["transfers"]})
    if "<outputs>" in moves:
        mv = moves["<outputs>"]
        rows.append({"node": "<outputs>", "op": "transfer", "device": HOST,
                     "predicted_s": link.seconds(mv["from_accel"], mv["transfers"]), "host_s": None,
                     "cycles": None, "bytes": mv["from_accel"], "transfers": mv["transfers"]})
    return rows


def cost_placement(graph: Graph, kernel_ops: tuple[str, ...], dims: dict[str, int], offset: int,
                   host_s: dict[str, float], cycles: CycleModel, clock_mhz: float, link: Link,
                   bus_bits: int = DEFAULT_BUS_BITS) -> dict[str, str]:
    """Per node with a kernel: the accelerator when its cycles at the clock plus moving
    its activation inputs and output across the link beat its measured host time;
    nodes whose cycles are unknown, and nodes without a kernel, stay on the host."""
    force: dict[str, str] = {}
    for n in graph.nodes:
        if n.op not in kernel_ops:
            force[n.name] = HOST
            continue
        cyc = cycles.node_cycles(n, dims, offset)
        if cyc is None:
            force[n.name] = HOST
            continue
        acts = [t for t in n.inputs if t and graph.tensors[t].kind != "weight"] + [n.outputs[0]]
        nbytes = sum(tensor_format(graph, t, bus_bits).nbytes(_numel(graph, t, dims)) for t in acts)
        accel_s = cyc / (clock_mhz * 1e6) + link.seconds(nbytes, len(acts))
        force[n.name] = ACCEL if accel_s < host_s.get(n.name, float("inf")) else HOST
    return force


def format_table(rows: list[dict]) -> str:
    def f_s(v):
        return "-" if v is None else f"{v * 1e3:.3f}"

    head = f"{'node':<48} {'op':<10} {'device':<6} {'pred ms':>9} {'host ms':>9} {'cycles':>10} {'bytes':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['node'][:48]:<48} {r['op']:<10} {r['device']:<6} {f_s(r['predicted_s']):>9} "
                     f"{f_s(r['host_s']):>9} {('-' if r['cycles'] is None else r['cycles']):>10} "
                     f"{r['bytes']:>10}")
    return "\n".join(lines)


def median_profile(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = samples[0].keys() if samples else []
    return {k: float(np.median([s[k] for s in samples])) for k in keys}
