"""Roofline of one transformer layer on a part, next to the generated design.

For a fixed graph's layer at ``seq`` tokens:

* ``macs``: every ``linear`` (``seq * K * N``) and every ``attention``
  (``heads * 2 * seq * seq * head_dim``: QK^T and PV);
* ``weight_bytes``: the layer's weight and bias codes at their bit widths;
* compute bound: ``macs / (mac_units * fmax)`` with ``mac_units`` the part's
  DSP multipliers (one MAC per cycle each) unless given;
* weight-streaming bound: ``weight_bytes / bandwidth`` (weights fetched from
  external memory once per layer call); when the whole model's weights fit in
  the part's block RAM they need not be streamed, which the result says
  (``weights_fit_on_chip``) -- the bound is reported either way;
* roofline time = max of the two; arithmetic intensity = MACs per weight byte,
  ridge = peak MACs/s / bandwidth.

The generated design: the engines' exact cycles from their manifests
(:class:`hwgen.rtl.matmul.MatmulEngine` per linear, one
:class:`hwgen.rtl.attention.AttentionEngine` pass per head), run one after the
other on one engine of each kind, at the design's Fmax (``hwgen impl``),
with ``fraction_of_roofline`` against the part's DSP roof and
``fraction_of_own_roof`` against the design's own ``rows * cols`` multipliers
(DSP and fabric: a 16x16 array on LFE5U-85F has more multipliers than DSPs,
so it can beat the DSP roof).
"""
from __future__ import annotations

import math

import numpy as np

from .parts import EBR_BITS, ImplError, Part, parse_part


def _bits(graph, name: str) -> int:
    t = graph.tensors[name]
    return int(t.fmt.width) if t.fmt is not None else 32


def layer_work(graph, layer: int, seq: int) -> dict:
    """MACs and weight bytes of one layer, per node and in total."""
    nodes = [n for n in graph.nodes if n.layer == layer and n.op in ("linear", "attention")]
    if not nodes:
        raise ImplError(f"graph '{graph.name}' has no linear/attention node in layer {layer} "
                        f"(layers: {', '.join(map(str, graph.layers)) or 'none'})")
    rows = []
    for n in nodes:
        if n.op == "linear":
            w = np.asarray(graph.weights[n.inputs[1]])
            k, nn = int(w.shape[0]), int(w.shape[1])
            wbytes = k * nn * _bits(graph, n.inputs[1]) / 8
            b = graph.node_input(n, "bias")
            if b:
                wbytes += nn * _bits(graph, b) / 8
            rows.append({"name": n.name, "op": "linear", "k": k, "n": nn, "macs": seq * k * nn,
                         "weight_bytes": wbytes})
        else:
            h, d = int(n.attrs["heads"]), int(n.attrs["head_dim"])
            rows.append({"name": n.name, "op": "attention", "heads": h, "head_dim": d,
                         "macs": h * 2 * seq * seq * d, "weight_bytes": 0.0})
    return {"nodes": rows, "macs": sum(r["macs"] for r in rows),
            "weight_bytes": sum(r["weight_bytes"] for r in rows)}


def model_weight_bytes(graph) -> float:
    total = 0.0
    for n in graph.nodes:
        if n.op == "linear":
            w = np.asarray(graph.weights[n.inputs[1]])
            total += w.size * _bits(graph, n.inputs[1]) / 8
    return total


