"""Frontend: trace a torch module into a *float graph* (:class:`hwgen.ir.Graph`).

:func:`trace` maps a module onto the op vocabulary of :data:`hwgen.ir.OPS`. Weights are
float32 numpy arrays; activations are ``dtype="float"``, ids and masks ``"index"``; no
tensor has a format and ``meta["quantized"]`` is False. The float executor
(:mod:`hwgen.float_exec`) runs the result; it matches the module to float rounding.

How a module is converted
-------------------------
1. *Whole-model converters* (graph kinds ``"encoder"`` and ``"decoder"``):
   HF ``BertModel`` (sentence encoder: embeddings, layers, mean pooling) and GPT-like
   decoders recognised by structure (``tok_emb``, ``pos_emb``, ``blocks``, ``ln_f``,
   ``lm_head``, e.g. ``models/tiny_gpt.py``'s ``TinyGPT``).
2. *Block converters* (registry :data:`BLOCK_CONVERTERS`): ``torch.nn.TransformerEncoderLayer``,
   ``torch.nn.TransformerEncoder``, HF ``BertLayer`` and ``GPT2Block``.
3. *Leaf converters* (registry :data:`LEAF_CONVERTERS`): ``nn.Linear``, ``nn.LayerNorm``,
   ``nn.GELU``, ``nn.ReLU``, ``nn.Dropout``/``nn.Identity`` (identity), HF activations.
4. Anything else goes through a ``torch.fx`` symbolic trace whose leaves are the
   registry types plus *attention-like* submodules (``nn.Linear`` children named like
   q/k/v[/o] and a head-count attribute). An attention leaf is checked by probing:
   the module is run on a random input and must equal q/k/v projections + the
   ``attention`` op (+ o projection) for some choice of causal/scale, which also tells
   whether it is causal. fx nodes map to ops (``operator.add`` -> add, ``F.gelu`` ->
   gelu, ``F.relu`` -> relu, ``F.layer_norm``/``F.linear`` on parameters, dropout and
   ``contiguous`` -> identity); anything else raises :class:`UnsupportedOpError`
   naming the op and its module path.

Conventions of the emitted graph
--------------------------------
* Nodes converted from a module are named by its module path (``"attn.q"``,
  ``"encoder.layer.3.output.dense"``); the attention op is named by the attention
  module's path, nodes with no module of their own by ``<block path>.<role>``
  (``"blocks.0.residual_attn"``, ``"add"``), made unique with ``_1``, ``_2`` ...
  Every node's single output tensor has the node's name, except graph outputs.
  Weights are ``<node>.weight`` / ``<node>.bias`` (linear, ``(in, out)`` layout:
  ``y = x @ W + b``), ``<node>.gamma`` / ``<node>.beta`` (layernorm), ``<node>.table``
  (embedding).
* ``source`` is the torch module path (``""`` = the traced module itself); ``layer``
  the transformer block index (``None`` outside blocks; a traced single block is 0).
* Graph kinds, inputs and outputs:
  ``"block"``: input ``"x"`` (B, S, H) float, optional ``"mask"`` (B, S) index (1 =
  valid key), output ``"y"`` (B, S, H). ``x`` is followed by a ``quantize`` node
  ``"quant_x"``. ``meta["seq_first"]`` is True when the module itself takes
  (S, B, H) (``batch_first=False``): the graph is always batch-first.
  ``"encoder"``: inputs ``"ids"``, ``"mask"`` (B, S) index, output ``"embedding"`` (B, H).
  ``"decoder"``: input ``"ids"`` (B, S) index, output ``"logits"`` (B, S, vocab).
* ``attention`` attrs: ``heads``, ``head_dim``, ``causal``, ``scale``, ``kv_cache``.
  ``gelu``: ``approximate`` (``"none"`` = erf, ``"tanh"``). ``layernorm``: ``eps``.
  ``embedding``: ``positions`` (True: rows ``arange(S)`` + cache offset; ids only give
  the shape).
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
import re
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .float_exec import attention_float
from .ir import Graph, Node, Tensor

__all__ = ["UnsupportedOpError", "trace", "split_example", "reference_forward", "natural_kind",
           "BLOCK_CONVERTERS", "LEAF_CONVERTERS", "KINDS"]

KINDS = ("block", "encoder", "decoder")


class UnsupportedOpError(ValueError):
    """A module or op the frontend cannot express; the message names it and its module path."""


# ----------------------------------------------------------------------------- naming helpers


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    if not name:
        return prefix
    return f"{prefix}.{name}"


def _pretty(obj: Any) -> str:
    """A readable qualified name for a module class, a function or a method name."""
    if isinstance(obj, nn.Module):
        obj = type(obj)
    if isinstance(obj, str):
        return f"torch.Tensor.{obj}"
    name = getattr(obj, "__name__", None)
    if not isinstance(obj, type) and name:
        for ns, label in ((F, "torch.nn.functional"), (torch, "torch"), (operator, "operator"),
                          (math, "math")):
            if getattr(ns, name, None) is obj:
                return f"{label}.{name}"
    mod = getattr(obj, "__module__", None) or ""
    qual = getattr(obj, "__qualname__", None) or name or repr(obj)
    if mod.startswith("torch.nn.modules."):
        mod = "torch.nn"
    elif mod.startswith("transformers."):
        mod = "transformers"
    return f"{mod}.{qual}" if mod else qual


def _where(path: str) -> str:
    return f"module path '{path}'" if path else "module path '' (the traced module itself)"


def _unsupported(what: Any, path: str, detail: str = "") -> UnsupportedOpError:
    msg = f"unsupported op {_pretty(what)} at {_where(path)}"
    if detail:
        msg += f" ({detail})"
    return UnsupportedOpError(msg)


def _class_keys(obj: Any) -> list[str]:
    """Registry keys of a module's class and its bases: "torch.nn.X", "transformers.X", "pkg.X"."""
    cls = obj if isinstance(obj, type) else type(obj)
    keys = []
    for c in cls.__mro__:
        if c in (nn.Module, object):
            break
        mod = c.__module__
        if mod.startswith("torch.nn.modules."):
            keys.append(f"torch.nn.{c.__qualname__}")
        elif mod.startswith("transformers."):
            keys.append(f"transformers.{c.__qualname__}")
        else:
            keys.append(f"{mod}.{c.__qualname__}")
    return keys


def _lookup(registry: dict[str, Any], obj: Any) -> Any:
    for key in _class_keys(obj):
        if key in registry:
            return registry[key]
    return None


# ----------------------------------------------------------------------------- graph builder


