"""Channel pruning: whole weight blocks of two linears that share a channel.

Block pruning (``block:RATIO``, :mod:`hwgen.prune`) picks each linear's empty
blocks on its own, so every pruned block costs output error. Inside a
transformer block some channels run from one linear to the next through
channel-wise ops only, and removing such a channel empties a column of the
first linear *and* a row of the second for the error of one:

``ffn``  an FFN neuron: column ``j`` of the up projection, ``gelu``, row ``j``
         of the down projection;
``vo``   an attention value channel: column ``d`` of the value projection, the
         attention's weighted sum (channel-wise per head), row ``d`` of the
         attention output projection;
``qk``   a query/key channel: column ``d`` of the query and of the key
         projection, which meet only in the dot product of head ``d // head_dim``.

A :class:`ChannelPair` names the linears of one such channel set. Channels are
pruned in groups of ``lcm(block_k, block_n)``, so every group is whole engine
blocks of both linears; channels inside a head (``vo``, ``qk``) stay inside it.
The channels need not be adjacent: the channels of a pair can be permuted
(the producers' columns and biases and the consumer's rows, the same
permutation; inside each head for attention), which leaves the float function
exactly unchanged (:func:`permute_pair`). :func:`prune_pairs` sorts each head's
channels by importance, keeps the best groups, permutes the kept channels to
the front of their head, and zeroes the rest: the producers' columns and
biases and the consumer's rows. Then the consumer's kept rows and its bias are
refitted by least squares (with an intercept, so the pruned channels' mean is
kept) to reproduce the dense consumer's output on the inputs it sees in the
already-pruned graph, pair by pair in graph order.

Importance of channel ``c`` (calibration inputs, valid positions): ``ffn`` and
``vo``, ``Var(x_c) * ||W_consumer[c, :]||^2`` (what the consumer loses beyond the
mean, which the bias keeps); ``qk``, ``E[q_c^2] * Var(k_c)`` (the part of the
score ``q_c k_c`` that is not constant over the keys: the softmax ignores the
rest).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .ir import Graph, Node
from .prune import PruneError, prunable_linears, valid_rows

KINDS = ("ffn", "vo", "qk")


@dataclass(frozen=True)
class ChannelPair:
    """Linears that share channels: ``producers`` (their output columns),
    ``consumer`` (its input rows; ``None`` for ``qk``), the tensor whose channels
    the importance reads (``x``: the consumer's input; for ``qk`` the key), the
    query tensor for ``qk``, and the head layout."""

    kind: str
    layer: int
    producers: tuple[str, ...]       # linear node names
    consumer: str | None
    x: str
    q: str | None
    heads: int
    channels: int

    @property
    def name(self) -> str:
        return f"layer{self.layer}.{self.kind}"

    def linears(self) -> tuple[str, ...]:
        return self.producers + ((self.consumer,) if self.consumer else ())


def channel_pairs(graph: Graph, kinds: Iterable[str] = KINDS) -> list[ChannelPair]:
    """Every channel set of the float graph's transformer blocks, in graph
    order: for each attention node whose q, k, v are prunable linears feeding
    only it, a ``qk`` and (when its output feeds only one linear) a ``vo``
    pair; for each linear -> gelu -> linear chain with single consumers, an
    ``ffn`` pair."""
    kinds = tuple(kinds)
    for k in kinds:
        if k not in KINDS:
            raise PruneError(f"channel pair kind {k!r}: expected one of {', '.join(KINDS)}")
    lin = {n.outputs[0]: n for n in prunable_linears(graph)}

    def only(t: str) -> Node | None:
        """``t``'s one consumer (None: several, none, or ``t`` is a graph output)."""
        c = graph.consumers(t)
        return c[0] if len(c) == 1 and t not in graph.outputs else None

    pairs = []
    for node in graph.nodes:
        if node.op == "attention" and node.layer is not None:
            q, k, v = (lin.get(t) for t in node.inputs[:3])
            if not (q and k and v) or any(only(n.outputs[0]) is not node for n in (q, k, v)):
                continue
            heads, chans = int(node.attrs["heads"]), int(node.attrs["heads"] * node.attrs["head_dim"])
            if "qk" in kinds:
                pairs.append(ChannelPair("qk", node.layer, (q.name, k.name), None, k.outputs[0],
                                         q.outputs[0], heads, chans))
            o = only(node.outputs[0])
            if "vo" in kinds and o is not None and o.op == "linear" and o.inputs[0] == node.outputs[0] \
                    and o.outputs[0] in lin:
                pairs.append(ChannelPair("vo", node.layer, (v.name,), o.name, node.outputs[0], None,
                                         heads, chans))
        elif node.op == "gelu" and node.layer is not None and "ffn" in kinds:
            up, down = lin.get(node.inputs[0]), only(node.outputs[0])
            if up is None or only(up.outputs[0]) is not node or down is None or down.op != "linear" \
                    or down.inputs[0] != node.outputs[0] or down.outputs[0] not in lin:
                continue
            pairs.append(ChannelPair("ffn", node.layer, (up.name,), down.name, node.outputs[0], None, 1,
                                     int(graph.weights[up.inputs[1]].shape[1])))
    return pairs


def group_size(pair: ChannelPair, block_k: int, block_n: int) -> int:
    """Channels pruned together: ``lcm(block_k, block_n)`` (whole blocks of the
    producers' columns and the consumer's rows); it must divide a head."""
    g = block_n if pair.consumer is None else math.lcm(block_k, block_n)
    per_head = pair.channels // pair.heads
    if per_head % g:
        raise PruneError(f"{pair.name}: {per_head} channels per head are not a multiple of the "
                         f"{g}-channel block group (block_k {block_k}, block_n {block_n}); "
                         "channel pruning needs whole blocks inside a head")
    return g


class _Stats:
    """Running mean and mean square of channels over valid positions."""

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, v: np.ndarray) -> None:
        self.n += v.shape[0]
        self.s = self.s + v.sum(0)
        self.ss = self.ss + (v * v).sum(0)

    @property
    def mean(self) -> np.ndarray:
        return self.s / max(self.n, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.ss / max(self.n, 1) - self.mean ** 2, 0.0)


