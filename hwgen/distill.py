"""Knowledge distillation: a quantized (optionally pruned) student trained against a float teacher.

The teacher is the float graph of the model itself (MiniLM: the pretrained
float model; any graph the frontend traces). The student is the same graph with
its weights being trained, in two stages that share one loss
(:class:`DistillLoss`):

1. **float stage** (:class:`FloatStudent`, :func:`distill_float`): a
   differentiable float forward (the float executor's op semantics,
   :data:`hwgen.float_exec.FLOAT_OPS`) with pruning masks applied, cheap enough
   for hundreds of steps on a CPU; a gradual pruning schedule runs here;
   optionally with the quantized graph's weight and activation rounding in
   its forward (:mod:`hwgen.fake_quant`, approximate, straight-through);
2. **QAT stage** (:func:`distill_qat`): the same loss on
   :class:`hwgen.qat.QATModel`, whose forward *is* the golden model of the
   quantized student (fake quantization in the loop, bit for bit), masks kept.

Loss = ``out_weight`` x output term + ``hidden_weight`` x mean over transformer
blocks of the normalized hidden-state error. Output term: ``1 - cosine`` per
output vector (encoders: sentence embeddings; blocks), or for decoders the
KL divergence of the student's next-byte distribution from the teacher's at
``temperature`` (x T^2). Hidden states: each block's output tensor (the last
node of that layer), ``||s - t||^2 / ||t||^2`` over valid positions (a ``mask``
input's padding left out). Optional finer terms (``linear_weight``,
``attention_weight``): every linear's output inside the blocks, the same
normalized error, and every attention's distributions, KL of the student's
from the teacher's. Teacher values are computed once per feed.

The tiny-gpt student with half the layers is a different module (fewer
blocks), trained by ``models/distill_tiny_gpt_student.py`` with
:func:`kd_logits` and :func:`hidden_mse` from here.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .devices import default_device, torch_device
from .float_exec import FLOAT_OPS, _RunContext, attention_scores, run_float, split_heads
from .ir import Graph
from .qat import LR_SCHEDULES, embedding_tables

if TYPE_CHECKING:
    from .fake_quant import FakeQuant


class DistillError(ValueError):
    """A distillation request that cannot run; the message names the setting."""


#: bytes of teacher values a :class:`DistillLoss` keeps between the steps that
#: revisit a batch (MiniLM distilled on the shipped sentences, keeping every
#: batch, was killed for memory at 13 GB)
TEACHER_CACHE_BYTES = 1 << 30

#: the float distillation stage's default (peak) Adam learning rate (``--distill-lr``)
DISTILL_LR = 1e-4

#: the float stage's matmul precisions (``--distill-precision``): ``fp32``, or
#: ``bf16`` (torch autocast: matmuls in bfloat16, weights, optimizer state,
#: teacher and loss in float32)
FLOAT_PRECISIONS = ("fp32", "bf16")

#: ``--distill-group-by-length``: sentences are sorted by token count within
#: runs of this many sentences (64 batches), then batched and the batches shuffled
GROUP_SENTENCES = 1024


def check_precision(precision: str) -> None:
    if precision not in FLOAT_PRECISIONS:
        raise DistillError(f"--distill-precision {precision}: expected one of {', '.join(FLOAT_PRECISIONS)}")


def autocast(device: torch.device, precision: str):
    """The context the float student's forward runs in: nothing for ``fp32``;
    for ``bf16`` torch autocast on ``device``'s type (matmuls in bfloat16)."""
    import contextlib

    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------
# loss terms (also used by models/distill_tiny_gpt_student.py)
# ----------------------------------------------------------------------------

def kd_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softmax distributions at ``temperature``,
    times T^2, averaged over positions (last axis = classes)."""
    t = temperature
    s = F.log_softmax(student.reshape(-1, student.shape[-1]) / t, dim=-1)
    p = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]).to(s.dtype) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``||s - t||^2 / ||t||^2`` over the rows (last axis = features) where ``valid``."""
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1]).to(s.dtype)
    if valid is not None:
        v = valid.reshape(-1).bool().to(s.device)
        s, t = s[v], t[v]
    return ((s - t) ** 2).sum() / (t * t).sum().clamp_min(1e-12)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1]).to(s.dtype)
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def attention_kl(q: torch.Tensor, k: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, node,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the attention distributions of attention
    ``node`` (its heads, scale and causality; ``mask`` (B, S), 1 = valid, is
    its key mask input, :func:`hwgen.float_exec.attention_scores`): the
    student's projected ``q``, ``k`` against the teacher's ``q_t``, ``k_t``
    (B, S, heads*head_dim), summed over keys and averaged over heads and the
    valid queries."""
    a = node.attrs
    h, d, causal, scale = int(a["heads"]), int(a["head_dim"]), bool(a["causal"]), float(a["scale"])

    def log_probs(qq, kk):
        return F.log_softmax(attention_scores(split_heads(qq, h, d), split_heads(kk, h, d), mask, causal,
                                              scale), dim=-1)

    ls = log_probs(q, k)
    lt = log_probs(q_t.to(q.dtype), k_t.to(k.dtype))
    pt = lt.exp()
    kl = torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(pt)).sum(-1)    # (B, heads, S)
    if mask is None:
        return kl.mean()
    w = (mask.to(kl.device) != 0).to(kl.dtype)[:, None, :].expand_as(kl)
    return (kl * w).sum() / w.sum().clamp_min(1)


def layer_outputs(graph: Graph) -> list[str]:
    """Each transformer block's output tensor: the output of the last node of
    each layer index, in layer order."""
    last: dict[int, str] = {}
    for node in graph.nodes:
        if node.layer is not None:
            last[node.layer] = node.outputs[0]
    return [last[i] for i in sorted(last)]


@dataclass
class DistillLoss:
    """The distillation objective for one graph (see the module docstring).

    Two optional finer terms supervise the inside of each block too:
    ``linear_weight`` x the mean over the blocks' linears of each output's
    :func:`hidden_mse`, and ``attention_weight`` x the mean over attention
    nodes of :func:`attention_kl` (TinyBERT / MiniLM-style attention
    distillation: the query/key projections get a direct signal).

    The teacher's values of a batch are kept (float32, as the float executor
    computes them) up to ``cache_bytes`` in all; a batch beyond that is rerun
    each time it comes round, which gives the same values, so the budget
    changes the time, not the losses."""

    graph: Graph                 # the teacher's float graph (folded, unpruned)
    kind: str                    # "encoder" | "decoder" | "block"
    out_weight: float = 1.0
    hidden_weight: float = 1.0
    temperature: float = 1.0
    cache_bytes: int = TEACHER_CACHE_BYTES
    device: str | torch.device = "cpu"   # where the teacher runs and its values are kept
    linear_weight: float = 0.0
    attention_weight: float = 0.0

    def __post_init__(self):
        if self.kind not in ("encoder", "decoder", "block"):
            raise DistillError(f"model kind {self.kind!r}: distillation supports encoder, decoder, block")
        self.hidden = layer_outputs(self.graph)
        self.out = self.graph.outputs[0]
        self.linears = [n.outputs[0] for n in self.graph.nodes if n.op == "linear" and n.layer is not None]
        self.attentions = [n for n in self.graph.nodes if n.op == "attention"]
        kept = [self.out, *self.hidden]
        if self.linear_weight:
            kept += self.linears
        if self.attention_weight:
            kept += [t for n in self.attentions for t in n.inputs[:2]]
        self._kept = list(dict.fromkeys(kept))
        self._teacher: dict[int, dict[str, torch.Tensor]] = {}
        self.cached_bytes = 0

    def teacher(self, feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Teacher values (output and block outputs) of ``feed`` in float64,
        kept for the next time while the cache has room (``cache_bytes``)."""
        vals = self._teacher.get(id(feed))
        if vals is None:
            run = run_float(self.graph, feed, record=True, device=self.device)
            vals = {n: run[n].detach() for n in self._kept}
            size = sum(t.numel() * t.element_size() for t in vals.values())
            if self.cached_bytes + size <= self.cache_bytes:
                self._teacher[id(feed)] = vals
                self.cached_bytes += size
        return {n: t.to(torch.float64) for n, t in vals.items()}

    @property
    def cached_batches(self) -> int:
        """How many batches' teacher values are kept."""
        return len(self._teacher)

    def __call__(self, feed: dict[str, np.ndarray], values: dict[str, torch.Tensor]) -> torch.Tensor:
        t = self.teacher(feed)
        s_out = values[self.out]
        if self.kind == "decoder":
            out = kd_logits(s_out, t[self.out], self.temperature)
        else:
            out = cosine_loss(s_out, t[self.out])
        loss = self.out_weight * out
        valid = torch.as_tensor(np.asarray(feed["mask"]) != 0) if "mask" in feed else None
        if self.hidden_weight and self.hidden:
            h = sum(hidden_mse(values[n], t[n], valid) for n in self.hidden) / len(self.hidden)
            loss = loss + self.hidden_weight * h
        if self.linear_weight and self.linears:
            lin = sum(hidden_mse(values[n], t[n], valid) for n in self.linears) / len(self.linears)
            loss = loss + self.linear_weight * lin
        if self.attention_weight and self.attentions:
            att = sum(attention_kl(values[n.inputs[0]], values[n.inputs[1]], t[n.inputs[0]], t[n.inputs[1]],
                                   n, values[n.inputs[3]] if len(n.inputs) > 3 and n.inputs[3] else None)
                      for n in self.attentions) / len(self.attentions)
            loss = loss + self.attention_weight * att
        return loss

    def qat(self) -> Callable:
        """The loss in :func:`hwgen.qat.finetune`'s ``loss_fn(feed, step)`` form."""
        return lambda feed, step: self(feed, step.values)


