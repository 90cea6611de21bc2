"""Bench of the host driver (registered in :mod:`hwgen.bench`).

* ``bitexact``: MiniLM (W8A8, 4 evaluation sentences, one batch) through the driver
  with the ``golden`` and ``hls`` backends, every output integer compared with the
  golden model called directly; tiny-gpt greedy decoding (prompt + 8 tokens) the
  same way, every logit code of every step and every token.
* ``overhead``: wall time of the driver with ``--backend golden`` over the golden
  model called directly, same MiniLM batch, medians of interleaved runs (target <= 1.2).
* ``rtl_cycles``: the tiny decoder's layer-0 kernels (q, k, v, attention, o, fc1,
  fc2) on the Verilated engines (4x4 PE array, 2 lanes): prefill plus 2 decoding
  steps, bit-exact vs golden, and per kernel run the cost model's predicted cycles
  vs the cycles measured in simulation (target: equal).

    python -m hwgen.runtime.bench [--quick]
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def say(msg: str) -> None:
    print(f"[bench runtime] {msg}", file=sys.stderr, flush=True)


def _minilm_feeds():
    from .. import zoo

    lines = [ln for ln in (zoo.DATA_DIR / "sentences_eval.txt").read_text().splitlines() if ln.strip()][:4]
    return zoo.feeds_from_text("minilm", "\n".join(lines))


def bitexact(backends=("golden", "hls")) -> dict:
    from ..golden import GoldenModel
    from . import jobs
    from .driver import Driver

    out = {}
    g = jobs.load_graph("minilm", say=say)
    feeds = _minilm_feeds()
    want = GoldenModel(g)(feeds)[g.outputs[0]]
    for b in backends:
        say(f"minilm through --backend {b}")
        t0 = time.perf_counter()
        d = Driver(g, b, say=say)
        t1 = time.perf_counter()
        got, st = d.run(feeds)
        out[f"minilm_{b}"] = {"mismatches": int((got[g.outputs[0]] != want).sum()), "vectors": int(want.size),
                              "prepare_s": t1 - t0, "run_s": time.perf_counter() - t1,
                              "bytes_to_accel": st.bytes_to_accel, "bytes_from_accel": st.bytes_from_accel,
                              "accel_cycles": st.accel_cycles}
    g = jobs.load_graph("tiny-gpt", say=say)
    prompt = list(b"def parse(text):\n    ")
    g_new, g_seen = jobs.golden_generate(g, prompt, 8, 128)
    for b in backends:
        say(f"tiny-gpt decoding through --backend {b}")
        d = Driver(g, b, say=say)
        t0 = time.perf_counter()
        new, seen, _, st = d.generate(prompt, 8, 128)
        out[f"tiny_gpt_{b}"] = {"mismatches": sum(int((x != y).sum()) for x, y in zip(seen, g_seen)),
                                "tokens_equal": new == g_new, "vectors": int(sum(x.size for x in seen)),
                                "run_s": time.perf_counter() - t0}
    return out


def overhead(repeats: int = 7) -> dict:
    from ..golden import GoldenModel
    from . import jobs
    from .driver import Driver

    g = jobs.load_graph("minilm", say=say)
    feeds = _minilm_feeds()
    d = Driver(g, "golden")
    gm = GoldenModel(g)
    fns = [lambda: d.run(feeds), lambda: gm(feeds)]
    for fn in fns:
        fn()
    times = [[], []]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    drv, gold = (statistics.median(t) for t in times)
    return {"batch": int(feeds["ids"].shape[0]), "seq": int(feeds["ids"].shape[1]), "driver_s": drv,
            "golden_s": gold, "ratio": drv / gold, "repeats": repeats}


def rtl_cycles(steps: int = 2) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from conftest import build_tiny_decoder, tiny_decoder_feeds

    from ..quant import QuantConfig, quantize
    from . import jobs
    from .cost import CycleModel
    from .driver import Driver

    g, _ = quantize(build_tiny_decoder(), tiny_decoder_feeds(), QuantConfig.from_bits("w8a8"))
    layer0 = [n.name for n in g.nodes if n.layer == 0 and n.op in ("linear", "attention")]
    force = {"linear": "host", "attention": "host", **{n: "accel" for n in layer0}}
    say(f"rtl: {len(layer0)} kernels of the tiny decoder's layer 0 on Verilator")
    t0 = time.perf_counter()
    d = Driver(g, "rtl", force=force, cycles=CycleModel(g, rows=4, cols=4, lanes=2, max_m=16), say=say)
    prompt = [1, 9, 4, 30, 22, 17]
    new, seen, _, st = d.generate(prompt, steps, ctx=24)
    g_new, g_seen = jobs.golden_generate(g, prompt, steps, ctx=24)
    kernels = {k: {"runs": len(v), "predicted": sum(a for a, _ in v), "measured": sum(b for _, b in v),
                   "equal_runs": sum(a == b for a, b in v)} for k, v in d.accel.measured.items()}
    return {"kernels": kernels, "all_equal": all(k["equal_runs"] == k["runs"] for k in kernels.values()),
            "mismatches": sum(int((x != y).sum()) for x, y in zip(seen, g_seen)),
            "tokens_equal": new == g_new, "wall_s": time.perf_counter() - t0}


def runtime_bench(quick: bool = False) -> dict:
    r = {"overhead": overhead(5 if quick else 9), "bitexact": bitexact()}
    if not quick:
        r["rtl_cycles"] = rtl_cycles()
    return r


if __name__ == "__main__":
    res = runtime_bench("--quick" in sys.argv)
    print(json.dumps(res, indent=1))