def importance(graph: Graph, pairs: list[ChannelPair], feeds: Iterable[dict[str, np.ndarray]]
               ) -> dict[str, np.ndarray]:
    """Per pair (by name), the importance of each channel (see the module
    docstring), from one float pass over ``feeds``."""
    from .float_exec import run_float

    feeds = list(feeds)
    if not feeds:
        raise PruneError("channel importance needs at least one calibration batch")
    stats: dict[str, _Stats] = {}
    for feed in feeds:
        vals = run_float(graph, feed, record=True)
        for t in {p.x for p in pairs} | {p.q for p in pairs if p.q}:
            stats.setdefault(t, _Stats()).add(valid_rows(feed, vals[t]))
    out = {}
    for p in pairs:
        if p.consumer is None:
            out[p.name] = stats[p.q].ss / max(stats[p.q].n, 1) * stats[p.x].var
        else:
            w = np.asarray(graph.weights[graph.node(p.consumer).inputs[1]], dtype=np.float64)
            out[p.name] = stats[p.x].var * (w * w).sum(1)
    return out


def choose(imp: np.ndarray, heads: int, group: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(permutation, keep): the channel order (new position -> old channel)
    that puts each head's kept channels first, most important first, and the
    keep mask in that new order. ``round(ratio * groups)`` groups of ``group``
    channels are pruned, the ones with the least summed importance (each head's
    channels sorted, so a head keeps a prefix of its groups; equal importances:
    the lower channel first, and of two equal groups the later one is pruned)."""
    c = imp.size
    per = c // heads
    perm = np.concatenate([h * per + np.argsort(-imp[h * per:(h + 1) * per], kind="stable")
                           for h in range(heads)])
    val = imp[perm].reshape(-1, group).sum(1)                     # per group, in new order
    n_prune = int(round(ratio * val.size))
    order = np.lexsort((-np.arange(val.size), val))                # smallest first; later group first
    keep_g = np.ones(val.size, dtype=bool)
    keep_g[order[:n_prune]] = False
    return perm, np.repeat(keep_g, group)


def permute_pair(graph: Graph, pair: ChannelPair, perm: np.ndarray) -> None:
    """Permute the pair's channels in place (new position ``i`` holds old
    channel ``perm[i]``): the producers' weight columns and biases, the
    consumer's weight rows. The float function is unchanged."""
    for name in pair.producers:
        node = graph.node(name)
        w, b = node.inputs[1], graph.node_input(node, "bias")
        graph.weights[w] = np.ascontiguousarray(graph.weights[w][:, perm])
        if b:
            graph.weights[b] = np.ascontiguousarray(graph.weights[b][perm])
    if pair.consumer:
        w = graph.node(pair.consumer).inputs[1]
        graph.weights[w] = np.ascontiguousarray(graph.weights[w][perm])


