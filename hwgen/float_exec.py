"""Float executor of a graph: the float semantics of every op in :data:`hwgen.ir.OPS`.

:func:`run_float` runs a *float graph* (the frontend's output: float32 weights, no
formats) in torch float32. It is the reference the frontend is checked against (float
graph == torch module) and the source of the activation statistics the quantizer
calibrates from (``record=True`` returns every intermediate tensor by name).

Each op's float meaning is one small function in :data:`FLOAT_OPS`; they take the node,
its input tensors (``None`` for an absent optional input) and an :class:`_RunContext`.

Decoders: attention nodes with ``kv_cache=True`` keep their keys and values in a
:class:`FloatState`, together with the position offset that ``embedding`` nodes with
``positions=True`` and causal masks start from. Prefill with the prompt, then feed one
token at a time with the same state; the result equals one full causal forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .ir import Graph, Node

__all__ = ["FloatState", "run_float", "run_float_ordered", "attention_float", "attention_scores", "split_heads",
           "FLOAT_OPS"]


class FloatState:
    """Decoder state of a float run: per-attention-node KV cache and the position offset.

    ``kv[node_name] = (k, v)`` with shape (B, heads, T, head_dim); ``offset`` is the
    number of positions already consumed (the first position of the next call).
    """

    def __init__(self) -> None:
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.offset: int = 0

    def reset(self) -> None:
        """Forget the cache: the next run starts at position 0."""
        self.kv.clear()
        self.offset = 0

    def __repr__(self) -> str:
        return f"FloatState(offset={self.offset}, cached_nodes={sorted(self.kv)})"


@dataclass
class _RunContext:
    state: FloatState | None
    offset: int
    device: torch.device
    new_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- attention


def attention_float(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    heads: int, head_dim: int, causal: bool, scale: float,
                    past: tuple[torch.Tensor, torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Multi-head attention on projected q, k, v (B, S, heads*head_dim).

    Returns the merged context (B, S, heads*head_dim) and the (k, v) heads including
    ``past`` (B, heads, T, head_dim), T = past + S. The probabilities are the softmax
    of :func:`attention_scores` (its masking rules).
    """
    b, s, _ = q.shape
    kh = split_heads(k, heads, head_dim)
    vh = split_heads(v, heads, head_dim)
    if past is not None:
        kh = torch.cat([past[0], kh], dim=2)
        vh = torch.cat([past[1], vh], dim=2)
    probs = F.softmax(attention_scores(split_heads(q, heads, head_dim), kh, mask, causal, scale), dim=-1)
    ctx = torch.matmul(probs, vh).transpose(1, 2).reshape(b, s, heads * head_dim)
    return ctx, (kh, vh)


