"""Quantization-aware training with a forward that *is* the golden model.

Straight-through fake quantization, made exact: each training step

1. re-quantizes the float shadow weights with the frozen activation formats
   (:func:`hwgen.quant.quantize_weights`, the same pass ``hwgen quantize``
   runs) and executes that fixed graph with :class:`~hwgen.golden.GoldenModel`,
   recording every tensor's integer codes;
2. runs the float semantics of each op (:data:`hwgen.float_exec.FLOAT_OPS`)
   in torch float64 on straight-through weights ``w + (dequant(codes(w)) - w).detach()``
   and on the previous ops' outputs;
3. replaces each op's float output by the exact dequantized golden value while
   keeping the float op's gradient (:class:`_ReplaceValue`).

So the forward values are the golden model's, bit for bit, by construction
(``tests/test_qat.py`` checks every tensor), and gradients are the usual
straight-through ones. :meth:`QATModel.export` gives the fixed graph of the
current weights.

Pruning (:mod:`hwgen.prune`): :meth:`QATModel.set_masks` fixes weights to exactly 0
where a keep mask is False: the forward uses ``p * mask`` (so pruned weights get no
gradient and quantize to code 0), and :func:`finetune` takes a ``before_step`` hook
through which a gradual schedule (:class:`hwgen.prune.GradualPruner`) raises
sparsity as training goes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from .float_exec import FLOAT_OPS, _RunContext
from .golden import GoldenModel, check_feeds, dequantize
from .ir import Graph
from .quant import ActFormat, QuantConfig, linear_row_shift, quantize_weights


class _ReplaceValue(torch.autograd.Function):
    """Forward: the exact value. Backward: the gradient of the float surrogate."""

    @staticmethod
    def forward(ctx, surrogate: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        return exact.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def dequantize_weight(graph: Graph, name: str) -> np.ndarray:
    """Real values of a weight's codes, undoing a linear's row pre-scaling."""
    real = dequantize(graph, name, graph.weights[name])
    for node in graph.consumers(name):
        if node.op == "linear" and node.inputs[1] == name:
            real = np.ldexp(real, -linear_row_shift(graph, node)[:, None])
    return real


def embedding_tables(graph: Graph) -> set[str]:
    """The names of ``graph``'s embedding tables (frozen in QAT and in the float
    distillation stage unless their ``train_embeddings``)."""
    return {n.inputs[1] for n in graph.nodes if n.op == "embedding"}


@dataclass
class StepResult:
    outputs: dict[str, torch.Tensor]       # dequantized golden values, differentiable
    codes: dict[str, np.ndarray]           # every tensor's golden codes
    fixed: Graph                           # the fixed graph this step executed
    values: dict[str, torch.Tensor] | None = None  # every tensor, differentiable (distillation)


class QATModel(torch.nn.Module):
    """Float shadow weights of a (folded) float graph with frozen activation formats.

    Linear, layernorm and (with ``train_embeddings``) embedding weights are
    trained; frozen weights keep their float values and are quantized each
    step like the others.
    """

    def __init__(self, float_graph: Graph, fmts: dict[str, ActFormat], cfg: QuantConfig,
                 train_embeddings: bool = False):
        super().__init__()
        self.graph = float_graph
        self.fmts = fmts
        self.cfg = cfg
        frozen = set() if train_embeddings else embedding_tables(float_graph)
        self.names = sorted(set(float_graph.weights) - frozen)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(float_graph.weights[n].astype(np.float64)))
            for n in self.names)
        self.masks: dict[str, np.ndarray] = {}

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        """Keep masks (weight name -> bool array, False = pruned to exactly 0)."""
        for name, m in masks.items():
            if name not in self.graph.weights or self.graph.weights[name].shape != m.shape:
                raise ValueError(f"mask for '{name}' does not match a weight of the graph")
        self.masks = {k: np.asarray(v, dtype=bool) for k, v in masks.items()}

    def _masked(self, name: str, p: torch.Tensor) -> torch.Tensor:
        m = self.masks.get(name)
        return p if m is None else p * torch.from_numpy(m.astype(np.float64))

    def float_weights(self) -> dict[str, np.ndarray]:
        """The current float weights as the forward sees them (masks applied)."""
        ws = {n: self._masked(n, p.detach()).numpy().astype(np.float32)
              for n, p in zip(self.names, self.weights)}
        for n, m in self.masks.items():
            if n not in ws:
                ws[n] = np.where(m, self.graph.weights[n], 0).astype(np.float32)
        return ws

    def current_float_graph(self) -> Graph:
        return self.graph.with_weights(self.float_weights())

    def export(self) -> Graph:
        """The fixed graph of the current weights (what `hwgen quantize` saves)."""
        return quantize_weights(self.current_float_graph(), self.fmts, self.cfg)

    def step(self, feed: dict[str, np.ndarray]) -> StepResult:
        fixed = self.export()
        codes = GoldenModel(fixed)(feed, record=True)
        feed = check_feeds(fixed, feed)
        vals: dict[str, torch.Tensor] = {}
        for name in fixed.inputs:
            v = torch.from_numpy(np.asarray(feed[name]))
            vals[name] = v.to(torch.float64) if fixed.tensors[name].dtype == "float" else v
        trained = dict(zip(self.names, self.weights))
        for name in fixed.weights:
            exact = torch.from_numpy(dequantize_weight(fixed, name))
            p = trained.get(name)
            if p is not None:
                p = self._masked(name, p)
            vals[name] = exact if p is None else p + (exact - p).detach()
        ctx = _RunContext(state=None, offset=0, device=torch.device("cpu"))
        for node in fixed.nodes:
            args = [vals[t] if t else None for t in node.inputs]
            y = FLOAT_OPS[node.op](node, args, ctx)
            out = node.outputs[0]
            exact = torch.from_numpy(dequantize(fixed, out, codes[out]))
            vals[out] = _ReplaceValue.apply(y.to(torch.float64), exact)
        return StepResult({n: vals[n] for n in fixed.outputs}, codes, fixed, vals)


#: learning-rate schedules of :func:`adam_steps`
LR_SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str) -> None:
    """Refuse a learning-rate schedule that is not one of :data:`LR_SCHEDULES`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"learning-rate schedule {schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")


