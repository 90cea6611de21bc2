"""Adaptive precision: a cheap low-precision pass per input, a rerun at high
precision only where a check says the low pass is unreliable.

:class:`AdaptiveRunner` holds two fixed graphs of the same model (e.g. W8A8 and
W16A16, or a block-sparse and a dense W8A8) and one *check*, a number per input
(batch row) read off the low pass's own recorded integers:

``saturation``  activation codes pinned at their format's min or max code, per
                valid token, over every fixed-point activation of the graph
                (clipped outliers are what a narrow format gets wrong);
``entropy``     mean entropy (nats) of the output's softmax over the valid
                positions (decoders: an uncertain next-byte distribution);
``margin``      minus the mean gap between the two largest output logits
                (a small top-1 margin flips under a small error).

An input whose score exceeds ``threshold`` is run again on the high graph and
takes its outputs from there. :meth:`AdaptiveRunner.fit_threshold` picks the
threshold on *calibration* inputs as the score quantile that reruns a given
fraction (the evaluation inputs are never used for that).

Cycles are the engines' own counts per input (:func:`graph_cycles`): each
linear on the RTL matmul engine (:meth:`hwgen.rtl.matmul.MatmulSpec.cycles`
with the linear's recorded block bitmap, in passes of ``max_m`` rows of the
input's valid tokens) and each attention node through the host driver's cycle
model (:class:`hwgen.runtime.cost.CycleModel`, AttentionEngine cycles per head).
An input that is rerun costs its low pass plus its high pass.

The host driver calls :meth:`AdaptiveRunner.run` (outputs, which rows were
rerun, their scores and cycles); :func:`evaluate_adaptive` is the report:
how often each graph ran, cycles, and accuracy of low, high and adaptive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .golden import GoldenModel, dequantize
from .ir import Graph

CHECKS = ("saturation", "entropy", "margin")


class AdaptiveError(ValueError):
    """An adaptive-precision request that cannot run; the message names the setting."""


# ----------------------------------------------------------------------------
# per-input cycles, from the engines
# ----------------------------------------------------------------------------

class GraphCycles:
    """Engine cycles of one graph for one input of ``s`` tokens (batch row)."""

    def __init__(self, graph: Graph, max_m: int = 128):
        from . import prune as P
        from .runtime.cost import CycleModel

        self.graph, self.max_m = graph, max_m
        self.rows, self.cols, self.block_k = P.engine_geometry()
        self._attn = CycleModel(graph, rows=self.rows, cols=self.cols, max_m=max_m)
        self._lin: dict[str, object] = {}
        self._cache: dict[int, int] = {}

    def _linear(self, node, m: int) -> int:
        from . import prune as P
        from .rtl.matmul import MatmulSpec

        if node.name not in self._lin:
            spec = MatmulSpec.for_linear(self.graph, node, rows=self.rows, cols=self.cols,
                                         max_m=self.max_m, block_k=self.block_k)
            rec = node.attrs.get("sparsity")
            bm = P.linear_bitmap(self.graph, node, self.block_k, self.cols) if rec else None
            self._lin[node.name] = (spec, bm)
        spec, bm = self._lin[node.name]
        total = 0
        while m > 0:
            total += spec.cycles(min(m, self.max_m), bm)
            m -= self.max_m
        return total

    def __call__(self, s: int) -> int:
        """Cycles of every linear and attention node for one input of ``s`` tokens."""
        if s not in self._cache:
            total = 0
            for node in self.graph.nodes:
                if node.op == "linear":
                    m = s if len(self.graph.tensors[node.inputs[0]].shape) == 3 else 1  # pooled: 1 row
                    total += self._linear(node, m)
                elif node.op == "attention":
                    c = self._attn.node_cycles(node, {"B": 1, "S": s})
                    if c is None:
                        raise AdaptiveError(f"node '{node.name}': no attention engine cycle count")
                    total += c
            self._cache[s] = total
        return self._cache[s]


def graph_cycles(graph: Graph, s: int, max_m: int = 128) -> int:
    return GraphCycles(graph, max_m)(s)


# ----------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------

def _valid(feed: dict, rows: int, seq: int) -> np.ndarray:
    if "mask" in feed:
        return np.asarray(feed["mask"]) != 0
    return np.ones((rows, seq), dtype=bool)


def saturation_score(graph: Graph, rec: dict[str, np.ndarray], feed: dict) -> np.ndarray:
    """Per batch row: activation codes at their format's min/max code, per valid token."""
    ids = next(iter(feed.values()))
    rows, seq = np.shape(ids)[:2]
    valid = _valid(feed, rows, seq)
    count = np.zeros(rows)
    for name, t in graph.tensors.items():
        if t.kind != "activation" or t.fmt is None or name not in rec:
            continue
        c = rec[name]
        if c.ndim < 2 or c.shape[0] != rows:
            continue
        sat = (c == t.fmt.max_code) | (c == t.fmt.min_code)
        sat = sat.reshape(rows, -1) if c.ndim == 2 else sat
        if sat.ndim >= 3 and sat.shape[1] == seq:          # (B, S, ...): valid positions only
            sat = sat & valid.reshape(rows, seq, *([1] * (sat.ndim - 2)))
        count += sat.reshape(rows, -1).sum(1)
    return count / np.maximum(valid.sum(1), 1)