class _Builder:
    def __init__(self, name: str, kind: str):
        self.g = Graph(name=name, meta={"quantized": False, "kind": kind})
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        name = name or "node"
        cand, i = name, 0
        while cand in self._names or cand in self.g.tensors:
            i += 1
            cand = f"{name}_{i}"
        self._names.add(cand)
        return cand

    def input(self, name: str, shape: tuple, dtype: str) -> str:
        self.g.add_tensor(Tensor(name, tuple(shape), kind="input", dtype=dtype))
        self._names.add(name)
        self.g.inputs.append(name)
        return name

    def weight(self, name: str, value: Any) -> str:
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float32).numpy()
        arr = np.array(value, dtype=np.float32, copy=True)
        name = self._unique(name)
        self.g.add_weight(name, arr, dtype="float")
        return name

    def shape(self, tensor: str) -> tuple:
        return tuple(self.g.tensors[tensor].shape)

    def op(self, op: str, inputs: list[str], *, name: str, source: str, layer: int | None,
           shape: tuple, attrs: dict | None = None) -> str:
        name = self._unique(name or op)
        self.g.add_tensor(Tensor(name, tuple(shape), kind="activation", dtype="float"))
        self.g.add_node(Node(name=name, op=op, inputs=list(inputs), outputs=[name],
                             attrs=dict(attrs or {}), source=source, layer=layer))
        return name

    def rename(self, old: str, new: str) -> str:
        """Rename activation tensor ``old`` (used for graph outputs such as "logits")."""
        if old == new:
            return new
        if new in self.g.tensors:
            raise ValueError(f"tensor '{new}' already exists")
        t = self.g.tensors.pop(old)
        t.name = new
        self.g.tensors[new] = t
        for n in self.g.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
            n.outputs = [new if o == old else o for o in n.outputs]
        self.g.inputs = [new if i == old else i for i in self.g.inputs]
        self._names.add(new)
        return new


class _Ctx:
    """Conversion context shared by all converters of one trace."""

    def __init__(self, builder: _Builder, kv_cache: bool = False,
                 mask_dtype: torch.dtype = torch.long):
        self.b = builder
        self.kv_cache = kv_cache
        self.mask_dtype = mask_dtype
        self.seq_first_ok = False  # the traced module itself takes (S, B, H)

    # common op emitters --------------------------------------------------
    def linear(self, x: str, w_in_out: Any, bias: Any, name: str, source: str, layer) -> str:
        b = self.b
        w = b.weight(f"{name}.weight", w_in_out)
        ins = [x, w]
        if bias is not None:
            ins.append(b.weight(f"{name}.bias", bias))
        n_out = b.g.weights[w].shape[1]
        return b.op("linear", ins, name=name, source=source, layer=layer,
                    shape=b.shape(x)[:-1] + (int(n_out),))

    def nn_linear(self, x: str, mod: nn.Linear, path: str, layer, name: str | None = None) -> str:
        return self.linear(x, mod.weight.detach().t(), mod.bias, name or path, path, layer)

    def layernorm(self, x: str, gamma: Any, beta: Any, eps: float, name: str, source: str, layer) -> str:
        b = self.b
        gi = b.weight(f"{name}.gamma", gamma)
        bi = b.weight(f"{name}.beta", beta)
        return b.op("layernorm", [x, gi, bi], name=name, source=source, layer=layer,
                    shape=b.shape(x), attrs={"eps": float(eps)})

    def nn_layernorm(self, x: str, mod: nn.LayerNorm, path: str, layer) -> str:
        shape = tuple(mod.normalized_shape)
        if len(shape) != 1:
            raise _unsupported(mod, path, f"normalized_shape {list(shape)}: only the last dimension")
        h = shape[0]
        gamma = mod.weight if mod.weight is not None else torch.ones(h)
        beta = getattr(mod, "bias", None)
        beta = beta if beta is not None else torch.zeros(h)
        return self.layernorm(x, gamma, beta, mod.eps, path, path, layer)

    def act(self, x: str, spec: tuple, name: str, source: str, layer) -> str:
        kind = spec[0]
        if kind == "identity":
            return x
        attrs = {"approximate": spec[1]} if kind == "gelu" else {}
        return self.b.op(kind, [x], name=name, source=source, layer=layer, shape=self.b.shape(x),
                         attrs=attrs)

    def add(self, a: str, c: str, name: str, source: str, layer) -> str:
        sa, sc = self.b.shape(a), self.b.shape(c)
        shape = sa if len(sa) >= len(sc) else sc
        return self.b.op("add", [a, c], name=name, source=source, layer=layer, shape=shape)

    def attention(self, x: str, mask: str | None, projs: list[tuple[str, str, Any, Any]],
                  heads: int, head_dim: int, causal: bool, scale: float, name: str, source: str,
                  layer) -> str:
        """q/k/v linear ops from ``projs`` [(name, source, W (in, out), bias)] + the attention op."""
        qkv = [self.linear(x, w, bias, n, src, layer) for n, src, w, bias in projs]
        ins = qkv + ([mask] if mask is not None else [])
        return self.b.op("attention", ins, name=name, source=source, layer=layer,
                         shape=self.b.shape(qkv[0]),
                         attrs={"heads": int(heads), "head_dim": int(head_dim), "causal": bool(causal),
                                "scale": float(scale), "kv_cache": bool(self.kv_cache)})


# ----------------------------------------------------------------------------- activations


_GELU_NONE = {"GELUActivation", "AccurateGELUActivation"}
_GELU_TANH = {"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation",
              "GELUPytorchTanh"}


def _act_spec(obj: Any) -> tuple | None:
    """("gelu", approximate) | ("relu",) | ("identity",) for an activation module/function."""
    if isinstance(obj, nn.GELU):
        return ("gelu", obj.approximate)
    if isinstance(obj, nn.ReLU):
        return ("relu",)
    if isinstance(obj, (nn.Dropout, nn.Identity)):
        return ("identity",)
    if obj is F.gelu:
        return ("gelu", "none")
    if obj is F.relu or obj is torch.relu:
        return ("relu",)
    if isinstance(obj, nn.Module):
        names = {c.__name__ for c in type(obj).__mro__ if c.__module__.startswith("transformers")}
        if names & _GELU_NONE:  # (use_gelu_python: the same erf formula)
            return ("gelu", "none")
        if names & _GELU_TANH:
            return ("gelu", "tanh")
        if "LinearActivation" in names:
            return ("identity",)
    if isinstance(obj, functools.partial) and obj.func is F.gelu and not obj.args:
        return ("gelu", obj.keywords.get("approximate", "none"))
    return None


# ----------------------------------------------------------------------------- leaf converters


def _leaf_linear(ctx: _Ctx, mod, path, layer, x):
    return ctx.nn_linear(x, mod, path, layer)


def _leaf_layernorm(ctx: _Ctx, mod, path, layer, x):
    return ctx.nn_layernorm(x, mod, path, layer)


def _leaf_act(ctx: _Ctx, mod, path, layer, x):
    spec = _act_spec(mod)
    if spec is None:
        raise _unsupported(mod, path)
    return ctx.act(x, spec, path, path, layer)


