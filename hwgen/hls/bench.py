"""The HLS numbers of ``make bench`` (registered in :mod:`hwgen.bench`).

* ``minilm_layer_s128``: every kernel of all-MiniLM-L6-v2 W8A8 layer 0 and its
  block top, C-simulated (g++, ap_fixed headers) on real activations at
  sequence length 128 (two rows: the evaluation sentences joined and cut to
  128 tokens, and the first 4 sentences padded to 128), every output code
  compared with the golden model;
* ``block_csim``: compile time of that C-simulation binary from an empty cache
  (all kernels of the layer + the block top + testbench, one g++ run) and the
  run time of the block top alone on those inputs;
* ``hls4ml_minilm_layer0``: hls4ml's own C-simulation of every layer of MiniLM
  layer 0 it can express vs the golden model (max |diff| in LSB per layer);
* ``frontend_coverage``: ops of an HF BertLayer / GPT2Block that hls4ml's
  PyTorch frontend converts, vs hwgen's graph and HLS kernels.

    python -c "from hwgen.hls.bench import hls_bench; print(hls_bench())"
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ = 128


def say(msg: str) -> None:
    print(f"[bench:hls] {msg}", file=sys.stderr, flush=True)


def minilm_feeds(seq: int = SEQ) -> dict[str, np.ndarray]:
    """Two rows of real MiniLM inputs at ``seq`` tokens: the evaluation sentences joined
    and cut to ``seq`` tokens (no padding), and the first 4 sentences, padded."""
    from .. import zoo

    lines = [ln for ln in (zoo.DATA_DIR / "sentences_eval.txt").read_text().splitlines() if ln.strip()]
    long = zoo.feeds_from_text("minilm", " ".join(lines[:40]))
    short = zoo.feeds_from_text("minilm", "\n".join(lines[:4]))
    rows = {}
    for k in ("ids", "mask"):
        a = np.asarray(long[k])[:1, :seq]
        if a.shape[1] < seq:
            raise RuntimeError(f"the joined sentences give only {a.shape[1]} tokens")
        b = np.asarray(short[k])[:1, :seq]
        b = np.pad(b, ((0, 0), (0, seq - b.shape[1])))
        rows[k] = np.concatenate([a, b])
    return rows


def minilm_graph():
    from .. import zoo
    from ..quant import QuantConfig, quantize

    bundle = zoo.load("minilm")
    fixed, _ = quantize(bundle.graph, bundle.calib_feeds, QuantConfig.from_bits("w8a8"))
    fixed.meta["model"] = "minilm"
    return fixed


def minilm_layer(graph, feeds, layer: int = 0) -> dict:
    """All kernels of ``layer`` + its block top, compiled from an empty cache, run at S=128."""
    from .csim import build, run_kernels
    from .project import all_files, golden_io, plan, _mismatches

    kernels, skipped = plan(graph, layer, max_seq=SEQ)
    files = all_files(kernels)
    with tempfile.TemporaryDirectory(prefix="hwgen-bench-hls-") as td:
        t0 = time.perf_counter()
        build(files, Path(td))
        compile_s = time.perf_counter() - t0
        say(f"layer {layer}: {len(kernels) - 1} kernels + block top compiled in {compile_s:.1f} s")
        xs, ys = golden_io(graph, kernels, feeds)
        t0 = time.perf_counter()
        outs = run_kernels(kernels, files, xs, cache=Path(td))
        run_all_s = time.perf_counter() - t0
        block = next(k for k in kernels if k.op == "block")
        t0 = time.perf_counter()
        run_kernels([block], files, {block.node: xs[block.node]}, cache=Path(td))
        block_run_s = time.perf_counter() - t0
    per = []
    for k in kernels:
        bad, size = _mismatches(outs[k.node], ys[k.node])
        per.append({"name": k.name, "op": k.op, "vectors": size, "mismatches": bad})
        say(f"  {k.name:48s} {k.op:10s} {size:9d} codes  mismatches {bad}")
    return {"layer": layer, "seq": SEQ, "batch": int(np.asarray(feeds["ids"]).shape[0]),
            "kernels": per, "vectors": sum(p["vectors"] for p in per),
            "mismatches": sum(p["mismatches"] for p in per), "skipped": [s["name"] for s in skipped],
            "compile_s": compile_s, "run_all_kernels_s": run_all_s, "block_run_s": block_run_s,
            "block_sources": len(files)}


def hls_bench(quick: bool = False) -> dict:
    from .hls4ml_interop import frontend_coverage, verify as hls4ml_verify
    from .project import builtin_feeds

    t0 = time.perf_counter()
    say("quantizing MiniLM W8A8")
    graph = minilm_graph()
    feeds = minilm_feeds()
    say(f"MiniLM layer 0 at S={SEQ}: C-simulation of every kernel and the block top")
    res = {"minilm_layer_s128": minilm_layer(graph, feeds, 0)}
    say("hls4ml frontend coverage of HF BertLayer / GPT2Block")
    res["frontend_coverage"] = frontend_coverage()
    if not quick:
        say("hls4ml C-simulation of MiniLM layer 0 vs golden (hls4ml compiles cached)")
        f4, note = builtin_feeds(graph)
        rep, skipped = hls4ml_verify(graph, f4, layer=0, say=say)
        res["hls4ml_minilm_layer0"] = {"inputs": note, "layers": rep, "skipped": skipped}
    res["wall_s"] = time.perf_counter() - t0
    return res