def _probs(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _logits(graph: Graph, rec: dict[str, np.ndarray], check: str) -> np.ndarray:
    out = graph.outputs[0]
    kind = graph.meta.get("kind")
    y = dequantize(graph, out, rec[out])
    if y.ndim != 3 or kind in ("encoder", "block"):
        raise AdaptiveError(f"check '{check}' needs per-position logits (a decoder); graph "
                            f"'{graph.name}' ({kind or 'unknown kind'}) outputs '{out}' of shape "
                            f"{list(y.shape)}: use the saturation check")
    return y


def entropy_score(graph: Graph, rec: dict[str, np.ndarray], feed: dict) -> np.ndarray:
    y = _logits(graph, rec, "entropy")
    p = _probs(y)
    h = -(p * np.log(np.maximum(p, 1e-300))).sum(-1)
    valid = _valid(feed, *h.shape)
    return (h * valid).sum(1) / np.maximum(valid.sum(1), 1)


def margin_score(graph: Graph, rec: dict[str, np.ndarray], feed: dict) -> np.ndarray:
    y = _logits(graph, rec, "margin")
    top2 = np.sort(y, axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    valid = _valid(feed, *gap.shape)
    return -(gap * valid).sum(1) / np.maximum(valid.sum(1), 1)


SCORES = {"saturation": saturation_score, "entropy": entropy_score, "margin": margin_score}


# ----------------------------------------------------------------------------
# the runner (what the host driver calls)
# ----------------------------------------------------------------------------

@dataclass
class AdaptiveRun:
    outputs: dict[str, np.ndarray]   # codes per output; rerun rows from the high graph
    rerun: np.ndarray                # bool per batch row
    scores: np.ndarray               # the check per batch row
    cycles: np.ndarray               # engine cycles per batch row (low, plus high if rerun)
    tokens: np.ndarray               # valid tokens per batch row
    low_outputs: dict[str, np.ndarray] = field(default_factory=dict)  # the low pass's codes


@dataclass
class AdaptiveRunner:
    """Low/high graph pair, a check and a threshold (see the module docstring).
    Both graphs must take the same inputs and give outputs of the same format
    family (codes are returned per graph; :meth:`run` dequantizes nothing)."""

    low: Graph
    high: Graph
    check: str = "saturation"
    threshold: float = math.inf
    max_m: int = 128
    _gl: GoldenModel = field(init=False, repr=False)
    _gh: GoldenModel = field(init=False, repr=False)

    def __post_init__(self):
        if self.check not in CHECKS:
            raise AdaptiveError(f"unknown check {self.check!r}: choose one of {', '.join(CHECKS)}")
        if list(self.low.inputs) != list(self.high.inputs) or list(self.low.outputs) != list(self.high.outputs):
            raise AdaptiveError(f"low graph ({self.low.inputs} -> {self.low.outputs}) and high graph "
                                f"({self.high.inputs} -> {self.high.outputs}) must take the same inputs "
                                "and give the same outputs (quantize the same model twice)")
        for g, what in ((self.low, "low"), (self.high, "high")):
            if not g.is_fixed:
                raise AdaptiveError(f"the {what} graph '{g.name}' is not quantized")
        self._gl, self._gh = GoldenModel(self.low), GoldenModel(self.high)
        self.cycles_low, self.cycles_high = GraphCycles(self.low, self.max_m), GraphCycles(self.high, self.max_m)

    def low_pass(self, feed: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The low graph's recorded codes and the check per batch row."""
        rec = self._gl(feed, record=True)
        return rec, SCORES[self.check](self.low, rec, feed)

    def fit_threshold(self, feeds: list[dict], rerun_fraction: float) -> float:
        """Set (and return) the threshold that reruns ``rerun_fraction`` of the
        rows of ``feeds`` (calibration inputs), the score quantile."""
        if not 0 <= rerun_fraction <= 1:
            raise AdaptiveError(f"rerun fraction must be in [0, 1], got {rerun_fraction}")
        s = np.concatenate([self.low_pass(f)[1] for f in feeds])
        self.threshold = math.inf if rerun_fraction == 0 else float(np.quantile(s, 1 - rerun_fraction))
        if rerun_fraction == 1:
            self.threshold = -math.inf
        return self.threshold

    def run(self, feed: dict) -> AdaptiveRun:
        rec, scores = self.low_pass(feed)
        outs = {n: rec[n].copy() for n in self.low.outputs}
        rerun = scores > self.threshold
        ids = next(iter(feed.values()))
        rows, seq = np.shape(ids)[:2]
        tokens = _valid(feed, rows, seq).sum(1)
        if rerun.any():
            idx = np.flatnonzero(rerun)
            hi = self._gh({k: np.asarray(v)[idx] for k, v in feed.items()})
            for n in self.high.outputs:
                if outs[n].dtype != hi[n].dtype:
                    outs[n] = outs[n].astype(np.result_type(outs[n].dtype, hi[n].dtype))
                outs[n][idx] = hi[n]
        cyc = np.array([self.cycles_low(int(t)) + (self.cycles_high(int(t)) if r else 0)
                        for t, r in zip(tokens, rerun)], dtype=np.int64)
        return AdaptiveRun(outs, rerun, scores, cyc, tokens, {n: rec[n] for n in self.low.outputs})


# ----------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------

def _row_metrics(bundle, graph: Graph, feed: dict, codes: np.ndarray, ref: np.ndarray) -> dict:
    from .accuracy import cosine_rows

    y = dequantize(graph, graph.outputs[0], codes)
    if bundle.kind == "decoder":
        ids = np.asarray(feed["ids"])
        pred = y[:, :-1].argmax(-1)
        logp = y[:, :-1] - y[:, :-1].max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return {"correct": (pred == ids[:, 1:]).sum(1), "count": np.full(len(ids), ids.shape[1] - 1),
                "nll": nll.sum(1), "cos": cosine_rows(y, ref).reshape(len(ids), -1).mean(1)}
    return {"cos": cosine_rows(y, ref).reshape(y.shape[0], -1).mean(1)}


def evaluate_adaptive(bundle, low: Graph, high: Graph, check: str = "saturation",
                      rerun_fraction: float = 0.2, tau: float = 0.99, max_m: int = 128,
                      fit_feeds: list[dict] | None = None) -> dict:
    """Run the evaluation inputs of ``bundle`` through low, high and adaptive;
    threshold fitted for ``rerun_fraction`` on ``fit_feeds`` (default: the
    calibration inputs, but the formats were fitted to those, so they saturate
    less than new inputs: prefer held-out inputs that are not the evaluation set).

    Accuracy per graph: mean cosine vs the float model per input; ``ok_frac`` =
    inputs with cosine >= ``tau``; decoders also next-byte top-1 accuracy and
    perplexity. Cycles: mean engine cycles per input."""
    runner = AdaptiveRunner(low, high, check, max_m=max_m)
    thr = runner.fit_threshold(bundle.calib_feeds if fit_feeds is None else fit_feeds, rerun_fraction)
    acc: dict[str, dict[str, list]] = {k: {} for k in ("low", "high", "adaptive")}
    cyc = {"low": [], "high": [], "adaptive": []}
    rerun_rows = total_rows = 0
    gh = GoldenModel(high)
    for feed in bundle.eval_feeds:
        ref = np.asarray(bundle.reference(feed), dtype=np.float64)
        run = runner.run(feed)
        out = low.outputs[0]
        high_codes = gh(feed)[out]
        for key, g, codes in (("low", low, run.low_outputs[out]), ("high", high, high_codes),
                              ("adaptive", None, run.outputs[out])):
            if key == "adaptive":
                # rows from each graph, dequantized with the graph that made them
                yl = _row_metrics(bundle, low, feed, codes, ref)
                yh = _row_metrics(bundle, high, feed, high_codes, ref)
                m = {k: np.where(run.rerun, yh[k], yl[k]) for k in yl}
            else:
                m = _row_metrics(bundle, g, feed, codes, ref)
            for k, v in m.items():
                acc[key].setdefault(k, []).append(np.asarray(v, dtype=np.float64))
        cyc["low"] += [runner.cycles_low(int(t)) for t in run.tokens]
        cyc["high"] += [runner.cycles_high(int(t)) for t in run.tokens]
        cyc["adaptive"] += run.cycles.tolist()
        rerun_rows += int(run.rerun.sum())
        total_rows += len(run.rerun)
    res = {"check": check, "threshold": thr, "rerun_fraction_fit": rerun_fraction,
           "inputs": total_rows, "low_only": total_rows - rerun_rows, "rerun": rerun_rows,
           "low_graph": low.meta.get("bits"), "high_graph": high.meta.get("bits"), "tau": tau}
    for key in acc:
        a = {k: np.concatenate(v) for k, v in acc[key].items()}
        r = {"cosine_mean": float(a["cos"].mean()), "cosine_min": float(a["cos"].min()),
             "ok_frac": float((a["cos"] >= tau).mean()), "cycles_mean": float(np.mean(cyc[key]))}
        if "correct" in a:
            r["top1"] = float(a["correct"].sum() / a["count"].sum())
            r["ppl"] = float(math.exp(a["nll"].sum() / a["count"].sum()))
        res[key] = r
    res["cycles_ratio_vs_low"] = res["adaptive"]["cycles_mean"] / res["low"]["cycles_mean"]
    return res


# ----------------------------------------------------------------------------
# `hwgen run --adaptive HIGH_BITS` (minilm)
# ----------------------------------------------------------------------------

#: held-out corpus sentences the `hwgen run --adaptive` threshold is fitted on
FIT_SENTENCES = 256
RUN_RERUN_FRACTION = 0.2


def run_adaptive(low: Graph, text: str, high_bits: str, batch: int = 8, check: str = "saturation",
                 rerun_fraction: float = RUN_RERUN_FRACTION, say=lambda m: None) -> dict:
    """The ``adaptive`` object of ``hwgen run --model minilm --text ... --adaptive HIGH_BITS``:
    the run's graph is the low graph; the high graph is minilm quantized at
    ``high_bits`` (the driver's cached quantization); the threshold reruns
    ``rerun_fraction`` of ``FIT_SENTENCES`` held-out corpus sentences. Keys:
    ``low``, ``high``, ``check``, ``threshold``, ``inputs``, ``low_only``,
    ``rerun``, ``rerun_rows`` (sentence indices), ``cycles_low_mean``,
    ``cycles_high_mean``, ``cycles_adaptive_mean``, ``cycles_ratio_vs_low``.
    Both passes run on the golden model (the same integers as every backend)."""
    from . import zoo
    from .distill import corpus_sentences
    from .runtime import jobs

    if jobs._model_of(low) != "minilm":
        raise AdaptiveError("--adaptive runs minilm graphs (a check per sentence); for other models "
                            "use hwgen.adaptive.AdaptiveRunner")
    high = jobs.load_graph("minilm", None, high_bits, say)
    runner = AdaptiveRunner(low, high, check)
    fit_s = corpus_sentences(FIT_SENTENCES, seed=1)
    fit = [zoo.feeds_from_text("minilm", "\n".join(fit_s[i:i + 16])) for i in range(0, len(fit_s), 16)]
    say(f"adaptive: fitting the {check} threshold on {len(fit_s)} held-out sentences "
        f"({rerun_fraction:.0%} reruns)")
    thr = runner.fit_threshold(fit, rerun_fraction)
    lines = jobs.sentences(text)
    rerun_rows, cyc, cl, ch = [], [], [], []
    for i in range(0, len(lines), batch):
        feed = zoo.feeds_from_text("minilm", "\n".join(lines[i:i + batch]))
        run = runner.run(feed)
        rerun_rows += [i + int(j) for j in np.flatnonzero(run.rerun)]
        cyc += run.cycles.tolist()
        cl += [runner.cycles_low(int(t)) for t in run.tokens]
        ch += [runner.cycles_high(int(t)) for t in run.tokens]
    return {"low": low.meta.get("bits"), "high": high_bits, "check": check, "threshold": thr,
            "inputs": len(lines), "low_only": len(lines) - len(rerun_rows), "rerun": len(rerun_rows),
            "rerun_rows": rerun_rows, "cycles_low_mean": float(np.mean(cl)),
            "cycles_high_mean": float(np.mean(ch)), "cycles_adaptive_mean": float(np.mean(cyc)),
            "cycles_ratio_vs_low": float(np.mean(cyc) / np.mean(cl))}
