"""``make bench``: the measured numbers of README.md, in one run.

Quantization (issue targets):
* all-MiniLM-L6-v2, integer-only, mean/min sentence-embedding cosine vs float
  over the built-in evaluation sentences, for W4A8, W8A8, W8A16 and W16A16
  (post-training), and W8A8 / W4A8 after QAT;
* tiny-gpt perplexity per byte, float vs W8A8 integer;
* golden MiniLM forward time / torch float32 forward time on the same batch
  (16 sentences padded to 128 tokens), medians of repeated runs measured in
  this one process (a ratio, so machine load cancels as far as it can).

Writes ``OUT/bench.json`` and prints a Markdown table; progress on stderr.

    python -m hwgen.bench [--out build/bench] [--qat-steps 30] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import zoo
from .accuracy import evaluate, qat_loss
from .golden import GoldenModel
from .quant import QuantConfig, calibrate, prepare, quantize


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def minilm_accuracy(bits: list[str], qat_bits: list[str], qat_steps: int) -> list[dict]:
    bundle = zoo.load("minilm")
    folded = prepare(bundle.graph)
    stats = calibrate(folded, bundle.calib_feeds)  # formats differ per width; statistics do not
    rows = []
    for b in bits:
        say(f"minilm {b} post-training")
        cfg = QuantConfig.from_bits(b)
        fixed, _ = quantize(bundle.graph, bundle.calib_feeds, cfg, stats=stats)
        rows.append({"bits": b, "qat_steps": 0, **evaluate(bundle, fixed)})
    for b in qat_bits:
        from .qat import QATModel, finetune

        say(f"minilm {b} QAT {qat_steps} steps")
        cfg = QuantConfig.from_bits(b)
        _, fmts = quantize(bundle.graph, bundle.calib_feeds, cfg, stats=stats)
        model = QATModel(folded, fmts, cfg)
        finetune(model, bundle.calib_feeds, qat_loss(bundle), qat_steps)
        rows.append({"bits": b, "qat_steps": qat_steps, **evaluate(bundle, model.export())})
    return rows


def tiny_gpt_accuracy() -> dict:
    say("tiny-gpt w8a8")
    bundle = zoo.load("tiny-gpt")
    fixed, _ = quantize(bundle.graph, bundle.calib_feeds, QuantConfig.from_bits("w8a8"))
    r = evaluate(bundle, fixed)
    r["ppl_ratio"] = r["ppl_quant"] / r["ppl_float"]
    return r


def _interleaved_medians(fns, repeats: int) -> list[float]:
    """Median wall time of each function, run alternately so load hits all alike."""
    for fn in fns:
        fn()  # warm caches (tables, weight conversions, BLAS threads)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def golden_speed(repeats: int = 7) -> dict:
    say("golden vs torch float32 speed")
    bundle = zoo.load("minilm")
    fixed, _ = quantize(bundle.graph, bundle.calib_feeds, QuantConfig.from_bits("w8a8"))
    text = "\n".join(Path(zoo.MODELS_DIR / "data" / "sentences_eval.txt").read_text().splitlines()[:16])
    feed = zoo.feeds_from_text("minilm", text)
    pad = 128 - feed["ids"].shape[1]
    feed = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in feed.items()}  # pad id 0, mask 0
    golden = GoldenModel(fixed)
    ids, mask = torch.as_tensor(feed["ids"]), torch.as_tensor(feed["mask"])
    with torch.no_grad():
        t_golden, t_torch = _interleaved_medians(
            [lambda: golden(feed), lambda: bundle.module(input_ids=ids, attention_mask=mask)], repeats)
    return {"batch": int(ids.shape[0]), "seq": int(ids.shape[1]), "golden_s": t_golden,
            "torch_fp32_s": t_torch, "ratio": t_golden / t_torch, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hwgen.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--qat-steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="W8A8 only, 5 QAT steps")
    args = ap.parse_args(argv)
    bits = ["w8a8"] if args.quick else ["w4a8", "w8a8", "w8a16", "w16a16"]
    qat_bits = ["w8a8"] if args.quick else ["w8a8", "w4a8"]
    steps = 5 if args.quick else args.qat_steps
    t0 = time.perf_counter()
    result = {"golden_speed": golden_speed(),
              "minilm": minilm_accuracy(bits, qat_bits, steps),
              "tiny_gpt": tiny_gpt_accuracy()}
    result["runtime"] = __import__("hwgen.runtime.bench", fromlist=["x"]).runtime_bench(args.quick)
    result["hls"] = __import__("hwgen.hls.bench", fromlist=["x"]).hls_bench(args.quick)
    result["rtl_sim"] = __import__("hwgen.rtl.verify", fromlist=["x"]).rtl_sim_bench(args.quick)
    impl = __import__("hwgen.impl.bench", fromlist=["x"]).impl_bench
    # the reference kernel and buffers on an 8x8 array first: minutes, where the 16x16 takes hours here
    result["impl_proxy_8x8"] = impl(rows=8, cols=8)
    result["impl"] = impl(args.quick)
    result["compression"] = __import__("hwgen.distill", fromlist=["x"]).bench(quick=args.quick)
    result["bench_wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    print("| MiniLM-L6 | QAT steps | cosine mean | cosine min |\n|---|---|---|---|")
    for r in result["minilm"]:
        print(f"| {r['bits'].upper()} | {r['qat_steps']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")
    t = result["tiny_gpt"]
    print(f"\ntiny-gpt W8A8: ppl float {t['ppl_float']:.4f}, integer {t['ppl_quant']:.4f} "
          f"(ratio {t['ppl_ratio']:.4f})")
    s = result["golden_speed"]
    print(f"golden / torch fp32 MiniLM forward ({s['batch']}x{s['seq']}): "
          f"{s['golden_s']:.3f} s / {s['torch_fp32_s']:.3f} s = {s['ratio']:.2f}")
    print(f"\nwrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
