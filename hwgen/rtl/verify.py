"""`hwgen verify --target rtl`: every kernel's Verilog simulated, bit-exact vs golden.

For a fixed graph (optionally one layer) :func:`verify`:

1. records every node's inputs and outputs with the golden model on real
   inputs (the graph's built-in evaluation inputs from
   :func:`hwgen.hls.project.builtin_feeds`, or ``--inputs``); a graph with a
   KV cache is run as a prefill pass then single-token passes
   (:class:`hwgen.golden.GoldenState`), so the decoder's cached step is checked;
2. adds corner-case vectors per kernel, with expected codes from the golden
   model's own kernel for that node (``hwgen.golden``'s op functions): for a
   linear, extreme codes (all minimum, all maximum, alternating: the outputs
   saturate), one token, and ``rows + 1`` tokens (M not dividing the array);
   for attention, a fully masked sequence (all-zero padding bits: every row
   fully masked), extreme q/k (the exp index saturates), one token, and
   ``lanes + 1`` tokens;
3. runs each kernel's cocotb bench (:mod:`sim.kernels`) on Verilator (default)
   or Icarus, the Verilog from :mod:`hwgen.rtl.generate` (one build per
   kernel, cached), and compares every output code.

One report per kernel: ``name``, ``node``, ``op``, ``shape``, ``vectors``
(output codes compared), ``mismatches`` (0 is the only pass), ``cycles``
(measured on the real-activation runs), ``model_cycles`` (the engine's
``cycles()`` for the same runs; equal when the hardware meets its own
timing model), ``ideal_cycles`` (MACs / MAC units), ``utilization`` (ideal /
measured), ``first_mismatches``, ``runs``, build and simulation seconds.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


class SimError(RuntimeError):
    """A simulator that is missing or broken, a failed build, a bench without a result."""


def _sim_package():
    """Import the repository's ``sim`` package (cocotb benches live in sim/)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "sim" / "__init__.py").is_file():
        raise SimError(f"the cocotb benches (sim/) are not next to the hwgen package ({root}): "
                       "RTL verification runs from a source checkout (pip install -e .)")
    if str(root) not in sys.path:
        sys.path.append(str(root))
    import sim  # noqa: F401
    return sim


# ----------------------------------------------------------------------------- golden records

def pad_feeds(feeds: dict[str, np.ndarray], seq: int) -> dict[str, np.ndarray]:
    """Pad every (B, S) input to ``seq`` tokens with zeros (pad id 0, mask 0)."""
    out = {}
    for k, v in feeds.items():
        v = np.asarray(v)
        if v.ndim >= 2 and v.shape[1] < seq:
            v = np.pad(v, [(0, 0), (0, seq - v.shape[1])] + [(0, 0)] * (v.ndim - 2))
        out[k] = v
    return out


def golden_steps(graph, feeds: dict[str, np.ndarray], decode_steps: int = 2) -> list[dict]:
    """Golden records: ``[{"offset", "vals"}]``. Stateless graphs: one step over
    the feeds. Graphs with a KV cache: a prefill of all but ``decode_steps``
    tokens, then one step per remaining token (batch row 0)."""
    from ..golden import GoldenModel, GoldenState

    gm = GoldenModel(graph, workers=1)
    stateful = any(n.op == "attention" and n.attrs.get("kv_cache") for n in graph.nodes)
    if not stateful:
        return [{"offset": 0, "vals": gm(feeds, record=True)}]
    first = {k: np.asarray(v)[:1] for k, v in feeds.items()}
    s = int(np.asarray(first[graph.inputs[0]]).shape[1])
    d = min(decode_steps, s - 1)
    cuts = [(0, s - d)] + [(t, t + 1) for t in range(s - d, s)]
    state, steps = GoldenState(), []
    for a, b in cuts:
        step = {k: np.asarray(v)[:, a:b] for k, v in first.items()}
        steps.append({"offset": a, "vals": gm(step, state, record=True)})
    return steps


def _golden_node(graph, node, ins):
    """The golden model's own kernel for ``node`` on synthetic inputs (fresh state)."""
    from .. import golden

    return golden._OPS[node.op](golden.GoldenModel(graph, workers=1), node, ins, golden.GoldenState())


# ----------------------------------------------------------------------------- per kernel

def _linear_corners(graph, node, spec, rng) -> list[np.ndarray]:
    f = spec.x_fmt
    lo, hi, k = f.min_code, f.max_code, spec.k
    alt = np.where(np.add.outer(np.arange(spec.rows + 1), np.arange(k)) % 2 == 0, lo, hi)
    return [np.full((1, k), hi), np.full((2, k), lo), alt,
            rng.integers(lo, hi + 1, (spec.rows + 1, k))]