def lr_at(lr: float, i: int, steps: int, schedule: str = "constant") -> float:
    """The learning rate of step ``i`` of ``steps``: ``lr`` throughout
    (``constant``), or ``lr`` decayed along half a cosine to 0 after the last
    step (``cosine``: ``lr * (1 + cos(pi * i / steps)) / 2``)."""
    check_schedule(schedule)
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * i / steps))


def adam_steps(params, feeds: list[dict[str, np.ndarray]],
               loss_of: Callable[[dict[str, np.ndarray]], torch.Tensor], steps: int, lr: float,
               progress: Callable[[int, float], None] | None = None,
               before_step: Callable[[int], None] | None = None, schedule: str = "constant",
               after_step: Callable[[int], None] | None = None) -> list[float]:
    """The one training loop of QAT and distillation: ``steps`` Adam steps on
    ``params``, step ``i`` on ``feeds[i % len(feeds)]`` with the loss
    ``loss_of(feed)`` at learning rate :func:`lr_at`; ``before_step(i)`` runs
    first (a pruning schedule), ``after_step(i)`` after the update (a weight
    average), ``progress(i + 1, loss)`` last. Returns the losses."""
    if steps and not feeds:
        raise ValueError(f"{steps} training step(s) need at least one input batch")
    check_schedule(schedule)                         # before any step
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for i in range(steps):
        if before_step:
            before_step(i)
        for group in opt.param_groups:
            group["lr"] = lr_at(lr, i, steps, schedule)
        opt.zero_grad()
        loss = loss_of(feeds[i % len(feeds)])
        loss.backward()
        opt.step()
        if after_step:
            after_step(i)
        losses.append(float(loss.detach()))
        if progress:
            progress(i + 1, losses[-1])
    return losses


def finetune(model: QATModel, feeds: Iterable[dict[str, np.ndarray]],
             loss_fn: Callable[[dict[str, np.ndarray], StepResult], torch.Tensor],
             steps: int, lr: float = 2e-5,
             progress: Callable[[int, float], None] | None = None,
             before_step: Callable[[int], None] | None = None) -> list[float]:
    """``steps`` Adam steps of ``loss_fn(feed, step_result)``; returns the losses.
    ``before_step(i)`` runs before step ``i`` (0-based), e.g. a pruning schedule."""
    return adam_steps(model.parameters(), list(feeds), lambda f: loss_fn(f, model.step(f)), steps, lr,
                      progress, before_step)