#: module class key -> ``fn(ctx, module, path, layer, x) -> tensor`` (one op or identity)
LEAF_CONVERTERS: dict[str, Callable] = {
    "torch.nn.Linear": _leaf_linear,
    "torch.nn.LayerNorm": _leaf_layernorm,
    "torch.nn.GELU": _leaf_act,
    "torch.nn.ReLU": _leaf_act,
    "torch.nn.Dropout": _leaf_act,
    "torch.nn.Identity": _leaf_act,
    **{f"transformers.{n}": _leaf_act for n in (_GELU_NONE | _GELU_TANH | {"LinearActivation"})},
}


# ----------------------------------------------------------------------------- block converters


def _conv_tel(ctx: _Ctx, mod: nn.TransformerEncoderLayer, path: str, layer, x: str, mask: str | None):
    """torch.nn.TransformerEncoderLayer (self-attention + FFN, pre- or post-norm)."""
    if not mod.self_attn.batch_first and not ctx.seq_first_ok:
        raise _unsupported(mod, path, "batch_first=False inside another module; trace it directly "
                           "or use batch_first=True")
    sa_path = _join(path, "self_attn")
    act_spec = _act_spec(mod.activation)
    if act_spec is None:
        raise _unsupported(mod.activation, path, "activation must be relu or gelu")
    act_src = _join(path, "activation") if isinstance(mod.activation, nn.Module) else path

    def sa_block(h):
        return _emit_mha(ctx, mod.self_attn, sa_path, layer, h, mask)

    def ff_block(h):
        h = ctx.nn_linear(h, mod.linear1, _join(path, "linear1"), layer)
        h = ctx.act(h, act_spec, _join(path, "activation"), act_src, layer)
        return ctx.nn_linear(h, mod.linear2, _join(path, "linear2"), layer)

    ln1 = lambda h: ctx.nn_layernorm(h, mod.norm1, _join(path, "norm1"), layer)  # noqa: E731
    ln2 = lambda h: ctx.nn_layernorm(h, mod.norm2, _join(path, "norm2"), layer)  # noqa: E731
    if mod.norm_first:
        x = ctx.add(x, sa_block(ln1(x)), _join(path, "residual_attn"), path, layer)
        return ctx.add(x, ff_block(ln2(x)), _join(path, "residual_ffn"), path, layer)
    x = ln1(ctx.add(x, sa_block(x), _join(path, "residual_attn"), path, layer))
    return ln2(ctx.add(x, ff_block(x), _join(path, "residual_ffn"), path, layer))


def _emit_mha(ctx: _Ctx, sa: nn.MultiheadAttention, sa_path: str, layer, x: str, mask: str | None,
              causal: bool = False) -> str:
    """nn.MultiheadAttention as self-attention: in_proj split into q/k/v linears, attention, out_proj."""
    if sa.bias_k is not None or sa.add_zero_attn:
        raise _unsupported(sa, sa_path, "bias_k/bias_v/add_zero_attn are not supported")
    e, heads = sa.embed_dim, sa.num_heads
    hd = e // heads
    if sa._qkv_same_embed_dim:
        w = sa.in_proj_weight.detach()
        ws = [w[:e], w[e:2 * e], w[2 * e:]]
    else:
        ws = [sa.q_proj_weight.detach(), sa.k_proj_weight.detach(), sa.v_proj_weight.detach()]
    b = sa.in_proj_bias.detach() if sa.in_proj_bias is not None else None
    bs = [None] * 3 if b is None else [b[:e], b[e:2 * e], b[2 * e:]]
    projs = [(_join(sa_path, r), sa_path, ws[i].t(), bs[i]) for i, r in enumerate("qkv")]
    a = ctx.attention(x, mask, projs, heads, hd, causal, 1.0 / math.sqrt(hd), sa_path, sa_path, layer)
    return ctx.nn_linear(a, sa.out_proj, _join(sa_path, "out_proj"), layer)


def _conv_tenc(ctx: _Ctx, mod: nn.TransformerEncoder, path: str, layer, x: str, mask: str | None):
    """torch.nn.TransformerEncoder: its layers (block index = position), then the optional norm."""
    for i, lyr in enumerate(mod.layers):
        x = _conv_tel(ctx, lyr, _join(path, f"layers.{i}"), i, x, mask)
    if mod.norm is not None:
        x = _convert_leaf_or_fail(ctx, mod.norm, _join(path, "norm"), None, x)
    return x