def _verify_linear(graph, kernel, steps, batch, corners, sim, waves, say, rng) -> dict:
    from sim.kernels import matmul_bench

    from .matmul import linear_operands

    node = graph.node(kernel.node)
    spec = kernel.engine
    _, ops = linear_operands(graph, node)
    xs, ys = [], []
    for st in steps:
        x, y = st["vals"][node.inputs[0]], st["vals"][node.outputs[0]]
        x = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.ndim >= 2 else x[None, None]
        y = y.reshape(-1, y.shape[-2], y.shape[-1]) if y.ndim >= 2 else y[None, None]
        for b in range(min(batch, x.shape[0])):
            xs.append(x[b])
            ys.append(y[b])
    n_real = len(xs)
    if corners:
        for xc in _linear_corners(graph, node, spec, rng):
            xs.append(xc)
            ys.append(_golden_node(graph, node, [xc[None]] + [None] * (len(node.inputs) - 1))[0])
    res = matmul_bench(spec, xs, ops["w"], ops["bias"], ops["shift"], expected=ys, sim=sim,
                       waves=waves, verilog=kernel.verilog(), say=say)
    _explain_linear(graph, node, xs, res["first_mismatches"])
    real_cycles = sum(res["run_cycles"][:n_real])
    ideal = sum(spec.ideal_cycles(int(x.shape[0])) for x in xs[:n_real])
    return {"shape": [int(xs[0].shape[0]), spec.k, spec.n], "runs": len(xs), "real_runs": n_real,
            "cycles": real_cycles, "model_cycles": sum(res["model_run_cycles"][:n_real]),
            "ideal_cycles": ideal, "utilization": ideal / real_cycles if real_cycles else None,
            "bench": res}


def _explain_linear(graph, node, xs, first: list[dict]) -> None:
    """Add the golden computation's operands and intermediates to each
    reported mismatch (``hwgen.mismatch``): index [row, column] of run r."""
    from ..mismatch import explain_element

    for e in first:
        run = e.get("output", "")
        if not run.startswith("run") or not isinstance(e.get("expected"), int) or len(e["index"]) != 2:
            continue
        x = xs[int(run[3:])]
        e.update(explain_element(graph, node, [x[None]], (0, *e["index"])))


def _split(x, b, h, hd):
    return np.asarray(x)[b, :, h * hd:(h + 1) * hd]


def _attention_corners(graph, node, eng, rng) -> list[dict]:
    """Synthetic one-sequence cases: inputs of head 0 (other heads zero) and
    padding bits (None for a node without a mask input)."""
    hd, heads = eng.head_dim, int(node.attrs["heads"])
    has_mask = len(node.inputs) > 3 and bool(node.inputs[3])
    cases = []

    def rand(f, s):
        return rng.integers(f.min_code, f.max_code + 1, (s, hd))

    s = min(eng.lanes + 1, eng.max_seq)
    if has_mask:
        cases.append((rand(eng.q_fmt, s), rand(eng.k_fmt, s), rand(eng.v_fmt, s), np.zeros(s, np.int64)))
    q = np.full((s, hd), eng.q_fmt.max_code)
    k = np.full((s, hd), eng.k_fmt.min_code)
    k[0] = eng.k_fmt.max_code                       # one key far above the rest: exp saturates
    cases.append((q, k, rand(eng.v_fmt, s), np.ones(s, np.int64) if has_mask else None))
    cases.append((rand(eng.q_fmt, 1), rand(eng.k_fmt, 1), rand(eng.v_fmt, 1),
                  np.ones(1, np.int64) if has_mask else None))
    out = []
    for q, k, v, valid in cases:
        sq = q.shape[0]
        full = [np.zeros((1, sq, heads * hd), np.int64) for _ in range(3)]
        for f, x in zip(full, (q, k, v)):
            f[0, :, :hd] = x
        ins = full + ([valid[None]] if has_mask else [])
        want = _golden_node(graph, node, ins)[0, :, :hd]
        out.append({"q": q, "k": k, "v": v, "valid": valid, "offset": 0, "want": want})
    return out


