"""The ``hwgen`` command: one verb per stage.

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
    fixed, fmts = quantize(bundle.graph, bundle.calib_feeds, cfg)
    losses: list[float] = []
    if args.qat_steps:
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
              "ops": len(fixed.nodes), "out": str(out)}
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


# ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
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
    q.add_argument("--eval-text", help="file with one evaluation input per line "
                   "(replaces the built-in evaluation inputs)")
    q.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    q.add_argument("--quiet", action="store_true", help="no progress on stderr")
    q.set_defaults(fn=cmd_quantize)

    g = sub.add_parser("golden", help="run a fixed graph on inputs with the golden model",
                       description="Run the integer-exact NumPy golden model of a fixed graph.")
    g.add_argument("graph", help="graph directory written by `hwgen quantize`")
    g.add_argument("--inputs", help=".npz with one array per graph input")
    g.add_argument("--text", help="input text (models quantized from minilm or tiny-gpt)")
    g.add_argument("--out", help="write output codes and floats to this .npz")
    g.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.set_defaults(fn=cmd_golden)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except Exception as e:
        # hwgen's own errors (every stage defines one, named after what it checks) and
        # file-system errors are the user's to fix: one line, no traceback.
        if not (type(e).__module__.startswith("hwgen.") or isinstance(e, OSError)):
            raise
        print(f"hwgen: error: {e}", file=sys.stderr)
        return 1
    _emit(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