def _conv_bert_layer(ctx: _Ctx, mod, path: str, layer, x: str, mask: str | None):
    """HF transformers BertLayer (post-norm; self-attention only, no cross-attention)."""
    sa = mod.attention.self
    sa_path = _join(path, "attention.self")
    pet = getattr(sa, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise _unsupported(sa, sa_path, f"position_embedding_type '{pet}'")
    heads, hd = int(sa.num_attention_heads), int(sa.attention_head_size)
    scale = float(getattr(sa, "scaling", hd ** -0.5))
    causal = bool(getattr(sa, "is_causal", False) or getattr(mod, "is_decoder", False))
    projs = [(_join(sa_path, r), _join(sa_path, r), getattr(sa, r).weight.detach().t(), getattr(sa, r).bias)
             for r in ("query", "key", "value")]
    a = ctx.attention(x, mask, projs, heads, hd, causal, scale, sa_path, sa_path, layer)
    so = mod.attention.output
    so_path = _join(path, "attention.output")
    h = ctx.nn_linear(a, so.dense, _join(so_path, "dense"), layer)
    h = ctx.add(h, x, _join(so_path, "residual"), so_path, layer)
    h1 = ctx.nn_layernorm(h, so.LayerNorm, _join(so_path, "LayerNorm"), layer)
    ip = _join(path, "intermediate")
    f = ctx.nn_linear(h1, mod.intermediate.dense, _join(ip, "dense"), layer)
    act = mod.intermediate.intermediate_act_fn
    spec = _act_spec(act)
    if spec is None:
        raise _unsupported(act, _join(ip, "intermediate_act_fn"))
    f = ctx.act(f, spec, _join(ip, "intermediate_act_fn"), _join(ip, "intermediate_act_fn"), layer)
    op = _join(path, "output")
    f = ctx.nn_linear(f, mod.output.dense, _join(op, "dense"), layer)
    f = ctx.add(f, h1, _join(op, "residual"), op, layer)
    return ctx.nn_layernorm(f, mod.output.LayerNorm, _join(op, "LayerNorm"), layer)


def _conv_gpt2_block(ctx: _Ctx, mod, path: str, layer, x: str, mask: str | None):
    """HF transformers GPT2Block (pre-norm, causal; Conv1D weights are already (in, out))."""
    at = mod.attn
    at_path = _join(path, "attn")
    if getattr(at, "is_cross_attention", False):
        raise _unsupported(at, at_path, "cross-attention")
    e, heads, hd = int(at.embed_dim), int(at.num_heads), int(at.head_dim)
    if hasattr(at, "scaling"):
        scale = float(at.scaling)
    else:
        scale = hd ** -0.5 if at.scale_attn_weights else 1.0
        if at.scale_attn_by_inverse_layer_idx:
            scale /= float(at.layer_idx + 1)
    w, b = at.c_attn.weight.detach(), at.c_attn.bias.detach()
    ca = _join(at_path, "c_attn")
    projs = [(_join(ca, r), ca, w[:, i * e:(i + 1) * e], b[i * e:(i + 1) * e]) for i, r in enumerate("qkv")]
    h = ctx.nn_layernorm(x, mod.ln_1, _join(path, "ln_1"), layer)
    a = ctx.attention(h, mask, projs, heads, hd, True, scale, at_path, at_path, layer)
    cp = _join(at_path, "c_proj")
    a = ctx.linear(a, at.c_proj.weight.detach(), at.c_proj.bias, cp, cp, layer)
    x = ctx.add(a, x, _join(path, "residual_attn"), path, layer)
    h = ctx.nn_layernorm(x, mod.ln_2, _join(path, "ln_2"), layer)
    mp = _join(path, "mlp")
    h = ctx.linear(h, mod.mlp.c_fc.weight.detach(), mod.mlp.c_fc.bias, _join(mp, "c_fc"), _join(mp, "c_fc"),
                   layer)
    spec = _act_spec(mod.mlp.act)
    if spec is None:
        raise _unsupported(mod.mlp.act, _join(mp, "act"))
    h = ctx.act(h, spec, _join(mp, "act"), _join(mp, "act"), layer)
    h = ctx.linear(h, mod.mlp.c_proj.weight.detach(), mod.mlp.c_proj.bias, _join(mp, "c_proj"),
                   _join(mp, "c_proj"), layer)
    return ctx.add(x, h, _join(path, "residual_ffn"), path, layer)


#: module class key -> ``fn(ctx, module, path, layer, x, mask) -> tensor`` (whole blocks)
BLOCK_CONVERTERS: dict[str, Callable] = {
    "torch.nn.TransformerEncoderLayer": _conv_tel,
    "torch.nn.TransformerEncoder": _conv_tenc,
    "transformers.BertLayer": _conv_bert_layer,
    "transformers.GPT2Block": _conv_gpt2_block,
}


# ----------------------------------------------------------------------------- whole models


def _is_bert_model(mod: nn.Module) -> bool:
    return "transformers.BertModel" in _class_keys(mod)


def _is_gpt_like(mod: nn.Module) -> bool:
    return (isinstance(getattr(mod, "tok_emb", None), nn.Embedding)
            and isinstance(getattr(mod, "pos_emb", None), nn.Embedding)
            and isinstance(getattr(mod, "blocks", None), (nn.ModuleList, nn.Sequential))
            and isinstance(getattr(mod, "ln_f", None), nn.LayerNorm)
            and isinstance(getattr(mod, "lm_head", None), nn.Linear))


def natural_kind(module: nn.Module) -> str:
    """The graph kind a module traces to: "encoder", "decoder" or "block"."""
    if _is_bert_model(module):
        return "encoder"
    if _is_gpt_like(module):
        return "decoder"
    return "block"


def _conv_bert_model(ctx: _Ctx, mod) -> None:
    """HF BertModel as a sentence encoder: embeddings, all layers, mean pooling -> "embedding"."""
    b = ctx.b
    emb = mod.embeddings
    cfg = mod.config
    pet = getattr(cfg, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise _unsupported(emb, "embeddings", f"position_embedding_type '{pet}'")
    ids = b.input("ids", ("B", "S"), "index")
    mask = b.input("mask", ("B", "S"), "index")
    h_dim = int(emb.word_embeddings.weight.shape[1])
    word = emb.word_embeddings.weight.detach()
    wname = b.weight("embeddings.word_embeddings.table", word)
    we = b.op("embedding", [ids, wname], name="embeddings.word_embeddings",
              source="embeddings.word_embeddings", layer=None, shape=("B", "S", h_dim),
              attrs={"positions": False})
    # token_type_ids are always 0 here (single-segment sentences), so the token-type
    # row 0 is a constant vector: it is folded into the position table, which then holds
    # position_embeddings[p] + token_type_embeddings[0].
    pos = emb.position_embeddings.weight.detach()
    if getattr(emb, "token_type_embeddings", None) is not None:
        pos = pos + emb.token_type_embeddings.weight.detach()[0][None, :]
    pname = b.weight("embeddings.position_embeddings.table", pos)
    pe = b.op("embedding", [ids, pname], name="embeddings.position_embeddings",
              source="embeddings.position_embeddings", layer=None, shape=("B", "S", h_dim),
              attrs={"positions": True})
    h = ctx.add(we, pe, "embeddings.add", "embeddings", None)
    h = ctx.nn_layernorm(h, emb.LayerNorm, "embeddings.LayerNorm", None)
    for i, lyr in enumerate(mod.encoder.layer):
        h = _conv_bert_layer(ctx, lyr, f"encoder.layer.{i}", i, h, mask)
    out = b.op("mean_pool", [h, mask], name="pool", source="", layer=None, shape=("B", h_dim))
    b.rename(out, "embedding")
    b.g.outputs = ["embedding"]
    b.g.meta.update({"hidden": h_dim, "vocab": int(word.shape[0]), "max_positions": int(pos.shape[0]),
                     "layers_total": len(mod.encoder.layer), "pooling": "mean",
                     "token_type_folded": True})


def _conv_gpt_like(ctx: _Ctx, mod) -> None:
    """GPT-like decoder (tok_emb + pos_emb, blocks, ln_f, lm_head) -> "logits"."""
    b = ctx.b
    ids = b.input("ids", ("B", "S"), "index")
    tok, pos = mod.tok_emb.weight.detach(), mod.pos_emb.weight.detach()
    h_dim = int(tok.shape[1])
    te = b.op("embedding", [ids, b.weight("tok_emb.table", tok)], name="tok_emb", source="tok_emb",
              layer=None, shape=("B", "S", h_dim), attrs={"positions": False})
    pe = b.op("embedding", [ids, b.weight("pos_emb.table", pos)], name="pos_emb", source="pos_emb",
              layer=None, shape=("B", "S", h_dim), attrs={"positions": True})
    h = ctx.add(te, pe, "embed_add", "", None)
    for i, blk in enumerate(mod.blocks):
        h = _convert_block(ctx, blk, f"blocks.{i}", i, h, None)
    h = ctx.nn_layernorm(h, mod.ln_f, "ln_f", None)
    out = ctx.nn_linear(h, mod.lm_head, "lm_head", None)
    b.rename(out, "logits")
    b.g.outputs = ["logits"]
    b.g.meta.update({"hidden": h_dim, "vocab": int(mod.lm_head.out_features),
                     "max_positions": int(pos.shape[0]), "layers_total": len(mod.blocks)})


# ----------------------------------------------------------------------------- attention-like leaves

_Q_NAMES = ("q", "q_proj", "query", "wq", "to_q", "W_q")
_K_NAMES = ("k", "k_proj", "key", "wk", "to_k", "W_k")
_V_NAMES = ("v", "v_proj", "value", "wv", "to_v", "W_v")
_O_NAMES = ("o", "o_proj", "out_proj", "out", "proj", "wo", "to_out", "c_proj", "dense", "W_o")
_HEADS_ATTRS = ("heads", "num_heads", "n_heads", "n_head", "num_attention_heads", "nhead")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "d_head", "head_size")
_SCALE_ATTRS = ("scale", "scaling", "softmax_scale")


def _attention_parts(mod: nn.Module) -> dict | None:
    """q/k/v[/o] Linear children and head count of an attention-like module, else None."""
    children = dict(mod.named_children())

    def find(names):
        for n in names:
            if isinstance(children.get(n), nn.Linear):
                return n
        return None

    q, k, v = find(_Q_NAMES), find(_K_NAMES), find(_V_NAMES)
    if not (q and k and v):
        return None
    heads = next((getattr(mod, a) for a in _HEADS_ATTRS if isinstance(getattr(mod, a, None), int)), None)
    if not heads:
        return None
    o = find(_O_NAMES)
    lq = children[q]
    head_dim = next((getattr(mod, a) for a in _HEAD_DIM_ATTRS if isinstance(getattr(mod, a, None), int)),
                    lq.out_features // heads)
    return {"q": q, "k": k, "v": v, "o": o, "heads": int(heads), "head_dim": int(head_dim)}


def _is_blocky(mod: nn.Module) -> bool:
    return (_lookup(BLOCK_CONVERTERS, mod) is not None or _attention_parts(mod) is not None
            or any(_attention_parts(m) is not None or _lookup(BLOCK_CONVERTERS, m) is not None
                   for m in mod.modules()))


def _block_map(root: nn.Module) -> dict[str, int]:
    """Paths of transformer blocks (items of a ModuleList/Sequential holding attention) -> index."""
    out: dict[str, int] = {}
    for path, m in root.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and _lookup(BLOCK_CONVERTERS, m) is None:
            for i, (name, child) in enumerate(m.named_children()):
                if _is_blocky(child):
                    out[_join(path, name)] = i
    return out


def _layer_of(rel_path: str, bmap: dict[str, int], default):
    best, best_len = default, -1
    for p, i in bmap.items():
        if (rel_path == p or rel_path.startswith(p + ".")) and len(p) > best_len:
            best, best_len = i, len(p)
    return best


# ----------------------------------------------------------------------------- fx fallback


_FX_IDENTITY_FUNCS = {F.dropout, torch.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}
_FX_IDENTITY_METHODS = {"contiguous", "clone", "detach"}


class _V:
    """A value while walking an fx graph: a float tensor, the mask, a constant, a tuple ..."""

    __slots__ = ("kind", "val")

    def __init__(self, kind: str, val: Any = None):
        self.kind, self.val = kind, val  # kind: "h", "mask", "const", "param", "tuple", "ignored"

    def __repr__(self):
        return f"_V({self.kind}, {self.val!r})"


class _HwTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if (_lookup(LEAF_CONVERTERS, m) is not None or _lookup(BLOCK_CONVERTERS, m) is not None
                or _attention_parts(m) is not None or _act_spec(m) is not None):
            return True
        return super().is_leaf_module(m, qualname)


def _module_supported(m: nn.Module) -> bool:
    return (_lookup(LEAF_CONVERTERS, m) is not None or _lookup(BLOCK_CONVERTERS, m) is not None
            or _attention_parts(m) is not None or _act_spec(m) is not None
            or isinstance(m, nn.MultiheadAttention))


def _fx_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(last)


def _convert_fx(ctx: _Ctx, module: nn.Module, path: str, layer_default, x: str, mask: str | None) -> str:
    cls = _pretty(module)
    sig = inspect.signature(module.forward)
    params = [p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not params:
        raise UnsupportedOpError(f"cannot trace {cls} at {_where(path)}: forward takes no tensor argument")
    mask_param = None
    if mask is not None:
        named = [p for p in params[1:] if "mask" in p.name.lower()]
        mask_param = named[0] if named else (params[1] if len(params) > 1 else None)
        if mask_param is None:
            raise UnsupportedOpError(f"cannot trace {cls} at {_where(path)}: a mask was given but "
                                     "forward takes no mask argument")
    concrete = {}
    for p in params[1:]:
        if p is mask_param:
            continue
        if p.default is inspect.Parameter.empty:
            raise UnsupportedOpError(f"cannot trace {cls} at {_where(path)}: forward argument '{p.name}' "
                                     "has no default (only the hidden state and a mask can be inputs)")
        concrete[p.name] = p.default
    try:
        # (a GraphModule owns the graph, which dead-code elimination needs)
        graph = fx.GraphModule(module, _HwTracer().trace(module, concrete_args=concrete or None)).graph
    except UnsupportedOpError:
        raise
    except Exception as e:  # noqa: BLE001 - fx raises many types
        raise UnsupportedOpError(f"cannot trace {cls} at {_where(path)} with torch.fx "
                                 f"({type(e).__name__}: {e})") from e
    graph.eliminate_dead_code()
    for node in graph.nodes:  # name an unsupported submodule before any op around it
        if node.op == "call_module" and not _module_supported(module.get_submodule(node.target)):
            raise _unsupported(module.get_submodule(node.target), _join(path, node.target))
    bmap = _block_map(module)
    env: dict[fx.Node, _V] = {}
    placeholders = 0
    result: _V | None = None

    def val(a) -> _V:
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, (tuple, list)):
            return _V("tuple", [val(i) for i in a])
        return _V("const", a)

    def need_h(v: _V | None, what, p) -> str:
        if v is None:
            raise _unsupported(what, p, "missing operand")
        if v.kind != "h":
            raise _unsupported(what, p, f"operand is {'a constant ' + repr(v.val) if v.kind == 'const' else v.kind}")
        return v.val

    for node in graph.nodes:
        rel = node.target if node.op == "call_module" else _fx_path(node)
        p = _join(path, rel)
        layer = _layer_of(rel, bmap, layer_default)
        if node.op == "placeholder":
            name = node.target.lstrip("*")
            if placeholders == 0:
                env[node] = _V("h", x)
            elif mask_param is not None and name == mask_param.name:
                env[node] = _V("mask", mask)
            else:
                env[node] = _V("const", concrete.get(name, concrete.get(re.sub(r"_\d+$", "", name))))
            placeholders += 1
        elif node.op == "get_attr":
            obj = module
            for part in node.target.split("."):
                obj = getattr(obj, part)
            env[node] = _V("param", obj.detach() if isinstance(obj, torch.Tensor) else obj)
        elif node.op == "call_module":
            sub = module.get_submodule(node.target)
            env[node] = _fx_call_module(ctx, sub, p, layer, node, env, val)
        elif node.op == "call_function":
            env[node] = _fx_call_function(ctx, node, p, layer, val, need_h)
        elif node.op == "call_method":
            env[node] = _fx_call_method(ctx, node, p, layer, val, need_h)
        elif node.op == "output":
            result = val(node.args[0])
    return _first_hidden(result, cls, path)


def _first_hidden(v: _V | None, cls: str, path: str) -> str:
    if v is not None and v.kind == "h":
        return v.val
    if v is not None and v.kind == "tuple":
        for item in v.val:
            if item.kind == "h":
                return item.val
    raise UnsupportedOpError(f"cannot trace {cls} at {_where(path)}: its output is not a tensor "
                             "computed from the input hidden state")


def _fx_call_function(ctx: _Ctx, node: fx.Node, p: str, layer, val, need_h) -> _V:
    fn = node.target
    args = [val(a) for a in node.args]
    kwargs = {k: val(a) for k, a in node.kwargs.items()}
    if getattr(fn, "__name__", "") in ("_assert_is_none", "_assert_is_not_none"):
        return _V("const", None)
    if fn is getattr:
        return _V("ignored", f"getattr {node.args[1]!r}")
    if fn is operator.getitem:
        base, idx = args[0], args[1]
        if base.kind == "tuple" and idx.kind == "const" and isinstance(idx.val, int):
            return base.val[idx.val]
        if base.kind == "ignored":
            return _V("ignored", base.val)
        raise _unsupported(fn, p, "indexing/slicing a tensor")
    if fn in (operator.add, torch.add, operator.iadd):
        if fn is torch.add and "alpha" in kwargs:
            raise _unsupported(fn, p, "alpha")
        a, c = need_h(args[0], fn, p), need_h(args[1] if len(args) > 1 else kwargs.get("other"), fn, p)
        return _V("h", ctx.add(a, c, _join(p, "add"), p, layer))
    if fn is F.gelu:
        x = need_h(args[0], fn, p)
        approx = kwargs["approximate"].val if "approximate" in kwargs else (
            args[1].val if len(args) > 1 else "none")
        return _V("h", ctx.act(x, ("gelu", approx), _join(p, "gelu"), p, layer))
    if fn in (F.relu, torch.relu):
        x = need_h(args[0], fn, p)
        return _V("h", ctx.act(x, ("relu",), _join(p, "relu"), p, layer))
    if fn in _FX_IDENTITY_FUNCS:
        return _V("h", need_h(args[0], fn, p))
    if fn is F.layer_norm:
        x = need_h(args[0], fn, p)
        names = ["normalized_shape", "weight", "bias", "eps"]
        a = {n: (args[i + 1] if i + 1 < len(args) else kwargs.get(n)) for i, n in enumerate(names)}
        shape = a["normalized_shape"].val if a["normalized_shape"] is not None else None
        if isinstance(shape, int):
            shape = (shape,)
        if shape is None or len(shape) != 1:
            raise _unsupported(fn, p, "normalized_shape must be the last dimension")
        h = int(shape[0])
        w = a["weight"].val if a["weight"] is not None and a["weight"].val is not None else torch.ones(h)
        bb = a["bias"].val if a["bias"] is not None and a["bias"].val is not None else torch.zeros(h)
        if not isinstance(w, torch.Tensor) or not isinstance(bb, torch.Tensor):
            raise _unsupported(fn, p, "weight/bias must be module parameters")
        eps = a["eps"].val if a["eps"] is not None else 1e-5
        return _V("h", ctx.layernorm(x, w, bb, float(eps), _join(p, "layer_norm"), p, layer))
    if fn is F.linear:
        x = need_h(args[0], fn, p)
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        bb = args[2] if len(args) > 2 else kwargs.get("bias")
        if w is None or w.kind != "param" or (bb is not None and bb.kind not in ("param", "const")):
            raise _unsupported(fn, p, "weight/bias must be module parameters")
        bias = bb.val if bb is not None else None
        return _V("h", ctx.linear(x, w.val.t(), bias, _join(p, "linear"), p, layer))
    raise _unsupported(fn, p)


def _fx_call_method(ctx: _Ctx, node: fx.Node, p: str, layer, val, need_h) -> _V:
    m = node.target
    args = [val(a) for a in node.args]
    self_v = args[0]
    if self_v.kind == "mask" and m in ("to", "float", "long", "int", "bool", "type", "contiguous"):
        return self_v
    if m in _FX_IDENTITY_METHODS:
        return _V("h", need_h(self_v, m, p))
    if m in ("float", "to"):
        rest = [a.val for a in args[1:]] + [v.val for v in (val(a) for a in node.kwargs.values())]
        if all(r in (torch.float32, "cpu") or isinstance(r, torch.device) for r in rest):
            return _V("h", need_h(self_v, m, p))
    if m in ("add", "__add__") and len(args) == 2:
        return _V("h", ctx.add(need_h(self_v, m, p), need_h(args[1], m, p), _join(p, "add"), p, layer))
    if m == "relu":
        return _V("h", ctx.act(need_h(self_v, m, p), ("relu",), _join(p, "relu"), p, layer))
    if self_v.kind == "ignored":
        return _V("ignored", self_v.val)
    raise _unsupported(m, p)


def _fx_call_module(ctx: _Ctx, sub: nn.Module, p: str, layer, node: fx.Node, env, val) -> _V:
    args = [val(a) for a in node.args]
    kwargs = {k: val(a) for k, a in node.kwargs.items()}
    everything = args + list(kwargs.values())
    hidden = {v.val for v in everything if v.kind == "h"}
    masks = [v for v in everything if v.kind == "mask"]
    if _attention_parts(sub) is not None and _lookup(LEAF_CONVERTERS, sub) is None:
        if len(hidden) != 1:
            raise _unsupported(sub, p, "attention must be self-attention on one hidden state")
        for v in everything:
            if v.kind not in ("h", "mask", "const"):
                raise _unsupported(sub, p, f"unexpected {v.kind} argument")
        x = hidden.pop()
        mask = masks[0].val if masks else None
        y, n_out = _convert_attention_leaf(ctx, sub, p, layer, x, mask, _fx_caller(sub, node, env))
        if n_out is None:
            return _V("h", y)
        return _V("tuple", [_V("h", y)] + [_V("ignored", "attention extra output (cache / weights)")]
                  * (n_out - 1))
    if isinstance(sub, nn.MultiheadAttention):
        return _fx_mha(ctx, sub, p, layer, node, args, kwargs)
    if len(hidden) != 1 or args[0].kind != "h":
        raise _unsupported(sub, p, "takes exactly one hidden-state tensor")
    x = args[0].val
    conv = _lookup(BLOCK_CONVERTERS, sub)
    if conv is not None:
        return _V("h", conv(ctx, sub, p, layer, x, masks[0].val if masks else None))
    if any(v.kind != "const" for v in everything[1:]) or any(
            v.val is not None for v in everything[1:] if v.kind == "const"):
        raise _unsupported(sub, p, "extra arguments")
    return _V("h", _convert_leaf_or_fail(ctx, sub, p, layer, x))


def _fx_caller(mod: nn.Module, node: fx.Node, env) -> Callable:
    """``call(x, mask)`` repeating an fx call_module with other inputs for x and mask."""

    def call(xp, mp):
        def sub(a):
            if isinstance(a, fx.Node):
                v = env[a]
                return xp if v.kind == "h" else mp if v.kind == "mask" else v.val
            return a

        return mod(*fx.node.map_aggregate(node.args, sub), **fx.node.map_aggregate(dict(node.kwargs), sub))

    return call


def _fx_mha(ctx: _Ctx, sub: nn.MultiheadAttention, p: str, layer, node: fx.Node, args, kwargs) -> _V:
    """A call ``mha(x, x, x, ...)``: self-attention without masks (batch_first only)."""
    if not sub.batch_first:
        raise _unsupported(sub, p, "batch_first=False inside a traced module")
    names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    qkv = [bound.get(n) for n in ("query", "key", "value")]
    if any(v is None or v.kind != "h" for v in qkv) or len({v.val for v in qkv}) != 1:
        raise _unsupported(sub, p, "only self-attention mha(x, x, x) is supported")
    for n in ("key_padding_mask", "attn_mask"):
        v = bound.get(n)
        if v is not None and not (v.kind == "const" and v.val is None):
            raise _unsupported(sub, p, f"{n} is not supported inside a traced module")
    causal = bound.get("is_causal")
    if causal is not None and not (causal.kind == "const" and not causal.val):
        raise _unsupported(sub, p, "is_causal is not supported inside a traced module")
    y = _emit_mha(ctx, sub, p, layer, qkv[0].val, None)
    return _V("tuple", [_V("h", y), _V("ignored", "attention weights")])


def _convert_leaf_or_fail(ctx: _Ctx, sub: nn.Module, p: str, layer, x: str) -> str:
    conv = _lookup(LEAF_CONVERTERS, sub)
    if conv is None and _act_spec(sub) is not None:
        conv = _leaf_act
    if conv is None:
        raise _unsupported(sub, p)
    return conv(ctx, sub, p, layer, x)


class _EvalMode:
    """Temporarily put a module (and its children) in eval mode."""

    def __init__(self, mod: nn.Module):
        self.mod = mod

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.mod.modules()]
        self.mod.eval()

    def __exit__(self, *exc):
        for m, t in self.flags:
            m.training = t


def _convert_attention_leaf(ctx: _Ctx, mod: nn.Module, p: str, layer, x: str, mask: str | None,
                            call: Callable) -> tuple[str, int | None]:
    """Emit q/k/v linears + attention (+ o linear) after probing ``mod`` for causal/scale.

    ``call(x, mask)`` runs the module the way the traced code calls it (mask None when the
    graph has none); its output (or first output) must equal the emitted ops'."""
    parts = _attention_parts(mod)
    lq, lk, lv = (getattr(mod, parts[r]) for r in ("q", "k", "v"))
    lo = getattr(mod, parts["o"]) if parts["o"] else None
    heads, hd = parts["heads"], parts["head_dim"]
    if lq.out_features != heads * hd or lk.out_features != heads * hd or lv.out_features != heads * hd:
        raise _unsupported(mod, p, f"q/k/v widths {lq.out_features}/{lk.out_features}/{lv.out_features} "
                           f"are not heads*head_dim = {heads}*{hd} (grouped/multi-query attention)")
    # Probe: run the module on a random input (and a mask with padding) and find the
    # attention semantics that reproduce it.
    gen = torch.Generator().manual_seed(1234)
    xp = torch.randn(2, 7, lq.in_features, generator=gen)
    mp = torch.ones(2, 7, dtype=ctx.mask_dtype)
    mp[1, 5:] = 0
    try:
        with torch.no_grad(), _EvalMode(mod):
            out = call(xp, mp if mask is not None else None)
            n_out = None
            if isinstance(out, (tuple, list)):
                n_out = len(out)
                out = out[0]
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"returned {type(out).__name__}")
            q, k, v = (lin(xp) for lin in (lq, lk, lv))
            mref = mp if mask is not None else None
            scales = [float(getattr(mod, a)) for a in _SCALE_ATTRS
                      if isinstance(getattr(mod, a, None), (float, int)) and not isinstance(getattr(mod, a), bool)]
            scales += [1.0 / math.sqrt(hd), 1.0]
            found = None
            for scale in scales:
                for causal in (False, True):
                    ctx_v, _ = attention_float(q, k, v, mref, heads, hd, causal, scale)
                    ref = lo(ctx_v) if lo is not None else ctx_v
                    if ref.shape == out.shape and torch.allclose(ref, out.float(), atol=1e-4, rtol=1e-4):
                        found = (scale, causal)
                        break
                if found:
                    break
    except Exception as e:  # noqa: BLE001
        raise _unsupported(mod, p, f"probing the attention module failed: {type(e).__name__}: {e}") from e
    if found is None:
        raise _unsupported(mod, p, "its output is not multi-head softmax attention over its q/k/v"
                           f"{'/' + parts['o'] if lo is not None else ''} projections "
                           "(tried causal and non-causal, scale 1/sqrt(head_dim) and 1)")
    scale, causal = found
    projs = [(_join(p, parts[r]), _join(p, parts[r]), getattr(mod, parts[r]).weight.detach().t(),
              getattr(mod, parts[r]).bias) for r in ("q", "k", "v")]
    y = ctx.attention(x, mask, projs, heads, hd, causal, scale, p, p, layer)
    if lo is not None:
        y = ctx.nn_linear(y, lo, _join(p, parts["o"]), layer)
    return y, n_out


