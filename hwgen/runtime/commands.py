"""The ``hwgen run`` and ``hwgen plan`` verbs (argument parsing and JSON; the work is
in :mod:`hwgen.runtime.jobs`)."""
from __future__ import annotations

import argparse

from ..adaptive import RUN_RERUN_FRACTION
from ..cli import add_output_options
from ..devices import DEVICES
from . import cost as cost_mod
from .backends import BACKENDS
from .partition import DriverError, parse_force


def _common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="minilm | tiny-gpt (quantized once, cached)")
    src.add_argument("--graph", help="a graph directory written by `hwgen quantize`")
    p.add_argument("--bits", default="w8a8", help="with --model: quantization (default w8a8)")
    p.add_argument("--backend", default="golden", help=f"accelerator: {' | '.join(BACKENDS)} (default golden)")
    p.add_argument("--device", default="cpu", help=f"host ops: {' | '.join(DEVICES)} (default cpu)")
    p.add_argument("--place", action="append", metavar="NODE_OR_OP=host|accel",
                   help="force a node or every node of an op onto a device (repeatable)")
    p.add_argument("--accel-ops", help="comma-separated ops put on the accelerator when it has their "
                   "kernel (default linear,attention)")
    add_output_options(p)


def add_parsers(sub) -> None:
    r = sub.add_parser("run", help="run a model end to end: kernels on the accelerator, the rest on CPU/GPU",
                       description="Run minilm (sentence embeddings, --text) or tiny-gpt (generation, "
                       "--prompt) with the kernels on an accelerator backend and the rest on torch; "
                       "check every output integer against the golden model.")
    _common(r)
    r.add_argument("--text", help="minilm: sentences, one per line (each one request)")
    r.add_argument("--prompt", help="tiny-gpt: the prompt")
    r.add_argument("--max-new-tokens", type=int, default=16, help="tiny-gpt: tokens to generate (default 16)")
    r.add_argument("--batch", type=int, default=8, help="minilm: sentences per batch (default 8)")
    r.add_argument("--trace", help="write a Chrome-trace/Perfetto JSON file of what ran where and when")
    r.add_argument("--no-float", action="store_true", help="skip the float model (cosine_vs_float null)")
    r.add_argument("--policy", default="kernels",
                   help="kernels (default placement) | cost (place by the cost model of `hwgen plan`, "
                   "profiled on the first request, 200 MHz, 8 GB/s)")
    r.add_argument("--adaptive", metavar="HIGH_BITS",
                   help="adaptive precision (hwgen.adaptive): rerun at HIGH_BITS (e.g. w8a8) the sentences "
                   "whose low pass saturates most (minilm) or the generated tokens whose low-pass top-1 "
                   "margin is smallest (tiny-gpt); adds an 'adaptive' object")
    r.add_argument("--adaptive-rerun", type=float, metavar="FRACTION",
                   help="with --adaptive: fit the threshold to rerun this fraction of held-out inputs "
                   f"(default {RUN_RERUN_FRACTION:g})")
    r.add_argument("--adaptive-budget", type=float, metavar="RATIO",
                   help="with --adaptive: fit the threshold to rerun the most held-out inputs whose cycles "
                   "stay within RATIO x the low graph's (e.g. 1.25); excludes --adaptive-rerun")
    r.add_argument("--adaptive-verify", action="store_true",
                   help="with --adaptive (tiny-gpt): verified generation: the low graph drafts tokens, the "
                   "high graph verifies them (a pass when the check flags a draft, or 15 are pending) and "
                   "replaces the first it disagrees with, so every token is the high graph's")
    r.set_defaults(fn=cmd_run)

    p = sub.add_parser("plan", help="print the placement table: op, device, predicted time, bytes",
                       description="Profile every op on the host, place the graph (default placement, "
                       "--place, or --policy cost) and predict per op: accelerator cycles at the clock "
                       "plus link time, host time from the profile, bytes moved.")
    _common(p)
    p.add_argument("--text", help="example input (minilm: sentences; tiny-gpt: a prompt)")
    p.add_argument("--policy", default="kernels", help="kernels (default placement) | cost (cost model)")
    p.add_argument("--clock-mhz", type=float, default=cost_mod.DEFAULT_CLOCK_MHZ,
                   help=f"accelerator clock (default {cost_mod.DEFAULT_CLOCK_MHZ:g})")
    p.add_argument("--impl", help="a `hwgen impl --json` result: its fmax_mhz is the clock")
    p.add_argument("--link-gbps", type=float, default=cost_mod.DEFAULT_LINK_GBPS,
                   help=f"link bandwidth in GB/s (default {cost_mod.DEFAULT_LINK_GBPS:g})")
    p.add_argument("--link-latency-us", type=float, default=cost_mod.DEFAULT_LINK_LATENCY_US,
                   help=f"per-transfer latency in microseconds (default {cost_mod.DEFAULT_LINK_LATENCY_US:g})")
    p.set_defaults(fn=cmd_plan)


