"""Pruning: zero weights of a float graph's linears so the hardware can skip them.

Three patterns (:class:`PruneSpec`, parsed from the CLI's ``--prune``):

``unstructured:RATIO``  magnitude pruning: per linear, the ``RATIO`` fraction of
                        weights with the smallest score become 0.
``N:M`` (e.g. ``2:4``)  along the reduction dimension: in every group of ``M``
                        consecutive input channels (rows ``k`` of ``W``, K x N)
                        of every output column, only the ``N`` largest scores
                        survive.
``block:RATIO``         whole blocks of ``block_k`` x ``block_n`` weights (the
                        matmul engine's weight block: ``block_k`` rows of ``W``
                        by the PE array's ``cols``), the ``RATIO`` fraction of
                        blocks with the smallest L2 score norm per linear. The
                        engine issues no beats for an empty block
                        (:class:`hwgen.rtl.matmul.MatmulEngine`), so these save
                        cycles; the other two patterns only save storage.

Scores are ``|w[k, n]|`` (magnitude), optionally times the input channel's L2
norm over calibration inputs (``|w[k, n]| * ||x[:, k]||``, activation-aware
magnitude: a weight that multiplies a large activation matters more;
:func:`activation_norms`).

Pruned weights are exact zeros in the float graph (:func:`apply_masks`), so
they quantize to code 0 in any format and rounding mode; QAT keeps them at 0
(:class:`hwgen.qat.QATModel` takes the masks) and a gradual schedule
(:func:`gradual_fraction`, :class:`GradualPruner`) raises sparsity during
fine-tuning. After quantization :func:`record_sparsity` writes, per linear, the
pattern, the zero count and the block occupancy bitmap *derived from the
integer codes* into ``node.attrs["sparsity"]``: the RTL/HLS generators and the
cycle counts read the bitmap from there (:func:`linear_bitmap`), and
:func:`check_sparsity` proves it agrees with the codes.

Only linears inside transformer blocks (``node.layer`` set) are pruned by
default: embeddings, poolers and the language-model head stay dense.

Layer-selective pruning prunes a subset of those linears and leaves the rest
dense (bitmap all ones): :func:`select_linears` by name patterns (the CLI's
``--prune-layers``), or :func:`select_by_budget` by measured sensitivity (the
CLI's ``--prune-budget COS``): :func:`sensitivity` prunes each linear alone and
measures the mean cosine of the model's output against the dense float model on
calibration inputs; linears are tried in order of cosine loss per weight
(cheapest first) and kept while the float model with all kept ones pruned stays
at mean cosine >= ``COS``.

Channel-pair pruning (the CLI's ``--prune-channels``) chooses the blocks of two
linears that share channels together: :mod:`hwgen.prune_channels`; its budget
selection uses :func:`rank_units` and :func:`greedy_budget` as this module's does.
"""
from __future__ import annotations

import copy
import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .ir import Graph, Node


class PruneError(ValueError):
    """A pruning request that cannot be honoured; the message names the setting."""


#: default weight block (rows of W x columns) when no engine geometry is given:
#: the matmul engine's defaults (block_k 16, a 16 x 16 PE array)
DEFAULT_BLOCK = (16, 16)

_NM_RE = re.compile(r"^(\d+):(\d+)$")
_RATIO_RE = re.compile(r"^(block|unstructured):([0-9]*\.?[0-9]+)$")


@dataclass(frozen=True)
class PruneSpec:
    """One pruning pattern: ``kind`` is ``"nm"``, ``"block"`` or ``"unstructured"``."""

    kind: str
    n: int = 0
    m: int = 0
    ratio: float = 0.0
    block_k: int = DEFAULT_BLOCK[0]
    block_n: int = DEFAULT_BLOCK[1]

    @classmethod
    def parse(cls, text: str, block_k: int | None = None, block_n: int | None = None) -> "PruneSpec":
        """``"2:4"``, ``"block:0.5"``, ``"unstructured:0.5"``."""
        bk = DEFAULT_BLOCK[0] if block_k is None else block_k
        bn = DEFAULT_BLOCK[1] if block_n is None else block_n
        for name, v in (("block_k", bk), ("block_n", bn)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PruneError(f"--prune: {name} must be a positive integer, got {v!r}")
        s = str(text).strip().lower()
        m = _NM_RE.match(s)
        if m:
            n_, m_ = int(m.group(1)), int(m.group(2))
            if not 1 <= n_ < m_:
                raise PruneError(f"--prune {text!r}: N:M needs 1 <= N < M (e.g. 2:4)")
            return cls("nm", n=n_, m=m_, block_k=bk, block_n=bn)
        m = _RATIO_RE.match(s)
        if m:
            ratio = float(m.group(2))
            if not 0 < ratio < 1:
                raise PruneError(f"--prune {text!r}: RATIO must be between 0 and 1 (exclusive), "
                                 f"e.g. {m.group(1)}:0.5")
            return cls(m.group(1), ratio=ratio, block_k=bk, block_n=bn)
        raise PruneError(f"--prune {text!r}: expected N:M (e.g. 2:4), block:RATIO or "
                         "unstructured:RATIO (RATIO between 0 and 1, e.g. block:0.5)")

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.kind}:{self.ratio:g}"

    @property
    def target_sparsity(self) -> float:
        """Fraction of weights zeroed at the end (blocks: of whole blocks)."""
        return 1 - self.n / self.m if self.kind == "nm" else self.ratio

    def to_dict(self) -> dict:
        d = {"pattern": self.name, "kind": self.kind, "target_sparsity": self.target_sparsity}
        if self.kind == "block":
            d.update(block_k=self.block_k, block_n=self.block_n)
        return d