# ----------------------------------------------------------------------------
# float stage
# ----------------------------------------------------------------------------

class FloatStudent(torch.nn.Module):
    """Trainable float weights of a float graph, with keep masks (False = 0).

    ``forward(feed)`` runs the float op semantics differentiably and returns
    every tensor by name. Embedding tables are frozen (as in QAT); with
    ``trainable`` (weight tensor names) everything else is frozen too. The
    weights, masks and the forward live on ``device`` (a torch device:
    ``cuda`` trains on the GPU); :meth:`float_weights` hands them back as
    NumPy arrays. With ``fake_quant`` (a :class:`hwgen.fake_quant.FakeQuant`
    of this graph) the forward rounds linear weights and op outputs (embedding
    outputs: to their tables' formats) as the quantized graph does, with
    straight-through gradients; the weights themselves stay float."""

    def __init__(self, graph: Graph, masks: dict[str, np.ndarray] | None = None,
                 train_embeddings: bool = False, trainable: Iterable[str] | None = None,
                 device: str | torch.device = "cpu", fake_quant: "FakeQuant | None" = None):
        super().__init__()
        self.graph = graph
        self.device = torch.device(device)
        self.fake_quant = fake_quant
        frozen = set() if train_embeddings else embedding_tables(graph)
        if trainable is not None:
            unknown = set(trainable) - set(graph.weights)
            if unknown:
                raise DistillError(f"trainable weight(s) {sorted(unknown)[:3]} are not weights of the graph")
            frozen |= set(graph.weights) - set(trainable)
        self.names = sorted(set(graph.weights) - frozen)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(self._tensor(graph.weights[n])) for n in self.names)
        self._frozen = {n: self._tensor(graph.weights[n]) for n in frozen}
        self.masks: dict[str, np.ndarray] = {}
        if masks:
            self.set_masks(masks)

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        for name, m in masks.items():
            if name not in self.graph.weights or self.graph.weights[name].shape != m.shape:
                raise DistillError(f"mask for '{name}' does not match a weight of the graph")
        self.masks = {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
        self._mask_t = {k: self._tensor(v) for k, v in self.masks.items()}

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        """A float32 copy of ``a`` on the student's device."""
        return torch.from_numpy(np.array(a, dtype=np.float32)).to(self.device)

    def _w(self, name: str, p: torch.Tensor) -> torch.Tensor:
        m = getattr(self, "_mask_t", {}).get(name)
        return p if m is None else p * m

    def float_weights(self) -> dict[str, np.ndarray]:
        """Current weights, masks applied (float32)."""
        return {n: self._w(n, p.detach()).cpu().numpy().copy() for n, p in zip(self.names, self.weights)}

    def current_graph(self) -> Graph:
        """A float graph holding the current (masked) weights."""
        return self.graph.with_weights(self.float_weights())

    def forward(self, feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        vals: dict[str, torch.Tensor] = {}
        for name in self.graph.inputs:
            v = torch.from_numpy(np.asarray(feed[name])).to(self.device)
            vals[name] = v.to(torch.float32) if self.graph.tensors[name].dtype == "float" else v.long()
        for name, p in zip(self.names, self.weights):
            vals[name] = self._w(name, p)
        vals.update(self._frozen)
        fq = self.fake_quant
        if fq is not None:
            for name in self.graph.weights:
                vals[name] = fq.weight(name, vals[name])
        ctx = _RunContext(state=None, offset=0, device=self.device)
        for node in self.graph.nodes:
            args = [vals[t] if t else None for t in node.inputs]
            y = FLOAT_OPS[node.op](node, args, ctx)
            vals[node.outputs[0]] = y if fq is None else fq.act(node.outputs[0], y)
        return vals


def check_ema(decay: float) -> None:
    if not 0 <= decay < 1:
        raise DistillError(f"--distill-ema {decay}: the decay must be in [0, 1) (0: no average)")


class WeightEMA:
    """An exponential moving average of parameters (Polyak averaging): after
    each step ``avg <- decay * avg + (1 - decay) * p``, starting at the
    parameters' values; :meth:`copy_to_params` puts the averages in their place.
    The average of a noisy small-batch trajectory lies nearer the minimum than
    its last point; ``1 / (1 - decay)`` steps is its window."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        check_ema(decay)
        self.params = list(params)
        self.decay = decay
        self.avg = [p.detach().clone() for p in self.params]

    def update(self, i: int = 0) -> None:
        with torch.no_grad():
            for a, p in zip(self.avg, self.params):
                a.lerp_(p.detach(), 1.0 - self.decay)

    def copy_to_params(self) -> None:
        with torch.no_grad():
            for a, p in zip(self.avg, self.params):
                p.copy_(a)

    @contextlib.contextmanager
    def applied(self):
        """The averages in the parameters' place for the ``with`` block, then
        the parameters back as they were (training goes on from them)."""
        saved = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for s, p in zip(saved, self.params):
                    p.copy_(s)


def distill_float(student: FloatStudent, feeds: Iterable[dict[str, np.ndarray]], loss: DistillLoss,
                  steps: int, lr: float = 1e-4, before_step: Callable[[int], None] | None = None,
                  progress: Callable[[int, float], None] | None = None,
                  schedule: str = "constant", precision: str = "fp32", ema: float = 0.0,
                  checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0) -> list[float]:
    """``steps`` Adam steps of the distillation loss on the float student, the
    learning rate by ``schedule`` (:func:`hwgen.qat.lr_at`); ``before_step(i)``
    runs first (a pruning schedule). ``precision``: the student's forward (and
    so its backward) under :func:`autocast`; the loss is taken outside it.
    ``ema`` > 0: the student ends with the :class:`WeightEMA` of its weights at
    that decay instead of the last step's (masks apply to it as to them).
    ``checkpoint(n)`` runs after every ``checkpoint_every``-th step ``n`` short
    of the last, with the student holding the weights it would end with if it
    stopped there (the average with ``ema``); training then goes on from its
    own weights. Returns the losses."""
    feeds = list(feeds)
    if not feeds:
        raise DistillError("distillation needs at least one input batch")
    check_precision(precision)
    from .qat import adam_steps

    def loss_of(feed):
        with autocast(student.device, precision):
            values = student(feed)
        return loss(feed, values)

    average = WeightEMA(student.parameters(), ema) if ema else None

    def after_step(i: int) -> None:
        if average:
            average.update(i)
        if checkpoint and checkpoint_every and (i + 1) % checkpoint_every == 0 and i + 1 < steps:
            with average.applied() if average else contextlib.nullcontext():
                checkpoint(i + 1)

    losses = adam_steps(student.parameters(), feeds, loss_of, steps, lr, progress, before_step,
                        schedule=schedule, after_step=after_step)
    if average:
        average.copy_to_params()
    return losses


# ----------------------------------------------------------------------------
# float student files (--distill-save / --distill-init)
# ----------------------------------------------------------------------------

#: the format tag of a float student file
STUDENT_FORMAT = "hwgen-float-student/1"


def student_weights(graph: Graph, embeddings: bool = False) -> dict[str, np.ndarray]:
    """The weights a float student file holds: every weight of ``graph`` but the
    embedding tables (most of MiniLM's bytes), which it holds too when they
    were trained (``embeddings``)."""
    frozen = set() if embeddings else embedding_tables(graph)
    return {k: np.asarray(v, dtype=np.float32) for k, v in graph.weights.items() if k not in frozen}


def save_student(path: str | os.PathLike, graph: Graph, info: dict) -> None:
    """Write the float student ``graph``'s weights (:func:`student_weights`,
    masks applied; with the embedding tables when ``info["embeddings"]``) and
    ``info`` (JSON: model, prune, steps, embeddings) to the ``.npz`` file
    ``path``, atomically: a half-written file never takes its name."""
    import json

    from .files import atomic_file

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, __hwgen__=np.array(json.dumps({"format": STUDENT_FORMAT, **info})),
                 **student_weights(graph, bool(info.get("embeddings"))))


def load_student(path: str | os.PathLike, graph: Graph, model: str) -> tuple[dict[str, np.ndarray], dict]:
    """The weights and info of a float student file, checked against ``graph``
    (the folded float graph it must fit: same weight names and shapes, float)
    and ``model`` (the name it was saved for); every refusal names the file and
    what is wrong with it. ``path`` may also be the output folder of an earlier
    ``hwgen quantize --out`` of this model: its student is recovered from the
    integer codes (:func:`student_from_fixed`)."""
    import json
    import zipfile

    where = f"--distill-init {os.fspath(path)}"
    if os.path.isdir(path):
        weights, info = _student_from_folder(path, graph, where)
        _check_student(weights, graph, where)
        return weights, info
    try:
        z = np.load(path, allow_pickle=False)
        weights = {}
        if isinstance(z, np.lib.npyio.NpzFile):     # a .npy file loads as one array: not a student
            with z:
                weights = {k: z[k] for k in z.files}
        info = json.loads(str(weights.pop("__hwgen__"))) if "__hwgen__" in weights else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # JSONDecodeError is a ValueError
        raise DistillError(f"{where}: cannot read it as a float student file ({e})") from None
    if not isinstance(info, dict):
        raise DistillError(f"{where}: not a float student file (saved by --distill-save)")
    if info.get("format") != STUDENT_FORMAT:
        raise DistillError(f"{where}: format {info.get('format')!r}, expected {STUDENT_FORMAT!r}")
    if info.get("model") != model:
        raise DistillError(f"{where}: saved for model {info.get('model')!r}, not {model!r}")
    _check_student(weights, graph, where)
    return {k: v.astype(np.float32) for k, v in weights.items()}, info


def _check_student(weights: dict[str, np.ndarray], graph: Graph, where: str) -> None:
    want = student_weights(graph, embeddings=bool(embedding_tables(graph) & set(weights)))
    if set(weights) != set(want):
        odd = sorted(set(weights) ^ set(want))
        raise DistillError(f"{where}: its weights are not the model's ({len(odd)} name(s) differ, "
                           f"e.g. {odd[0]!r})")
    for k, v in weights.items():
        if v.shape != want[k].shape or v.dtype.kind != "f":
            raise DistillError(f"{where}: weight {k!r} is {v.dtype} {v.shape}, the model's is "
                               f"float {want[k].shape}")
        if not np.all(np.isfinite(v)):
            raise DistillError(f"{where}: weight {k!r} holds non-finite values")


def student_from_fixed(fixed: Graph, embeddings: bool = False) -> dict[str, np.ndarray]:
    """The float weights a quantized graph was made from, as far as its codes
    tell (:func:`student_weights`' names; with ``embeddings`` the embedding
    tables too): each linear's weight codes at their per-column format with
    the row pre-scale of its input's per-channel format undone
    (:func:`hwgen.qat.dequantize_weight`), biases, layernorm parameters and
    tables at theirs. Each value is within half a code step of the float
    weight it was rounded from (a saturated one within its format's range)."""
    from .qat import dequantize_weight

    names = [t for node in fixed.nodes
             for t in ([node.inputs[1], fixed.node_input(node, "bias")] if node.op == "linear" else
                       node.inputs[1:3] if node.op == "layernorm" else
                       node.inputs[1:2] if node.op == "embedding" and embeddings else []) if t]
    return {t: dequantize_weight(fixed, t).astype(np.float32) for t in names}


def _student_from_folder(path, graph: Graph, where: str) -> tuple[dict[str, np.ndarray], dict]:
    """:func:`load_student` for a ``hwgen quantize --out`` folder."""
    from .ir import GraphError

    try:
        fixed = Graph.load(path)
    except GraphError as e:
        raise DistillError(f"{where}: {e}") from None
    if not fixed.meta.get("quantized"):
        raise DistillError(f"{where}: the graph in it is not quantized")
    if fixed.name != graph.name:
        raise DistillError(f"{where}: a graph of {fixed.name!r}, not {graph.name!r}")
    prune = fixed.meta.get("prune")
    info = {"format": "hwgen quantize --out", "model": fixed.meta.get("model"),
            "prune": prune.get("pattern") if isinstance(prune, dict) and prune.get("pattern") != "dense" else None,
            "steps": (fixed.meta.get("distill") or {}).get("float_steps"),
            "embeddings": bool((fixed.meta.get("distill") or {}).get("embeddings"))}
    weights = student_from_fixed(fixed, info["embeddings"])
    missing = sorted(set(student_weights(graph, info["embeddings"])) - set(weights))
    if missing:
        raise DistillError(f"{where}: its graph has no codes for weight {missing[0]!r}")
    return weights, info


def check_init_masks(path: str | os.PathLike, weights: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                     saved_prune: str | None, prune: str | None) -> None:
    """Refuse a saved student pruned otherwise than this run (``prune``, the
    pattern's name, against ``saved_prune``), or whose weights are nonzero where
    ``masks`` prune (other linears chosen): training from it would silently
    zero weights it relies on, or let its zeros grow back."""
    if saved_prune != prune:
        raise DistillError(f"--distill-init {os.fspath(path)}: saved with --prune {saved_prune or 'none'}, "
                           f"this run has --prune {prune or 'none'}; use the same --prune")
    for name, keep in masks.items():
        bad = int(np.count_nonzero(weights[name][~keep]))
        if bad:
            raise DistillError(f"--distill-init {os.fspath(path)}: weight {name!r} has {bad} nonzero "
                               "value(s) where this run's masks prune it (the file was saved with other "
                               "linears pruned); use the same --prune-layers / --prune-budget")


# ----------------------------------------------------------------------------
# the whole recipe
# ----------------------------------------------------------------------------

@dataclass
class DistillResult:
    fixed: Graph                          # the exported quantized student
    masks: dict[str, np.ndarray]          # final keep masks ({} without pruning)
    float_losses: list[float]
    qat_losses: list[float]
    schedule: list[float]                 # pruning fraction per float (or QAT) step
    teacher_cached: int = 0               # float stage: batches whose teacher values were kept
    float_student: Graph | None = None    # the float student after the float stage (None: no float stage)


def distill(float_graph: Graph, kind: str, calib_feeds: list[dict[str, np.ndarray]], cfg,
            spec=None, norms: dict[str, np.ndarray] | None = None, float_steps: int = 100,
            qat_steps: int = 0, lr: float = DISTILL_LR, qat_lr: float = 2e-5,
            train_feeds: list[dict[str, np.ndarray]] | None = None,
            hidden_weight: float = 1.0, say: Callable[[str], None] | None = None,
            start: Graph | None = None, masks: dict[str, np.ndarray] | None = None,
            names: list[str] | None = None, trainable: Iterable[str] | None = None,
            float_schedule: str = "constant", device: str | torch.device = "cpu",
            linear_weight: float = 0.0, attention_weight: float = 0.0,
            precision: str = "fp32", teacher_cache_bytes: int = TEACHER_CACHE_BYTES,
            float_ema: float = 0.0, train_embeddings: bool = False,
            fake_quant: bool = False, float_checkpoint: Callable[[int, Graph], None] | None = None,
            checkpoint_every: int = 0) -> DistillResult:
    """Prune (gradually over the float stage, else one-shot or gradually over
    QAT), distill in float, recalibrate, then distill with QAT; returns the
    quantized student. ``float_graph`` is the model's float graph (unfolded,
    as the frontend traces it): the teacher; ``train_feeds`` (default ``calib_feeds``) are the
    distillation inputs; calibration always uses ``calib_feeds``. ``start`` (a
    folded float graph, e.g. pruned and reconstructed) and fixed keep ``masks``
    replace the gradual schedule: the student starts there and keeps those zeros.
    ``names`` (weight names) restricts pruning to those linears (layer-selective);
    ``trainable`` (weight names) restricts the float stage's training to those;
    ``float_schedule``: the float stage's learning-rate schedule (:func:`hwgen.qat.lr_at`);
    ``device``: the torch device of the float stage (teacher and student; ``cuda``
    for long runs): the QAT stage, whose forward is the golden model, runs on the CPU;
    ``linear_weight``, ``attention_weight``: :class:`DistillLoss`'s finer terms;
    ``precision``: the float stage's matmuls (:func:`autocast`; the QAT stage is
    the golden model, exact); ``teacher_cache_bytes``: the float stage's teacher
    cache budget (:class:`DistillLoss`); ``float_ema``: the float stage ends with
    its weights' moving average at this decay (:class:`WeightEMA`; 0: the last step's);
    ``train_embeddings``: the float stage trains the embedding tables too
    (:class:`FloatStudent`; the QAT stage keeps them as they are then);
    ``fake_quant``: the float stage's forward rounds weights and activations
    as ``cfg`` does (:class:`hwgen.fake_quant.FakeQuant`, formats calibrated on
    the student as it starts); ``float_checkpoint(n, graph)``: called every
    ``checkpoint_every`` float steps (not after the last) with the step count and
    the float student's graph as it would end there (:func:`distill_float`)."""
    from . import prune as P
    from .qat import QATModel, finetune
    from .quant import prepare, quantize

    say = say or (lambda m: None)
    teacher = prepare(float_graph)
    device = torch.device(device)
    terms = dict(hidden_weight=hidden_weight, linear_weight=linear_weight, attention_weight=attention_weight)
    check_precision(precision)
    loss = DistillLoss(teacher, kind, device=device, cache_bytes=teacher_cache_bytes, **terms)
    feeds = train_feeds if train_feeds is not None else calib_feeds
    fixed_masks = masks is not None
    masks = dict(masks) if masks else {}
    schedule: list[float] = []
    f_losses: list[float] = []
    teacher_cached = 0
    student_graph = teacher if start is None else start
    if float_steps:
        fq = None
        if fake_quant:
            from .fake_quant import FakeQuant
            say("calibrating the student for the float stage's fake quantization")
            fq = FakeQuant(quantize(student_graph, calib_feeds, cfg)[0], device)
        st = FloatStudent(student_graph, masks or None, train_embeddings=train_embeddings, trainable=trainable,
                          device=device, fake_quant=fq)
        hook = None
        if spec is not None and not fixed_masks:
            hook = P.GradualPruner(st, spec, float_steps, norms, names=names)
        say(f"distill (float): {float_steps} step(s), lr {lr}"
            + (f", on {device}" if device.type != "cpu" else "")
            + (f", {precision} matmuls" if precision != "fp32" else "")
            + (f" ({float_schedule})" if float_schedule != "constant" else "")
            + (f", weights averaged (EMA {float_ema})" if float_ema else "")
            + (", embedding tables trained" if train_embeddings else "")
            + (f", {cfg.name} fake quantization" if fake_quant else "")
            + (f", pruning {spec.name} gradually" if hook is not None else "")
            + (f", {spec.name} masks fixed" if spec is not None and fixed_masks else ""))
        f_losses = distill_float(st, feeds, loss, float_steps, lr=lr, before_step=hook, schedule=float_schedule,
                                 precision=precision, ema=float_ema, checkpoint_every=checkpoint_every,
                                 checkpoint=(lambda n: float_checkpoint(n, st.current_graph()))
                                 if float_checkpoint else None,
                                 progress=lambda i, l: say(f"float step {i}/{float_steps} loss {l:.6f}")
                                 if i % 10 == 0 or i == float_steps else None)
        if hook is not None:
            masks, schedule = st.masks, hook.history
        student_graph = st.current_graph()
        teacher_cached = loss.cached_batches
        say(f"teacher values of {teacher_cached} of {len(feeds)} batch(es) kept "
            f"({loss.cached_bytes / 2**20:.0f} MiB)")
    elif spec is not None and not qat_steps and not fixed_masks:
        student_graph, masks = P.prune(teacher, spec, norms, names=names)
    # formats from the student as it is now (pruning and training move activation ranges)
    say("calibrating the student")
    _, fmts = quantize(student_graph, calib_feeds, cfg)
    model = QATModel(student_graph, fmts, cfg)
    if masks:
        model.set_masks(masks)
    q_losses: list[float] = []
    if qat_steps:
        hook = None
        if spec is not None and not masks and not fixed_masks:
            hook = P.GradualPruner(model, spec, qat_steps, norms, names=names)
        say(f"distill (QAT): {qat_steps} step(s), lr {qat_lr}")
        if device.type != "cpu":  # the QAT forward (the golden model) is on the CPU: so is its teacher
            loss = DistillLoss(teacher, kind, **terms)
        q_losses = finetune(model, feeds, loss.qat(), qat_steps, lr=qat_lr, before_step=hook,
                            progress=lambda i, l: say(f"QAT step {i}/{qat_steps} loss {l:.6f}"))
        if hook is not None:
            schedule = hook.history
        masks = model.masks
    fixed = model.export()
    fixed.meta["passes"] = fixed.meta.get("passes", []) + (["distill_float"] if float_steps else []) \
        + (["distill_qat"] if qat_steps else [])
    return DistillResult(fixed, masks, f_losses, q_losses, schedule, teacher_cached,
                         student_graph if float_steps else None)


# ----------------------------------------------------------------------------
# distillation inputs and the `hwgen quantize --prune/--distill` path
# ----------------------------------------------------------------------------

#: sentences of the tiny-gpt training text used as extra (unlabelled) MiniLM
#: distillation inputs, besides the 64 calibration sentences
EXTRA_SENTENCES = 512


def corpus_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` prose sentences (6..40 words, no code) of ``models/data/tiny_corpus_train.txt``
    (the Python docs text), in a seeded random order. Never the evaluation sentences."""
    import re

    from .zoo import DATA_DIR

    text = " ".join((DATA_DIR / "tiny_corpus_train.txt").read_text(encoding="utf-8").split())
    sents = [s for s in re.split(r"(?<=[.!?])\s+", text)
             if 6 <= len(s.split()) <= 40 and re.match(r"^[A-Z]", s) and not re.search(r"[>{}\[\]=|*]", s)]
    order = np.random.default_rng(seed).permutation(len(sents))
    return [sents[i] for i in order[:n]]


def _check_synthetic(bundle, synthetic: int) -> None:
    if synthetic < 0:
        raise DistillError(f"--distill-synthetic {synthetic}: the sentence count must be >= 0")
    if synthetic and bundle.name != "minilm":
        raise DistillError(f"--distill-synthetic: synthetic sentences are everyday English for minilm, "
                           f"not {bundle.name!r}")


def _check_reads_sentences(bundle, flag: str, verb: str) -> None:
    """Refuse ``flag``, a sentence-level option, for a model that reads
    fixed-width inputs (no tokenizer of sentences)."""
    if bundle.kind != "encoder" or bundle.tokenizer is None:
        raise DistillError(f"{flag}: model {bundle.name!r} ({bundle.kind}) reads "
                           f"fixed-width inputs, not sentences: nothing to {verb}")


def _check_augment(bundle, augment: int, texts: Sequence[str | os.PathLike]) -> None:
    from .augment import AugmentError, check_copies

    try:
        check_copies(augment)
    except AugmentError as e:
        raise DistillError(str(e)) from None
    if augment:
        _check_reads_sentences(bundle, "--distill-augment", "vary")
    if augment and not texts:
        raise DistillError("--distill-augment varies the --distill-text sentences: give --distill-text")


def _check_grouping(bundle, group_by_length: bool) -> None:
    if group_by_length:
        _check_reads_sentences(bundle, "--distill-group-by-length", "group")


def _sentence_batches(bundle, sents: list[str], group_by_length: bool = False) -> list[dict[str, np.ndarray]]:
    """Graph feeds of ``sents`` in batches of the calibration batch size
    (:data:`hwgen.zoo.SENTENCE_BATCH`): in order, or with ``group_by_length``
    in :func:`length_groups` order (batches of similar length: less padding)."""
    from .zoo import SENTENCE_BATCH

    if group_by_length:
        sents = length_groups(sents, [len(ids) for ids in bundle.tokenizer(sents)["input_ids"]])
    return [bundle.encode(sents[i:i + SENTENCE_BATCH]) for i in range(0, len(sents), SENTENCE_BATCH)]


def length_groups(sents: list[str], lengths: Sequence[int], run: int = GROUP_SENTENCES) -> list[str]:
    """``sents`` sorted by ``lengths`` (token counts; longest first, ties in
    order) within each run of ``run`` consecutive sentences: batches cut from
    the result pad to nearly their own length, while sentences of different
    runs never meet (a corpus's order of topics is kept run by run)."""
    if len(lengths) != len(sents):
        raise DistillError(f"{len(sents)} sentences but {len(lengths)} lengths")
    out: list[str] = []
    for r0 in range(0, len(sents), run):
        idx = sorted(range(r0, min(r0 + run, len(sents))), key=lambda i: (-lengths[i], i))
        out += [sents[i] for i in idx]
    return out


def _read_texts(bundle, texts: Sequence[str | os.PathLike]) -> list[list[str]]:
    """The non-empty lines of each ``--distill-text`` file, refused with the
    file's name when it is missing, unreadable or empty, or when the model
    takes no text."""
    from .zoo import ModelLoadError, _read_lines

    if texts and bundle.kind not in ("encoder", "decoder"):
        raise DistillError(f"--distill-text: model {bundle.name!r} ({bundle.kind}) takes tensors, not text")
    try:
        return [_read_lines(path, "distillation text") for path in texts]
    except ModelLoadError as e:
        raise DistillError(str(e)) from None


def text_feeds(bundle, texts: Sequence[str | os.PathLike],
               group_by_length: bool = False) -> list[dict[str, np.ndarray]]:
    """Graph feeds of the user's own distillation text files (``--distill-text``):
    an encoder (minilm) reads one sentence per non-empty line, in batches of 16
    (``group_by_length``: :func:`length_groups` per file);
    a decoder (tiny-gpt) reads each file's lines, joined by newlines, as bytes
    in windows of the model's calibration width. The teacher labels them, so
    any unlabelled text of the target domain will do; keep the evaluation text
    out of them."""
    return _text_batches(bundle, _read_texts(bundle, texts), group_by_length)


def _text_batches(bundle, files: list[list[str]], group_by_length: bool) -> list[dict[str, np.ndarray]]:
    """:func:`text_feeds` of files already read (:func:`_read_texts`: lines per file)."""
    from .zoo import GPT_BATCH, _windows

    feeds: list[dict[str, np.ndarray]] = []
    for lines in files:
        if bundle.kind == "encoder":
            feeds += _sentence_batches(bundle, lines, group_by_length)
        else:
            feeds += _windows("\n".join(lines).encode("utf-8"), int(bundle.meta["window"]), GPT_BATCH)
    return feeds


def train_feeds(bundle, extra: int = EXTRA_SENTENCES, synthetic: int = 0,
                texts: Sequence[str | os.PathLike] = (),
                group_by_length: bool = False, augment: int = 0) -> list[dict[str, np.ndarray]]:
    """Distillation inputs of a model bundle: its calibration batches, plus for
    minilm ``extra`` sentences of the training corpus in batches of 16 (the
    teacher labels them, so any text will do; the evaluation set is never used).
    ``synthetic`` (minilm only) adds that many everyday-English sentences of
    :func:`hwgen.synth_sentences.sentences` in batches of 16; ``texts`` adds the
    batches of those text files (:func:`text_feeds`). With either, all the
    batches are then shuffled (seeded), so the training loop, which takes the
    batches in order, alternates the domains. ``group_by_length``
    (``--distill-group-by-length``, sentence models): the corpus, synthetic and
    text sentences are batched by :func:`length_groups`, and the batches are
    always shuffled. ``augment`` (``--distill-augment``, sentence models): that
    many variants of every sentence of the ``texts`` (:func:`hwgen.augment.augment`,
    all files' sentences as one list) are added after them, batched the same way."""
    _check_synthetic(bundle, synthetic)
    _check_grouping(bundle, group_by_length)
    _check_augment(bundle, augment, texts)
    feeds = list(bundle.calib_feeds)
    if bundle.name == "minilm" and extra:
        sents = corpus_sentences(extra)
        feeds += _sentence_batches(bundle, sents, group_by_length)
    if synthetic:
        from .synth_sentences import sentences

        sents = sentences(synthetic)
        feeds += _sentence_batches(bundle, sents, group_by_length)
    files = _read_texts(bundle, texts)
    feeds += _text_batches(bundle, files, group_by_length)
    if augment:
        from .augment import augment as variants

        feeds += _sentence_batches(bundle, variants([s for lines in files for s in lines], augment),
                                   group_by_length)
    if synthetic or texts or group_by_length:
        feeds = [feeds[i] for i in np.random.default_rng(0).permutation(len(feeds))]
    return feeds


#: corpus sentences added to the calibration sentences for the reconstruction fit
RECON_SENTENCES = 128


#: float distillation steps when ``--distill`` is given without ``--distill-steps``
DISTILL_STEPS = 100


@dataclass(frozen=True)
class Compression:
    """What ``hwgen quantize`` does beyond calibration: one field per flag of
    README's Compression section (``--prune*``, ``--gradual``, ``--distill*``),
    named as the flag, plus the QAT stage's ``--qat-steps`` and ``--lr``. The
    CLI builds it from its arguments (:meth:`from_args`), the bench from its
    rows; :func:`compress` checks and runs it. ``None`` means "not given"
    where the flag's default depends on others (``distill_steps``:
    :data:`DISTILL_STEPS` with ``distill``; ``distill_lr``: :data:`DISTILL_LR`;
    ``distill_teacher_cache`` (GiB): :data:`TEACHER_CACHE_BYTES`)."""

    prune: str | None = None
    prune_layers: str | None = None
    prune_budget: float | None = None
    prune_channels: bool = False
    gradual: bool = False
    distill: bool = False
    distill_steps: int | None = None
    distill_pruned_only: bool = False
    distill_synthetic: int = 0
    distill_text: Sequence[str | os.PathLike] = ()
    distill_augment: int = 0
    distill_schedule: str = "constant"
    distill_lr: float | None = None
    distill_device: str = "cpu"
    distill_linear_weight: float = 0.0
    distill_attention_weight: float = 0.0
    distill_precision: str = "fp32"
    distill_group_by_length: bool = False
    distill_teacher_cache: float | None = None
    distill_ema: float = 0.0
    distill_train_embeddings: bool = False
    distill_fake_quant: bool = False
    distill_eval_every: int = 0
    distill_init: str | os.PathLike | None = None
    distill_save: str | os.PathLike | None = None
    qat_steps: int = 0
    lr: float = 2e-5
    cycles_m: int = 128

    #: the fields that are not compression requests by themselves (plain QAT, the cycle report's m)
    PLAIN = ("qat_steps", "lr", "cycles_m")

    def __post_init__(self):
        object.__setattr__(self, "distill_text", tuple(self.distill_text))   # a list from argparse

    @classmethod
    def from_args(cls, args) -> "Compression":
        """The settings of parsed ``hwgen quantize`` arguments (an attribute per
        flag; ``cycles_m`` is not a flag: the default)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    @property
    def requested(self) -> bool:
        """Whether any compression flag differs from its default: then
        :func:`compress` runs (and refuses what does not fit together), else
        the model is only calibrated (and QAT-trained with ``qat_steps``)."""
        return any(getattr(self, f.name) != f.default for f in fields(self) if f.name not in self.PLAIN)


def compress(bundle, cfg, c: Compression, say: Callable[[str], None] | None = None) -> tuple[Graph, dict]:
    """The ``hwgen quantize --prune ... --distill`` recipe on a model bundle, with the settings ``c``.

    Which linears: all prunable ones, or (layer-selective) those matching
    ``prune_layers`` (:func:`hwgen.prune.select_linears`, ``--prune-layers``), or those
    :func:`hwgen.prune.select_by_budget` picks for a float output cosine ``prune_budget``
    on the calibration inputs (``--prune-budget``); the others stay dense.
    ``distill_pruned_only``: the float distillation stage trains only the pruned
    linears' weights and biases (``--distill-pruned-only``). ``prune_channels``
    (``--prune-channels``, ``block:RATIO`` only): prune channel pairs instead of
    single linears (:mod:`hwgen.prune_channels`): the units ``prune_layers`` and
    ``prune_budget`` choose are pairs (a pair is taken when a pattern matches one of
    its linears), pruned one-shot with their refit. ``distill_synthetic``
    (``--distill-synthetic``, minilm): that many synthetic everyday sentences
    added to the distillation inputs (:func:`train_feeds`); ``distill_text``
    (``--distill-text``): the user's own text files added to them, and
    ``distill_augment`` (``--distill-augment``) variants of their sentences
    (:mod:`hwgen.augment`).
    ``distill_schedule`` (``--distill-schedule``): the float stage's
    learning-rate schedule, ``constant`` or ``cosine`` (:func:`hwgen.qat.lr_at`);
    ``distill_lr`` (``--distill-lr``) its peak learning rate (None: :data:`DISTILL_LR`); ``distill_device``
    (``--distill-device``): the torch device it trains on, ``cpu`` or ``cuda``.
    ``distill_linear_weight``, ``distill_attention_weight``
    (``--distill-linear-weight``, ``--distill-attention-weight``): the weights of
    :class:`DistillLoss`'s per-linear output and attention-distribution terms
    (both stages; 0 leaves them out). ``distill_precision``
    (``--distill-precision``): the float stage's matmuls, ``fp32`` or ``bf16``
    (:func:`autocast`); ``distill_group_by_length`` (``--distill-group-by-length``):
    the distillation sentences batched by length (:func:`train_feeds`);
    ``distill_teacher_cache`` (``--distill-teacher-cache``): the float stage's
    teacher cache budget in GiB (None: :data:`TEACHER_CACHE_BYTES`).
    ``distill_save`` (``--distill-save``): write the float student after the
    float stage to this file (:func:`save_student`); ``distill_init``
    (``--distill-init``): start from such a file instead of the pruned and
    refitted weights (no refit; the masks are computed as without it and the
    file's weights must be zero where they prune, :func:`check_init_masks`), a
    warm start: the learning-rate schedule and Adam's moments begin afresh.
    ``distill_ema`` (``--distill-ema``): the float stage ends with the moving
    average of its weights at this decay (:class:`WeightEMA`; 0: off).
    ``distill_train_embeddings`` (``--distill-train-embeddings``): the float
    stage trains the embedding tables too; trained tables (this run's or its
    ``distill_init``'s) are saved with the student and recorded as
    ``meta["distill"]["embeddings"]``, so a folder's student recovers them.
    ``distill_fake_quant`` (``--distill-fake-quant``): the float stage's forward
    rounds linear weights and activations as the quantized graph will
    (:mod:`hwgen.fake_quant`), so the float student learns around the W8A8
    rounding at float speed; the exact QAT stage follows unchanged.
    ``distill_eval_every`` (``--distill-eval-every``): every that many float
    steps (not after the last), the float student as it would end there (its
    weight average with ``distill_ema``) is scored on the evaluation inputs, in
    float (:func:`hwgen.accuracy.evaluate_float`) and quantized to ``cfg`` as it
    stands, without QAT (:func:`hwgen.accuracy.evaluate`); with
    ``distill_save`` it is also written there, so a stopped run leaves its last
    checkpoint. The scores only report: no checkpoint is chosen by them.

    Pruning, by default one-shot: masks from activation-aware magnitudes, then
    the kept weights refitted by least squares (:func:`hwgen.prune.reconstruct`,
    on the calibration inputs plus, for minilm, ``RECON_SENTENCES`` corpus
    sentences); fine-tuning (``distill_steps`` float distillation steps and/or
    ``qat_steps`` QAT steps, distillation loss with ``distill``, else the plain
    QAT loss) then keeps those zeros. ``gradual``: no reconstruction; sparsity rises
    over the fine-tuning steps (:class:`hwgen.prune.GradualPruner`) instead.
    Returns the fixed graph (sparsity recorded, :func:`hwgen.prune.record_sparsity`)
    and the extra JSON keys: ``prune``, ``prune_schedule``, ``sparsity``, ``cycles_m``,
    ``cycles_dense``, ``cycles_sparse``, ``cycles_ratio`` (all prunable linears: the
    whole model's linears in the blocks), ``engine``, ``prune_selection``, ``linears``,
    ``linears_pruned``, ``pruned_linears``, ``weight_share``, ``cycles_pruned_dense``,
    ``cycles_pruned_sparse``, ``cycles_pruned_ratio`` (the pruned linears only),
    ``sensitivity`` (with ``prune_budget``: the ranking, each row ``chosen`` or not), ``distill``,
    ``distill_steps``, ``distill_loss_first``, ``distill_loss_last``, ``qat_losses``, and the
    float stage's settings ``distill_schedule``, ``distill_lr``, ``distill_device``,
    ``distill_precision``, ``distill_group_by_length``, ``distill_augment``, ``distill_teacher_cache_gb`` and
    ``distill_teacher_cached`` (batches whose teacher values were kept), ``distill_init``,
    ``distill_init_steps`` (the float steps behind that file, summed over its own
    inits), ``distill_float_steps_total`` (those plus this run's; None when a folder's
    are unknown; also recorded as ``meta["distill"]["float_steps"]``), ``distill_save``,
    ``distill_ema``, ``distill_train_embeddings``, ``distill_fake_quant``,
    ``distill_eval_every`` and ``distill_evals`` (one row per checkpoint:
    ``step``, ``float_cosine_mean``, ``float_cosine_min``, ``cosine_mean``,
    ``cosine_min``, and for decoders ``float_ppl`` and ``ppl_quant``)."""
    from . import prune as P
    from .accuracy import qat_loss
    from .qat import QATModel, finetune
    from .quant import prepare, quantize

    say = say or (lambda m: None)
    rows, cols, block_k = P.engine_geometry()
    spec = P.PruneSpec.parse(c.prune, block_k=block_k, block_n=cols) if c.prune else None
    if c.distill_steps is not None and not c.distill:
        raise DistillError("--distill-steps needs --distill")
    distill_steps = DISTILL_STEPS if c.distill_steps is None else c.distill_steps
    if (c.distill and distill_steps < 0) or c.qat_steps < 0:
        raise DistillError("--distill-steps and --qat-steps must be >= 0")
    float_stage = bool(c.distill and distill_steps)     # the float distillation stage runs
    if c.distill and not (distill_steps or c.qat_steps or c.distill_init is not None):
        raise DistillError("--distill needs --distill-steps > 0, --qat-steps > 0 or --distill-init")
    if c.gradual and not (spec is not None and (float_stage or c.qat_steps)):
        raise DistillError("--gradual needs --prune and fine-tuning steps (--distill or --qat-steps)")
    if c.distill_pruned_only and not float_stage:
        raise DistillError("--distill-pruned-only needs --distill with --distill-steps > 0")
    if c.distill_synthetic and not c.distill:
        raise DistillError("--distill-synthetic needs --distill")
    _check_synthetic(bundle, c.distill_synthetic)
    if c.distill_text and not c.distill:
        raise DistillError("--distill-text needs --distill")
    if c.distill_augment and not c.distill:
        raise DistillError("--distill-augment needs --distill")
    _check_augment(bundle, c.distill_augment, c.distill_text)
    if c.distill_schedule != "constant" and not float_stage:
        raise DistillError("--distill-schedule needs --distill with --distill-steps > 0")
    if c.distill_schedule not in LR_SCHEDULES:
        raise DistillError(f"--distill-schedule {c.distill_schedule}: expected one of {', '.join(LR_SCHEDULES)}")
    if c.distill_lr is not None and not float_stage:
        raise DistillError("--distill-lr needs --distill with --distill-steps > 0")
    if c.distill_lr is not None and not c.distill_lr > 0:
        raise DistillError(f"--distill-lr {c.distill_lr}: the learning rate must be > 0")
    distill_lr = DISTILL_LR if c.distill_lr is None else c.distill_lr
    for flag, w in (("--distill-linear-weight", c.distill_linear_weight),
                    ("--distill-attention-weight", c.distill_attention_weight)):
        if w and not c.distill:
            raise DistillError(f"{flag} needs --distill")
        if not w >= 0:
            raise DistillError(f"{flag} {w}: the weight must be >= 0")
    if c.distill_device != "cpu" and not float_stage:
        raise DistillError("--distill-device needs --distill with --distill-steps > 0")
    if c.distill_precision != "fp32" and not float_stage:
        raise DistillError("--distill-precision needs --distill with --distill-steps > 0")
    check_precision(c.distill_precision)
    if c.distill_group_by_length and not c.distill:
        raise DistillError("--distill-group-by-length needs --distill")
    _check_grouping(bundle, c.distill_group_by_length)
    if c.distill_teacher_cache is not None and not float_stage:
        raise DistillError("--distill-teacher-cache needs --distill with --distill-steps > 0")
    if c.distill_teacher_cache is not None and not c.distill_teacher_cache >= 0:
        raise DistillError(f"--distill-teacher-cache {c.distill_teacher_cache}: the budget (GiB) must be >= 0")
    cache_bytes = TEACHER_CACHE_BYTES if c.distill_teacher_cache is None else int(c.distill_teacher_cache * 2**30)
    try:
        torch_device(c.distill_device, "--distill-device")
    except ValueError as e:
        raise DistillError(str(e)) from None
    _read_texts(bundle, c.distill_text)  # refuses a bad file now, not after pruning
    if c.distill_init is not None and not c.distill:
        raise DistillError("--distill-init needs --distill")
    if c.distill_init is not None and c.gradual:
        raise DistillError("--distill-init starts from a saved student, whose zeros are its masks: "
                           "drop --gradual")
    if c.distill_ema and not float_stage:
        raise DistillError("--distill-ema needs --distill with --distill-steps > 0")
    check_ema(c.distill_ema)
    if c.distill_train_embeddings and not float_stage:
        raise DistillError("--distill-train-embeddings needs --distill with --distill-steps > 0")
    if c.distill_fake_quant and not float_stage:
        raise DistillError("--distill-fake-quant needs --distill with --distill-steps > 0")
    if c.distill_eval_every and not float_stage:
        raise DistillError("--distill-eval-every needs --distill with --distill-steps > 0")
    if isinstance(c.distill_eval_every, bool) or not isinstance(c.distill_eval_every, int) \
            or c.distill_eval_every < 0:
        raise DistillError(f"--distill-eval-every {c.distill_eval_every}: the interval must be an "
                           "integer >= 1 (steps; 0: off)")
    if c.distill_save is not None and not float_stage:
        raise DistillError("--distill-save needs --distill with --distill-steps > 0")
    if c.distill_save is not None and not os.path.isdir(os.path.dirname(os.path.abspath(c.distill_save))):
        raise DistillError(f"--distill-save {os.fspath(c.distill_save)}: its folder does not exist")
    if (c.prune_layers is not None or c.prune_budget is not None) and spec is None:
        raise DistillError("--prune-layers and --prune-budget need --prune")
    if c.prune_channels and (spec is None or spec.kind != "block"):
        raise DistillError("--prune-channels needs --prune block:RATIO (whole blocks of each channel pair)")
    if c.prune_channels and c.gradual:
        raise DistillError("--prune-channels is one-shot (permuted, pruned and refitted): drop --gradual")
    if c.prune_layers is not None and c.prune_budget is not None:
        raise DistillError("--prune-layers and --prune-budget exclude each other: name the linears "
                           "or give a budget")
    folded = prepare(bundle.graph)
    init_w = init_info = None
    if c.distill_init is not None:
        init_w, init_info = load_student(c.distill_init, folded, bundle.name)
    norms = masks = names = pair_names = None
    ranking = None
    start = folded
    if spec is not None and c.prune_channels:
        masks, names, ranking, start, pair_names = _prune_channels(folded, bundle, spec, c.prune_layers,
                                                                   c.prune_budget, say)
    elif spec is not None:
        say(f"pruning {spec.name}: activation norms over {len(bundle.calib_feeds)} calibration batch(es)")
        norms = P.activation_norms(folded, bundle.calib_feeds)
        if c.prune_layers is not None:
            names = [n.inputs[1] for n in P.select_linears(folded, c.prune_layers)]
        elif c.prune_budget is not None:
            say(f"selecting linears for float cosine >= {c.prune_budget} on the calibration inputs")
            chosen, ranking = P.select_by_budget(folded, spec, bundle.calib_feeds, c.prune_budget, norms, say=say)
            if not chosen:
                raise DistillError(f"--prune-budget {c.prune_budget}: pruning any one linear with {spec.name} "
                                   "already falls below it; lower the budget")
            names = [n.inputs[1] for n in chosen]
        if names is not None:
            say(f"pruning {len(names)} of {len(P.prunable_linears(folded))} linears")
        if not c.gradual:
            masks = P.compute_masks(folded, spec, norms, names=names)
            if init_w is None:
                say("refitting the kept weights (least squares, layer by layer)")
                start = P.reconstruct(folded, masks, train_feeds(bundle, RECON_SENTENCES), say=say)
    if init_w is not None:
        check_init_masks(c.distill_init, init_w, masks or {}, init_info.get("prune"), spec.name if spec else None)
        behind = init_info.get("steps")
        say(f"starting from the saved student {os.fspath(c.distill_init)} ("
            + ("float steps behind it not recorded)" if behind is None else f"{behind} float step(s) behind it)"))
        start = start.with_weights(init_w)
    f_losses: list[float] = []
    q_losses: list[float] = []
    cached = steps_total = None
    evals: list[dict] = []
    if c.distill:
        # float steps behind the start, over its --distill-init chain (None: a folder's unknown count)
        init_steps = None if init_info and init_info.get("steps") is None else \
            (init_info["steps"] if init_info else 0)
        # trained tables (this run's or its init's) go with the student: files and folders
        tables = c.distill_train_embeddings or bool(init_w is not None and embedding_tables(folded) & set(init_w))

        def behind(step: int) -> int | None:
            """The float steps behind the student after this run's step ``step``."""
            return None if init_steps is None else init_steps + step

        def student_info(step: int, **extra) -> dict:
            """A student file's info after this run's float step ``step``."""
            return {"model": bundle.name, "prune": spec.name if spec else None, "steps": behind(step),
                    "embeddings": tables, **extra}

        def checkpoint(step: int, student: Graph) -> None:
            row = _checkpoint_scores(bundle, cfg, student, step)
            evals.append(row)
            say(f"checkpoint at float step {step}: float cosine {row['float_cosine_mean']:.5f}, "
                f"{cfg.name} {row['cosine_mean']:.5f} (min {row['cosine_min']:.4f})")
            if c.distill_save is not None:
                save_student(c.distill_save, student, student_info(step))
        res = distill(bundle.graph, bundle.kind, bundle.calib_feeds, cfg, spec, norms,
                      float_steps=distill_steps, qat_steps=c.qat_steps, lr=distill_lr, qat_lr=c.lr,
                      train_feeds=train_feeds(bundle, synthetic=c.distill_synthetic, texts=c.distill_text,
                                              group_by_length=c.distill_group_by_length,
                                              augment=c.distill_augment),
                      say=say, start=start, masks=masks, names=names,
                      trainable=_pruned_params(folded, masks) if c.distill_pruned_only else None,
                      float_schedule=c.distill_schedule, device=c.distill_device,
                      linear_weight=c.distill_linear_weight, attention_weight=c.distill_attention_weight,
                      precision=c.distill_precision, teacher_cache_bytes=cache_bytes, float_ema=c.distill_ema,
                      train_embeddings=c.distill_train_embeddings, fake_quant=c.distill_fake_quant,
                      float_checkpoint=checkpoint if c.distill_eval_every else None,
                      checkpoint_every=c.distill_eval_every)
        fixed, masks, f_losses, q_losses = res.fixed, res.masks, res.float_losses, res.qat_losses
        cached = res.teacher_cached
        steps_total = behind(distill_steps)
        fixed.meta["distill"] = {"float_steps": steps_total, "embeddings": tables}
        if c.distill_save is not None:
            save_student(c.distill_save, res.float_student, student_info(distill_steps, loss_last=f_losses[-1]))
            say(f"float student saved to {os.fspath(c.distill_save)}")
    elif c.qat_steps:
        _, fmts = quantize(start if masks is not None else P.prune(folded, spec, norms, names=names)[0]
                           if spec is not None else folded, bundle.calib_feeds, cfg)
        model = QATModel(start, fmts, cfg)
        hook = None
        if masks is not None:
            model.set_masks(masks)
        elif spec is not None:
            hook = P.GradualPruner(model, spec, c.qat_steps, norms, names=names)
        say(f"QAT: {c.qat_steps} step(s), lr {c.lr}" + (f", pruning {spec.name} gradually" if hook else ""))
        q_losses = finetune(model, bundle.calib_feeds, qat_loss(bundle), c.qat_steps, lr=c.lr, before_step=hook,
                            progress=lambda i, l: say(f"QAT step {i}/{c.qat_steps} loss {l:.6f}"))
        fixed, masks = model.export(), model.masks
        fixed.meta["passes"] = fixed.meta.get("passes", []) + ["qat"]
    else:
        fixed, _ = quantize(start, bundle.calib_feeds, cfg)
    masks = masks or {}
    bad = P.mask_violations(fixed, masks)
    if bad:  # cannot happen: zeros quantize to 0; checked so a regression is loud
        raise DistillError(f"{bad} pruned weight(s) have nonzero codes after quantization")
    rec = P.record_sparsity(fixed, spec, block_k, cols, names=names)
    cyc = P.cycle_report(fixed, c.cycles_m, rows=rows, cols=cols, block_k=block_k)
    pruned_nodes = [n for n in P.prunable_linears(fixed) if n.name in set(rec["pruned_linears"])]
    cyp = P.cycle_report(fixed, c.cycles_m, rows=rows, cols=cols, block_k=block_k, nodes=pruned_nodes)
    selection = None if spec is None else ("channels:" if c.prune_channels else "") + (
                                           f"layers:{c.prune_layers}" if c.prune_layers is not None else
                                           f"budget:{c.prune_budget}" if c.prune_budget is not None else "all")
    return fixed, {"prune": spec.name if spec else None,
                   "prune_schedule": None if spec is None else ("gradual" if c.gradual else "oneshot+refit"),
                   "sparsity": rec["sparsity"], **cyc,
                   "prune_selection": selection, "linears": rec["linears"],
                   "linears_pruned": rec["linears_pruned"], "pruned_linears": rec["pruned_linears"],
                   "weight_share": rec["weight_share"], "cycles_pruned_dense": cyp["cycles_dense"],
                   "cycles_pruned_sparse": cyp["cycles_sparse"], "cycles_pruned_ratio": cyp["cycles_ratio"],
                   "sensitivity": ranking, "channel_pairs": pair_names,
                   "distill": bool(c.distill), "distill_steps": distill_steps if c.distill else 0,
                   "distill_synthetic": c.distill_synthetic, "distill_text": [str(t) for t in c.distill_text],
                   "distill_augment": c.distill_augment,
                   "distill_schedule": c.distill_schedule if float_stage else None,
                   "distill_lr": distill_lr if float_stage else None,
                   "distill_device": c.distill_device if float_stage else None,
                   "distill_precision": c.distill_precision if float_stage else None,
                   "distill_group_by_length": bool(c.distill_group_by_length),
                   "distill_teacher_cache_gb": cache_bytes / 2**30 if float_stage else None,
                   "distill_teacher_cached": cached if float_stage else None,
                   "distill_init": None if c.distill_init is None else os.fspath(c.distill_init),
                   "distill_init_steps": init_info.get("steps") if init_info else None,
                   "distill_float_steps_total": steps_total,
                   "distill_save": None if c.distill_save is None else os.fspath(c.distill_save),
                   "distill_ema": c.distill_ema if float_stage else None,
                   "distill_train_embeddings": c.distill_train_embeddings,
                   "distill_fake_quant": c.distill_fake_quant,
                   "distill_eval_every": c.distill_eval_every or None, "distill_evals": evals,
                   "distill_linear_weight": c.distill_linear_weight if c.distill else None,
                   "distill_attention_weight": c.distill_attention_weight if c.distill else None,
                   "distill_loss_first": f_losses[0] if f_losses else None,
                   "distill_loss_last": f_losses[-1] if f_losses else None, "qat_losses": q_losses}


def _checkpoint_scores(bundle, cfg, student: Graph, step: int) -> dict:
    """A ``distill_evals`` row: the float student ``student`` scored in float
    and quantized to ``cfg`` (calibrated on the calibration inputs, no QAT)."""
    from .accuracy import evaluate, evaluate_float
    from .quant import quantize

    f = evaluate_float(bundle, student)
    q = evaluate(bundle, quantize(student, bundle.calib_feeds, cfg)[0])
    row = {"step": step, "float_cosine_mean": f["cosine_mean"], "float_cosine_min": f["cosine_min"],
           "cosine_mean": q["cosine_mean"], "cosine_min": q["cosine_min"]}
    if bundle.kind == "decoder":
        row.update(float_ppl=f["ppl_quant"], ppl_quant=q["ppl_quant"])
    return row


def _prune_channels(folded: Graph, bundle, spec, layers: str | None, budget: float | None, say):
    """``compress``'s channel-pair pruning: which pairs (all, by name, by
    budget), then :func:`hwgen.prune_channels.prune_pairs` refitted on the
    reconstruction inputs. Returns (masks, pruned weight names, ranking, start,
    the pruned pairs' names)."""
    from . import prune as P
    from . import prune_channels as C

    pairs = C.channel_pairs(folded)
    if not pairs:
        raise DistillError("--prune-channels: the model has no channel pairs (FFN up -> gelu -> down, "
                           "attention value -> output, query/key)")
    ranking = None
    if layers is not None:
        hit = {n.name for n in P.select_linears(folded, layers)}
        pairs = [p for p in pairs if hit & set(p.linears())]
        if not pairs:
            raise DistillError(f"--prune-layers {layers!r} matches no linear of a channel pair")
    elif budget is not None:
        say(f"selecting channel pairs for float cosine >= {budget} on the calibration inputs")
        pairs, ranking = C.select_by_budget(folded, pairs, spec.ratio, spec.block_k, spec.block_n,
                                            bundle.calib_feeds, budget, say=say)
        if not pairs:
            raise DistillError(f"--prune-budget {budget}: pruning any one channel pair with {spec.name} "
                               "already falls below it; lower the budget")
    say(f"channel-pruning {len(pairs)} pair(s): {', '.join(p.name for p in pairs)}")
    start, masks = C.prune_pairs(folded, pairs, spec.ratio, spec.block_k, spec.block_n,
                                 train_feeds(bundle, RECON_SENTENCES), say=say)
    return masks, list(masks), ranking, start, [p.name for p in pairs]


def _pruned_params(graph: Graph, masks: dict[str, np.ndarray] | None) -> list[str]:
    """Weight and bias tensor names of the linears with a keep mask."""
    if not masks:
        raise DistillError("--distill-pruned-only needs one-shot pruning (--prune without --gradual)")
    return [t for n in graph.nodes if n.op == "linear" and n.inputs[1] in masks for t in n.inputs[1:] if t]


# ----------------------------------------------------------------------------
# `make bench`: the compression targets
# ----------------------------------------------------------------------------

#: float output cosine budget of the bench's layer-selective row (``--prune-budget``)
BENCH_BUDGET = 0.985

class BenchRow(NamedTuple):
    """One MiniLM row of the compression bench: ``hwgen quantize --prune
    PATTERN --distill`` with these settings (one-shot + refit, ``qat_steps``
    QAT steps)."""

    key: str                     # its name in the result and in targets["cosine_ge_0.98"]
    pattern: str                 # --prune
    budget: float | None = None  # --prune-budget; selective rows train only the pruned linears
    channels: bool = False       # --prune-channels
    corpus: bool = False         # --distill-text models/data/sentences_distill.txt
    steps: int | None = None     # --distill-steps (None: the bench's float_steps)
    schedule: str = "constant"   # --distill-schedule
    lr: float | None = None      # --distill-lr (None: DISTILL_LR)
    terms: float = 0.0           # --distill-linear-weight and --distill-attention-weight
    precision: str = "fp32"      # --distill-precision
    group: bool = False          # --distill-group-by-length
    cache_gb: float | None = None  # --distill-teacher-cache (None: TEACHER_CACHE_BYTES)
    ema: float = 0.0             # --distill-ema
    init: str | None = None      # --distill-init: the float student of this earlier row (its key)
    embeddings: bool = False     # --distill-train-embeddings
    augment: int = 0             # --distill-augment (with corpus)
    fake_quant: bool = False     # --distill-fake-quant
    qat_steps: int | None = None  # --qat-steps (None: the bench's qat_steps)


BENCH_ROWS = (
    BenchRow("2:4", "2:4"),
    BenchRow("block:0.5", "block:0.5"),
    BenchRow("block:0.5 selective", "block:0.5", budget=BENCH_BUDGET),
    BenchRow("block:0.5 channels", "block:0.5", channels=True),
    BenchRow("block:0.5 channels selective", "block:0.5", budget=BENCH_BUDGET, channels=True),
    BenchRow("2:4 corpus", "2:4", corpus=True, steps=25000, schedule="cosine", lr=4e-4, precision="bf16",
             group=True, cache_gb=6.0),
    BenchRow("2:4 corpus continued", "2:4", corpus=True, steps=24000, schedule="cosine", lr=1e-4,
             precision="bf16", group=True, cache_gb=6.0, ema=0.9995, init="2:4 corpus"),
    BenchRow("2:4 corpus embeddings", "2:4", corpus=True, steps=10000, schedule="cosine", lr=1e-4,
             precision="bf16", group=True, cache_gb=6.0, ema=0.9995, init="2:4 corpus continued",
             embeddings=True, augment=2),
    BenchRow("2:4 corpus fake-quant", "2:4", corpus=True, steps=1500, schedule="cosine", lr=5e-5, ema=0.998,
             init="2:4 corpus embeddings", embeddings=True, augment=2, fake_quant=True, qat_steps=120),
    BenchRow("2:4 corpus fake-quant continued", "2:4", corpus=True, steps=2000, schedule="cosine", lr=5e-5,
             ema=0.998, init="2:4 corpus fake-quant", embeddings=True, augment=2, fake_quant=True, qat_steps=0),
    BenchRow("2:4 corpus second cycle", "2:4", corpus=True, steps=9000, schedule="cosine", lr=1e-4,
             precision="bf16", group=True, cache_gb=6.0, ema=0.9995, init="2:4 corpus embeddings",
             embeddings=True, augment=2, qat_steps=0),
    BenchRow("2:4 corpus second cycle fake-quant", "2:4", corpus=True, steps=1500, schedule="cosine", lr=5e-5,
             ema=0.998, init="2:4 corpus second cycle", embeddings=True, augment=2, fake_quant=True, qat_steps=0),
    BenchRow("block:0.5 channels corpus", "block:0.5", channels=True, corpus=True, steps=4000,
             schedule="cosine"),
    BenchRow("block:0.5 channels selective corpus", "block:0.5", budget=0.975, channels=True,
             corpus=True, steps=2000),
)


def bench(quick: bool = False, float_steps: int = 300, qat_steps: int = 4,
          say: Callable[[str], None] | None = None, model: str = "minilm") -> dict:
    """The compression numbers of README.md (registered in :mod:`hwgen.bench`).

    * the :data:`BENCH_ROWS` on ``model`` (minilm), W8A8: 2:4 and block:0.5
      (engine blocks) on every linear; block:0.5 on the linears
      :func:`hwgen.prune.select_by_budget` picks for a float cosine budget on
      the calibration inputs; the same two with channel pairs
      (:mod:`hwgen.prune_channels`); and, distilled on the shipped sentences
      too (:data:`hwgen.zoo.DISTILL_SENTENCES`) for more steps, 2:4 and every
      channel pair on every linear and a budget's channel pairs. Each row:
      mean/min embedding cosine vs float over the evaluation sentences, and
      the matmul engine's cycles at m = 128, sparse vs dense, of the pruned
      linears and of all block linears (the corpus rows are minilm's, the
      sentences being English: skipped for other models). A row with ``init``
      goes on from that earlier row's float student (``--distill-init``; skipped
      when that row did not run). The float stages run on the GPU where torch
      sees one (``distill_device`` in the result);
    * tiny-gpt student (``models/tiny_gpt_student.pt``, half the layers): float
      perplexity vs the teacher's float perplexity, and its W8A8 perplexity;
    * adaptive precision, per token on tiny-gpt (:func:`hwgen.adaptive.bench`):
      low W4A8 + QAT, high W8A8, margin check, threshold fitted on held-out windows;
      the teacher-forced dispatch and verified generation.
    ``quick``: every row 20 float steps, 1 QAT step (a smoke run, not the numbers)."""
    import sys
    import tempfile
    import time

    from . import zoo
    from .accuracy import evaluate
    from .quant import QuantConfig, quantize

    say = say or (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    if quick:
        float_steps, qat_steps = 20, 1
    res: dict = {"float_steps": float_steps, "qat_steps": qat_steps}
    cfg = QuantConfig.from_bits("w8a8")
    bundle = zoo.load(model)
    res["model"] = model
    res["pruned"] = []
    rows = [r for r in BENCH_ROWS if not r.corpus or bundle.name == "minilm"]
    rows = [r for r in rows if r.init is None or r.init in {q.key for q in rows}]
    device = default_device()     # the float stages, where torch sees a GPU
    res["distill_device"] = device
    students = tempfile.TemporaryDirectory(prefix="hwgen-bench-")   # float students later rows go on from
    saves = {r.init for r in rows if r.init}
    for r in rows:
        t0 = time.perf_counter()
        steps = float_steps if quick or r.steps is None else r.steps
        q_steps = qat_steps if quick or r.qat_steps is None else r.qat_steps
        say(f"{model} w8a8 {r.key}{f' (budget {r.budget})' if r.budget else ''} + distillation "
            f"({steps} float steps, {r.schedule}, lr {r.lr or DISTILL_LR:g}"
            f"{f', linear and attention terms x{r.terms:g}' if r.terms else ''}"
            f"{f', {r.precision} matmuls' if r.precision != 'fp32' else ''}"
            f"{', batched by length' if r.group else ''}"
            f"{f', EMA {r.ema}' if r.ema else ''}{f', from the {r.init} row' if r.init else ''}"
            f"{', embedding tables trained' if r.embeddings else ''}"
            f"{f', {r.augment} variants of each sentence' if r.augment else ''}"
            f"{', W8A8 fake quantization' if r.fake_quant else ''}"
            f"{', with the distillation sentences' if r.corpus else ''} on {device} + {q_steps} QAT steps)")
        fixed, info = compress(bundle, cfg, Compression(
            prune=r.pattern, prune_budget=r.budget, prune_channels=r.channels, distill=True,
            distill_steps=steps, distill_pruned_only=r.budget is not None,
            distill_text=(zoo.DISTILL_SENTENCES,) if r.corpus else (), distill_schedule=r.schedule,
            distill_lr=r.lr, distill_device=device, distill_linear_weight=r.terms,
            distill_attention_weight=r.terms, distill_precision=r.precision, distill_group_by_length=r.group,
            distill_teacher_cache=r.cache_gb, distill_ema=r.ema, distill_train_embeddings=r.embeddings,
            distill_augment=r.augment, distill_fake_quant=r.fake_quant,
            distill_init=_bench_student(students.name, r.init) if r.init else None,
            distill_save=_bench_student(students.name, r.key) if r.key in saves else None,
            qat_steps=q_steps), say=say)
        m = evaluate(bundle, fixed)
        res["pruned"].append({"row": r.key, "qat_steps": q_steps,
                              **{k: v for k, v in info.items() if k != "qat_losses"},
                              "cosine_mean": m["cosine_mean"], "cosine_min": m["cosine_min"],
                              "wall_s": time.perf_counter() - t0})
    students.cleanup()
    say("tiny-gpt student vs teacher")
    teacher = zoo.load("tiny-gpt")
    student = zoo.load(str(zoo.MODELS_DIR / "tiny_gpt_student.pt"))
    t_ref = evaluate(teacher, quantize(teacher.graph, teacher.calib_feeds, cfg)[0])
    s_q = evaluate(student, quantize(student.graph, student.calib_feeds, cfg)[0])
    res["tiny_gpt_student"] = {
        "teacher_layers": len(teacher.graph.layers), "student_layers": len(student.graph.layers),
        "teacher_ppl_float": t_ref["ppl_float"], "student_ppl_float": s_q["ppl_float"],
        "student_ppl_w8a8": s_q["ppl_quant"], "ratio_float": s_q["ppl_float"] / t_ref["ppl_float"],
        "ratio_w8a8": s_q["ppl_quant"] / t_ref["ppl_float"]}
    say("adaptive precision: tiny-gpt w4a8 (QAT) / w8a8, per-token margin check")
    from .adaptive import bench as adaptive_bench
    res["adaptive"] = adaptive_bench(quick=quick, say=say)
    row = {r["row"]: r for r in res["pruned"]}
    sel, chan_sel = row["block:0.5 selective"], row["block:0.5 channels selective"]
    res["targets"] = {
        "cosine_ge_0.98": {r.key: row[r.key]["cosine_mean"] >= 0.98 for r in rows if r.budget is None},
        "block_cycles_le_0.55": row["block:0.5"]["cycles_ratio"] <= 0.55,
        "channels_selective_cosine_ge_0.98": chan_sel["cosine_mean"] >= 0.98,
        "channels_selective_pruned_cycles_le_0.55": chan_sel["cycles_pruned_ratio"] <= 0.55,
        # layer-selective: only the linears the budget chose are pruned (see linears_pruned,
        # weight_share); the cycle ratio is of those linears, the whole model's is cycles_ratio
        "selective_cosine_ge_0.98": sel["cosine_mean"] >= 0.98,
        "selective_pruned_cycles_le_0.55": sel["cycles_pruned_ratio"] <= 0.55,
        "student_ppl_within_10pct": res["tiny_gpt_student"]["ratio_float"] <= 1.10,
        "adaptive_cycles_lt_1.3x": res["adaptive"]["target_cycles_lt_1.3x"],
        "adaptive_accuracy_of_high": res["adaptive"]["target_accuracy_of_high"],
        # verified generation: every generated token the high graph's, at < 1.3x the low graph's cycles
        "adaptive_verified_tokens_of_high_lt_1.3x": res["adaptive"]["verified"]["target_tokens_of_high"]
        and res["adaptive"]["verified"]["target_cycles_lt_1.3x"]}
    csel = row.get("block:0.5 channels selective corpus")
    if csel is not None:  # the budget's channel pairs distilled on the shipped sentences too
        res["targets"]["channels_selective_corpus_cosine_ge_0.98"] = csel["cosine_mean"] >= 0.98
        res["targets"]["channels_selective_corpus_pruned_cycles_le_0.55"] = csel["cycles_pruned_ratio"] <= 0.55
    return res


def _bench_student(folder: str, key: str) -> str:
    """Where the bench keeps row ``key``'s float student."""
    return os.path.join(folder, key.replace(" ", "_").replace(":", "-") + ".npz")


def _batches(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]