def _accel_ops(args):
    return tuple(o.strip() for o in args.accel_ops.split(",") if o.strip()) if args.accel_ops else None


def cmd_run(args) -> dict:
    from ..cli import Progress
    from . import jobs
    from .trace import Tracer

    say = Progress(args.quiet)
    force = parse_force(args.place)
    jobs._kernel_ops(args.backend)
    from .driver import check_device
    check_device(args.device)
    for flag, v in (("--text", args.text), ("--prompt", args.prompt)):
        if v is not None and not v.strip():
            raise DriverError(f"{flag} is empty: give at least one character")
    fit = None
    if args.adaptive:
        from ..adaptive import Fit
        fit = Fit.of(args.adaptive_rerun, args.adaptive_budget)      # checked before anything runs
    elif args.adaptive_rerun is not None or args.adaptive_budget is not None or args.adaptive_verify:
        raise DriverError("--adaptive-rerun, --adaptive-budget and --adaptive-verify need --adaptive HIGH_BITS")
    graph = jobs.load_graph(args.model, args.graph, args.bits, say)
    model = jobs._model_of(graph)
    if args.adaptive_verify:
        from ..adaptive import check_verify
        check_verify(fit, model)                                     # before the run, not after it
    tracer = Tracer() if args.trace else None
    if args.policy not in ("kernels", "cost"):
        raise DriverError(f"unknown placement policy '{args.policy}': expected kernels or cost")
    if args.policy == "cost":
        first = args.text if model == "minilm" else (args.prompt if args.prompt is not None else args.text)
        feeds = jobs.example_feeds(graph, (first or "").splitlines()[0] if model == "minilm" else first)
        say("placing by the cost model (profiling the host once)")
        planned = jobs.plan(graph, feeds, args.backend, args.device, force, _accel_ops(args), "cost",
                            repeats=1)
        force = {r["node"]: r["device"] for r in planned["rows"] if r["node"] != "<outputs>"}
    if model == "minilm":
        if args.prompt is not None:
            raise DriverError("minilm takes --text (sentences), not --prompt")
        if args.text is None:
            raise DriverError("give --text \"...\" (one sentence per line)")
        result = jobs.run_encoder(graph, args.text, args.backend, args.device, args.batch, force,
                                  _accel_ops(args), tracer, not args.no_float, say)
    else:
        prompt = args.prompt if args.prompt is not None else args.text
        if prompt is None:
            raise DriverError("give --prompt \"...\"")
        result = jobs.run_decoder(graph, prompt, args.max_new_tokens, args.backend, args.device, force,
                                  _accel_ops(args), tracer, not args.no_float, say)
    if args.adaptive:
        from ..adaptive import run_adaptive
        result["adaptive"] = run_adaptive(graph, args.text if model == "minilm" else prompt, args.adaptive,
                                          args.batch, fit=fit, say=say, max_new_tokens=args.max_new_tokens,
                                          verify=args.adaptive_verify)
    if tracer is not None:
        result["trace"] = str(tracer.write(args.trace))
        say(f"wrote trace {args.trace} (open in https://ui.perfetto.dev)")
    say(f"bit-exact vs golden: {result['bitexact_vs_golden']} ({result['mismatches']} mismatches)")
    return result


def cmd_plan(args) -> dict:
    from ..cli import Progress
    from . import jobs
    from .driver import check_device

    say = Progress(args.quiet)
    force = parse_force(args.place)
    jobs._kernel_ops(args.backend)
    check_device(args.device)
    if args.link_gbps <= 0 or args.link_latency_us < 0:
        raise DriverError("--link-gbps must be > 0 and --link-latency-us >= 0")
    clock = cost_mod.clock_from_impl(args.impl) if args.impl else args.clock_mhz
    graph = jobs.load_graph(args.model, args.graph, args.bits, say)
    feeds = jobs.example_feeds(graph, args.text)
    link = cost_mod.Link(args.link_gbps * 1e9, args.link_latency_us * 1e-6)
    result = jobs.plan(graph, feeds, args.backend, args.device, force, _accel_ops(args), args.policy,
                       clock, link, say=say)
    print(cost_mod.format_table(result["rows"]))
    if not args.json:  # the table already shows the rows
        result = {k: v for k, v in result.items() if k != "rows"}
    return result
