"""``hwgen impl`` and ``hwgen sweep``: argument parsers and the verbs
(registered by :func:`hwgen.cli.build_parser` through :func:`add_parsers`)."""
from __future__ import annotations

import argparse
import time

from ..cli import add_output_options
from .flow import ROUTERS
from .parts import parse_part

#: resource keys summed over kernels
SUM_KEYS = ("lut", "ff", "dsp", "bram")


def implement_kernels(kernels, part, freq_mhz: float = 200.0, xilinx: bool = True,
                      timeout: float = 1800.0, cache: bool = True, say=None, router: str = "router1") -> dict:
    """ECP5 place and route (and the Xilinx estimate) of every kernel; one row
    per kernel plus the total. Fmax of the total is the slowest kernel's."""
    from .flow import estimate_xilinx, implement_component, kernel_verilog

    say = say or (lambda m: None)
    part = parse_part(part) if isinstance(part, str) else part
    rows = []
    for n, k in enumerate(kernels, 1):
        say(f"[{n}/{len(kernels)}] {k.name} ({k.op}): Verilog")
        r = implement_component(k.component, part, freq_mhz=freq_mhz, timeout=timeout, cache=cache, say=say,
                                router=router)
        row = {"name": k.name, "op": k.op, "part": part.name, "fmax_mhz": r["fmax_mhz"],
               **{x: r[x] for x in SUM_KEYS}, "timing_met": r["timing_met"],
               "critical_path": r["critical_path"], "placed": r["placed"],
               "pe_dsp_budget": r["pe_dsp_budget"],
               "cycles": k.manifest.get("cycles"), "ideal_cycles": k.manifest.get("ideal_cycles"),
               "utilization": k.manifest.get("utilization"),
               "synth_s": r["synth_s"], "pnr_s": r["pnr_s"], "cached": r["cached"]}
        say(f"[{n}/{len(kernels)}] {k.name}: {r['fmax_mhz']} MHz, {r['lut']} LUT, {r['ff']} FF, "
            f"{r['dsp']} DSP, {r['bram']} BRAM" + (" (cached)" if r["cached"] else ""))
        if xilinx:
            x = estimate_xilinx(kernel_verilog(k.component, None), timeout=timeout, cache=cache, say=say)
            row["xilinx"] = {kk: x[kk] for kk in ("lut", "ff", "dsp", "bram", "ramb36", "ramb18", "flow")}
        rows.append(row)
    total = {"part": part.name, **{x: sum(r[x] for r in rows) for x in SUM_KEYS}}
    total["fmax_mhz"] = min(r["fmax_mhz"] for r in rows)
    dev = part.device
    total["fits"] = all(total[x] <= getattr(dev, a) for x, a in
                        (("lut", "luts"), ("ff", "ffs"), ("dsp", "dsp"), ("bram", "bram")))
    out = {"part": part.name, "target_mhz": freq_mhz, "router": router, "fmax_mhz": total["fmax_mhz"],
           **{x: total[x] for x in SUM_KEYS}, "kernels": rows, "total": total,
           "device": part.as_dict()}
    if xilinx:
        out["xilinx"] = {x: sum(r["xilinx"][x] for r in rows) for x in SUM_KEYS}
        out["xilinx"]["family"] = "xc7"
    return out


def cmd_impl(args: argparse.Namespace) -> dict:
    from ..cli import Progress
    from ..ir import Graph
    from .kernels import graph_kernels

    say = Progress(args.quiet)
    t0 = time.perf_counter()
    part = parse_part(args.part)
    graph = Graph.load(args.graph)
    names = [x for x in (args.kernels or "").split(",") if x] or None
    kernels, skipped = graph_kernels(graph, names, layer=None if args.all_layers else args.layer,
                                     rows=args.rows, cols=args.cols, max_m=args.max_m)
    for s in skipped:
        say(f"skipping {s['name']} ({s['op']}): {s['reason']}")
    say(f"{len(kernels)} kernel(s) on {part.name}, {args.rows}x{args.cols} PE array, "
        f"target {args.freq:g} MHz")
    res = implement_kernels(kernels, part, freq_mhz=args.freq, xilinx=not args.no_xilinx,
                            timeout=args.timeout, cache=not args.no_cache, say=say, router=args.router)
    res = {"graph": str(args.graph), **res, "skipped": skipped}
    if args.bandwidth:
        from .roofline import roofline

        layer = args.layer if not args.all_layers and args.layer in graph.layers else None
        rf = roofline(graph, part, fmax_mhz=res["fmax_mhz"], bandwidth_gbs=args.bandwidth, seq=args.max_m,
                      layer=layer, rows=args.rows, cols=args.cols)
        res["roofline"] = {k: v for k, v in rf.items() if k != "nodes"}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def cmd_sweep(args: argparse.Namespace) -> dict:
    from ..cli import Progress
    from .sweep import SweepConfig, run_sweep

    say = Progress(args.quiet)
    cfg = SweepConfig.from_args(args)
    return run_sweep(cfg, out=args.out, ray_address=args.ray, jobs=args.jobs, say=say)


