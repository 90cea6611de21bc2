"""``make bench`` numbers of issue 6: Fmax and resources of the reference
matmul engine (MiniLM W8A8, layer 0's query projection 384x384, 16x16 PE
array, 128 tokens) on LFE5U-85F, its achieved MACs per cycle per DSP, and the
roofline of a MiniLM layer next to the design.

    python -m hwgen.impl.bench [--quick] [--part LFE5U-85F] [--bandwidth 6.4]
                               [--router router1|router2] [--timeout 7200] [--rows 8 --cols 8]

``--quick`` implements the 16x16 PE array alone (no buffers) instead of the
whole engine. Place and route of the full engine takes tens of minutes on two
busy cores; results are cached (``.hwgen-cache/impl``).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import zipfile

REFERENCE = {"model": "minilm", "bits": "w8a8", "kernel": "encoder.layer.0.attention.self.query",
             "rows": 16, "cols": 16, "m": 128}


def say(msg: str) -> None:
    print(f"[impl bench] {msg}", file=sys.stderr, flush=True)


def _graph(model: str, bits: str):
    from ..ir import Graph
    from .sweep import quantized

    z, acc = quantized(model, bits, say)
    d = tempfile.mkdtemp(prefix="hwgen-bench-")
    with zipfile.ZipFile(io.BytesIO(z)) as f:
        f.extractall(d)
    return Graph.load(d), acc


def impl_bench(quick: bool = False, part: str = "LFE5U-85F", bandwidth_gbs: float = 6.4,
               freq_mhz: float = 200.0, timeout: float = 7200.0, router: str = "router1",
               rows: int | None = None, cols: int | None = None) -> dict:
    """The reference engine's numbers; a tool failure or timeout (``timeout``
    seconds per tool run) is returned as ``error`` instead of raised. ``rows`` /
    ``cols`` replace the reference's 16 x 16 array (the same kernel and buffers
    on a smaller array: a proxy that places and routes in minutes)."""
    from ..rtl.matmul import MatmulEngine
    from ..rtl.pe_array import PEArray
    from .flow import implement_component
    from .parts import ImplError, parse_part
    from .roofline import roofline

    ref = dict(REFERENCE)
    ref.update({k: v for k, v in (("rows", rows), ("cols", cols)) if v})
    p = parse_part(part)
    graph, acc = _graph(ref["model"], ref["bits"])
    eng = MatmulEngine.for_linear(graph, ref["kernel"], rows=ref["rows"], cols=ref["cols"], max_m=ref["m"])
    spec = eng.spec
    if quick:
        comp = PEArray(ref["rows"], ref["cols"], spec.x_fmt.width + (not spec.x_fmt.signed),
                       spec.w_fmt.width + (not spec.w_fmt.signed), spec.acc_width)
        ref["design"] = "PE array only (--quick)"
    else:
        comp = eng
        ref["design"] = "MatmulEngine"
    say(f"{ref['design']} {ref['rows']}x{ref['cols']} for {ref['kernel']} on {p.name} (cached when done before)")
    m = ref["m"]
    cycles = eng.cycles(m)
    macs = m * spec.k * spec.n
    pes = ref["rows"] * ref["cols"]
    exact = {"cycles": cycles, "macs": macs, "macs_per_cycle": macs / cycles, "utilization": macs / pes / cycles}

    def synthesized(res: dict, budget: int) -> dict:
        """What synthesis gives, with or without place and route: resources, the PE
        DSP budget and MACs per cycle per DSP."""
        return {**{k: res[k] for k in ("lut", "ff", "dsp", "bram")}, "pe_dsp_budget": budget,
                "fabric_multipliers": max(0, pes - budget), "macs_per_cycle_per_dsp": macs / cycles / max(res["dsp"], 1)}
    try:
        r = implement_component(comp, p, freq_mhz=freq_mhz, timeout=timeout, say=say, router=router)
    except ImplError as e:  # reported, not fatal to the rest of `make bench`
        say(f"failed: {e}")
        out = {"reference": ref, "part": p.name, "router": router, "error": str(e), **exact, "accuracy": acc}
        res = getattr(e, "resources", None)
        if res:  # synthesis finished (place and route failed): the resources and MACs per DSP stand
            out.update(synthesized(res, getattr(e, "pe_dsp_budget", p.device.dsp)))
        return out
    out = {"reference": ref, "part": r["part"], "router": router, "fmax_mhz": r["fmax_mhz"], "target_mhz": freq_mhz,
           **synthesized(r, r["pe_dsp_budget"]),
           "critical_path": r["critical_path"], "synth_s": r["synth_s"], "pnr_s": r["pnr_s"],
           "cached": r["cached"], **exact,
           "gmacs_per_s": macs / cycles * r["fmax_mhz"] / 1e3,
           "roofline": {k: v for k, v in roofline(graph, p, fmax_mhz=r["fmax_mhz"], bandwidth_gbs=bandwidth_gbs,
                                                  seq=m, layer=0, rows=ref["rows"], cols=ref["cols"],
                                                  design_fmax_mhz=r["fmax_mhz"]).items()
                        if k != "nodes"},
           "accuracy": acc}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hwgen.impl.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", default="LFE5U-85F")
    ap.add_argument("--bandwidth", type=float, default=6.4, help="external memory GB/s (default 6.4)")
    ap.add_argument("--router", choices=("router1", "router2"), default="router1", help="nextpnr router")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per tool run (default 7200)")
    ap.add_argument("--rows", type=int, help="PE array rows instead of the reference's 16")
    ap.add_argument("--cols", type=int, help="PE array columns instead of the reference's 16")
    a = ap.parse_args(argv)
    print(json.dumps(impl_bench(a.quick, a.part, a.bandwidth, timeout=a.timeout, router=a.router,
                                rows=a.rows, cols=a.cols)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