# ----------------------------------------------------------------------------
# which linears, and their scores
# ----------------------------------------------------------------------------

def prunable_linears(graph: Graph) -> list[Node]:
    """Linears inside transformer blocks (``layer`` set), in graph order."""
    return [n for n in graph.nodes if n.op == "linear" and n.layer is not None]


def valid_rows(feed: dict[str, np.ndarray], v) -> np.ndarray:
    """A recorded activation (a tensor or array, features last) as float64 rows,
    without the padding positions (``feed``'s ``mask`` of 0) when it is
    (batch, sequence, features) over the mask's shape."""
    v = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float64)
    if "mask" in feed and v.ndim == 3 and v.shape[:2] == np.shape(feed["mask"]):
        v = v[np.asarray(feed["mask"]) != 0]
    return v.reshape(-1, v.shape[-1])


def activation_norms(graph: Graph, feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per input channel L2 norm of every prunable linear's input over ``feeds``
    (float graph), keyed by the linear's weight tensor name. Padding positions
    (a ``mask`` input of 0) are left out."""
    from .float_exec import run_float

    xs = {n.inputs[0]: n.inputs[1] for n in prunable_linears(graph)}
    sq: dict[str, np.ndarray] = {}
    for feed in feeds:
        vals = run_float(graph, feed, record=True)
        for x, w in xs.items():
            v = valid_rows(feed, vals[x])
            sq[w] = sq.get(w, 0) + (v * v).sum(0)
    return {w: np.sqrt(s) for w, s in sq.items()}


def scores(w: np.ndarray, norm: np.ndarray | None = None) -> np.ndarray:
    """``|w|`` (K x N), times the input channel norm ``norm[k]`` if given."""
    s = np.abs(np.asarray(w, dtype=np.float64))
    return s if norm is None else s * np.asarray(norm, dtype=np.float64)[:, None]


# ----------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------

def _keep_top(score: np.ndarray, prune: int) -> np.ndarray:
    """Keep mask with the ``prune`` smallest entries of ``score`` (flattened) off;
    ties broken by position, so the count is exact."""
    keep = np.ones(score.size, dtype=bool)
    if prune > 0:
        keep[np.argsort(score.reshape(-1), kind="stable")[:prune]] = False
    return keep.reshape(score.shape)


def block_scores(score: np.ndarray, block_k: int, block_n: int) -> np.ndarray:
    """L2 norm of the scores in each ``block_k x block_n`` block (edge blocks partial)."""
    k, n = score.shape
    gk, gn = -(-k // block_k), -(-n // block_n)
    pad = np.zeros((gk * block_k, gn * block_n))
    pad[:k, :n] = score
    return np.sqrt((pad.reshape(gk, block_k, gn, block_n) ** 2).sum(axis=(1, 3)))


def expand_blocks(bitmap: np.ndarray, shape: tuple[int, int], block_k: int, block_n: int) -> np.ndarray:
    """A block bitmap (gk x gn) as an element mask of ``shape`` (K x N)."""
    full = np.repeat(np.repeat(np.asarray(bitmap, dtype=bool), block_k, 0), block_n, 1)
    return full[:shape[0], :shape[1]]


def nm_mask(score: np.ndarray, n: int, m: int, groups: float = 1.0) -> np.ndarray:
    """N:M along axis 0 (the reduction dimension): in each group of ``m``
    consecutive rows of each column keep the ``n`` largest scores (a partial
    last group of ``r`` rows keeps ``min(n, r)``). With ``groups < 1`` only that
    fraction of the groups is thinned: the ones that lose the least score."""
    k, cols = score.shape
    gk = -(-k // m)
    pad = np.full((gk * m, cols), -np.inf)  # padding rows rank last (then cut)
    pad[:k] = score
    g = pad.reshape(gk, m, cols)
    order = np.argsort(-g, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(m)[None, :, None], axis=1)
    thin = rank < n                                              # (gk, m, cols)
    if groups < 1:
        lost = np.where(thin, 0.0, np.where(np.isinf(g), 0.0, g)).sum(axis=1)   # (gk, cols)
        n_thin = int(round(groups * lost.size))
        chosen = ~_keep_top(lost, n_thin)                        # the n_thin cheapest groups
        thin = thin | ~chosen[:, None, :]
    return thin.reshape(gk * m, cols)[:k]


def mask_for(score: np.ndarray, spec: PruneSpec, fraction: float = 1.0) -> np.ndarray:
    """Keep mask (True = kept) of one weight for ``spec`` at ``fraction`` of its
    final sparsity (the gradual schedule; 1 = all of it)."""
    if not 0 <= fraction <= 1:
        raise PruneError(f"pruning fraction must be in [0, 1], got {fraction}")
    if score.ndim != 2:
        raise PruneError(f"pruning needs a 2-D (K x N) weight, got shape {list(score.shape)}")
    if spec.kind == "unstructured":
        return _keep_top(score, int(round(spec.ratio * fraction * score.size)))
    if spec.kind == "nm":
        return nm_mask(score, spec.n, spec.m, groups=fraction)
    if spec.kind == "block":
        bs = block_scores(score, spec.block_k, spec.block_n)
        keep = _keep_top(bs, int(round(spec.ratio * fraction * bs.size)))
        return expand_blocks(keep, score.shape, spec.block_k, spec.block_n)
    raise PruneError(f"unknown pruning kind {spec.kind!r}")


def compute_masks(graph: Graph, spec: PruneSpec, norms: dict[str, np.ndarray] | None = None,
                  fraction: float = 1.0, prev: dict[str, np.ndarray] | None = None,
                  weights: dict[str, np.ndarray] | None = None,
                  names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Keep masks of every prunable linear's weight (name -> bool K x N), or of
    those whose weight is in ``names`` (layer-selective pruning; the others get
    no mask and stay dense).

    ``weights`` overrides the graph's float weights (QAT's current shadow
    weights); ``prev`` masks make pruning monotone: weights already pruned
    score 0, so they stay pruned while the fraction grows."""
    masks = {}
    only = None if names is None else set(names)
    for node in prunable_linears(graph):
        name = node.inputs[1]
        if only is not None and name not in only:
            continue
        w = (weights or {}).get(name, graph.weights[name])
        s = scores(w, None if norms is None else norms.get(name))
        if prev is not None and name in prev:
            s = np.where(prev[name], s, -1.0)
        masks[name] = mask_for(s, spec, fraction)
    return masks


def apply_masks(graph: Graph, masks: dict[str, np.ndarray]) -> Graph:
    """A copy of the float graph with the masked weights set to exactly 0."""
    g = copy.copy(graph)
    g.weights = dict(graph.weights)
    g.meta = dict(graph.meta)
    for name, keep in masks.items():
        w = graph.weights[name]
        if w.shape != keep.shape:
            raise PruneError(f"mask of '{name}' has shape {list(keep.shape)}, weight {list(w.shape)}")
        g.weights[name] = np.where(keep, w, 0).astype(w.dtype)
    return g


def prune(graph: Graph, spec: PruneSpec, norms: dict[str, np.ndarray] | None = None,
          names: Iterable[str] | None = None) -> tuple[Graph, dict[str, np.ndarray]]:
    """One-shot pruning of a float graph (of the linears whose weight is in
    ``names``, default all prunable ones): (pruned copy, keep masks)."""
    masks = compute_masks(graph, spec, norms, names=names)
    return apply_masks(graph, masks), masks


# ----------------------------------------------------------------------------
# layer-selective pruning: by name, or by measured sensitivity
# ----------------------------------------------------------------------------

def select_linears(graph: Graph, patterns: str) -> list[Node]:
    """The prunable linears whose node name or weight tensor name matches one of
    the comma-separated shell patterns (``fnmatch``, case-sensitive), in graph
    order, e.g. ``"*.intermediate.dense,*.output.dense"`` or
    ``"encoder.layer.[0-2].*"``. A pattern that matches no prunable linear is an
    error."""
    pats = [p.strip() for p in str(patterns).split(",") if p.strip()]
    lin = prunable_linears(graph)
    if not pats:
        raise PruneError("--prune-layers: expected comma-separated patterns of linear names, got "
                         f"{patterns!r}")
    def hit(n: Node, p: str) -> bool:
        return fnmatch.fnmatchcase(n.name, p) or fnmatch.fnmatchcase(n.inputs[1], p)

    for p in pats:
        if not any(hit(n, p) for n in lin):
            some = ", ".join(n.name for n in lin[:3])
            raise PruneError(f"--prune-layers pattern {p!r} matches no linear inside a transformer "
                             f"block (names look like: {some})")
    return [n for n in lin if any(hit(n, p) for p in pats)]


def _float_outputs(graph: Graph, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """``graph``'s float output for each of ``feeds``."""
    from .float_exec import run_float

    out = graph.outputs[0]
    return [run_float(graph, f)[out].detach().cpu().numpy() for f in feeds]


class DenseRuns:
    """The float graph's recorded run over ``feeds``, kept so a graph with some
    linears pruned reruns only from the first linear whose weight differs
    (:func:`hwgen.float_exec.run_float_from`): from the dense run, or from the
    run of the pruned set last passed to :meth:`rebase` when the masks extend
    it (the greedy budget walk: the linears chosen so far, plus one). ``ref``
    is the dense output per feed."""

    def __init__(self, graph: Graph, feeds: list[dict[str, np.ndarray]]):
        from .float_exec import run_float

        self.graph, self.out, self.feeds = graph, graph.outputs[0], feeds
        self.index = {n.inputs[1]: i for i, n in enumerate(graph.nodes) if n.op == "linear"}
        self.dense = [run_float(graph, f, record=True) for f in feeds]
        self.ref = [r[self.out].detach().cpu().numpy() for r in self.dense]
        self.base_masks: dict[str, np.ndarray] = {}
        self.base = self.dense

    def rebase(self, masks: dict[str, np.ndarray]) -> None:
        """Record the run with ``masks`` applied, for masks that extend them."""
        from .float_exec import run_float

        self.base_masks = {k: np.asarray(v) for k, v in masks.items()}
        pruned = apply_masks(self.graph, masks)
        self.base = [run_float(pruned, f, record=True) for f in self.feeds]

    def outputs(self, masks: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The float outputs with ``masks`` (weight name -> keep mask) applied."""
        from .float_exec import run_float_from

        extends = all(w in masks and np.array_equal(masks[w], m) for w, m in self.base_masks.items())
        records, known = (self.base, self.base_masks) if extends else (self.dense, {})
        start = min((self.index[w] for w in masks if w not in known), default=len(self.graph.nodes))
        pruned = apply_masks(self.graph, masks)
        return [run_float_from(pruned, r, start)[self.out].detach().cpu().numpy() for r in records]


def _cosine(outs: list[np.ndarray], ref: list[np.ndarray]) -> np.ndarray:
    """Per output vector cosine of per-feed outputs against ``ref``."""
    from .accuracy import cosine_rows

    return np.concatenate([cosine_rows(y, r) for y, r in zip(outs, ref)])


def _output_cosine(graph: Graph, feeds: list[dict[str, np.ndarray]], ref: list[np.ndarray]) -> np.ndarray:
    """Per output vector cosine of ``graph``'s float output against ``ref``."""
    return _cosine(_float_outputs(graph, feeds), ref)


def rank_units(units: list, outputs: Callable[[object], list[np.ndarray]], ref: list[np.ndarray],
               row_of: Callable[[object], dict], say=None) -> list[dict]:
    """The sensitivity ranking of any pruning units (linears, channel pairs):
    per unit, ``outputs(unit)`` (the float graph's outputs over the feeds of
    ``ref``, one per feed, with that unit alone pruned) against ``ref`` (the
    dense outputs); ``row_of(unit)`` gives its ``name`` and
    ``weights`` (weight count) plus any keys to report. Rows add
    ``cosine_mean``, ``cosine_min``, ``drop`` and ``drop_per_mweight``, sorted
    cheapest first (ties: the units' order)."""
    if not ref:
        raise PruneError("sensitivity needs at least one calibration batch")
    say = say or (lambda m: None)
    rows = []
    for i, unit in enumerate(units):
        c = _cosine(outputs(unit), ref)
        r = row_of(unit)
        drop = 1.0 - float(c.mean())
        rows.append({**r, "cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "drop": drop,
                     "drop_per_mweight": drop / r["weights"] * 1e6, "order": i})
        say(f"sensitivity {r['name']}: cosine {c.mean():.5f}")
    rows.sort(key=lambda r: (r["drop_per_mweight"], r["order"]))
    for r in rows:
        del r["order"]
    return rows


def greedy_budget(ranking: list[dict], outputs_with: Callable[[list[dict]], list[np.ndarray]],
                  ref: list[np.ndarray], budget: float, say=None,
                  on_choose: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Walk ``ranking`` (cheapest first) and choose each unit whose pruning
    together with the ones chosen before (``outputs_with(rows)``: the float
    graph's outputs over the feeds of ``ref`` with those rows' units pruned)
    keeps the mean output cosine against ``ref`` >= ``budget``; ``on_choose(rows)``
    is called with the chosen rows each time one is added. Returns the ranking with ``chosen`` and
    ``cosine_with`` (the combined cosine when it was tried)."""
    if not 0 < budget <= 1:
        raise PruneError(f"--prune-budget must be a cosine in (0, 1], e.g. 0.99; got {budget}")
    say = say or (lambda m: None)
    chosen: list[dict] = []
    rows = []
    for r in ranking:
        c = float(_cosine(outputs_with(chosen + [r]), ref).mean())
        ok = c >= budget
        if ok:
            chosen.append(r)
            if on_choose is not None:
                on_choose(chosen)
        rows.append({**r, "chosen": ok, "cosine_with": c})
        say(f"budget {budget}: {r['name']} -> {c:.5f} {'chosen' if ok else 'skipped'}")
    return rows


def sensitivity(graph: Graph, spec: PruneSpec, feeds: Iterable[dict[str, np.ndarray]],
                norms: dict[str, np.ndarray] | None = None, nodes: list[Node] | None = None,
                say=None, runs: DenseRuns | None = None) -> list[dict]:
    """Per prunable linear (or ``nodes``): prune it alone (``spec``, one-shot,
    ``norms``-aware scores, no refit) in the float ``graph`` and measure the
    cosine of the model's output against the dense float output over ``feeds``
    (calibration inputs; never the evaluation set). Returns one row per linear,
    ``name``, ``weight``, ``weights`` (its weight count), ``cosine_mean``,
    ``cosine_min``, ``drop`` (1 - cosine_mean) and ``drop_per_mweight`` (drop
    per million weights), sorted cheapest first by ``drop_per_mweight`` (ties:
    graph order). Deterministic: the same graph and feeds give the same list.
    Each pruned graph reruns from its linear on (:class:`DenseRuns`; ``runs``:
    the dense run over ``feeds`` when the caller has it)."""
    runs = DenseRuns(graph, list(feeds)) if runs is None else runs
    nodes = prunable_linears(graph) if nodes is None else nodes

    def outputs(n: Node) -> list[np.ndarray]:
        return runs.outputs(compute_masks(graph, spec, norms, names=[n.inputs[1]]))

    return rank_units(nodes, outputs, runs.ref, lambda n: {"name": n.name, "weight": n.inputs[1],
                                                           "weights": int(graph.weights[n.inputs[1]].size)},
                      say)


def select_by_budget(graph: Graph, spec: PruneSpec, feeds: Iterable[dict[str, np.ndarray]], budget: float,
                     norms: dict[str, np.ndarray] | None = None, ranking: list[dict] | None = None,
                     say=None) -> tuple[list[Node], list[dict]]:
    """Greedy layer selection under a cosine budget: walk :func:`sensitivity`'s
    ranking (cheapest first) and add each linear whose pruning, together with
    the ones already chosen (one-shot, no refit), keeps the float model's mean
    output cosine against the dense float model over ``feeds`` >= ``budget``;
    skip it otherwise. Returns (the chosen linears in graph order, the ranking
    with ``chosen`` and ``cosine_with`` (the combined cosine when it was tried)
    added)."""
    if not 0 < budget <= 1:
        raise PruneError(f"--prune-budget must be a cosine in (0, 1], e.g. 0.99; got {budget}")
    runs = DenseRuns(graph, list(feeds))
    ranking = sensitivity(graph, spec, feeds, norms, say=say, runs=runs) if ranking is None else ranking
    def masks_of(rs: list[dict]) -> dict[str, np.ndarray]:
        return compute_masks(graph, spec, norms, names=[r["weight"] for r in rs])

    rows = greedy_budget(ranking, lambda rs: runs.outputs(masks_of(rs)), runs.ref, budget, say,
                         on_choose=lambda rs: runs.rebase(masks_of(rs)))
    chosen = {r["weight"] for r in rows if r["chosen"]}
    return [n for n in prunable_linears(graph) if n.inputs[1] in chosen], rows


# ----------------------------------------------------------------------------
# gradual schedule (during QAT / distillation)
# ----------------------------------------------------------------------------

def gradual_fraction(step: int, steps: int, start: float = 0.0, end: float = 0.5) -> float:
    """Cubic schedule (Zhu & Gupta 2017): the fraction of the final sparsity
    reached before step ``step`` (0-based) of ``steps``, 0 until ``start * steps``,
    rising as ``1 - (1 - t)**3`` to 1 at ``end * steps`` and staying there. The
    step count is rounded so every step's fraction is exact in the report."""
    if steps <= 0:
        return 1.0
    t0, t1 = start * steps, max(end * steps, start * steps + 1)
    t = min(max((step + 1 - t0) / (t1 - t0), 0.0), 1.0)
    return 1 - (1 - t) ** 3


class GradualPruner:
    """Updates a :class:`~hwgen.qat.QATModel`'s masks before each fine-tuning step.

    ``pruner(i)`` (the hook :func:`hwgen.qat.finetune` calls) recomputes the masks
    from the current shadow weights at :func:`gradual_fraction` of the final
    sparsity; pruned weights stay pruned. The last update reaches the full
    ``spec`` sparsity (fraction 1 by ``end * steps``)."""

    def __init__(self, model, spec: PruneSpec, steps: int, norms: dict[str, np.ndarray] | None = None,
                 start: float = 0.0, end: float = 0.5, names: Iterable[str] | None = None):
        self.model, self.spec, self.steps, self.norms = model, spec, steps, norms
        self.names = None if names is None else list(names)
        self.start, self.end = start, end
        self.history: list[float] = []

    def __call__(self, step: int) -> None:
        f = gradual_fraction(step, self.steps, self.start, self.end)
        if self.history and f == self.history[-1]:
            self.history.append(f)
            return
        self.model.set_masks(compute_masks(self.model.graph, self.spec, self.norms, fraction=f,
                                           prev=self.model.masks or None,
                                           weights=self.model.float_weights(), names=self.names))
        self.history.append(f)


# ----------------------------------------------------------------------------
# the fixed graph's record: sparsity and block bitmaps, from the codes
# ----------------------------------------------------------------------------

def block_bitmap(codes: np.ndarray, block_k: int, block_n: int) -> np.ndarray:
    """Occupancy of each ``block_k x block_n`` block of a K x N weight: uint8
    (ceil(K/block_k), ceil(N/block_n)), 1 where any code in the block is nonzero."""
    codes = np.asarray(codes)
    k, n = codes.shape
    gk, gn = -(-k // block_k), -(-n // block_n)
    pad = np.zeros((gk * block_k, gn * block_n), dtype=bool)
    pad[:k, :n] = codes != 0
    return pad.reshape(gk, block_k, gn, block_n).any(axis=(1, 3)).astype(np.uint8)


def record_sparsity(fixed: Graph, spec: PruneSpec | None, block_k: int = DEFAULT_BLOCK[0],
                    block_n: int = DEFAULT_BLOCK[1], names: Iterable[str] | None = None) -> dict:
    """Write ``node.attrs["sparsity"]`` on every prunable linear of a fixed graph
    and ``meta["prune"]`` (the spec and the overall sparsity); returns the latter.

    Per linear: ``pattern`` (spec name, or ``"dense"`` without a spec or for a
    linear whose weight is not in ``names`` when given: layer-selective
    pruning), ``zeros`` and ``weights`` (counts of zero codes and of codes),
    ``sparsity`` (their ratio), ``block_k``/``block_n`` and ``bitmap`` (a list
    of rows, 1 = block holds a nonzero code: :func:`block_bitmap` of the
    codes), ``blocks_empty``. ``meta["prune"]`` adds ``pruned_linears`` (node
    names), ``linears_pruned`` and ``weight_share`` (the pruned linears' share
    of the prunable linears' weights, i.e. of their MACs per row)."""
    if spec is not None and spec.kind == "block":
        block_k, block_n = spec.block_k, spec.block_n
    only = None if names is None else set(names)
    zeros = total = share = 0
    pruned = []
    for node in prunable_linears(fixed):
        codes = fixed.weights[node.inputs[1]]
        bm = block_bitmap(codes, block_k, block_n)
        z = int(np.count_nonzero(codes == 0))
        on = spec is not None and (only is None or node.inputs[1] in only)
        node.attrs["sparsity"] = {
            "pattern": spec.name if on else "dense", "zeros": z, "weights": int(codes.size),
            "sparsity": z / codes.size, "block_k": block_k, "block_n": block_n,
            "bitmap": bm.tolist(), "blocks_empty": int(bm.size - bm.sum())}
        zeros, total = zeros + z, total + codes.size
        if on:
            pruned.append(node.name)
            share += codes.size
    rec = {**(spec.to_dict() if spec is not None else {"pattern": "dense"}),
           "block_k": block_k, "block_n": block_n,
           "linears": len(prunable_linears(fixed)), "sparsity": zeros / total if total else 0.0,
           "pruned_linears": pruned, "linears_pruned": len(pruned),
           "weight_share": share / total if total else 0.0}
    fixed.meta["prune"] = rec
    return rec


def linear_bitmap(fixed: Graph, node: Node, block_k: int, block_n: int) -> np.ndarray:
    """The block bitmap of a linear for an engine with this geometry: the
    recorded one when the graph holds it for these block dimensions, else
    derived from the codes (every linear has one; dense ones are all 1)."""
    rec = node.attrs.get("sparsity")
    if rec and rec["block_k"] == block_k and rec["block_n"] == block_n:
        return np.asarray(rec["bitmap"], dtype=np.uint8)
    return block_bitmap(fixed.weights[node.inputs[1]], block_k, block_n)


def check_sparsity(fixed: Graph) -> int:
    """Raise :class:`PruneError` if a recorded bitmap or zero count disagrees
    with the codes; returns the number of linears checked."""
    n = 0
    for node in fixed.nodes:
        rec = node.attrs.get("sparsity")
        if node.op != "linear" or not rec:
            continue
        codes = fixed.weights[node.inputs[1]]
        bm = block_bitmap(codes, rec["block_k"], rec["block_n"])
        if not np.array_equal(bm, np.asarray(rec["bitmap"], dtype=np.uint8)):
            raise PruneError(f"node '{node.name}': recorded block bitmap disagrees with the weight "
                             "codes; re-run `hwgen quantize --prune` to rebuild the graph")
        if int(np.count_nonzero(codes == 0)) != rec["zeros"]:
            raise PruneError(f"node '{node.name}': recorded zero count {rec['zeros']} disagrees with "
                             "the weight codes; re-run `hwgen quantize --prune`")
        n += 1
    return n


def mask_violations(fixed: Graph, masks: dict[str, np.ndarray]) -> int:
    """Count of pruned positions (mask False) whose code is not 0."""
    return sum(int(np.count_nonzero(fixed.weights[name][~keep])) for name, keep in masks.items())


def nm_violations(codes: np.ndarray, n: int, m: int) -> int:
    """Groups of ``m`` consecutive rows (per column) with more than ``n`` nonzero codes."""
    k, cols = codes.shape
    gk = -(-k // m)
    pad = np.zeros((gk * m, cols), dtype=bool)
    pad[:k] = np.asarray(codes) != 0
    return int(np.count_nonzero(pad.reshape(gk, m, cols).sum(axis=1) > n))



# ----------------------------------------------------------------------------
# cycles: read from the matmul engine (one call site)
# ----------------------------------------------------------------------------

def engine_geometry() -> tuple[int, int, int]:
    """``(rows, cols, block_k)``: the defaults of
    :meth:`hwgen.rtl.matmul.MatmulSpec.for_linear` (the engine's one definition)."""
    import inspect

    from .rtl.matmul import MatmulSpec

    p = inspect.signature(MatmulSpec.for_linear).parameters
    return p["rows"].default, p["cols"].default, p["block_k"].default


def linear_cycles(fixed: Graph, node: Node, m: int, rows: int, cols: int, block_k: int,
                  max_m: int | None = None) -> tuple[int, int]:
    """(dense, sparse) cycles of one linear on the RTL matmul engine for ``m``
    rows: :meth:`hwgen.rtl.matmul.MatmulSpec.cycles` without and with the
    linear's block bitmap (:func:`linear_bitmap` for ``block_k x cols``)."""
    from .rtl.matmul import MatmulSpec

    spec = MatmulSpec.for_linear(fixed, node, rows=rows, cols=cols, max_m=max(m, max_m or m),
                                 block_k=block_k)
    return spec.cycles(m), spec.cycles(m, linear_bitmap(fixed, node, block_k, cols))


def cycle_report(fixed: Graph, m: int, rows: int | None = None, cols: int | None = None,
                 block_k: int | None = None, nodes: list[Node] | None = None) -> dict:
    """Summed engine cycles of the prunable linears (default) for ``m`` rows:
    ``cycles_m``, ``cycles_dense``, ``cycles_sparse``, ``cycles_ratio``
    (sparse / dense), and the engine geometry. Geometry defaults: :func:`engine_geometry`."""
    r0, c0, k0 = engine_geometry()
    rows, cols, block_k = rows or r0, cols or c0, block_k or k0
    dense = sparse = 0
    for node in (prunable_linears(fixed) if nodes is None else nodes):
        d, s = linear_cycles(fixed, node, m, rows, cols, block_k)
        dense, sparse = dense + d, sparse + s
    return {"cycles_m": m, "cycles_dense": dense, "cycles_sparse": sparse,
            "cycles_ratio": sparse / dense if dense else 1.0,
            "engine": {"rows": rows, "cols": cols, "block_k": block_k}}


# ----------------------------------------------------------------------------
# least-squares reconstruction of the kept weights (one-shot, layer by layer)
# ----------------------------------------------------------------------------

def reconstruct(graph: Graph, masks: dict[str, np.ndarray], feeds: Iterable[dict[str, np.ndarray]],
                damp: float = 0.01, say=None) -> Graph:
    """The pruned float graph whose kept weights are refitted, linear by linear in
    graph order, to reproduce the dense linear's output on the inputs it sees in
    the already-pruned graph (calibration ``feeds``, valid positions only): per
    output column ``n`` with kept rows ``S``, ``w[S, n] = (X_S^T X_S + d I)^-1
    X_S^T X w0[:, n]`` (SparseGPT's objective, solved exactly; ``d`` = ``damp`` x
    the mean of diag(X^T X)). Pruned weights stay exactly 0. Linears that share
    an input are refitted together. One float pass over the graph: every feed's
    values are kept while the nodes run in order, each linear group refitted
    when its input is ready."""
    from .float_exec import run_float_ordered

    say = say or (lambda m: None)
    feeds = list(feeds)
    g = apply_masks(graph, masks)
    groups: dict[str, list[Node]] = {}
    for node in prunable_linears(graph):
        if node.inputs[1] in masks:
            groups.setdefault(node.inputs[0], []).append(node)

    def before(node: Node, envs: list[dict]) -> None:
        if node.op == "linear" and node.inputs[0] in groups:
            _refit_group(graph, g, masks, groups.pop(node.inputs[0]), feeds, envs, node.inputs[0], damp, say)

    run_float_ordered(g, feeds, before)
    return g


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a x = b`` for a (batch of) symmetric positive semi-definite normal
    matrices; a singular one (``damp`` 0 on inputs of lower rank than the kept
    rows) gets the minimum-norm least-squares solution instead of an error."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        if a.ndim == 2:
            return np.linalg.lstsq(a, b, rcond=None)[0]
        return np.stack([np.linalg.lstsq(ai, bi, rcond=None)[0] for ai, bi in zip(a, b)])


def _refit_group(graph, g, masks, nodes, feeds, envs, x_name, damp, say) -> None:
    x = np.concatenate([valid_rows(feed, env[x_name]) for feed, env in zip(feeds, envs)])
    h = x.T @ x
    hd = h + damp * float(np.mean(np.diag(h))) * np.eye(h.shape[0])
    for node in nodes:
        wname = node.inputs[1]
        w0 = graph.weights[wname].astype(np.float64)
        keep = masks[wname]
        rhs = h @ w0
        w = np.zeros_like(w0)
        # columns with the same kept rows share one factorization
        keys = np.packbits(keep, axis=0).T
        _, first, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        cols_of = [np.flatnonzero(inv.reshape(-1) == u) for u in range(len(first))]
        sizes = keep[:, first].sum(0)
        for size in np.unique(sizes[sizes > 0]):
            us = np.flatnonzero(sizes == size)
            for c0 in range(0, len(us), 64):        # supports of one size: one batched solve
                chunk = us[c0:c0 + 64]
                idx = np.stack([np.flatnonzero(keep[:, first[u]]) for u in chunk])       # (c, s)
                a = hd[idx[:, :, None], idx[:, None, :]]                                   # (c, s, s)
                one = np.array([len(cols_of[u]) == 1 for u in chunk])
                if one.any():                        # one column per support (N:M): batched
                    cols = np.array([cols_of[u][0] for u in chunk[one]])
                    sol = _solve(a[one], rhs[idx[one], cols[:, None]][..., None])[..., 0]
                    w[idx[one], cols[:, None]] = sol
                for j in np.flatnonzero(~one):       # shared supports (blocks): many right-hand sides
                    cols = cols_of[chunk[j]]
                    w[idx[j][:, None], cols[None, :]] = _solve(a[j], rhs[idx[j][:, None], cols[None, :]])
        g.weights[wname] = w.astype(graph.weights[wname].dtype)
    say(f"refitted {', '.join(n.name for n in nodes)} on {x.shape[0]} rows")
