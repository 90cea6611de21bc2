"""End-to-end jobs of ``hwgen run`` and ``hwgen plan``.

* :func:`load_graph`: a saved graph (``--graph DIR``) or a built-in model quantized
  once and cached under ``.hwgen-cache/runtime/graphs/`` (keyed by model, bits and a
  hash of the sources that decide the graph).
* :func:`run_encoder`: sentence embeddings (minilm): every line of the text is one
  request, requests grouped ``batch`` at a time, batches pipelined over the host and
  the accelerator; checked against the golden model (every output integer) and the
  float model (cosine).
* :func:`run_decoder`: greedy generation with a KV cache (tiny-gpt), checked against
  the same loop on the golden model (every logit code of every step, every token).
* :func:`plan`: the placement table with predicted times and bytes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from .. import zoo
from ..golden import GoldenModel, GoldenState, dequantize
from ..ir import Graph
from . import cost as cost_mod
from .backends import BACKENDS, CACHE
from .driver import Driver, RunStats, greedy_decode
from .partition import ACCEL, HOST, DriverError, counts, place
from .trace import Tracer

_PKG = Path(__file__).resolve().parents[1]
#: sources whose change changes a quantized graph
_GRAPH_SOURCES = ("contract.py", "fixed.py", "ir.py", "quant.py", "frontend.py", "float_exec.py", "zoo.py")


def _graph_key(model: str, bits: str) -> str:
    h = hashlib.sha256(f"{model}|{bits}".encode())
    for name in _GRAPH_SOURCES:
        h.update((_PKG / name).read_bytes())
    for p in sorted(zoo.MODELS_DIR.glob("*.py")) + sorted(zoo.MODELS_DIR.glob("*.pt")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def load_graph(model: str | None = None, graph_dir: str | None = None, bits: str = "w8a8",
               say=lambda m: None) -> Graph:
    if graph_dir:
        return Graph.load(graph_dir)
    if not model:
        raise DriverError("give --model NAME (minilm, tiny-gpt) or --graph DIR")
    from ..quant import QuantConfig, quantize

    cfg = QuantConfig.from_bits(bits)
    key = zoo._ALIASES.get(model.lower(), model)
    if key not in ("minilm", "tiny-gpt"):
        raise DriverError(f"--model {model}: `hwgen run` takes minilm or tiny-gpt (or a saved graph "
                          "with --graph DIR)")
    d = CACHE / "graphs" / f"{key}-{cfg.name}-{_graph_key(key, cfg.name)}"
    if (d / "graph.json").is_file():
        say(f"graph: cached {d}")
        return Graph.load(d)
    say(f"graph: quantizing {key} to {cfg.name} once (cached in {d})")
    bundle = zoo.load(key)
    fixed, _ = quantize(bundle.graph, bundle.calib_feeds, cfg)
    fixed.name = bundle.name
    fixed.meta.update({"model": key, "kind": bundle.kind, "bits": cfg.name})
    # written beside and renamed into place; a concurrent run that got there first wins
    tmp = d.with_name(f".{d.name}.{os.getpid()}.{threading.get_ident()}")
    fixed.save(tmp)
    try:
        os.rename(tmp, d)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return fixed


def _model_of(graph: Graph) -> str:
    model = str(graph.meta.get("model") or "")
    key = zoo._ALIASES.get(model.lower())
    if key is None and model.endswith(".pt"):
        key = "tiny-gpt"
    if key not in ("minilm", "tiny-gpt"):
        raise DriverError(f"graph '{graph.name}' was quantized from model '{model or '?'}'; `hwgen run` "
                          "runs graphs of minilm and tiny-gpt (which take text)")
    return key


def _stats_json(d: Driver, st: RunStats) -> dict:
    return {"placement": d.placement_counts(), "bytes_to_accel": st.bytes_to_accel,
            "bytes_from_accel": st.bytes_from_accel, "transfers": st.transfers,
            "weight_bytes": d.weight_bytes, "accel_cycles": st.accel_cycles}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.where(den == 0, 1.0, den)


# ----------------------------------------------------------------------------- encoder

def sentences(text: str) -> list[str]:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        raise DriverError("--text is empty: give at least one sentence (one per line)")
    return lines


def check_sentence_lengths(graph: Graph, lines: list[str]) -> None:
    """Refuse sentences longer than the model takes (the tokenizer would cut them silently)."""
    model_dir = zoo._minilm_dir()
    tok = zoo._minilm_tokenizer(model_dir)
    limit = min(zoo._minilm_max_len(model_dir), _positions(graph))
    for i, s in enumerate(lines):
        n = len(tok(s, truncation=False)["input_ids"])
        if n > limit:
            raise DriverError(f"sentence {i + 1} is {n} tokens long; the model takes at most {limit} "
                              "(shorten it or split it)")


def _positions(graph: Graph) -> int:
    for n in graph.nodes:
        if n.op == "embedding" and n.attrs.get("positions"):
            return int(graph.tensors[n.inputs[1]].shape[0])
    return 1 << 30


def run_encoder(graph: Graph, text: str, backend: str = "golden", device: str = "cpu",
                batch: int = 8, force=None, accel_ops=None, tracer: Tracer | None = None,
                float_ref: bool = True, say=lambda m: None) -> dict:
    model = _model_of(graph)
    if model != "minilm":
        raise DriverError(f"graph '{graph.name}' is a decoder ({model}): use --prompt, not --text")
    if batch < 1:
        raise DriverError(f"--batch must be >= 1, got {batch}")
    lines = sentences(text)
    check_sentence_lengths(graph, lines)
    groups = [lines[i:i + batch] for i in range(0, len(lines), batch)]
    feeds = [zoo.feeds_from_text(model, "\n".join(g)) for g in groups]
    say(f"placing {len(graph.nodes)} ops; backend {backend}, host device {device}")
    drv = Driver(graph, backend, device, accel_ops=accel_ops, force=force, tracer=tracer, say=say)
    say(f"running {len(lines)} sentence(s) in {len(groups)} batch(es)")
    t0 = time.perf_counter()
    outs, st = drv.run_many(feeds)
    wall = time.perf_counter() - t0
    out_name = graph.outputs[0]
    codes = np.concatenate([o[out_name] for o in outs])
    say("checking against the golden model")
    golden = GoldenModel(graph)
    t0 = time.perf_counter()
    ref = np.concatenate([golden(f)[out_name] for f in feeds])
    golden_s = time.perf_counter() - t0
    mismatches = int((codes != ref).sum())
    result = {"backend": backend, "device": device, "model": model, "sentences": len(lines),
              "batches": len(groups), **_stats_json(drv, st),
              "cosine_vs_float": None, "bitexact_vs_golden": mismatches == 0, "mismatches": mismatches,
              "wall_s": wall, "golden_s": golden_s}
    if float_ref:
        say("float reference (torch module)")
        bundle = zoo.load(model)
        flt = np.concatenate([bundle.reference(f) for f in feeds])
        cos = _cosines(dequantize(graph, out_name, codes), flt)
        result["cosine_vs_float"] = float(cos.mean())
        result["cosine_min"] = float(cos.min())
    if tracer is not None:
        result["overlap_s"] = tracer.overlap("host", "accel")
    result["embedding_head"] = [float(v) for v in dequantize(graph, out_name, codes)[0, :8]]
    return result


# ----------------------------------------------------------------------------- decoder

def golden_generate(graph: Graph, prompt_ids: list[int], max_new_tokens: int, ctx: int):
    """The decoding loop of :meth:`Driver.generate` on the golden model alone."""
    gm = GoldenModel(graph)
    state = GoldenState()
    name = graph.outputs[0]

    def step(feed: np.ndarray, restart: bool, label: str) -> np.ndarray:
        nonlocal state
        if restart:
            state = GoldenState()
        return gm({graph.inputs[0]: feed}, state)[name]

    new, seen, _ = greedy_decode(step, prompt_ids, max_new_tokens, ctx)
    return new, seen


def run_decoder(graph: Graph, prompt: str, max_new_tokens: int, backend: str = "golden",
                device: str = "cpu", force=None, accel_ops=None, tracer: Tracer | None = None,
                float_ref: bool = True, say=lambda m: None) -> dict:
    model = _model_of(graph)
    if model != "tiny-gpt":
        raise DriverError(f"graph '{graph.name}' is an encoder ({model}): use --text, not --prompt")
    if max_new_tokens < 0:
        raise DriverError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    ids = list(str(prompt).encode("utf-8"))
    if not ids:
        raise DriverError("--prompt is empty: give at least one character")
    ctx = int(graph.meta.get("max_positions") or _positions(graph))
    if len(ids) > ctx:
        raise DriverError(f"--prompt is {len(ids)} bytes; the model's context holds {ctx} positions "
                          "(shorten the prompt)")
    drv = Driver(graph, backend, device, accel_ops=accel_ops, force=force, tracer=tracer, say=say)
    say(f"generating {max_new_tokens} token(s) after a {len(ids)}-byte prompt")
    t0 = time.perf_counter()
    new, seen, prefill, st = drv.generate(ids, max_new_tokens, ctx)
    wall = time.perf_counter() - t0
    say("checking against the golden model's decoding loop")
    t0 = time.perf_counter()
    g_new, g_seen = golden_generate(graph, ids, max_new_tokens, ctx)
    golden_s = time.perf_counter() - t0
    mismatches = sum(int((a != b).sum()) for a, b in zip(seen, g_seen)) + sum(a != b for a, b in zip(new, g_new))
    text = bytes(ids + new).decode("utf-8", errors="replace")
    result = {"backend": backend, "device": device, "model": model, **_stats_json(drv, st),
              "cosine_vs_float": None, "bitexact_vs_golden": mismatches == 0 and new == g_new,
              "mismatches": int(mismatches), "wall_s": wall, "golden_s": golden_s,
              "tokens": len(new), "tokens_per_s": len(new) / wall if wall > 0 else None, "text": text}
    if float_ref:
        say("float reference (torch module) on the prompt")
        bundle = zoo.load(model)
        flt = bundle.reference({"ids": np.asarray([ids[-ctx:]], dtype=np.int64)})
        result["cosine_vs_float"] = float(_cosines(dequantize(graph, graph.outputs[0], prefill), flt).mean())
    if tracer is not None:
        result["overlap_s"] = tracer.overlap("host", "accel")
    return result


# ----------------------------------------------------------------------------- plan

def example_feeds(graph: Graph, text: str | None) -> dict:
    model = _model_of(graph)
    if text is not None and not str(text).strip():
        raise DriverError("--text is empty")
    if model == "minilm":
        return zoo.feeds_from_text(model, text or "hwgen runs transformer blocks on an accelerator.")
    ids = list(str(text or "def main():\n    return").encode("utf-8"))
    ctx = int(graph.meta.get("max_positions") or _positions(graph))
    if len(ids) > ctx:
        raise DriverError(f"--text is {len(ids)} bytes; the model's context holds {ctx} positions")
    return {"ids": np.asarray([ids], dtype=np.int64)}


def plan(graph: Graph, feeds: dict, backend: str = "golden", device: str = "cpu", force=None,
         accel_ops=None, policy: str = "kernels", clock_mhz: float = cost_mod.DEFAULT_CLOCK_MHZ,
         link: cost_mod.Link = cost_mod.Link(), repeats: int = 3, say=lambda m: None) -> dict:
    """Profile every node on the host backend, then place (``kernels``: the default
    placement and ``force``; ``cost``: the cost model) and predict."""
    _kernel_ops(backend)
    if policy not in ("kernels", "cost"):
        raise DriverError(f"unknown placement policy '{policy}': expected kernels or cost")
    if clock_mhz <= 0:
        raise DriverError(f"accelerator clock must be > 0 MHz, got {clock_mhz}")
    say(f"profiling {len(graph.nodes)} ops on the host ({device}), {repeats} run(s)")
    host_drv = Driver(graph, "golden", device, force={n.op: HOST for n in graph.nodes})
    samples = []
    for _ in range(repeats):
        _, st = host_drv.run(feeds)
        samples.append(st.node_s)
    host_s = cost_mod.median_profile(samples)
    first = np.asarray(feeds[graph.inputs[0]])
    dims = {"B": int(first.shape[0]), "S": int(first.shape[1])}
    cycles = cost_mod.CycleModel(graph)
    kernel_ops = _kernel_ops(backend)
    if policy == "cost":
        auto = cost_mod.cost_placement(graph, kernel_ops, dims, 0, host_s, cycles, clock_mhz, link)
        auto.update(force or {})
        force = auto
    placement = place(graph, kernel_ops, accel_ops, force)
    rows = cost_mod.plan_rows(graph, placement, dims, 0, host_s, cycles, clock_mhz, link)
    acc = [r for r in rows if r["device"] == ACCEL]
    known = all(r["cycles"] is not None for r in acc)
    total_cycles = sum(r["cycles"] for r in acc) if known else None
    return {"backend": backend, "device": device, "policy": policy, "clock_mhz": clock_mhz,
            "link_gbps": link.bytes_per_s / 1e9, "dims": dims, "placement": counts(graph, placement),
            "accel_cycles": total_cycles,
            "predicted_s": sum(r["predicted_s"] for r in rows) if all(r["predicted_s"] is not None for r in rows) else None,
            "host_only_s": sum(host_s.values()),
            "bytes": sum(r["bytes"] for r in rows), "rows": rows}


def _kernel_ops(backend: str) -> tuple[str, ...]:
    """The ops each backend has kernels for (the rtl engines: linear and attention)."""
    if backend not in BACKENDS:
        raise DriverError(f"unknown backend '{backend}': expected one of {', '.join(BACKENDS)}")
    if backend == "golden":
        from ..golden import _OPS
        return tuple(op for op in _OPS if op != "quantize")
    if backend == "hls":
        from ..hls import HLS_OPS
        return tuple(HLS_OPS)
    return ("linear", "attention")