def add_parsers(sub) -> None:
    i = sub.add_parser("impl", help="synthesize and place-and-route the RTL kernels: resources, Fmax",
                       description="Synthesize the RTL engines of a fixed graph with yosys synth_ecp5, "
                       "place and route them with nextpnr-ecp5 (LUT4, FF, MULT18X18D, DP16KD, Fmax, "
                       "critical path when short of the target) and estimate Xilinx 7-series "
                       "resources with synth_xilinx. Results are cached under .hwgen-cache/impl.")
    i.add_argument("--graph", required=True, help="graph directory written by `hwgen quantize`")
    i.add_argument("--part", default="LFE5U-85F", help="ECP5 part, e.g. LFE5U-85F or LFE5U-85F-8BG381C "
                   "(default LFE5U-85F: speed grade 6, CABGA381)")
    i.add_argument("--kernels", help="comma-separated node names (default: the kernels of --layer)")
    i.add_argument("--layer", type=int, default=0, help="transformer block whose kernels to build (default 0)")
    i.add_argument("--all-layers", action="store_true", help="every layer's kernels")
    i.add_argument("--rows", type=int, default=16, help="PE array rows (default 16)")
    i.add_argument("--cols", type=int, default=16, help="PE array columns (default 16)")
    i.add_argument("--max-m", type=int, default=128, help="tokens per call the buffers hold (default 128)")
    i.add_argument("--freq", type=float, default=200.0, help="target clock in MHz (default 200)")
    i.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool run (default 3600)")
    i.add_argument("--router", choices=ROUTERS, default="router1",
                   help="nextpnr router (default router1: the better Fmax; router2 finishes large "
                   "congested designs sooner)")
    i.add_argument("--bandwidth", type=float, metavar="GBPS",
                   help="add the layer's roofline at this external memory bandwidth (GB/s), "
                   "with the achieved Fmax")
    i.add_argument("--no-xilinx", action="store_true", help="skip the synth_xilinx estimate")
    i.add_argument("--no-cache", action="store_true", help="rerun the tools even when cached")
    add_output_options(i)
    i.set_defaults(fn=cmd_impl)

    s = sub.add_parser("sweep", help="design-space sweep: cycles, resources, Fmax, accuracy; Pareto plot",
                       description="Evaluate every combination of array shape, bit width and parallel "
                       "engines: exact cycles of a model layer from the engines' manifests, resources "
                       "and Fmax from yosys/nextpnr, accuracy from the quantizer. Writes sweep.csv, "
                       "sweep.json and pareto.png to --out. Points are cached; an interrupted sweep "
                       "resumes. A failing point is marked failed with its reason.")
    s.add_argument("--model", default="bert-block", help="zoo model whose layer is swept (default bert-block)")
    s.add_argument("--shapes", default="4x4,8x8", help="PE array shapes, e.g. 4x4,8x8,16x16")
    s.add_argument("--bits", default="w8a8", help="bit widths, e.g. w4a8,w8a8,w8a16")
    s.add_argument("--engines", default="1", help="parallel matmul engines, e.g. 1,2")
    s.add_argument("--part", default="LFE5U-85F", help="ECP5 part (default LFE5U-85F)")
    s.add_argument("--freq", type=float, default=200.0, help="target clock in MHz (default 200)")
    s.add_argument("--seq", type=int, default=None, help="tokens per layer call (default 128)")
    s.add_argument("--kernel", help="the linear node implemented per point (default: the layer's widest)")
    s.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool run (default 3600)")
    s.add_argument("--jobs", type=int, default=None, help="local worker processes (default: CPU count)")
    s.add_argument("--ray", metavar="ADDRESS", help="run the points on a Ray cluster (ray.init(ADDRESS))")
    s.add_argument("--out", required=True, help="output folder: sweep.csv, sweep.json, pareto.png")
    add_output_options(s)
    s.set_defaults(fn=cmd_sweep)