def split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(B, S, heads*head_dim) -> (B, heads, S, head_dim)."""
    return x.reshape(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)


def attention_scores(qh: torch.Tensor, kh: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                     scale: float) -> torch.Tensor:
    """The masked attention scores (B, heads, S, T) of query heads ``qh`` (B,
    heads, S, head_dim) against key heads ``kh`` (B, heads, T, head_dim).

    ``mask`` (B, T) or (B, S) is 1 for valid keys (a mask shorter than T covers
    the newest keys; cached ones count as valid). Query i sits at absolute
    position T - S + i; with ``causal`` it sees keys 0 .. T - S + i. Excluded
    scores are set to the most negative float, so a row with no valid key
    becomes uniform under softmax (as in HF transformers) instead of NaN.
    """
    b, s, t = qh.shape[0], qh.shape[2], kh.shape[2]
    scores = torch.matmul(qh, kh.transpose(-2, -1)) * scale
    allowed = None
    if mask is not None:
        valid = mask.to(scores.device) != 0
        if valid.shape[-1] < t:
            pad = torch.ones(b, t - valid.shape[-1], dtype=torch.bool, device=valid.device)
            valid = torch.cat([pad, valid], dim=-1)
        elif valid.shape[-1] > t:
            raise ValueError(f"attention mask covers {valid.shape[-1]} keys but there are only {t}")
        allowed = valid[:, None, None, :]
    if causal:
        tri = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril(diagonal=t - s)
        allowed = tri[None, None] if allowed is None else allowed & tri[None, None]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return scores


# ----------------------------------------------------------------------------- ops


def _op_quantize(node: Node, x, ctx):
    (x,) = x
    return x  # identity in float: the quantizer gives the output a format later


def _op_embedding(node: Node, args, ctx):
    ids, table = args
    if node.attrs.get("positions", False):
        # Rows arange(S) offset by the cache position, broadcast over the batch.
        s = ids.shape[-1]
        pos = torch.arange(ctx.offset, ctx.offset + s, device=table.device)
        if ctx.offset + s > table.shape[0]:
            raise ValueError(f"node '{node.name}': positions {ctx.offset}..{ctx.offset + s - 1} exceed "
                             f"the {table.shape[0]}-row position table")
        return table[pos].expand(*ids.shape, table.shape[-1])
    return table[ids.long()]


def _op_linear(node: Node, args, ctx):
    x, w = args[0], args[1]
    y = torch.matmul(x, w)
    if len(args) > 2 and args[2] is not None:
        y = y + args[2]
    return y


def _op_attention(node: Node, args, ctx):
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else None
    a = node.attrs
    use_cache = bool(a.get("kv_cache", False)) and ctx.state is not None
    past = ctx.state.kv.get(node.name) if use_cache else None
    out, kv = attention_float(q, k, v, mask, int(a["heads"]), int(a["head_dim"]), bool(a["causal"]),
                              float(a["scale"]), past)
    if use_cache:
        ctx.new_kv[node.name] = kv
    return out


def _op_layernorm(node: Node, args, ctx):
    x, gamma, beta = args
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, float(node.attrs["eps"]))


def _op_gelu(node: Node, args, ctx):
    return F.gelu(args[0], approximate=node.attrs.get("approximate", "none"))


def _op_relu(node: Node, args, ctx):
    return torch.relu(args[0])


def _op_add(node: Node, args, ctx):
    return args[0] + args[1]


def _op_mean_pool(node: Node, args, ctx):
    # sentence-transformers mean pooling: sum over valid positions / count (count >= 1e-9).
    x, mask = args
    m = (mask != 0).to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / torch.clamp(m.sum(dim=1), min=1e-9)


#: op name -> float semantics ``fn(node, inputs, ctx) -> tensor``
FLOAT_OPS: dict[str, Callable] = {
    "quantize": _op_quantize,
    "embedding": _op_embedding,
    "linear": _op_linear,
    "attention": _op_attention,
    "layernorm": _op_layernorm,
    "gelu": _op_gelu,
    "relu": _op_relu,
    "add": _op_add,
    "mean_pool": _op_mean_pool,
}


# ----------------------------------------------------------------------------- runner


def _as_tensor(value, dtype: str, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as e:
            raise ValueError(f"feed '{name}' cannot be converted to a tensor: {e}") from None
    if dtype == "index":
        if t.is_floating_point():
            t = t.round()
        t = t.to(torch.long)
    else:
        t = t.to(torch.float32)
    return t.to(device)


def _check_shape(name: str, t: torch.Tensor, shape: tuple, bound: dict) -> None:
    if t.dim() != len(shape):
        raise ValueError(f"feed '{name}' has shape {list(t.shape)}; the graph expects {list(shape)}")
    for got, want in zip(t.shape, shape):
        if isinstance(want, str):
            if bound.setdefault(want, got) != got:
                raise ValueError(f"feed '{name}' has shape {list(t.shape)}: dimension '{want}' is "
                                 f"{got} here but {bound[want]} in another input")
        elif int(want) != got:
            raise ValueError(f"feed '{name}' has shape {list(t.shape)}; the graph expects {list(shape)}")


def _check_float_graph(graph: Graph) -> None:
    for t in graph.tensors.values():
        if t.kind == "weight" and t.dtype != "float":
            raise ValueError(f"run_float runs float graphs; weight '{t.name}' is {t.dtype} "
                             "(run a quantized graph with the golden model)")


def _input_env(graph: Graph, feeds: Mapping[str, np.ndarray | torch.Tensor], dev: torch.device
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The graph inputs of one feed as tensors (checked: present, shaped as
    declared, symbolic dimensions consistent) and the symbolic dimensions bound."""
    missing = [n for n in graph.inputs if n not in feeds]
    if missing:
        raise ValueError(f"missing feed(s) {missing}; graph '{graph.name}' takes inputs {graph.inputs}")
    env: dict[str, torch.Tensor] = {}
    bound: dict[str, int] = {}
    for name in graph.inputs:
        spec = graph.tensors[name]
        t = _as_tensor(feeds[name], spec.dtype, name, dev)
        _check_shape(name, t, spec.shape, bound)
        env[name] = t
    return env, bound


