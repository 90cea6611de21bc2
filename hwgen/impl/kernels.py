"""The kernels ``hwgen impl`` synthesizes: the RTL engines of a fixed graph's
nodes (``linear`` -> :class:`hwgen.rtl.matmul.MatmulEngine`, ``attention`` ->
:class:`hwgen.rtl.attention.AttentionEngine`), each with its exact cycle count
from the engine's own manifest."""
from __future__ import annotations

from dataclasses import dataclass

from .parts import ImplError


@dataclass
class Kernel:
    name: str            #: the graph node
    op: str
    component: object    #: the Amaranth component
    manifest: dict       #: the engine's manifest (cycles, ideal_cycles, utilization ...)


def _attention_engine():
    try:
        from ..rtl.attention import AttentionEngine
    except ImportError:
        return None
    return AttentionEngine


def graph_kernels(graph, names=None, layer: int | None = 0, rows: int = 16, cols: int = 16,
                  max_m: int = 128, lanes: int = 8) -> tuple[list[Kernel], list[dict]]:
    """Kernels for the graph's ``linear``/``attention`` nodes: those named in
    ``names``, else those of ``layer`` (None: every layer). Cycles at ``m =
    max_m`` tokens (attention: ``max_m`` queries over ``max_m`` keys). Returns
    (kernels, skipped nodes with the reason)."""
    from ..rtl.matmul import MatmulEngine
    from ..rtl.pe_array import RTLError

    if not graph.is_fixed:
        raise ImplError(f"graph '{graph.name}' is a float graph; quantize it first (`hwgen quantize`)")
    ops = ("linear", "attention")
    if names:
        known = {n.name: n for n in graph.nodes}
        missing = [x for x in names if x not in known]
        if missing:
            cand = ", ".join(n.name for n in graph.nodes if n.op in ops)
            raise ImplError(f"graph '{graph.name}' has no node {', '.join(map(repr, missing))} "
                            f"(kernel nodes: {cand})")
        nodes = [known[x] for x in names]
    else:
        if layer is not None and layer not in graph.layers:
            raise ImplError(f"graph '{graph.name}' has no layer {layer} "
                            f"(layers: {', '.join(map(str, graph.layers)) or 'none'})")
        nodes = [n for n in graph.nodes if n.op in ops and (layer is None or n.layer == layer)]
    kernels, skipped = [], []
    for n in nodes:
        try:
            if n.op == "linear":
                eng = MatmulEngine.for_linear(graph, n, rows=rows, cols=cols, max_m=max_m)
                man = eng.manifest(max_m)
            elif n.op == "attention":
                Att = _attention_engine()
                if Att is None:
                    skipped.append({"name": n.name, "op": n.op, "reason": "no RTL attention engine"})
                    continue
                eng = Att.for_node(graph, n, max_seq=max_m, lanes=lanes)
                man = eng.manifest(max_m, max_m)
            else:
                raise ImplError(f"node '{n.name}': op '{n.op}' has no RTL kernel (only linear, attention)")
        except RTLError as e:
            skipped.append({"name": n.name, "op": n.op, "reason": str(e)})
            continue
        kernels.append(Kernel(n.name, n.op, eng, man))
    if not kernels:
        why = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped) or "no linear/attention node"
        raise ImplError(f"graph '{graph.name}': nothing to implement ({why})")
    return kernels, skipped
