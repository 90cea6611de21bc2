"""The hwgen command: one verb per stage.

Every verb that measures something takes ``--json`` and then prints one JSON
object as the last line of stdout (keys documented in README.md). Progress
goes to stderr. Bad input ends with one ``hwgen: error: ...`` line naming
the problem, exit status 1, and no half-written output.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__


class Progress:
    """One line per step on stderr (quiet with --quiet)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """``--json`` and ``--quiet``: the same two options on every verb."""
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=False))
    else:
        width = max(len(k) for k in result)
        for k, v in result.items():
            print(f"{k:<{width}}  {v}")


# ----------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------

def cmd_quantize(args: argparse.Namespace) -> dict:
    from . import zoo
    from .accuracy import evaluate, qat_loss
    from .quant import QuantConfig, quantize

    say = Progress(args.quiet)
    cfg = QuantConfig.from_bits(args.bits)
    out = Path(args.out)
    say(f"loading model {args.model}")
    bundle = zoo.load(args.model, eval_text=args.eval_text)
    layers = len(bundle.graph.layers)
    say(f"traced {len(bundle.graph.nodes)} ops over {layers} layer(s); calibrating on "
        f"{len(bundle.calib_feeds)} batch(es)")
    from .distill import Compression, compress as run_compress

    compression = Compression.from_args(args)
    compress = compression.requested     # hwgen.distill.compress prunes and/or distills
    fixed, fmts = (None, None) if compress else quantize(bundle.graph, bundle.calib_feeds, cfg)
    losses: list[float] = []
    extra: dict = {}
    if compress:
        fixed, extra = run_compress(bundle, cfg, compression, say=say)
        losses = extra.pop("qat_losses")
    if args.qat_steps and not compress:
        from .qat import QATModel, finetune
        from .quant import prepare

        say(f"QAT: {args.qat_steps} step(s), lr {args.lr}")
        model = QATModel(prepare(bundle.graph), fmts, cfg)
        losses = finetune(model, bundle.calib_feeds, qat_loss(bundle), args.qat_steps, lr=args.lr,
                          progress=lambda i, l: say(f"QAT step {i}/{args.qat_steps} loss {l:.6f}"))
        fixed = model.export()
        fixed.meta["passes"] = fixed.meta.get("passes", []) + ["qat"]
    say(f"evaluating on {len(bundle.eval_feeds)} batch(es)")
    metrics = evaluate(bundle, fixed)
    result = {"model": args.model, "bits": cfg.name, "layers": layers, **metrics,
              "qat_steps": args.qat_steps, "qat_loss_first": losses[0] if losses else None,
              "qat_loss_last": losses[-1] if losses else None,
              "ops": len(fixed.nodes), "out": str(out), **extra}
    fixed.name = bundle.name
    fixed.meta.update({"model": args.model, "kind": bundle.kind, "bits": cfg.name,
                       "metrics": metrics})
    fixed.save(out)
    say(f"wrote {out}")
    return result


# ----------------------------------------------------------------------------
# golden
# ----------------------------------------------------------------------------

def cmd_golden(args: argparse.Namespace) -> dict:
    from .golden import GoldenModel, dequantize
    from .ir import Graph

    say = Progress(args.quiet)
    graph = Graph.load(args.graph)
    if args.inputs:
        try:
            with np.load(args.inputs, allow_pickle=False) as z:
                feeds = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise InputFileError(f"{args.inputs}: cannot read inputs ({e})") from None
    elif args.text is not None:
        from . import zoo

        feeds = zoo.feeds_from_text(graph.meta.get("model", ""), args.text)
    else:
        raise InputFileError("give --inputs FILE.npz (arrays named after the graph inputs "
                             f"{graph.inputs}) or --text")
    say(f"running {graph.name}: {len(graph.nodes)} ops")
    t0 = time.perf_counter()
    outs = GoldenModel(graph)(feeds)
    wall = time.perf_counter() - t0
    result = {"graph": str(args.graph), "wall_s": wall, "outputs": {}}
    arrays = {}
    for name, codes in outs.items():
        f = dequantize(graph, name, codes)
        arrays[name] = codes
        arrays[name + ".float"] = f
        t = graph.tensors[name]
        fmt = str(t.fmt)
        if t.per_channel:
            fmt += f" per channel, int_bits {min(t.channel_int_bits)}..{max(t.channel_int_bits)}"
        result["outputs"][name] = {"shape": list(codes.shape), "format": fmt,
                                   "head": [float(v) for v in f.reshape(-1)[:8]]}
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(args.out)
        result["out"] = args.out
    return result


