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
threshold on held-out inputs as the score quantile that reruns a given
fraction, :meth:`AdaptiveRunner.fit_budget` as the one that reruns the most
held-out inputs within a cycle budget (a ratio to the low graph's cycles);
neither the calibration nor the evaluation inputs are used for that.

:class:`TokenAdaptive` does the same per decoded token of a KV-cache decoder
(tiny-gpt): the low graph runs every step, the ``margin`` or ``entropy`` of that
step's own logits decides, and a rerun step is the high graph's step, its KV
cache caught up lazily (one pass over the positions it has not seen).
:func:`evaluate_token_adaptive` is its report and :func:`bench` the
``make bench`` target (tiny-gpt W4A8 with QAT / W8A8).

Cycles are the engines' own counts per input (:func:`graph_cycles`): each
linear on the RTL matmul engine (:meth:`hwgen.rtl.matmul.MatmulSpec.cycles`
with the linear's recorded block bitmap, in passes of ``max_m`` rows of the
input's valid tokens) and each attention node through the host driver's cycle
model (:class:`hwgen.runtime.cost.CycleModel`, AttentionEngine cycles per head).
An input that is rerun costs its low pass plus its high pass.

The host driver calls :meth:`AdaptiveRunner.run` (outputs, which rows were
rerun, their scores and cycles) or :meth:`TokenAdaptive.generate` (``hwgen run
--adaptive``); :func:`evaluate_adaptive` is the per-input report:
how often each graph ran, cycles, and accuracy of low, high and adaptive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .golden import GoldenModel, GoldenState, dequantize
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
        return self.step(s, 0)

    def step(self, s: int, offset: int = 0) -> int:
        """Cycles of one pass over ``s`` new tokens at positions ``offset ..``
        (decoders with a KV cache: the attention engine reads ``offset + s``
        keys; every linear runs ``s`` rows, in passes of ``max_m``)."""
        key = (s, offset)
        if key not in self._cache:
            total = 0
            for node in self.graph.nodes:
                if node.op == "linear":
                    m = s if len(self.graph.tensors[node.inputs[0]].shape) == 3 else 1  # pooled: 1 row
                    total += self._linear(node, m)
                elif node.op == "attention":
                    c = self._attn.node_cycles(node, {"B": 1, "S": s}, offset)
                    if c is None:
                        raise AdaptiveError(f"node '{node.name}': no attention engine cycle count")
                    total += c
            self._cache[key] = total
        return self._cache[key]


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


def _logits(graph: Graph, codes: np.ndarray, check: str) -> np.ndarray:
    out = graph.outputs[0]
    kind = graph.meta.get("kind")
    y = dequantize(graph, out, codes)
    if y.ndim != 3 or kind in ("encoder", "block"):
        raise AdaptiveError(f"check '{check}' needs per-position logits (a decoder); graph "
                            f"'{graph.name}' ({kind or 'unknown kind'}) outputs '{out}' of shape "
                            f"{list(y.shape)}: use the saturation check")
    return y


def token_scores(graph: Graph, codes: np.ndarray, check: str) -> np.ndarray:
    """The ``entropy`` or ``margin`` check per position, ``(B, S)``, from the
    output logit codes ``(B, S, V)`` of a decoder graph (larger = less sure)."""
    y = _logits(graph, codes, check)
    if check == "entropy":
        p = _probs(y)
        return -(p * np.log(np.maximum(p, 1e-300))).sum(-1)
    if check == "margin":
        top2 = np.sort(y, axis=-1)[..., -2:]
        return -(top2[..., 1] - top2[..., 0])
    raise AdaptiveError(f"check {check!r} has no per-token score: choose entropy or margin")


def _row_mean(per_pos: np.ndarray, feed: dict) -> np.ndarray:
    valid = _valid(feed, *per_pos.shape)
    return (per_pos * valid).sum(1) / np.maximum(valid.sum(1), 1)


def entropy_score(graph: Graph, rec: dict[str, np.ndarray], feed: dict) -> np.ndarray:
    return _row_mean(token_scores(graph, rec[graph.outputs[0]], "entropy"), feed)


def margin_score(graph: Graph, rec: dict[str, np.ndarray], feed: dict) -> np.ndarray:
    return _row_mean(token_scores(graph, rec[graph.outputs[0]], "margin"), feed)


SCORES = {"saturation": saturation_score, "entropy": entropy_score, "margin": margin_score}


# ----------------------------------------------------------------------------
# the runner (what the host driver calls)
# ----------------------------------------------------------------------------

def _check_fraction(rerun_fraction: float) -> None:
    if not 0 <= rerun_fraction <= 1:
        raise AdaptiveError(f"rerun fraction must be in [0, 1], got {rerun_fraction}")


def _quantile_threshold(scores: np.ndarray, rerun_fraction: float) -> float:
    """The threshold that reruns ``rerun_fraction`` of ``scores`` (score >
    threshold): their ``1 - rerun_fraction`` quantile; inf reruns none, -inf all."""
    if rerun_fraction == 0:
        return math.inf
    if rerun_fraction == 1:
        return -math.inf
    return float(np.quantile(scores, 1 - rerun_fraction))


def _check_budget(max_ratio: float) -> None:
    if not (max_ratio >= 1 and math.isfinite(max_ratio)):
        raise AdaptiveError(f"cycle budget must be a ratio to the low graph's cycles >= 1, got {max_ratio}")


def _budget_threshold(scores: np.ndarray, ratio_at: Callable[[float], float], max_ratio: float) -> float:
    """The lowest threshold (the most reruns: score > threshold) among the
    scores' own values and inf whose cycle ratio ``ratio_at(threshold)`` is at
    most ``max_ratio``, by bisection over the sorted distinct scores. Lowering
    the threshold only adds reruns and each rerun adds a pass, so the ratio
    grows as the threshold falls; the returned threshold was itself measured
    within the budget (inf, no reruns, always is)."""
    _check_budget(max_ratio)
    cand = np.unique(scores)[:-1]                # ascending: rerunning score > cand[i]; the max reruns
                                                 # nothing, which inf says for any score
    lo, hi = 0, len(cand)                        # cand[hi] := inf (no reruns) fits
    if ratio_at(-math.inf) <= max_ratio:
        return -math.inf
    while lo < hi:                               # invariant: cand[hi] (or inf) fits, cand[< lo] do not
        mid = (lo + hi) // 2
        if ratio_at(float(cand[mid])) <= max_ratio:
            hi = mid
        else:
            lo = mid + 1
    return math.inf if hi == len(cand) else float(cand[hi])


def _check_same_model(low: Graph, high: Graph) -> None:
    """Both graphs must be quantizations of one model: the same weights by name and shape."""
    for name in sorted(set(low.weights) | set(high.weights)):
        a, b = low.weights.get(name), high.weights.get(name)
        if a is None or b is None or a.shape != b.shape:
            raise AdaptiveError(f"low graph '{low.name}' and high graph '{high.name}' are not the same model "
                                f"(weight '{name}': {None if a is None else list(a.shape)} vs "
                                f"{None if b is None else list(b.shape)}); quantize one model twice")


@dataclass
class AdaptiveRun:
    outputs: dict[str, np.ndarray]   # codes per output; rerun rows from the high graph
    rerun: np.ndarray                # bool per batch row
    scores: np.ndarray               # the check per batch row
    cycles: np.ndarray               # engine cycles per batch row (low, plus high if rerun)
    tokens: np.ndarray               # valid tokens per batch row
    cycles_low: np.ndarray           # the low pass's cycles per batch row (the low graph alone)
    cycles_high: np.ndarray          # the high pass's cycles per batch row (what a rerun adds)
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
        _check_same_model(self.low, self.high)
        self._gl, self._gh = GoldenModel(self.low), GoldenModel(self.high)
        self.cycles_low, self.cycles_high = GraphCycles(self.low, self.max_m), GraphCycles(self.high, self.max_m)

    def low_pass(self, feed: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The low graph's recorded codes and the check per batch row."""
        rec = self._gl(feed, record=True)
        return rec, SCORES[self.check](self.low, rec, feed)

    def fit_threshold(self, feeds: list[dict], rerun_fraction: float) -> float:
        """Set (and return) the threshold that reruns ``rerun_fraction`` of the
        rows of ``feeds`` (held-out inputs: neither calibration nor evaluation), the
        score quantile."""
        _check_fraction(rerun_fraction)
        self.threshold = _quantile_threshold(np.concatenate([self.low_pass(f)[1] for f in feeds]),
                                             rerun_fraction)
        return self.threshold

    def fit_budget(self, feeds: list[dict], max_ratio: float) -> float:
        """Set (and return) the threshold that reruns the most rows of ``feeds``
        (held-out inputs) whose cycles stay within ``max_ratio`` x the low
        graph's: the rows' low pass costs ``cycles_low(tokens)``, a rerun adds
        ``cycles_high(tokens)`` (:func:`_budget_threshold`)."""
        if not feeds:
            raise AdaptiveError("no held-out inputs to fit the threshold on")
        s = np.concatenate([self.low_pass(f)[1] for f in feeds])
        low, high = (np.concatenate(c).astype(np.float64) for c in zip(*(self.row_cycles(f)[1:] for f in feeds)))
        self.threshold = _budget_threshold(s, lambda thr: (low.sum() + high[s > thr].sum()) / low.sum(),
                                           max_ratio)
        return self.threshold

    def row_cycles(self, feed: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per batch row of ``feed``: its valid tokens, the low pass's cycles and
        the high pass's (what a rerun adds)."""
        rows, seq = np.shape(next(iter(feed.values())))[:2]
        tokens = _valid(feed, rows, seq).sum(1)
        return (tokens, np.array([self.cycles_low(int(t)) for t in tokens], dtype=np.int64),
                np.array([self.cycles_high(int(t)) for t in tokens], dtype=np.int64))

    def run(self, feed: dict) -> AdaptiveRun:
        rec, scores = self.low_pass(feed)
        outs = {n: rec[n].copy() for n in self.low.outputs}
        rerun = scores > self.threshold
        tokens, cyc_low, cyc_high = self.row_cycles(feed)
        if rerun.any():
            idx = np.flatnonzero(rerun)
            hi = self._gh({k: np.asarray(v)[idx] for k, v in feed.items()})
            for n in self.high.outputs:
                if outs[n].dtype != hi[n].dtype:
                    outs[n] = outs[n].astype(np.result_type(outs[n].dtype, hi[n].dtype))
                outs[n][idx] = hi[n]
        return AdaptiveRun(outs, rerun, scores, cyc_low + np.where(rerun, cyc_high, 0), tokens, cyc_low,
                           cyc_high, {n: rec[n] for n in self.low.outputs})


# ----------------------------------------------------------------------------
# per decoded token (KV-cache decoders)
# ----------------------------------------------------------------------------

@dataclass
class TokenRun:
    """Teacher-forced decoding of ``ids`` (B, T): step ``t`` feeds ``ids[:, t]``
    and predicts ``ids[:, t + 1]``, for t = 0 .. T-2."""

    logits: np.ndarray        # (B, T-1, V) float: the high graph's where rerun, else the low graph's
    low_logits: np.ndarray    # (B, T-1, V) float: the low graph's (every step)
    rerun: np.ndarray         # (B, T-1) bool: steps rerun on the high graph
    scores: np.ndarray        # (B, T-1): the check of each step's low pass
    cycles: np.ndarray        # (B,) engine cycles: low steps + the high graph's catch-up passes
    cycles_low: np.ndarray    # (B,) the low steps alone (what the low graph alone costs)
    high_passes: np.ndarray   # (B,) high graph passes (= reruns)
    high_rows: np.ndarray     # (B,) token rows the high graph processed (catch-up included)


class TokenAdaptive:
    """Per decoded token precision for a KV-cache decoder (tiny-gpt).

    Every step runs the **low** graph on the new token (its KV cache is always
    complete). The check (``margin``: minus the gap between the two largest
    logits; ``entropy``: of the softmax) is read off that step's own low logits;
    a step whose score exceeds ``threshold`` is **rerun on the high graph**, and
    its prediction is the high graph's.

    The high graph's step needs the high graph's KV cache of every earlier
    position. It is kept lazily: a rerun at position ``t`` runs the high graph
    over the positions it has not seen since its last pass (``h .. t``, one pass
    of ``t - h + 1`` rows on the cache) and takes the last row's logits. That is
    exactly the high graph's own output at ``t`` (the golden model gives the same
    integers for any split of a sequence into cached passes; tested), so the
    adaptive prediction at every step is bit-exact the low or the high graph's.

    Cost: both graphs run on the same engines (the matmul engine and the
    attention engine; their cycle counts do not depend on operand widths), so a
    rerun is a second pass: ``GraphCycles.step(rows, offset)`` of the high graph.
    A matmul pass costs the same for 1 to ``rows`` (16) token rows, so a
    catch-up of up to 16 positions costs about one decoding step."""

    def __init__(self, low: Graph, high: Graph, check: str = "margin", threshold: float = math.inf,
                 max_m: int = 128):
        if check not in ("margin", "entropy"):
            raise AdaptiveError(f"per-token check {check!r}: choose margin or entropy")
        for g, what in ((low, "low"), (high, "high")):
            if not g.is_fixed:
                raise AdaptiveError(f"the {what} graph '{g.name}' is not quantized")
            if not any(n.op == "attention" and n.attrs.get("kv_cache") for n in g.nodes):
                raise AdaptiveError(f"the {what} graph '{g.name}' has no KV-cache attention: per-token "
                                    "precision runs decoders (e.g. tiny-gpt); use AdaptiveRunner per input")
        if list(low.inputs) != list(high.inputs) or list(low.outputs) != list(high.outputs):
            raise AdaptiveError(f"low graph ({low.inputs} -> {low.outputs}) and high graph "
                                f"({high.inputs} -> {high.outputs}) must take the same inputs "
                                "and give the same outputs (quantize the same model twice)")
        _check_same_model(low, high)
        self.low, self.high, self.check, self.threshold = low, high, check, threshold
        self.out = low.outputs[0]
        self._gl, self._gh = GoldenModel(low), GoldenModel(high)
        self.cycles_low, self.cycles_high = GraphCycles(low, max_m), GraphCycles(high, max_m)

    def scores(self, graph: Graph, codes: np.ndarray) -> np.ndarray:
        return token_scores(graph, codes, self.check)

    def fit_threshold(self, feeds: list[dict], rerun_fraction: float) -> float:
        """Set (and return) the threshold that reruns ``rerun_fraction`` of the
        scored steps of ``feeds`` (held-out windows): the quantile of the low
        graph's per-step check over positions 0 .. T-2. The low logits come from
        one pass per window, the same integers as decoding it step by step."""
        _check_fraction(rerun_fraction)
        self.threshold = _quantile_threshold(self._fit_scores(feeds).ravel(), rerun_fraction)
        return self.threshold

    def fit_budget(self, feeds: list[dict], max_ratio: float) -> float:
        """Set (and return) the threshold that reruns the most scored steps of
        ``feeds`` (held-out windows) whose teacher-forced dispatch costs at most
        ``max_ratio`` x the low graph's cycles: the catch-up passes each rerun
        pattern implies, counted by :meth:`dispatch_cycles` (the cycle model,
        no high-graph run)."""
        s = self._fit_scores(feeds)
        low = float(self.dispatch_cycles(np.zeros(s.shape, dtype=bool)).sum())
        self.threshold = _budget_threshold(s.ravel(), lambda thr: float(self.dispatch_cycles(s > thr).sum()) / low,
                                           max_ratio)
        return self.threshold

    def _fit_scores(self, feeds: list[dict]) -> np.ndarray:
        """The low graph's check per scored step (positions 0 .. T-2) of every
        window of ``feeds``, (windows, T-1). The low logits come from one pass
        per window, the same integers as decoding it step by step."""
        if not feeds:
            raise AdaptiveError("no held-out inputs to fit the threshold on")
        return np.concatenate([self.scores(self.low, self._gl(f)[self.out])[:, :-1] for f in feeds])

    def dispatch_cycles(self, rerun: np.ndarray) -> np.ndarray:
        """Engine cycles per window ``(B,)`` of teacher-forced decoding with
        the reruns ``rerun`` ``(B, T-1)``: a low step per position, and per
        rerun at ``t`` the high graph's catch-up pass over ``h .. t`` (``h``:
        one past the previous rerun): :meth:`score_ids`'s count, and
        :meth:`fit_budget`'s for patterns that never ran."""
        rerun = np.asarray(rerun, dtype=bool)
        low = sum(self.cycles_low.step(1, t) for t in range(rerun.shape[1]))   # GraphCycles caches steps
        out = np.full(rerun.shape[0], low, dtype=np.int64)
        for r in range(rerun.shape[0]):
            h = 0
            for t in np.flatnonzero(rerun[r]):
                out[r] += self.cycles_high.step(int(t) + 1 - h, h)
                h = int(t) + 1
        return out

    def score_ids(self, ids: np.ndarray) -> TokenRun:
        """Teacher-forced decoding of the rows of ``ids`` (B, T), batched over rows
        for the low steps, one high-graph cache per row."""
        ids = np.asarray(ids, dtype=np.int64)
        b, t_len = ids.shape
        if t_len < 2:
            raise AdaptiveError("per-token scoring needs sequences of 2 or more tokens")
        st_low = GoldenState()
        st_high = [GoldenState() for _ in range(b)]
        seen = np.zeros(b, dtype=np.int64)            # positions each row's high cache holds
        lo = hi = None
        rerun = np.zeros((b, t_len - 1), dtype=bool)
        scores = np.zeros((b, t_len - 1))
        passes = np.zeros(b, dtype=np.int64)
        for t in range(t_len - 1):
            codes = self._gl({self.low.inputs[0]: ids[:, t:t + 1]}, st_low)[self.out]
            y = dequantize(self.low, self.out, codes)[:, 0]
            if lo is None:
                lo = np.zeros((b, t_len - 1, y.shape[-1]))
            lo[:, t] = y
            scores[:, t] = self.scores(self.low, codes)[:, 0]
            rerun[:, t] = scores[:, t] > self.threshold
            for r in np.flatnonzero(rerun[:, t]):
                h = int(seen[r])
                hc = self._gh({self.high.inputs[0]: ids[r:r + 1, h:t + 1]}, st_high[r])[self.out]
                if hi is None:
                    hi = lo.copy()
                hi[r, t] = dequantize(self.high, self.out, hc)[0, -1]
                passes[r] += 1
                seen[r] = t + 1
        rows = np.where(passes > 0, seen, 0)
        logits = lo if hi is None else np.where(rerun[..., None], hi, lo)
        return TokenRun(logits, lo, rerun, scores, self.dispatch_cycles(rerun),
                        self.dispatch_cycles(np.zeros_like(rerun)), passes, rows)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, ctx: int) -> dict:
        """Greedy generation (:func:`hwgen.runtime.driver.greedy_decode`, the
        driver's loop) with the check on the logits that pick each next token:
        a prefill pass over the prompt, then one step per token; the cache
        restart of that loop resets both graphs' caches."""
        from .runtime.driver import greedy_decode

        hist: list[int] = []
        st = {"low": GoldenState(), "high": GoldenState(), "seen": 0}
        log = {"steps": 0, "rerun": [], "scores": [], "cycles": 0, "cycles_low": 0, "high_rows": 0}

        def step(feed, restart, label):
            if restart:
                st["low"].reset()
                st["high"].reset()
                st["seen"] = 0
                hist.clear()
            off = len(hist)
            hist.extend(int(v) for v in np.asarray(feed).reshape(-1))
            codes = self._gl({self.low.inputs[0]: np.asarray(feed)}, st["low"])[self.out]
            y = dequantize(self.low, self.out, codes)
            score = float(self.scores(self.low, codes[:, -1:])[0, 0])
            c = self.cycles_low.step(len(hist) - off, off)
            log["cycles_low"] += c
            log["cycles"] += c
            if score > self.threshold:
                h = st["seen"]
                hc = self._gh({self.high.inputs[0]: np.asarray([hist[h:]], dtype=np.int64)}, st["high"])[self.out]
                y = y.copy()
                y[0, -1] = dequantize(self.high, self.out, hc)[0, -1]
                log["cycles"] += self.cycles_high.step(len(hist) - h, h)
                log["high_rows"] += len(hist) - h
                log["rerun"].append(log["steps"])
                st["seen"] = len(hist)
            log["scores"].append(score)
            log["steps"] += 1
            return y

        new, _, _ = greedy_decode(step, list(prompt_ids), max_new_tokens, ctx)
        return {"ids": new, **log}

    def generate_verified(self, prompt_ids: list[int], max_new_tokens: int, ctx: int,
                          max_draft: int | None = None) -> dict:
        """Greedy generation in which every token is the **high graph's**: the
        low graph drafts, the high graph verifies (speculative decoding, with the
        check choosing when to verify).

        The low graph generates draft tokens one step at a time until the check
        flags one (its score exceeds the threshold: the low graph is unsure, so a
        wrong token, and the drafts after it, are likely), or ``max_draft``
        drafts are pending, or the output is full. Then one high-graph pass on its
        own cache runs over every position it has not seen (the last verified
        token and the drafts) and gives the high graph's prediction at each
        drafted position. Drafts are accepted up to the first that differs from
        the high graph's prediction; that one is replaced by the high graph's
        token and the drafts after it are dropped (both caches are cut back,
        :meth:`hwgen.golden.GoldenState.truncate`). If every draft matched, the
        pass's last row adds one more token (the high graph's next prediction).

        Every emitted token is therefore the high graph's greedy choice after
        the same prefix, and the golden model gives the same integers for any
        split of a sequence into cached passes, so the output is exactly the
        high graph's own greedy generation (tested, token for token). The check
        only sets the cost: drafts after a rejected one are low steps spent for
        nothing, and each verification is a high pass.

        ``max_draft`` defaults to the PE array's rows less one, so a
        verification pass (drafts + the last verified token) is at most one
        pass of the PE array's rows. One cache of ``ctx`` positions: the prompt
        and the new tokens must fit (no cache restart).

        Returns ``ids`` (new tokens), ``tokens``, ``max_draft``, ``low_passes`` (low-graph
        passes, the first the prompt's prefill), ``low_rows``, ``high_passes``,
        ``high_rows``, ``drafted``, ``accepted`` (drafts the high graph
        confirmed), ``rejected`` (drafts replaced), ``discarded`` (drafts dropped
        after a rejected one), ``bonus`` (tokens from a pass's last row),
        ``check_stops`` (verifications the check called), ``scores`` (the check
        per draft), ``passes`` (``(graph, rows, offset)`` of every pass, ``graph``
        ``"low"`` or ``"high"``), ``cycles`` (low passes + high passes), ``cycles_low`` and
        ``cycles_high`` (the low or the high graph alone generating as many
        tokens: the prefill, then a step per further token)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise AdaptiveError("verified generation needs a prompt of at least one token")
        if max_new_tokens < 1:
            raise AdaptiveError(f"max_new_tokens {max_new_tokens}: generate at least one token")
        if max_draft is None:
            max_draft = _default_draft()
        if max_draft < 1:
            raise AdaptiveError(f"max_draft {max_draft}: draft at least one token per verification")
        total = len(prompt) + max_new_tokens
        if total > ctx:
            raise AdaptiveError(f"verified generation keeps one cache of {ctx} positions: the prompt "
                                f"({len(prompt)}) and the new tokens ({max_new_tokens}) must fit")
        inp = self.low.inputs[0]
        hist = list(prompt)
        verified = len(prompt)                  # hist[:verified]: the prompt and high-graph tokens
        st_low, st_high = GoldenState(), GoldenState()
        log = {"low_passes": 0, "low_rows": 0, "high_passes": 0, "high_rows": 0, "drafted": 0,
               "accepted": 0, "rejected": 0, "discarded": 0, "bonus": 0, "check_stops": 0,
               "scores": [], "passes": [], "cycles": 0}

        def run_unseen(model: GoldenModel, state: GoldenState, cycles: GraphCycles, kind: str) -> np.ndarray:
            off = state.offset
            codes = model({inp: np.asarray([hist[off:]], dtype=np.int64)}, state)[self.out]
            log["cycles"] += cycles.step(len(hist) - off, off)
            log["passes"].append((kind, len(hist) - off, off))
            log[f"{kind}_passes"] += 1
            log[f"{kind}_rows"] += len(hist) - off
            return codes

        while verified < total:
            while True:                         # draft
                codes = run_unseen(self._gl, st_low, self.cycles_low, "low")
                hist.append(int(np.argmax(codes[0, -1])))
                score = float(self.scores(self.low, codes[:, -1:])[0, 0])
                log["scores"].append(score)
                log["drafted"] += 1
                if score > self.threshold:
                    log["check_stops"] += 1
                    break
                if len(hist) - verified >= max_draft or len(hist) >= total:
                    break
            base = st_high.offset               # verify: rows base .. len-1 predict base+1 .. len
            pred = np.argmax(run_unseen(self._gh, st_high, self.cycles_high, "high")[0], axis=-1)
            for q in range(verified, len(hist)):
                want = int(pred[q - 1 - base])
                if want != hist[q]:
                    log["accepted"] += q - verified
                    log["rejected"] += 1
                    log["discarded"] += len(hist) - q - 1
                    hist[q:] = [want]
                    st_high.truncate(q)
                    st_low.truncate(min(st_low.offset, q))
                    verified = q + 1
                    break
            else:
                log["accepted"] += len(hist) - verified
                if len(hist) < total:
                    hist.append(int(pred[-1]))
                    log["bonus"] += 1
                verified = len(hist)
        n = len(prompt)
        alone = {f"cycles_{k}": c.step(n, 0) + sum(c.step(1, t) for t in range(n, total - 1))
                 for k, c in (("low", self.cycles_low), ("high", self.cycles_high))}
        return {"ids": hist[n:], "tokens": max_new_tokens, "max_draft": max_draft, **log, **alone}


def _default_draft() -> int:
    """Drafts per verification by default: the PE array's rows less one, so the
    verifying pass (the last verified token and the drafts) is one pass of
    the array's rows."""
    from .prune import engine_geometry

    return engine_geometry()[0] - 1


# ----------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------

def _row_metrics(bundle, graph: Graph, feed: dict, codes: np.ndarray, ref: np.ndarray) -> dict:
    from .accuracy import cosine_rows

    y = dequantize(graph, graph.outputs[0], codes)
    if bundle.kind == "decoder":
        ids = np.asarray(feed["ids"])
        nll, hits = _nll_correct(y[:, :-1], ids)
        return {"correct": hits.sum(1), "count": np.full(len(ids), ids.shape[1] - 1),
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
        cyc["low"] += run.cycles_low.tolist()
        cyc["high"] += run.cycles_high.tolist()
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


def _nll_correct(y: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per scored step: negative log-likelihood of the true next token, top-1 hit."""
    logp = y - y.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nxt = ids[:, 1:]
    return -np.take_along_axis(logp, nxt[..., None], -1)[..., 0], y.argmax(-1) == nxt


def evaluate_token_adaptive(eval_feeds: list[dict], low: Graph, high: Graph, fit_feeds: list[dict],
                            check: str = "margin", rerun_fraction: float = 0.2, max_m: int = 128,
                            say=lambda m: None, budget: float | None = None) -> dict:
    """Per-token adaptive precision of a decoder on ``eval_feeds`` (windows of
    ids), the threshold fitted for ``rerun_fraction`` (or, with ``budget``, for
    the most reruns within ``budget`` x the low graph's cycles) on ``fit_feeds``
    (held-out windows: neither calibration nor evaluation). Every window is decoded one
    token per step with the true previous token fed (teacher forcing): next-token
    top-1 accuracy and perplexity of the low graph alone, the high graph alone
    and the adaptive dispatch; engine cycles per window of each (the low or
    high graph alone: one step per token; adaptive: every low step plus the high
    graph's catch-up passes); how often each graph ran."""
    import time

    dec = TokenAdaptive(low, high, check, max_m=max_m)
    fit_rule = Fit.of(None, budget) if budget is not None else Fit.of(rerun_fraction, None)
    thr = fit_rule.apply(dec, fit_feeds)
    say(f"adaptive: {check} threshold {thr:.4g} ({fit_rule.describe()} on the "
        f"{sum(np.asarray(f['ids']).shape[0] for f in fit_feeds)} held-out windows' steps)")
    gh = GoldenModel(high)
    acc = {k: {"nll": 0.0, "hits": 0} for k in ("low", "high", "adaptive")}
    cyc = {"low": [], "high": [], "adaptive": []}
    steps = reruns = high_rows = windows = 0
    paired = {"disagree": 0, "kept_low_right_high_wrong": 0, "kept_low_wrong_high_right": 0,
              "rerun_low_right_high_wrong": 0, "rerun_low_wrong_high_right": 0}
    t0 = time.perf_counter()
    for i, feed in enumerate(eval_feeds):
        ids = np.asarray(feed[low.inputs[0]], dtype=np.int64)
        run = dec.score_ids(ids)
        # the high graph alone: one pass per window (the same integers as decoding it step by step)
        yh = dequantize(high, high.outputs[0], gh(feed)[high.outputs[0]])[:, :-1]
        hits = {}
        for key, y in (("low", run.low_logits), ("high", yh), ("adaptive", run.logits)):
            nll, hits[key] = _nll_correct(y, ids)
            acc[key]["nll"] += float(nll.sum())
            acc[key]["hits"] += int(hits[key].sum())
        lo_ok, hi_ok = hits["low"], hits["high"]
        paired["disagree"] += int((run.low_logits.argmax(-1) != yh.argmax(-1)).sum())
        for where, m in (("kept", ~run.rerun), ("rerun", run.rerun)):
            paired[f"{where}_low_right_high_wrong"] += int((m & lo_ok & ~hi_ok).sum())
            paired[f"{where}_low_wrong_high_right"] += int((m & ~lo_ok & hi_ok).sum())
        t_len = ids.shape[1]
        cyc["low"] += run.cycles_low.tolist()
        cyc["high"] += [sum(dec.cycles_high.step(1, t) for t in range(t_len - 1))] * len(ids)
        cyc["adaptive"] += run.cycles.tolist()
        steps += run.rerun.size
        reruns += int(run.rerun.sum())
        high_rows += int(run.high_rows.sum())
        windows += len(ids)
        say(f"adaptive: batch {i + 1}/{len(eval_feeds)}, {reruns}/{steps} steps rerun so far "
            f"({time.perf_counter() - t0:.0f} s)")
    res = {"mode": "per-token", "check": check, "fit": fit_rule.to_dict(), "threshold": thr,
           "rerun_fraction_fit": rerun_fraction if budget is None else None,
           "low_graph": low.meta.get("bits"), "high_graph": high.meta.get("bits"),
           "windows": windows, "steps": steps, "low_passes": steps, "high_passes": reruns,
           "low_only": steps - reruns, "rerun": reruns, "rerun_fraction": reruns / steps,
           "high_rows": high_rows}
    for key in acc:
        res[key] = {"top1": acc[key]["hits"] / steps, "ppl": math.exp(acc[key]["nll"] / steps),
                    "cycles_mean": float(np.mean(cyc[key]))}
    res["cycles_ratio_vs_low"] = res["adaptive"]["cycles_mean"] / res["low"]["cycles_mean"]
    # the same engines run both graphs: their cycle counts do not depend on operand widths
    res["same_cycles_low_high"] = res["low"]["cycles_mean"] == res["high"]["cycles_mean"]
    # adaptive - high top-1 = (kept steps the low graph alone got right) - (kept steps only the high
    # graph got right), over all steps; one standard deviation of that difference if the kept
    # disagreements were coin flips: sqrt(their count) / steps
    res["paired"] = paired
    res["adaptive_minus_high_top1"] = res["adaptive"]["top1"] - res["high"]["top1"]
    res["paired_noise_top1"] = math.sqrt(paired["kept_low_right_high_wrong"]
                                         + paired["kept_low_wrong_high_right"]) / steps
    res["target_cycles_lt_1.3x"] = res["cycles_ratio_vs_low"] < 1.3
    res["target_accuracy_of_high"] = res["adaptive"]["top1"] >= res["high"]["top1"]
    return res


def greedy_golden(model: GoldenModel, prompt_ids: list[int], max_new_tokens: int, ctx: int) -> list[int]:
    """One graph's own greedy generation on the golden model (the driver's
    decoding loop, :func:`hwgen.runtime.driver.greedy_decode`): the new ids."""
    from .runtime.driver import greedy_decode

    state = GoldenState()
    inp, out = model.graph.inputs[0], model.graph.outputs[0]

    def step(feed, restart, label):
        if restart:
            state.reset()
        return model({inp: np.asarray(feed)}, state)[out]
    return greedy_decode(step, list(prompt_ids), max_new_tokens, ctx)[0]


#: verified generation in the bench: the first VERIFY_PROMPT ids of each evaluation
#: window are a prompt, and VERIFY_NEW tokens are generated after it
VERIFY_PROMPT = 32
VERIFY_NEW = 64

#: the counts :meth:`TokenAdaptive.generate_verified` returns, summed over prompts
_VERIFY_COUNTS = ("drafted", "accepted", "rejected", "discarded", "bonus", "check_stops", "low_passes",
                  "low_rows", "high_passes", "high_rows", "cycles", "cycles_low", "cycles_high")


def evaluate_verified(eval_feeds: list[dict], low: Graph, high: Graph, fit_feeds: list[dict],
                      check: str = "margin", rerun_fraction: float = 0.2, prompt_len: int = VERIFY_PROMPT,
                      new_tokens: int = VERIFY_NEW, max_draft: int | None = None, max_m: int = 128,
                      say=lambda m: None) -> dict:
    """Verified generation (:meth:`TokenAdaptive.generate_verified`) from a
    prompt of the first ``prompt_len`` ids of every evaluation window,
    ``new_tokens`` generated per prompt; the check's threshold is the quantile
    that flags ``rerun_fraction`` of the held-out windows' steps (``fit_feeds``).
    The high graph alone and the low graph alone generate from the same
    prompts (greedy, on their own caches), and every token is compared:
    ``mismatches_vs_high`` counts the verified tokens that differ from the high
    graph's (0 by construction; measured), ``low_alone_differs`` the prompts
    whose low-graph-alone generation is not the high graph's, and
    ``low_alone_tokens_differ`` its positions that differ. Cycles are totals
    over the prompts: ``cycles_adaptive`` (every low and high pass),
    ``cycles_low`` / ``cycles_high`` (one graph alone: the prefill, then a step
    per further token), their ratios, and the targets ``target_cycles_lt_1.3x``
    and ``target_tokens_of_high``."""
    import time

    dec = TokenAdaptive(low, high, check, max_m=max_m)
    thr = dec.fit_threshold(fit_feeds, rerun_fraction)
    gl, gh = GoldenModel(low), GoldenModel(high)
    ctx = prompt_len + new_tokens
    tot = dict.fromkeys(_VERIFY_COUNTS, 0)
    res = {"mode": "verified", "check": check, "fit": Fit.of(rerun_fraction, None).to_dict(), "threshold": thr,
           "low_graph": low.meta.get("bits"), "high_graph": high.meta.get("bits"), "prompt_len": prompt_len,
           "new_tokens": new_tokens, "prompts": 0, "tokens": 0, "identical_to_high": 0,
           "mismatches_vs_high": 0, "low_alone_differs": 0, "low_alone_tokens_differ": 0}
    t0 = time.perf_counter()
    for feed in eval_feeds:
        for row in np.asarray(feed[low.inputs[0]], dtype=np.int64):
            if len(row) < prompt_len:
                raise AdaptiveError(f"an evaluation window of {len(row)} ids is shorter than the "
                                    f"{prompt_len}-id prompt")
            prompt = [int(t) for t in row[:prompt_len]]
            g = dec.generate_verified(prompt, new_tokens, ctx, max_draft)
            want = np.asarray(greedy_golden(gh, prompt, new_tokens, ctx))
            alone = np.asarray(greedy_golden(gl, prompt, new_tokens, ctx))
            wrong = int((np.asarray(g["ids"]) != want).sum())
            res["mismatches_vs_high"] += wrong
            res["identical_to_high"] += wrong == 0
            res["low_alone_tokens_differ"] += int((alone != want).sum())
            res["low_alone_differs"] += bool((alone != want).any())
            res["prompts"] += 1
            res["tokens"] += len(g["ids"])
            for k in _VERIFY_COUNTS:
                tot[k] += g[k]
        say(f"verified: {res['prompts']} prompts, {tot['check_stops']} check stops, "
            f"{res['mismatches_vs_high']} tokens differ from the high graph's "
            f"({time.perf_counter() - t0:.0f} s)")
    res.update({k: v for k, v in tot.items() if not k.startswith("cycles")})
    res["max_draft"] = g["max_draft"]
    res.update(cycles_adaptive=tot["cycles"], cycles_low=tot["cycles_low"], cycles_high=tot["cycles_high"],
               cycles_ratio_vs_low=tot["cycles"] / tot["cycles_low"],
               cycles_ratio_vs_high=tot["cycles"] / tot["cycles_high"])
    res["target_cycles_lt_1.3x"] = res["cycles_ratio_vs_low"] < 1.3
    res["target_tokens_of_high"] = res["mismatches_vs_high"] == 0
    return res


# ----------------------------------------------------------------------------
# tiny-gpt: held-out windows, the low graph, `make bench`
# ----------------------------------------------------------------------------

#: the share of the tiny-gpt training text, at its end, whose windows fit the
#: per-token threshold (held out from the low graph's QAT and from calibration)
FIT_TAIL = 0.1
#: the per-token defaults: check, and the share of held-out steps the threshold reruns
TOKEN_CHECK = "margin"
TOKEN_RERUN_FRACTION = 0.2
#: QAT steps of the W4A8 low graph (distilled from the float model), `make bench`
LOW_QAT_STEPS = 300


def _train_bytes() -> np.ndarray:
    from .zoo import DATA_DIR

    return np.frombuffer((DATA_DIR / "tiny_corpus_train.txt").read_bytes(), dtype=np.uint8).astype(np.int64)


def heldout_windows(bundle, batch: int = 16) -> list[dict]:
    """The threshold-fitting inputs of a tiny-gpt bundle: consecutive windows of
    the last ``FIT_TAIL`` of the training text (the low graph's QAT reads only
    the text before it), less any window that overlaps a calibration window.
    The evaluation text is a separate file (held-out topics)."""
    width = int(np.asarray(bundle.eval_feeds[0]["ids"]).shape[1])
    train = _train_bytes()
    raw = train.astype(np.uint8).tobytes()
    calib = [raw.find(np.asarray(w, dtype=np.uint8).tobytes())
             for f in bundle.calib_feeds for w in np.asarray(f["ids"])]
    lo = int(len(train) * (1 - FIT_TAIL))
    starts = [s for s in range(lo, len(train) - width + 1, width)
              if all(c < 0 or s + width <= c or c + width <= s for c in calib)]
    wins = np.stack([train[s:s + width] for s in starts])
    return [{"ids": wins[i:i + batch]} for i in range(0, len(wins), batch)]


def qat_windows(n: int = 256, width: int = 128, batch: int = 16, seed: int = 5) -> list[dict]:
    """``n`` seeded random windows of the first ``1 - FIT_TAIL`` of the training text."""
    train = _train_bytes()
    end = int(len(train) * (1 - FIT_TAIL)) - width
    starts = np.random.default_rng(seed).integers(0, end + 1, n)
    wins = np.stack([train[s:s + width] for s in starts])
    return [{"ids": wins[i:i + batch]} for i in range(0, len(wins), batch)]


def low_graph(bundle, bits: str = "w4a8", qat_steps: int = LOW_QAT_STEPS, lr: float = 1e-4,
              say=lambda m: None) -> Graph:
    """The low-precision graph: ``bits`` post-training quantization, then
    ``qat_steps`` QAT steps distilled from the float model (next-byte KL +
    hidden states, :class:`hwgen.distill.DistillLoss`) on :func:`qat_windows`;
    the last third of the steps at ``lr / 5``."""
    from .distill import DistillLoss
    from .qat import QATModel, finetune
    from .quant import QuantConfig, prepare, quantize

    cfg = QuantConfig.from_bits(bits)
    teacher = prepare(bundle.graph)
    fixed, fmts = quantize(teacher, bundle.calib_feeds, cfg)
    if qat_steps:
        loss = DistillLoss(teacher, bundle.kind)
        model = QATModel(teacher, fmts, cfg)
        feeds = qat_windows()
        first = qat_steps - qat_steps // 3
        for n, rate in ((first, lr), (qat_steps - first, lr / 5)):
            if n:
                say(f"low graph {bits}: {n} QAT step(s), lr {rate:g}")
                finetune(model, feeds, loss.qat(), n, lr=rate,
                         progress=lambda i, l: say(f"QAT step {i} loss {l:.5f}") if i % 25 == 0 else None)
        fixed = model.export()
    fixed.name = bundle.name
    fixed.meta.update(model=bundle.name, kind=bundle.kind, bits=bits + (f"+qat{qat_steps}" if qat_steps else ""))
    return fixed


def bench(quick: bool = False, say=lambda m: None, qat_steps: int = LOW_QAT_STEPS,
          check: str = TOKEN_CHECK, rerun_fraction: float = TOKEN_RERUN_FRACTION,
          save_low: str | None = None, budget: float | None = None) -> dict:
    """The adaptive-precision target of ``make bench`` (called by
    :func:`hwgen.distill.bench`): tiny-gpt, low W4A8 with QAT (:func:`low_graph`),
    high W8A8 (post-training), per-token ``check`` with the threshold fitted for
    ``rerun_fraction`` (or ``budget``) on :func:`heldout_windows`, evaluated on every evaluation
    window (:func:`evaluate_token_adaptive`), and ``verified``: generation from
    every evaluation window's first 32 ids, drafted by the low graph and
    verified by the high graph (:func:`evaluate_verified`). Adds ``model``,
    ``wall_s`` and the target booleans ``target_cycles_lt_1.3x`` and
    ``target_accuracy_of_high`` (``verified`` has its own).
    ``quick``: 3 QAT steps and the first two evaluation batches (a smoke run);
    ``save_low``: a directory the low graph is saved to (``hwgen run --graph``)."""
    import time

    from . import zoo
    from .quant import QuantConfig, quantize

    t0 = time.perf_counter()
    bundle = zoo.load("tiny-gpt")
    low = low_graph(bundle, "w4a8", 3 if quick else qat_steps, say=say)
    if save_low:
        low.save(save_low)
    high = quantize(bundle.graph, bundle.calib_feeds, QuantConfig.from_bits("w8a8"))[0]
    high.meta.update(kind=bundle.kind, bits="w8a8")
    evals = bundle.eval_feeds[:2] if quick else bundle.eval_feeds
    fit = heldout_windows(bundle)
    res = evaluate_token_adaptive(evals, low, high, fit, check, rerun_fraction, say=say, budget=budget)
    res["verified"] = evaluate_verified(evals, low, high, fit, check, rerun_fraction, say=say)
    res.update(model="tiny-gpt", quick=quick, wall_s=time.perf_counter() - t0)
    return res


# ----------------------------------------------------------------------------
# `hwgen run --adaptive HIGH_BITS`
# ----------------------------------------------------------------------------

#: held-out corpus sentences the `hwgen run --adaptive` threshold is fitted on
FIT_SENTENCES = 256
RUN_RERUN_FRACTION = 0.2


@dataclass(frozen=True)
class Fit:
    """How the threshold is fitted on held-out inputs: ``rule`` ``"rerun_fraction"``
    (the score quantile that reruns ``value`` of them) or ``"cycles_budget"``
    (the most reruns whose cycles stay within ``value`` x the low graph's)."""

    rule: str
    value: float

    @classmethod
    def of(cls, rerun_fraction: float | None, budget: float | None) -> "Fit":
        if rerun_fraction is not None and budget is not None:
            raise AdaptiveError("give a rerun fraction or a cycle budget, not both")
        if budget is not None:
            _check_budget(budget)
            return cls("cycles_budget", float(budget))
        rerun_fraction = RUN_RERUN_FRACTION if rerun_fraction is None else rerun_fraction
        _check_fraction(rerun_fraction)
        return cls("rerun_fraction", float(rerun_fraction))

    def apply(self, fitter, feeds: list[dict]) -> float:
        """Fit ``fitter`` (an :class:`AdaptiveRunner` or :class:`TokenAdaptive`) on ``feeds``."""
        if self.rule == "cycles_budget":
            return fitter.fit_budget(feeds, self.value)
        return fitter.fit_threshold(feeds, self.value)

    def describe(self) -> str:
        return (f"within {self.value:g}x the low graph's cycles" if self.rule == "cycles_budget"
                else f"{self.value:.0%} reruns")

    def to_dict(self) -> dict:
        return {"rule": self.rule, "value": self.value}


def run_adaptive(low: Graph, text: str, high_bits: str, batch: int = 8, check: str | None = None,
                 fit: Fit | None = None, say=lambda m: None, max_new_tokens: int = 16,
                 verify: bool = False) -> dict:
    """The ``adaptive`` object of ``hwgen run ... --adaptive HIGH_BITS``: the run's
    graph is the low graph; the high graph is the same model quantized at
    ``high_bits`` (the driver's cached quantization). minilm (``text``: sentences):
    a ``saturation`` check per sentence, see :func:`_run_adaptive_minilm`; tiny-gpt
    (``text``: the prompt): a ``margin`` check per generated token, see
    :func:`_run_adaptive_decoder`. The threshold is fitted on held-out inputs by
    ``fit`` (:class:`Fit`; default: rerun :data:`RUN_RERUN_FRACTION` of them).
    ``verify`` (tiny-gpt): verified generation instead, every token the high
    graph's (:meth:`TokenAdaptive.generate_verified`).
    Both passes run on the golden model (the same integers as every backend)."""
    from .runtime import jobs

    fit = Fit.of(None, None) if fit is None else fit
    model = jobs._model_of(low)
    if verify:
        check_verify(fit, model)
    if model == "minilm":
        return _run_adaptive_minilm(low, text, high_bits, batch, check or "saturation", fit, say)
    return _run_adaptive_decoder(low, text, high_bits, check or TOKEN_CHECK, fit, max_new_tokens, say,
                                 verify)


def check_verify(fit: Fit, model: str) -> None:
    """Refuse verified generation (``--adaptive-verify``) where it does not
    apply: its check is fitted by a rerun fraction (a cycle budget models the
    rerun dispatch), and it verifies generated tokens (tiny-gpt, not minilm)."""
    if fit.rule != "rerun_fraction":
        raise AdaptiveError("--adaptive-verify fits its check with --adaptive-rerun FRACTION; "
                            "--adaptive-budget models the rerun dispatch, not verified generation")
    if model == "minilm":
        raise AdaptiveError("--adaptive-verify drafts and verifies generated tokens: it is for tiny-gpt, "
                            "not minilm")


def _run_adaptive_decoder(low: Graph, prompt: str, high_bits: str, check: str, fit_rule: Fit,
                          max_new_tokens: int, say, verify: bool = False) -> dict:
    """tiny-gpt: greedy generation after ``prompt`` with per-token dispatch
    (:meth:`TokenAdaptive.generate`), the threshold fitted by ``fit_rule`` on
    the steps of :func:`heldout_windows`. Keys: ``mode`` ("per-token"), ``low``,
    ``high``, ``check``, ``fit`` (``rule``, ``value``), ``threshold``, ``steps`` (low passes: the prefill and
    one per token), ``low_only``, ``rerun``, ``rerun_steps`` (indices),
    ``high_rows``, ``cycles_low``, ``cycles_adaptive``, ``cycles_ratio_vs_low``,
    ``text`` (prompt and the adaptive continuation). ``verify``: see
    :func:`_verified_run`."""
    from . import zoo
    from .runtime import jobs

    high = jobs.load_graph("tiny-gpt", None, high_bits, say)
    low.meta.setdefault("kind", "decoder")
    high.meta.setdefault("kind", "decoder")
    dec = TokenAdaptive(low, high, check)
    bundle = zoo.load("tiny-gpt")
    fit = heldout_windows(bundle)
    say(f"adaptive: fitting the {check} threshold on {sum(len(f['ids']) for f in fit)} held-out windows "
        f"({fit_rule.describe()})")
    thr = fit_rule.apply(dec, fit)
    ids = list(str(prompt).encode("utf-8"))
    ctx = int(low.meta.get("max_positions") or bundle.meta["ctx"])
    if verify:
        return _verified_run(dec, fit_rule, thr, high_bits, ids, max_new_tokens, ctx)
    g = dec.generate(ids, max_new_tokens, ctx)
    return {"mode": "per-token", "low": low.meta.get("bits"), "high": high_bits, "check": check,
            "fit": fit_rule.to_dict(), "threshold": thr, "steps": g["steps"], "low_only": g["steps"] - len(g["rerun"]),
            "rerun": len(g["rerun"]), "rerun_steps": g["rerun"], "high_rows": g["high_rows"],
            "cycles_low": g["cycles_low"], "cycles_adaptive": g["cycles"],
            "cycles_ratio_vs_low": g["cycles"] / g["cycles_low"],
            "text": bytes(ids + g["ids"]).decode("utf-8", errors="replace")}


def _verified_run(dec: TokenAdaptive, fit_rule: Fit, thr: float, high_bits: str, ids: list[int],
                  max_new_tokens: int, ctx: int) -> dict:
    """``hwgen run --adaptive HIGH --adaptive-verify``: verified generation after
    the prompt ``ids``, and the high graph alone from the same prompt to compare
    with. Keys: ``mode`` ("verified"), ``low``, ``high``, ``check``, ``fit``,
    ``threshold``, ``max_draft``, ``tokens``, ``drafted``, ``accepted``,
    ``rejected``, ``discarded``, ``bonus``, ``check_stops``, ``low_passes``,
    ``high_passes``, ``high_rows``, ``tokens_differ_from_high`` (0 by
    construction; measured), ``cycles_low``, ``cycles_high`` (one graph alone),
    ``cycles_adaptive``, ``cycles_ratio_vs_low``, ``text``."""
    g = dec.generate_verified(ids, max_new_tokens, ctx)
    want = greedy_golden(dec._gh, ids, max_new_tokens, ctx)
    keep = ("max_draft", "tokens", "drafted", "accepted", "rejected", "discarded", "bonus", "check_stops",
            "low_passes", "high_passes", "high_rows", "cycles_low", "cycles_high")
    return {"mode": "verified", "low": dec.low.meta.get("bits"), "high": high_bits, "check": dec.check,
            "fit": fit_rule.to_dict(), "threshold": thr, **{k: g[k] for k in keep},
            "tokens_differ_from_high": int(sum(a != b for a, b in zip(g["ids"], want))),
            "cycles_adaptive": g["cycles"], "cycles_ratio_vs_low": g["cycles"] / g["cycles_low"],
            "text": bytes(ids + g["ids"]).decode("utf-8", errors="replace")}


def _run_adaptive_minilm(low: Graph, text: str, high_bits: str, batch: int, check: str,
                         fit_rule: Fit, say) -> dict:
    """minilm: the threshold fitted by ``fit_rule`` on ``FIT_SENTENCES``
    held-out corpus sentences. Keys: ``low``, ``high``, ``check``, ``fit``,
    ``threshold``, ``inputs``, ``low_only``, ``rerun``, ``rerun_rows`` (sentence
    indices), ``cycles_low_mean``, ``cycles_high_mean``, ``cycles_adaptive_mean``,
    ``cycles_ratio_vs_low``."""
    from . import zoo
    from .distill import corpus_sentences
    from .runtime import jobs

    high = jobs.load_graph("minilm", None, high_bits, say)
    runner = AdaptiveRunner(low, high, check)
    fit_s = corpus_sentences(FIT_SENTENCES, seed=1)
    fit = [zoo.feeds_from_text("minilm", "\n".join(fit_s[i:i + 16])) for i in range(0, len(fit_s), 16)]
    say(f"adaptive: fitting the {check} threshold on {len(fit_s)} held-out sentences "
        f"({fit_rule.describe()})")
    thr = fit_rule.apply(runner, fit)
    lines = jobs.sentences(text)
    rerun_rows, cyc, cl, ch = [], [], [], []
    for i in range(0, len(lines), batch):
        feed = zoo.feeds_from_text("minilm", "\n".join(lines[i:i + batch]))
        run = runner.run(feed)
        rerun_rows += [i + int(j) for j in np.flatnonzero(run.rerun)]
        cyc += run.cycles.tolist()
        cl += run.cycles_low.tolist()
        ch += run.cycles_high.tolist()
    return {"low": low.meta.get("bits"), "high": high_bits, "check": check, "fit": fit_rule.to_dict(),
            "threshold": thr,
            "inputs": len(lines), "low_only": len(lines) - len(rerun_rows), "rerun": len(rerun_rows),
            "rerun_rows": rerun_rows, "cycles_low_mean": float(np.mean(cl)),
            "cycles_high_mean": float(np.mean(ch)), "cycles_adaptive_mean": float(np.mean(cyc)),
            "cycles_ratio_vs_low": float(np.mean(cyc) / np.mean(cl))}