def _refit_consumer(graph: Graph, pair: ChannelPair, keep: np.ndarray, xs: np.ndarray, damp: float,
                    rows: bool) -> None:
    """Refit the consumer in place to reproduce its dense output (its weights
    in ``graph`` now) on ``xs`` (the inputs it sees in the graph before this
    pair's producers are pruned, valid rows): with ``rows``, its kept rows and
    bias by least squares (ridge ``damp``, intercept free); else only its bias,
    which then keeps the pruned channels' mean (``b += mean(x[:, pruned]) @
    w[pruned]``). The pruned rows are left as they were (the caller zeroes them)."""
    node = graph.node(pair.consumer)
    wname, bname = node.inputs[1], graph.node_input(node, "bias")
    w0 = np.asarray(graph.weights[wname], dtype=np.float64)
    b0 = np.asarray(graph.weights[bname], dtype=np.float64) if bname else np.zeros(w0.shape[1])
    if not rows:
        if bname:
            graph.weights[bname] = (b0 + xs[:, ~keep].mean(0) @ w0[~keep]).astype(graph.weights[bname].dtype)
        return
    y = xs @ w0 + b0
    icpt = bname is not None                     # without a bias there is no mean to keep
    a = np.concatenate([xs[:, keep], np.ones((xs.shape[0], int(icpt)))], axis=1)
    h = a.T @ a
    reg = damp * float(np.mean(np.diag(h)[:int(keep.sum())])) * np.eye(h.shape[0])
    if icpt:
        reg[-1, -1] = 0.0
    sol = np.linalg.solve(h + reg, a.T @ y)
    w = np.zeros_like(w0)
    w[keep] = sol[:int(keep.sum())]
    graph.weights[wname] = w.astype(graph.weights[wname].dtype)
    if icpt:
        graph.weights[bname] = sol[-1].astype(graph.weights[bname].dtype)


def _mask(graph: Graph, masks: dict[str, np.ndarray], wname: str, keep: np.ndarray) -> None:
    """AND ``keep`` (broadcast to the weight) into ``masks[wname]`` and zero the
    weight where the mask is False."""
    w = graph.weights[wname]
    m = np.broadcast_to(keep, w.shape)
    masks[wname] = masks.get(wname, np.ones(m.shape, bool)) & m
    graph.weights[wname] = np.where(masks[wname], w, 0).astype(w.dtype)


def _prune_producers(graph: Graph, pair: ChannelPair, keep: np.ndarray, masks: dict[str, np.ndarray]) -> None:
    """Zero the producers' pruned columns and bias entries."""
    for name in pair.producers:
        node = graph.node(name)
        _mask(graph, masks, node.inputs[1], keep[None, :])
        bn = graph.node_input(node, "bias")
        if bn:
            graph.weights[bn] = np.where(keep, graph.weights[bn], 0).astype(graph.weights[bn].dtype)


def prune_pairs(graph: Graph, pairs: list[ChannelPair], ratio: float, block_k: int, block_n: int,
                feeds: Iterable[dict[str, np.ndarray]], refit: bool = True, damp: float = 0.01,
                say=None, imp: dict[str, np.ndarray] | None = None) -> tuple[Graph, dict[str, np.ndarray]]:
    """Channel-prune ``pairs`` of the float ``graph`` at ``ratio`` (of each
    pair's channel groups, so of each of its linears' blocks): (the pruned,
    permuted and refitted copy, keep masks by weight name). Importance from
    ``feeds`` (or ``imp``, :func:`importance` of these pairs); ``refit``
    refits each consumer (``vo``, ``ffn``) on ``feeds`` against the graph
    before its pair was pruned, else only its bias.

    Two float passes over ``feeds``: one for the importance, and one in graph
    order (:func:`hwgen.float_exec.run_float_ordered`) that refits each
    consumer when it comes up, on its input as computed so far (its pair's
    producers still dense, every earlier pair pruned), then zeroes the pair's
    producer columns and consumer rows before the consumer runs. The pass has
    already run the producers densely, but their pruned channels (``x``'s) meet
    only the consumer's zero rows, so every value after the consumer is the
    pruned graph's. ``qk`` pairs have no consumer: they are pruned before the
    pass."""
    g, masks, _ = _prune_pass(graph, pairs, ratio, block_k, block_n, list(feeds), refit, damp, say, imp)
    return g, masks