class InputFileError(ValueError):
    pass


class TargetError(ValueError):
    pass


TARGETS = ("hls", "rtl", "hls4ml")


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise TargetError(f"unknown target '{target}': expected one of {', '.join(TARGETS)}")


def _hls_feeds(args, graph, say):
    from .hls.project import builtin_feeds, load_inputs

    if args.inputs:
        return load_inputs(args.inputs), f"--inputs {args.inputs}"
    feeds, note = builtin_feeds(graph)
    say(f"inputs: {note}")
    return feeds, note


def _warn_unsupported(skipped: list[dict]) -> None:
    """One stderr warning naming the nodes of kernel ops that were skipped anyway
    (attention with a KV cache, or a node the emitter refused)."""
    from .hls import HLS_OPS

    bad = [s for s in skipped if s["op"] in HLS_OPS]
    if bad:
        print("hwgen: warning: skipped, no HLS kernel: "
              + "; ".join(f"{s['name']}: {s['reason']}" for s in bad), file=sys.stderr)


# ----------------------------------------------------------------------------
# gen
# ----------------------------------------------------------------------------

def cmd_gen(args: argparse.Namespace) -> dict:
    from .hls.project import first_batch, fit_seq, golden_io, plan, write_project
    from .ir import Graph

    _check_target(args.target)
    say = Progress(args.quiet)
    if args.target == "rtl":  # Verilog + manifests: hwgen.rtl.generate
        from .rtl.generate import cmd_gen_rtl
        return cmd_gen_rtl(args, say)
    if args.target == "hls4ml":  # one hls4ml project per expressible layer: hwgen.hls.hls4ml_interop
        from .hls.hls4ml_interop import cmd_gen_hls4ml
        return cmd_gen_hls4ml(args, say)
    graph = Graph.load(args.graph)
    kernels, skipped = plan(graph, args.layer, args.par)
    _warn_unsupported(skipped)
    if skipped:
        say(f"skipping {len(skipped)} node(s) without an HLS kernel: "
            + ", ".join(f"{s['name']} ({s['op']})" for s in skipped))
    vectors, note = None, None
    if not args.no_vectors and kernels:
        try:
            feeds, note = _hls_feeds(args, graph, say)
        except Exception as e:
            if args.inputs or not type(e).__module__.startswith("hwgen."):
                raise
            print(f"hwgen: warning: no golden vectors ({e}); run_hls.tcl will skip csim/cosim",
                  file=sys.stderr)
            feeds = None
        if feeds is not None:
            feeds = first_batch(feeds, args.batch)
            kernels = fit_seq(graph, kernels, feeds, args.layer, args.par)
            say(f"golden vectors: {', '.join(f'{k} {list(np.shape(v))}' for k, v in feeds.items())}")
            vectors = golden_io(graph, kernels, feeds)
    say(f"writing {len(kernels)} kernel(s) to {args.out}")
    man = write_project(graph, kernels, skipped, args.out, part=args.part, clock_ns=args.clock_ns,
                        vectors=vectors, inputs_note=note)
    say(f"wrote {args.out}: run `vitis_hls -f run_hls.tcl` there")
    return {"target": "hls", "out": str(args.out), "kernels": [k["name"] for k in man["kernels"]],
            "files": man["files"], "skipped": [s["name"] for s in skipped], "vectors": vectors is not None}


# ----------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------

def cmd_verify(args: argparse.Namespace):
    from .hls.project import plan, verify
    from .ir import Graph

    _check_target(args.target)
    t0 = time.perf_counter()
    say = Progress(args.quiet)
    if args.target == "rtl":  # cocotb benches on Verilator/Icarus: hwgen.rtl.verify
        from .rtl.verify import cmd_verify_rtl
        return cmd_verify_rtl(args, say)
    if args.target == "hls4ml":  # hls4ml's own C-simulation vs golden: hwgen.hls.hls4ml_interop
        from .hls.hls4ml_interop import cmd_verify_hls4ml
        return cmd_verify_hls4ml(args, say)
    graph = Graph.load(args.graph)
    kernels, skipped = plan(graph, args.layer, args.par)
    say(f"{len(kernels)} kernel(s) with HLS support"
        + (f" in layer {args.layer}" if args.layer is not None else "")
        + (f"; skipping {len(skipped)}: " + ", ".join(f"{s['name']} ({s['op']})" for s in skipped)
           if skipped else ""))
    _warn_unsupported(skipped)
    if not kernels:
        raise TargetError(f"graph '{graph.name}': no node"
                          + (f" of layer {args.layer}" if args.layer is not None else "")
                          + " has an HLS kernel")
    feeds, note = _hls_feeds(args, graph, say)
    report = verify(graph, kernels, feeds, par=args.par, say=say, layer=args.layer)
    total = sum(k["mismatches"] for k in report)
    result = {"target": "hls", "graph": str(args.graph), "layer": args.layer, "inputs": note,
              "kernels": report, "vectors": sum(k["vectors"] for k in report), "mismatches": total,
              "skipped": skipped, "wall_s": time.perf_counter() - t0}
    say(f"{len(report)} kernel(s), {result['vectors']} output codes, {total} mismatch(es)")
    return result, (1 if total else 0)