# ----------------------------------------------------------------------------- dispatch + entry


def _convert_block(ctx: _Ctx, mod: nn.Module, path: str, layer, x: str, mask: str | None) -> str:
    conv = _lookup(BLOCK_CONVERTERS, mod)
    if conv is not None:
        return conv(ctx, mod, path, layer, x, mask)
    if _lookup(LEAF_CONVERTERS, mod) is not None or _act_spec(mod) is not None:
        return _convert_leaf_or_fail(ctx, mod, path, layer, x)
    if _attention_parts(mod) is not None:  # an attention module traced on its own
        call = (lambda xp, mp: mod(xp)) if mask is None else (lambda xp, mp: mod(xp, mp))
        return _convert_attention_leaf(ctx, mod, path, layer, x, mask, call)[0]
    return _convert_fx(ctx, mod, path, layer, x, mask)


def split_example(example: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(x, mask)`` from an example input: a tensor, ``(x,)``, ``(x, mask)`` or a dict with
    "x" (or "hidden_states"/"src") and optionally "mask" (or "attention_mask")."""
    if example is None:
        return None, None
    if isinstance(example, torch.Tensor):
        return example, None
    if isinstance(example, np.ndarray):
        return torch.from_numpy(example), None
    if isinstance(example, dict):
        x = next((example[k] for k in ("x", "hidden_states", "src") if k in example), None)
        m = next((example[k] for k in ("mask", "attention_mask") if k in example), None)
    elif isinstance(example, (tuple, list)) and 1 <= len(example) <= 2:
        x = example[0]
        m = example[1] if len(example) == 2 else None
    else:
        raise ValueError("example input must be a tensor, (x,), (x, mask) or a dict with 'x' and 'mask'; "
                         f"got {type(example).__name__}")
    x = torch.as_tensor(x) if x is not None else None
    m = torch.as_tensor(m) if m is not None else None
    return x, m


def _hidden_size(module: nn.Module) -> int:
    if isinstance(module, nn.TransformerEncoderLayer):
        return int(module.self_attn.embed_dim)
    if isinstance(module, nn.TransformerEncoder):
        return int(module.layers[0].self_attn.embed_dim)
    keys = _class_keys(module)
    if "transformers.BertLayer" in keys:
        return int(module.attention.self.query.in_features)
    if "transformers.GPT2Block" in keys:
        return int(module.ln_1.normalized_shape[0])
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    raise UnsupportedOpError(f"cannot tell the hidden size of {_pretty(module)}: pass example_input")


def trace(module: nn.Module, kind: str | None = None, example_input: Any = None, *,
          mask: bool | None = None, name: str | None = None, kv_cache: bool | None = None) -> Graph:
    """Trace ``module`` into a validated float graph.

    ``kind``: "block" ((B,S,H) -> (B,S,H)), "encoder" (HF BertModel sentence encoder) or
    "decoder" (GPT-like LM); ``None`` picks the module's natural kind. ``example_input``
    (block kind: see :func:`split_example`) gives the hidden size and whether a mask is
    used; ``mask`` forces a "mask" input on or off. ``kv_cache`` marks attention nodes
    for incremental decoding (default: True for decoders). Raises
    :class:`UnsupportedOpError` for what cannot be expressed.
    """
    natural = natural_kind(module)
    kind = kind or natural
    if kind not in KINDS:
        raise ValueError(f"unknown graph kind '{kind}'; expected one of {KINDS}")
    if kind != natural:
        raise ValueError(f"{_pretty(module)} traces as a '{natural}' graph, not '{kind}'")
    kv = (kind == "decoder") if kv_cache is None else bool(kv_cache)
    b = _Builder(name or type(module).__name__, kind)
    x_ex, m_ex = split_example(example_input) if kind == "block" else (None, None)
    ctx = _Ctx(b, kv_cache=kv, mask_dtype=m_ex.dtype if m_ex is not None else torch.long)
    with torch.no_grad():
        if kind == "encoder":
            _conv_bert_model(ctx, module)
        elif kind == "decoder":
            _conv_gpt_like(ctx, module)
        else:
            seq_first = False
            if isinstance(module, nn.TransformerEncoderLayer):
                seq_first = not module.self_attn.batch_first
            elif isinstance(module, nn.TransformerEncoder):
                seq_first = not module.layers[0].self_attn.batch_first
            ctx.seq_first_ok = seq_first
            h_dim = int(x_ex.shape[-1]) if x_ex is not None else _hidden_size(module)
            x = b.input("x", ("B", "S", h_dim), "float")
            use_mask = (m_ex is not None) if mask is None else bool(mask)
            m = b.input("mask", ("B", "S"), "index") if use_mask else None
            xq = b.op("quantize", [x], name="quant_x", source="", layer=None, shape=("B", "S", h_dim))
            layer0 = None if _block_map(module) or isinstance(module, nn.TransformerEncoder) else 0
            y = _convert_block(ctx, module, "", layer0, xq, m)
            if y == xq or b.g.tensors[y].kind != "activation":
                raise UnsupportedOpError(f"{_pretty(module)} computes nothing the graph can hold "
                                         "(identity module)")
            b.rename(y, "y")
            b.g.outputs = ["y"]
            b.g.meta.update({"hidden": h_dim, "seq_first": seq_first, "mask": use_mask})
    b.g.meta["module_class"] = _pretty(module)
    b.g.meta["kv_cache"] = kv
    b.g.validate()
    return b.g


# ----------------------------------------------------------------------------- torch reference


def _additive_mask(mask: torch.Tensor | None, s: int, causal: bool, dtype=torch.float32) -> torch.Tensor | None:
    """HF-style 4D additive mask (B or 1, 1, S, S): 0 where allowed, finfo.min elsewhere."""
    allowed = None
    if mask is not None:
        allowed = (mask != 0)[:, None, None, :].expand(-1, 1, s, -1)
    if causal:
        tri = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
        allowed = tri if allowed is None else allowed & tri
    if allowed is None:
        return None
    out = torch.zeros(allowed.shape, dtype=dtype)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def reference_forward(module: nn.Module, graph: Graph, feeds: dict[str, Any]) -> torch.Tensor:
    """The torch module's own float output for graph-style ``feeds`` (what the graph
    output means): embeddings (encoder, mean pooled over the mask), logits (decoder)
    or the block output, batch-first. Each module type is called with its own mask
    convention (TransformerEncoderLayer: src_key_padding_mask; HF layers: 4D additive)."""
    kind = graph.meta.get("kind", "block")

    def t(name, dtype):
        v = feeds[name]
        v = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
        return v.to(dtype)

    with torch.no_grad(), _EvalMode(module):
        if kind == "encoder":
            ids, mask = t("ids", torch.long), t("mask", torch.long)
            hid = module(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hid.dtype)
            return (hid * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
        if kind == "decoder":
            out = module(t("ids", torch.long))
            return out[0] if isinstance(out, (tuple, list)) else out
        x = t("x", torch.float32)
        mask = t("mask", torch.long) if "mask" in feeds and graph.meta.get("mask") else None
        seq_first = bool(graph.meta.get("seq_first"))
        keys = _class_keys(module)
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            kpm = None if mask is None else (mask == 0)
            # The fast path turns padded positions into zeros (nested tensors); the slow
            # path computes every position, as the graph does.
            fast = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                out = module(x.transpose(0, 1) if seq_first else x, src_key_padding_mask=kpm)
            finally:
                torch.backends.mha.set_fastpath_enabled(fast)
            if seq_first:
                out = out.transpose(0, 1)
        elif "transformers.BertLayer" in keys or "transformers.GPT2Block" in keys:
            causal = any(n.attrs.get("causal") for n in graph.nodes if n.op == "attention")
            am = _additive_mask(mask, x.shape[1], causal)
            out = module(x, attention_mask=am)
        elif mask is not None:
            out = module(x, mask)
        else:
            out = module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out