def _verify_attention(graph, kernel, steps, batch, corners, sim, waves, say, rng, heads=None) -> dict:
    from sim.kernels import attention_bench

    node = graph.node(kernel.node)
    eng = kernel.engine
    hd, nh = eng.head_dim, int(node.attrs["heads"])
    has_mask = len(node.inputs) > 3 and bool(node.inputs[3])
    hs = range(nh) if heads is None else [h for h in range(nh) if h < heads]
    passes, want = [], []
    rows = min(batch, np.asarray(steps[0]["vals"][node.inputs[0]]).shape[0])
    for b in range(rows):
        for h in hs:
            for st in steps:
                vals = st["vals"]
                q, k, v = (_split(vals[t], b, h, hd) for t in node.inputs[:3])
                valid = np.asarray(vals[node.inputs[3]])[b] if has_mask else None
                passes.append({"q": q, "k": k, "v": v, "valid": valid, "offset": st["offset"]})
                want.append(_split(vals[node.outputs[0]], b, h, hd))
    n_real = len(passes)
    if corners:
        for c in _attention_corners(graph, node, eng, rng):
            want.append(c.pop("want"))
            passes.append(c)
    res = attention_bench(eng, passes, want, sim=sim, waves=waves, verilog=kernel.verilog(), say=say)
    real = sum(res["pass_cycles"][:n_real])
    ideal = sum(eng.ideal_cycles(p["q"].shape[0], p["offset"] + p["q"].shape[0]) for p in passes[:n_real])
    return {"shape": {"s_q": int(passes[0]["q"].shape[0]), "head_dim": hd, "heads": len(hs),
                      "rows": rows},
            "runs": len(passes), "real_runs": n_real, "cycles": real,
            "model_cycles": sum(res["model_pass_cycles"][:n_real]), "ideal_cycles": ideal,
            "utilization": ideal / real if real else None, "bench": res}


def verify(graph, kernels, feeds: dict[str, np.ndarray], sim: str = "verilator", waves: bool = False,
           batch: int = 1, corners: bool = True, heads: int | None = None, seed: int = 0,
           say=lambda msg: None) -> list[dict]:
    """Simulate ``kernels`` (:func:`hwgen.rtl.generate.plan`) on golden vectors
    from ``feeds``; one report per kernel (module docstring)."""
    _sim_package()
    from sim.runner import check_simulator

    check_simulator(sim)
    say(f"golden model on {', '.join(f'{k} {list(np.shape(v))}' for k, v in feeds.items())}")
    steps = golden_steps(graph, feeds)
    if len(steps) > 1:
        say(f"KV cache: prefill of {steps[1]['offset']} token(s), then {len(steps) - 1} single-token step(s)")
    rng = np.random.default_rng(seed)
    report = []
    for kern in kernels:
        say(f"{kern.name}: {kern.op} (node {kern.node}) on {sim}")
        t0 = time.perf_counter()
        if kern.op == "linear":
            r = _verify_linear(graph, kern, steps, batch, corners, sim, waves, say, rng)
        else:
            r = _verify_attention(graph, kern, steps, batch, corners, sim, waves, say, rng, heads)
        bench = r.pop("bench")
        entry = {"name": kern.name, "node": kern.node, "op": kern.op, "shape": r["shape"],
                 "vectors": bench["vectors"], "mismatches": bench["mismatches"],
                 "cycles": r["cycles"], "model_cycles": r["model_cycles"],
                 "ideal_cycles": r["ideal_cycles"], "utilization": r["utilization"],
                 "runs": r["runs"], "real_runs": r["real_runs"],
                 "first_mismatches": bench["first_mismatches"],
                 "build_s": bench["build_s"], "sim_s": bench["run_s"],
                 "wall_s": time.perf_counter() - t0}
        if waves:
            entry["waves"] = bench.get("waves")
        report.append(entry)
        u = entry["utilization"]
        say(f"  {kern.name}: {entry['vectors']} codes, mismatches {entry['mismatches']}, "
            f"cycles {entry['cycles']} (model {entry['model_cycles']}), utilization "
            + (f"{u:.4f}" if u is not None else "-"))
    return report


# ----------------------------------------------------------------------------- CLI