# ----------------------------------------------------------------------------
# accuracy, flow, report
# ----------------------------------------------------------------------------

def cmd_accuracy(args: argparse.Namespace) -> dict:
    from . import zoo
    from .accuracy import bits_sweep, layer_cosines
    from .ir import Graph

    say = Progress(args.quiet)
    graph = Graph.load(args.graph)
    model = graph.meta.get("model")
    if not model:
        raise InputFileError(f"{args.graph}: the graph does not name the model it was quantized from "
                             "(graph.json meta.model); quantize it with `hwgen quantize --model`")
    bundle = zoo.load(model)
    feeds = bundle.eval_feeds[: args.batches]
    say(f"per-layer cosine of {graph.name} on {len(feeds)} evaluation batch(es)")
    layers = layer_cosines(bundle, graph, feeds)
    bits = [b for b in args.bits.split(",") if b] if args.bits else []
    rows = []
    if bits:
        say(f"post-training accuracy at {', '.join(bits)}")
        rows = bits_sweep(bundle, bits)
    return {"graph": str(args.graph), "model": model, "layers": layers, "bits": rows}


def cmd_flow(args: argparse.Namespace):
    from .flow import FlowConfig, main_flow

    cfg = FlowConfig(model=args.model, out=Path(args.out), bits=args.bits, layer=args.layer,
                     qat_steps=args.qat_steps, sim=args.sim, rows=args.rows, cols=args.cols,
                     part=args.part, impl_kernels=args.impl_kernels or "", impl_max_m=args.impl_max_m,
                     backend=args.backend,
                     text=args.text or FlowConfig.text,
                     only=tuple(x for x in (args.only or "").split(",") if x),
                     skip=tuple(x for x in (args.skip or "").split(",") if x), force=args.force)
    return main_flow(cfg, quiet=args.quiet)


def cmd_report(args: argparse.Namespace) -> dict:
    from .report import write_report

    res = write_report(args.out)
    Progress(args.quiet)(f"wrote {res['report']}")
    return res


# ----------------------------------------------------------------------------

def _rtl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=16, help="rtl: PE array rows (default 16)")
    p.add_argument("--cols", type=int, default=16, help="rtl: PE array columns (default 16)")
    p.add_argument("--max-seq", type=int, default=128, help="rtl: longest sequence (default 128)")
    p.add_argument("--lanes", type=int, default=8, help="rtl: attention keys per cycle (default 8)")