def _prune_pass(graph: Graph, pairs: list[ChannelPair], ratio: float, block_k: int, block_n: int,
                feeds: list[dict[str, np.ndarray]], refit: bool, damp: float, say,
                imp: dict[str, np.ndarray] | None) -> tuple[Graph, dict[str, np.ndarray], list[np.ndarray]]:
    """:func:`prune_pairs`, also returning the pruned graph's float outputs
    over ``feeds`` (the ordered pass computes them)."""
    from .float_exec import run_float_ordered

    if not 0 < ratio < 1:
        raise PruneError(f"channel pruning ratio must be between 0 and 1 (exclusive), got {ratio}")
    say = say or (lambda m: None)
    g = copy.copy(graph)
    g.weights = dict(graph.weights)
    g.meta = dict(graph.meta)
    if imp is None:
        imp = importance(g, pairs, feeds)
    masks: dict[str, np.ndarray] = {}
    at_consumer: dict[str, tuple[ChannelPair, np.ndarray]] = {}
    for p in pairs:
        perm, keep = choose(imp[p.name], p.heads, group_size(p, block_k, block_n), ratio)
        permute_pair(g, p, perm)
        if p.consumer is None:
            _prune_producers(g, p, keep, masks)
            say(f"channel-pruned {p.name}: {int((~keep).sum())} of {keep.size} channels")
        elif p.consumer in at_consumer:
            raise PruneError(f"{p.name} and {at_consumer[p.consumer][0].name} share the consumer {p.consumer}")
        else:
            at_consumer[p.consumer] = (p, keep)

    def before(node: Node, envs: list[dict]) -> None:
        if node.name not in at_consumer:
            return
        p, keep = at_consumer.pop(node.name)
        xs = np.concatenate([valid_rows(f, env[p.x]) for f, env in zip(feeds, envs)])
        _refit_consumer(g, p, keep, xs, damp, rows=refit)
        _mask(g, masks, node.inputs[1], keep[:, None])
        _prune_producers(g, p, keep, masks)
        say(f"channel-pruned {p.name}: {int((~keep).sum())} of {keep.size} channels, "
            + ("consumer refitted" if refit else "consumer bias keeps the mean"))

    envs = run_float_ordered(g, feeds, before)
    outs = [env[g.outputs[0]].numpy() for env in envs]
    return g, {k: np.ascontiguousarray(v) for k, v in masks.items()}, outs


def _pair_row(graph: Graph, pair: ChannelPair) -> dict:
    return {"name": pair.name, "kind": pair.kind, "layer": pair.layer, "linears": list(pair.linears()),
            "weights": int(sum(graph.weights[graph.node(n).inputs[1]].size for n in pair.linears()))}


def select_by_budget(graph: Graph, pairs: list[ChannelPair], ratio: float, block_k: int, block_n: int,
                     feeds: Iterable[dict[str, np.ndarray]], budget: float, say=None
                     ) -> tuple[list[ChannelPair], list[dict]]:
    """:func:`hwgen.prune.select_by_budget` for channel pairs: each pair pruned
    alone (:func:`prune_pairs` at ``ratio``, importance on ``feeds``), ranked
    by cosine loss per weight of its linears, then chosen greedily while the
    float model with all chosen pairs pruned keeps mean output cosine >=
    ``budget`` over ``feeds`` (calibration inputs). Here the consumers get only
    the bias refit (the pruned channels' mean): a least-squares refit of the
    kept rows on the same few inputs it is measured on would fit them, not
    the model (MiniLM, 64 calibration sentences: 10 pairs measured 0.986 there
    and 0.759 on the evaluation sentences). Returns (the chosen pairs in graph
    order, the ranking rows with ``chosen`` and ``cosine_with``)."""
    from .prune import _float_outputs, greedy_budget, rank_units

    feeds = list(feeds)
    ref = _float_outputs(graph, feeds)
    by_name = {p.name: p for p in pairs}
    imp = importance(graph, pairs, feeds)

    def outputs(ps: list[ChannelPair]) -> list[np.ndarray]:
        return _prune_pass(graph, sorted(ps, key=pairs.index), ratio, block_k, block_n, feeds, False, 0.0,
                           None, imp)[2]

    ranking = rank_units(pairs, lambda p: outputs([p]), ref, lambda p: _pair_row(graph, p), say)
    rows = greedy_budget(ranking, lambda rs: outputs([by_name[r["name"]] for r in rs]), ref, budget, say)
    chosen = {r["name"] for r in rows if r["chosen"]}
    return [p for p in pairs if p.name in chosen], rows