def cmd_verify_rtl(args, say) -> tuple[dict, int]:
    """``hwgen verify --target rtl``: the JSON result and the exit status."""
    from ..hls.project import builtin_feeds, first_batch, load_inputs
    from ..ir import Graph
    from .generate import RTLOptions, plan

    t0 = time.perf_counter()
    _sim_package()
    from sim.runner import check_simulator, simulator_version

    check_simulator(args.sim)   # a missing simulator fails before any work
    graph = Graph.load(args.graph)
    opt = RTLOptions(rows=args.rows, cols=args.cols, max_seq=args.max_seq, lanes=args.lanes)
    kernels, skipped = plan(graph, args.layer, opt)
    if getattr(args, "kernel", None):
        want = set(args.kernel)
        kernels = [k for k in kernels if k.name in want or k.node in want]
        if not kernels:
            raise SimError(f"no kernel named {sorted(want)} in the plan")
    if not kernels:
        from .pe_array import RTLError
        raise RTLError(f"graph '{graph.name}': no node"
                       + (f" of layer {args.layer}" if args.layer is not None else "")
                       + " has an RTL kernel (linear, attention)")
    say(f"{len(kernels)} kernel(s) on a {opt.rows}x{opt.cols} array"
        + (f" in layer {args.layer}" if args.layer is not None else ""))
    if args.inputs:
        feeds, note = load_inputs(args.inputs), f"--inputs {args.inputs}"
    else:
        feeds, note = builtin_feeds(graph)
        say(f"inputs: {note}")
    feeds = first_batch(feeds, args.batch)
    note = f"{'row 0' if args.batch == 1 else f'rows 0..{args.batch - 1}'} of {note}"
    if args.seq:
        feeds = pad_feeds(feeds, args.seq)
        note += f", padded to {args.seq} tokens"
    report = verify(graph, kernels, feeds, sim=args.sim, waves=args.waves, batch=args.batch,
                    corners=not args.no_corners, heads=args.heads, say=say)
    total = sum(k["mismatches"] for k in report)
    if total and not args.waves:
        # keep a waveform of every failing kernel: the same vectors again, with waves on
        failing = [k for k in kernels if any(r["name"] == k.name and r["mismatches"] for r in report)]
        say(f"recording waves of {len(failing)} failing kernel(s)")
        again = verify(graph, failing, feeds, sim=args.sim, waves=True, batch=args.batch,
                       corners=not args.no_corners, heads=args.heads, say=say)
        for r in report:
            for a in again:
                if a["name"] == r["name"]:
                    r["waves"] = a.get("waves")
    for r in report:
        for e in r.get("first_mismatches", [])[:3]:
            say(f"  mismatch in {r['name']} {e.get('output', '')}{e['index']}: expected {e['expected']}, "
                f"got {e['actual']}" + (f"; contract {e['contract']}" if e.get("contract") else ""))
        if r.get("waves"):
            say(f"  waves of {r['name']}: {r['waves']}")
    result = {"target": "rtl", "simulator": args.sim, "simulator_version": simulator_version(args.sim),
              "graph": str(args.graph), "layer": args.layer, "inputs": note,
              "array": [opt.rows, opt.cols], "kernels": report,
              "vectors": sum(k["vectors"] for k in report), "mismatches": total,
              "skipped": [s["name"] for s in skipped], "wall_s": time.perf_counter() - t0}
    say(f"{len(report)} kernel(s), {result['vectors']} output codes, {total} mismatch(es)")
    return result, (1 if total else 0)


# ----------------------------------------------------------------------------- make bench

def rtl_sim_bench(quick: bool = False, say=None) -> dict:
    """``make bench`` entry (hwgen/bench.py): (1) the full MiniLM W8A8 layer 0 at
    sequence length 128 (the first evaluation sentence padded with masked
    tokens) on Verilator, every kernel bit-exact, cycles and utilization per
    kernel on the 16 x 16 array; (2) :func:`sim.speed.matmul_speed`: cocotb
    bench cycles/s vs ``verilator --binary`` on the 16 x 16 engine.
    ``quick``: two attention heads, a smaller speed case."""
    from .. import zoo
    from ..hls.project import builtin_feeds, first_batch
    from ..quant import QuantConfig, quantize
    from .generate import RTLOptions, plan

    say = say or (lambda msg: print(f"[bench rtl] {msg}", file=sys.stderr, flush=True))
    _sim_package()
    from sim.speed import matmul_speed

    t0 = time.perf_counter()
    say("quantizing MiniLM W8A8")
    bundle = zoo.load("minilm")
    graph, _ = quantize(bundle.graph, bundle.calib_feeds, QuantConfig.from_bits("w8a8"))
    graph.name = bundle.name
    graph.meta.update({"model": "minilm", "kind": bundle.kind, "bits": "w8a8"})
    feeds, note = builtin_feeds(graph)
    feeds = pad_feeds(first_batch(feeds, 1), 128)
    kernels, _ = plan(graph, 0, RTLOptions())
    report = verify(graph, kernels, feeds, sim="verilator", heads=2 if quick else None, say=say)
    layer = {"inputs": f"row 0 of {note}, padded to 128 tokens", "heads": 2 if quick else "all",
             "mismatches": sum(k["mismatches"] for k in report),
             "vectors": sum(k["vectors"] for k in report),
             "kernels": [{k: e[k] for k in ("name", "op", "shape", "vectors", "mismatches", "cycles",
                                             "model_cycles", "ideal_cycles", "utilization", "build_s",
                                             "sim_s")} for e in report]}
    say("simulation speed: cocotb vs verilator --binary")
    speed = matmul_speed(k=128 if quick else 384, n=64 if quick else 384, m=128, runs=2 if quick else 4,
                         say=say)
    return {"minilm_layer0_seq128": layer, "speed": speed, "wall_s": time.perf_counter() - t0}