def build_parser() -> argparse.ArgumentParser:
    from .distill import DISTILL_LR, DISTILL_STEPS, TEACHER_CACHE_BYTES

    p = argparse.ArgumentParser(prog="hwgen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"hwgen {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    q = sub.add_parser("quantize", help="trace, calibrate, (fine-tune) and quantize a model to a fixed graph",
                       description="Trace a model into a float graph, calibrate activation formats on "
                       "sample inputs, quantize weights (per output channel), optionally fine-tune "
                       "with QAT, evaluate float vs integer-only outputs, and write the fixed graph.")
    q.add_argument("--model", required=True,
                   help="minilm | tiny-gpt | bert-block | path/to/file.py:factory")
    q.add_argument("--bits", default="w8a8", help="weights and matmul activations, e.g. w8a8, w4a8, w16a16")
    q.add_argument("--out", required=True, help="output directory (graph.json + weights.npz)")
    q.add_argument("--qat-steps", type=int, default=0, help="QAT fine-tuning steps (default 0)")
    q.add_argument("--lr", type=float, default=2e-5, help="QAT learning rate (default 2e-5)")
    q.add_argument("--prune", metavar="2:4|block:RATIO|unstructured:RATIO",
                   help="prune the transformer blocks' linears (see README: Compression)")
    q.add_argument("--prune-layers", metavar="PATTERNS",
                   help="with --prune: prune only the linears whose names match these comma-separated "
                   "shell patterns (e.g. '*.attention.output.dense'); the others stay dense")
    q.add_argument("--prune-budget", type=float, metavar="COS",
                   help="with --prune: prune the linears chosen by measured sensitivity, as many as keep "
                   "the float model's mean output cosine >= COS on the calibration inputs")
    q.add_argument("--prune-channels", action="store_true",
                   help="with --prune block:RATIO: prune channels two linears share (FFN neurons, attention "
                   "value and query/key channels), whole blocks of both, permuted and refitted")
    q.add_argument("--distill", action="store_true",
                   help="fine-tune against the float model (outputs + hidden states): "
                   "--distill-steps float steps, then --qat-steps QAT steps")
    q.add_argument("--distill-steps", type=int, default=None,
                   help=f"float distillation steps with --distill (default {DISTILL_STEPS})")
    q.add_argument("--distill-synthetic", type=int, default=0, metavar="N",
                   help="with --distill (minilm): add N synthetic everyday-English sentences to the "
                   "distillation inputs (default 0)")
    q.add_argument("--distill-schedule", default="constant", metavar="constant|cosine",
                   help="with --distill: the float stage's learning rate, constant (default) or "
                   "decayed along half a cosine to 0")
    q.add_argument("--distill-lr", type=float, default=None, metavar="LR",
                   help="with --distill: the float stage's (peak) Adam learning rate (default "
                   f"{DISTILL_LR:g})")
    q.add_argument("--distill-device", default="cpu", metavar="cpu|cuda",
                   help="with --distill: the torch device the float stage trains on (default cpu; "
                   "cuda where torch sees a GPU)")
    q.add_argument("--distill-linear-weight", type=float, default=0.0, metavar="W",
                   help="with --distill: add W x the mean error of every linear's output inside the "
                   "blocks to the loss (default 0)")
    q.add_argument("--distill-attention-weight", type=float, default=0.0, metavar="W",
                   help="with --distill: add W x the mean KL of every attention's distributions to the "
                   "loss (default 0)")
    q.add_argument("--distill-precision", default="fp32", metavar="fp32|bf16",
                   help="with --distill: the float stage's matmuls, fp32 (default) or bf16 (torch "
                   "autocast; weights, optimizer, teacher and loss stay fp32; QAT is exact)")
    q.add_argument("--distill-group-by-length", action="store_true",
                   help="with --distill (minilm): batch the distillation sentences by token count "
                   "(less padding), the batches shuffled")
    q.add_argument("--distill-teacher-cache", type=float, default=None, metavar="GIB",
                   help="with --distill: GiB of teacher values the float stage keeps between epochs "
                   f"(default {TEACHER_CACHE_BYTES / 2**30:g}; batches beyond it rerun the teacher)")
    q.add_argument("--distill-ema", type=float, default=0.0, metavar="DECAY",
                   help="with --distill: end the float stage with the moving average of its weights at "
                   "this decay (e.g. 0.999: about the last 1,000 steps; default 0, off)")
    q.add_argument("--distill-train-embeddings", action="store_true",
                   help="with --distill: the float stage trains the embedding tables too (saved with "
                   "--distill-save; default: frozen)")
    q.add_argument("--distill-fake-quant", action="store_true",
                   help="with --distill: the float stage's forward rounds linear weights and activations "
                   "to the --bits formats (straight-through gradients), so the student learns around the "
                   "rounding at float speed; the exact QAT stage follows unchanged")
    q.add_argument("--distill-eval-every", type=int, default=0, metavar="N",
                   help="with --distill: every N float steps, score the float student (its weight average "
                   "with --distill-ema) in float and quantized to --bits without QAT on the evaluation "
                   "inputs (JSON distill_evals), and write it to --distill-save if given (default 0, off)")
    q.add_argument("--distill-save", metavar="FILE",
                   help="with --distill: write the float student after the float stage to FILE (.npz), "
                   "to go on from later with --distill-init")
    q.add_argument("--distill-init", metavar="FILE|DIR",
                   help="with --distill: start from a float student saved by --distill-save, or recovered "
                   "from an earlier --out folder of the model (same --prune), instead of the pruned, "
                   "refitted weights")
    q.add_argument("--distill-text", action="append", default=[], metavar="FILE",
                   help="with --distill: add this text file to the distillation inputs (minilm: one "
                   "sentence per line; tiny-gpt: its bytes in windows); repeatable. "
                   "models/data/sentences_distill.txt is a built-in everyday-English one")
    q.add_argument("--distill-augment", type=int, default=0, metavar="K",
                   help="with --distill-text (minilm): add K variants of every one of its sentences "
                   "(spliced with another, a quarter of its words replaced, or a span of it; default 0)")
    q.add_argument("--distill-pruned-only", action="store_true",
                   help="with --prune --distill: the float stage trains only the pruned linears")
    q.add_argument("--gradual", action="store_true",
                   help="with --prune: raise sparsity gradually over the fine-tuning steps "
                   "(default: one-shot with least-squares refit)")
    q.add_argument("--eval-text", help="file with one evaluation input per line "
                   "(replaces the built-in evaluation inputs)")
    add_output_options(q)
    q.set_defaults(fn=cmd_quantize)

    g = sub.add_parser("golden", help="run a fixed graph on inputs with the golden model",
                       description="Run the integer-exact NumPy golden model of a fixed graph.")
    g.add_argument("graph", help="graph directory written by `hwgen quantize`")
    g.add_argument("--inputs", help=".npz with one array per graph input")
    g.add_argument("--text", help="input text (models quantized from minilm or tiny-gpt)")
    g.add_argument("--out", help="write output codes and floats to this .npz")
    add_output_options(g)
    g.set_defaults(fn=cmd_golden)

    gn = sub.add_parser("gen", help="generate hardware: HLS C++ (Vitis project), RTL Verilog, or an hls4ml project",
                        description="--target hls: one HLS C++ kernel per supported node of a fixed graph "
                        "and a top per block, a testbench, golden vectors and run_hls.tcl (vitis_hls -f "
                        "run_hls.tcl). --target rtl: Verilog of the Amaranth matmul/attention engines "
                        "with their manifests. --target hls4ml: an hls4ml project per layer it can express.")
    gn.add_argument("--graph", required=True, help="graph directory written by `hwgen quantize`")
    gn.add_argument("--target", required=True, help="hls | rtl | hls4ml")
    gn.add_argument("--out", required=True, help="output folder (replaced atomically)")
    gn.add_argument("--layer", type=int, help="only the nodes of this transformer block")
    gn.add_argument("--part", default="xcu250-figd2104-2L-e", help="FPGA part (default xcu250-figd2104-2L-e)")
    gn.add_argument("--clock-ns", type=float, default=5.0, help="clock period in ns (default 5)")
    gn.add_argument("--inputs", help=".npz with one array per graph input, for the golden vectors")
    gn.add_argument("--batch", type=int, default=1,
                    help="batch rows of the inputs used for the golden vectors (default 1)")
    gn.add_argument("--no-vectors", action="store_true", help="write no golden vectors (no csim/cosim)")
    gn.add_argument("--par", type=int, default=4, help="hls: parallelism setting, columns/channels/MACs "
                    "per cycle (ARRAY_PARTITION and UNROLL factors; default 4)")
    _rtl_args(gn)
    gn.add_argument("--lint", action="store_true", help="rtl: verilator --lint-only -Wall with the "
                    "waivers (exit 1 on any warning)")
    add_output_options(gn)
    gn.set_defaults(fn=cmd_gen)

    v = sub.add_parser("verify", help="simulate the generated kernels against the golden model, bit for bit",
                       description="Record every kernel's inputs and outputs with the golden model, "
                       "simulate the kernels (--target hls: g++ C-simulation against the ap_fixed "
                       "headers; rtl: cocotb on Verilator or Icarus; hls4ml: hls4ml's own C-simulation) "
                       "and count mismatching output codes; the first mismatches come with their operands "
                       "and the contract's intermediate values. Exit status 1 if any.")
    v.add_argument("--graph", required=True, help="graph directory written by `hwgen quantize`")
    v.add_argument("--target", required=True, help="hls | rtl | hls4ml")
    v.add_argument("--layer", type=int, help="only the nodes of this transformer block")
    v.add_argument("--inputs", help=".npz with one array per graph input (default: built-in inputs)")
    v.add_argument("--par", type=int, default=4, help="hls: parallelism setting of the kernels (default 4)")
    _rtl_args(v)
    v.add_argument("--sim", default="verilator", choices=["verilator", "icarus"],
                   help="rtl: simulator (default verilator)")
    v.add_argument("--waves", action="store_true", help="rtl: record waves (path in the JSON)")
    v.add_argument("--batch", type=int, default=1, help="rtl: batch rows of the inputs simulated (default 1)")
    v.add_argument("--seq", type=int, help="rtl: pad the inputs to this many tokens (e.g. 128)")
    v.add_argument("--heads", type=int, help="rtl: simulate only the first N heads of each attention")
    v.add_argument("--kernel", action="append", help="rtl: only this kernel (name or node; repeatable)")
    v.add_argument("--no-corners", action="store_true", help="rtl: no corner-case vectors")
    add_output_options(v)
    v.set_defaults(fn=cmd_verify)

    from .runtime.commands import add_parsers as _runtime_parsers  # `hwgen run`, `hwgen plan`
    _runtime_parsers(sub)

    ac = sub.add_parser("accuracy", help="float-vs-fixed accuracy per transformer block and per bit width",
                        description="Cosine of each transformer block's output (golden, dequantized) vs "
                        "the float model on evaluation inputs, and the model's output cosine after "
                        "post-training quantization at each --bits width.")
    ac.add_argument("--graph", required=True, help="graph directory written by `hwgen quantize`")
    ac.add_argument("--bits", default="", help="comma-separated bit widths to compare, e.g. w4a8,w8a8")
    ac.add_argument("--batches", type=int, default=2, help="evaluation batches for the per-layer cosines")
    add_output_options(ac)
    ac.set_defaults(fn=cmd_accuracy)

    fl = sub.add_parser("flow", help="run every stage in order, reusing unchanged ones",
                        description="quantize -> accuracy -> gen hls -> gen rtl -> verify hls -> verify rtl "
                        "-> impl -> run, into one folder; a stage whose inputs (argv, graph content, "
                        "hwgen sources) are unchanged is reused. Ends with a summary table on stderr. "
                        "Exit status 1 if a stage failed.")
    fl.add_argument("--model", default="minilm", help="minilm | tiny-gpt | bert-block | file.py:factory")
    fl.add_argument("--out", default="build/minilm", help="output folder (default build/minilm)")
    fl.add_argument("--bits", default="w8a8", help="bit width (default w8a8)")
    fl.add_argument("--layer", type=int, default=0, help="transformer block whose kernels are built (default 0)")
    fl.add_argument("--qat-steps", type=int, default=0, help="QAT steps of the quantize stage (default 0)")
    fl.add_argument("--sim", default="verilator", help="RTL simulator: verilator | icarus")
    fl.add_argument("--rows", type=int, default=16, help="PE array rows of the RTL stages (default 16)")
    fl.add_argument("--cols", type=int, default=16, help="PE array columns of the RTL stages (default 16)")
    fl.add_argument("--part", default="LFE5U-85F", help="FPGA part for impl (default LFE5U-85F)")
    fl.add_argument("--impl-kernels", help="impl: only these nodes (comma-separated; default all of the layer's)")
    fl.add_argument("--impl-max-m", type=int, default=0, help="impl: tokens per call the buffers hold")
    fl.add_argument("--backend", default="golden", help="accelerator backend of the run stage")
    fl.add_argument("--text", help="input text of the run stage")
    fl.add_argument("--only", help="comma-separated stages to run (others untouched)")
    fl.add_argument("--skip", help="comma-separated stages to leave out")
    fl.add_argument("--force", action="store_true", help="rerun stages even when unchanged")
    fl.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    fl.add_argument("--quiet", action="store_true", help="no progress or table on stderr")
    fl.set_defaults(fn=cmd_flow)

    rp = sub.add_parser("report", help="write a self-contained HTML report of a flow folder",
                        description="Read OUT/flow.json and OUT/results/*.json and write OUT/report.html "
                        "(plots embedded; also saved as OUT/report/*.png).")
    rp.add_argument("out", help="folder written by `hwgen flow`")
    add_output_options(rp)
    rp.set_defaults(fn=cmd_report)

    from .impl.cli import add_parsers as add_impl_parsers  # impl, sweep
    add_impl_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
        code = 0
        if isinstance(result, tuple):
            result, code = result
    except Exception as e:
        # hwgen's own errors (every stage defines one, named after what it checks) and
        # file-system errors are the user's to fix: one line, no traceback.
        if not (type(e).__module__.startswith("hwgen.") or isinstance(e, OSError)):
            raise
        print(f"hwgen: error: {e}", file=sys.stderr)
        return 1
    _emit(result, getattr(args, "json", False))
    return code


if __name__ == "__main__":
    sys.exit(main())