def design_cycles(graph, layer: int, seq: int, rows: int = 16, cols: int = 16, lanes: int = 8) -> dict:
    """The generated engines' exact cycles for the layer (from their manifests)."""
    from ..rtl.matmul import MatmulSpec
    from ..rtl.pe_array import RTLError

    per = []
    for n in graph.nodes:
        if n.layer != layer or n.op not in ("linear", "attention"):
            continue
        try:
            if n.op == "linear":
                spec = MatmulSpec.for_linear(graph, n, rows=rows, cols=cols, max_m=seq)
                man = spec.manifest(seq)
                per.append({"name": n.name, "op": n.op, "cycles": int(man["cycles"]),
                            "ideal_cycles": float(man["ideal_cycles"])})
            else:
                from ..rtl.attention import AttentionEngine

                eng = AttentionEngine.for_node(graph, n, max_seq=seq, lanes=min(lanes, seq))
                eng._MustUse__silence = True  # only its cycle counts are used here
                h = int(n.attrs["heads"])
                per.append({"name": n.name, "op": n.op, "heads": h,
                            "cycles": h * eng.cycles(seq, seq), "ideal_cycles": h * eng.ideal_cycles(seq, seq)})
        except (RTLError, ImportError) as e:
            per.append({"name": n.name, "op": n.op, "cycles": None, "reason": str(e)})
    known = [p["cycles"] for p in per if p["cycles"] is not None]
    return {"kernels": per, "cycles": sum(known), "complete": len(known) == len(per)}


def roofline(graph, part: Part | str = "LFE5U-85F", fmax_mhz: float = 150.0, bandwidth_gbs: float = 6.4,
             seq: int = 128, layer: int | None = None, mac_units: int | None = None,
             design_fmax_mhz: float | None = None, rows: int = 16, cols: int = 16, lanes: int = 8) -> dict:
    """Compute and weight-streaming bounds of one layer, and the design's time."""
    part = parse_part(part) if isinstance(part, str) else part
    for name, v in (("fmax_mhz", fmax_mhz), ("bandwidth_gbs", bandwidth_gbs), ("seq", seq)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or math.isinf(v):
            raise ImplError(f"{name} must be a positive number, got {v!r}")
    layer = graph.layers[0] if layer is None and graph.layers else layer
    work = layer_work(graph, layer, seq)
    units = part.device.dsp if mac_units is None else mac_units
    peak = units * fmax_mhz * 1e6  # MAC/s
    t_compute = work["macs"] / peak
    t_weights = work["weight_bytes"] / (bandwidth_gbs * 1e9)
    on_chip_bytes = part.device.bram * EBR_BITS / 8
    des = design_cycles(graph, layer, seq, rows, cols, lanes)
    dfmax = design_fmax_mhz or fmax_mhz
    t_design = des["cycles"] / (dfmax * 1e6)
    return {"part": part.name, "layer": layer, "seq": seq, "mac_units": units, "fmax_mhz": fmax_mhz,
            "bandwidth_gbs": bandwidth_gbs, "macs": work["macs"], "weight_bytes": work["weight_bytes"],
            "intensity_mac_per_byte": work["macs"] / max(work["weight_bytes"], 1e-30),
            "ridge_mac_per_byte": peak / (bandwidth_gbs * 1e9),
            "t_compute_s": t_compute, "t_weights_s": t_weights, "t_roofline_s": max(t_compute, t_weights),
            "bound": "compute" if t_compute >= t_weights else "weights",
            "on_chip_bytes": on_chip_bytes, "model_weight_bytes": model_weight_bytes(graph),
            "weights_fit_on_chip": model_weight_bytes(graph) <= on_chip_bytes,
            "design": {"rows": rows, "cols": cols, "fmax_mhz": dfmax, "cycles": des["cycles"],
                       "complete": des["complete"], "t_s": t_design,
                       "fraction_of_roofline": max(t_compute, t_weights) / t_design if t_design else None,
                       # the design's own roof: its rows*cols multipliers (DSP and fabric) at its Fmax
                       "mac_units": rows * cols,
                       "t_compute_s": work["macs"] / (rows * cols * dfmax * 1e6),
                       "fraction_of_own_roof": (max(work["macs"] / (rows * cols * dfmax * 1e6), t_weights)
                                                / t_design if t_design else None),
                       "kernels": des["kernels"]},
            "nodes": work["nodes"]}