def run_float(graph: Graph, feeds: Mapping[str, np.ndarray | torch.Tensor],
              state: FloatState | None = None, record: bool = False,
              device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Run a float graph in torch float32 and return its outputs by name.

    ``feeds`` maps every graph input to an array (index inputs are cast to int64,
    float ones to float32). With ``state`` attention nodes with ``kv_cache=True``
    attend to (and extend) the cached keys/values and positions start at
    ``state.offset``, which advances by this call's sequence length. With ``record``
    the result holds every input and activation tensor, keyed by tensor name.
    Runs under ``torch.no_grad()``.
    """
    _check_float_graph(graph)
    dev = torch.device(device)
    env, bound = _input_env(graph, feeds, dev)
    env.update(_weight_env(graph, graph.nodes, dev))
    seq = bound.get("S")
    if seq is None:
        first = env[graph.inputs[0]] if graph.inputs else None
        seq = int(first.shape[1]) if first is not None and first.dim() >= 2 else 0
    ctx = _RunContext(state=state, offset=state.offset if state is not None else 0, device=dev)
    _run_nodes(graph.nodes, env, ctx)
    if state is not None:
        state.kv.update(ctx.new_kv)
        state.offset += seq
    if record:
        return {k: v for k, v in env.items() if k not in graph.weights}
    return {name: env[name] for name in graph.outputs}


def _weight_env(graph: Graph, nodes: list[Node], dev: torch.device) -> dict[str, torch.Tensor]:
    """The weights ``nodes`` read, as float32 tensors on ``dev``."""
    names = {t for node in nodes for t in node.inputs if t in graph.weights}
    return {n: torch.from_numpy(np.ascontiguousarray(graph.weights[n], dtype=np.float32)).to(dev)
            for n in names}


def _run_nodes(nodes: list[Node], env: dict[str, torch.Tensor], ctx: _RunContext) -> None:
    """Run ``nodes`` in order on ``env`` (values by name), adding their outputs."""
    with torch.no_grad():
        for node in nodes:
            fn = FLOAT_OPS.get(node.op)
            if fn is None:
                raise ValueError(f"node '{node.name}': op '{node.op}' has no float semantics")
            env[node.outputs[0]] = fn(node, [env[n] if n else None for n in node.inputs], ctx)


def run_float_from(graph: Graph, recorded: Mapping[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
    """Rerun a float graph (no decoder state) from its node ``start`` on, every
    value before that node read from ``recorded``: a ``run_float(g, feeds,
    record=True)`` environment of a graph ``g`` that differs from ``graph`` at
    most in the weights of nodes ``start`` and later. Gives exactly what
    ``run_float(graph, feeds, record=True)`` gives, without recomputing the
    unchanged prefix (pruning one linear at a time)."""
    _check_float_graph(graph)
    if not 0 <= start <= len(graph.nodes):
        raise ValueError(f"start node {start} is not in 0 .. {len(graph.nodes)}")
    env = dict(recorded)
    dev = next(iter(recorded.values())).device if recorded else torch.device("cpu")
    env.update(_weight_env(graph, graph.nodes[start:], dev))
    _run_nodes(graph.nodes[start:], env, _RunContext(state=None, offset=0, device=dev))
    return {k: v for k, v in env.items() if k not in graph.weights}


def run_float_ordered(graph: Graph, feeds: list[Mapping[str, np.ndarray | torch.Tensor]],
                      before: Callable[[Node, list[dict[str, torch.Tensor]]], None] | None = None
                      ) -> list[dict[str, torch.Tensor]]:
    """Run a float graph (no decoder state) over several ``feeds`` at once, node
    by node, keeping every feed's values: returns one environment per feed (every
    input and activation tensor by name, as ``run_float(record=True)``).

    ``before(node, envs)`` is called before each node runs, with the values of
    every node before it in all the environments. It may change
    ``graph.weights`` (each node reads its weights when it runs) and the values
    in ``envs`` (later nodes read them). This is the one pass that layer-wise
    reconstruction needs: fit a linear on the inputs it sees in the graph as
    changed so far, then run it."""
    _check_float_graph(graph)
    dev = torch.device("cpu")
    envs = [_input_env(graph, feed, dev)[0] for feed in feeds]
    with torch.no_grad():
        for node in graph.nodes:
            fn = FLOAT_OPS.get(node.op)
            if fn is None:
                raise ValueError(f"node '{node.name}': op '{node.op}' has no float semantics")
            if before is not None:
                before(node, envs)
            weights = _weight_env(graph, [node], dev)
            for env in envs:
                ctx = _RunContext(state=None, offset=0, device=dev)
                env[node.outputs[0]] = fn(node, [(env[t] if t in env else weights[t]) if t else None
                                                 for t in node.inputs], ctx)
    return envs
