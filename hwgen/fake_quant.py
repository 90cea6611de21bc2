"""Fake quantization for the float distillation stage: the golden model's
roundings where most of its error comes from, at the float executor's speed.

The exact QAT stage (:class:`hwgen.qat.QATModel`) runs the golden model each
step: bit-exact, CPU only, about ten times the cost of a float step. Most of
the W8A8 error of a transformer is the rounding of two kinds of value, which
can be reproduced in torch float on any device:

* **linear weights**: each column rounded to its code (8 bits at W8) as
  :func:`hwgen.quant.quantize_weights` does (row pre-scale of a per-channel
  input, per-column integer bits chosen by least squared error among three
  candidates, ``AP_RND`` rounding, ``AP_SAT`` saturation), recomputed from the
  current weights at every forward: :meth:`FakeQuant.weight` equals
  :func:`hwgen.qat.dequantize_weight` of the quantized graph, value for value
  (``tests/test_fake_quant.py``);
* **activations**: every op output rounded (``AP_RND``) and saturated to the
  format calibration gave it (per channel where it has one), formats frozen
  at construction; embedding tables to their formats.

Everything else (the integer softmax, reciprocal and square-root tables,
probability rounding, accumulator widths) stays float: the forward is an
approximation of the golden model, not the golden model. Gradients are
straight-through (identity), as in QAT. The exact QAT stage still follows
and still decides the codes that are exported.
"""
from __future__ import annotations

import numpy as np
import torch

from .ir import Graph, GraphError
from .quant import linear_row_shift


def _round_sat(x: torch.Tensor, frac: torch.Tensor | float, lo: int, hi: int) -> torch.Tensor:
    """``x`` rounded half up to ``frac`` fractional bits and saturated to codes
    ``lo..hi``, as a real value (``frac`` broadcasts against ``x``)."""
    scale = torch.pow(2.0, torch.as_tensor(frac, dtype=x.dtype, device=x.device))
    return torch.clamp(torch.floor(x * scale + 0.5), lo, hi) / scale


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward ``q``, gradient of ``x``."""
    return x + (q - x).detach()


class FakeQuant:
    """The rounding of a quantized graph ``fixed`` (the output of
    :func:`hwgen.quant.quantize_weights` for the student as it starts), applied
    to a float forward of the same graph on ``device``.

    ``weight(name, w)``: a linear's weight ``w`` (float, any values) through its
    codes (the weight width), the integer bits recomputed from ``w``; other weights pass
    unchanged. ``act(name, y)``: an op output rounded to its frozen format (an
    embedding's output: its table's format), as float32 whatever ``y``'s
    dtype (under bfloat16 autocast the rounded values stay exact)."""

    def __init__(self, fixed: Graph, device: str | torch.device = "cpu"):
        if not fixed.meta.get("quantized"):
            raise GraphError("FakeQuant needs a quantized graph (quantize_weights' output)")
        self.device = torch.device(device)
        self.per_channel = bool(fixed.meta["quant_config"]["per_channel"])
        self._linear: dict[str, tuple[torch.Tensor, int]] = {}
        for node in fixed.nodes:
            if node.op == "linear":
                shift = torch.from_numpy(linear_row_shift(fixed, node).astype(np.float64))
                self._linear[node.inputs[1]] = (shift.to(self.device), fixed.tensors[node.inputs[1]].fmt.width)
        # an embedding's output has its table's format: rounding the gathered
        # rows is rounding the table, at a fraction of the cost
        self._acts = {node.outputs[0]: self._format(fixed, node.outputs[0]) for node in fixed.nodes
                      if fixed.tensors[node.outputs[0]].fmt is not None}

    def _format(self, fixed: Graph, name: str) -> tuple[torch.Tensor, int, int]:
        t = fixed.tensors[name]
        frac = torch.as_tensor(np.asarray(t.frac_bits(), dtype=np.float64), device=self.device)
        return frac, t.fmt.min_code, t.fmt.max_code

    @property
    def activations(self) -> list[str]:
        """The op outputs :meth:`act` rounds."""
        return list(self._acts)

    def weight(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if name not in self._linear:
            return w
        shift, width = self._linear[name]
        return _straight_through(w, linear_weight_values(w.detach().double(), shift, width,
                                                         self.per_channel).to(w.dtype))

    def act(self, name: str, y: torch.Tensor) -> torch.Tensor:
        f = self._acts.get(name)
        if f is None:
            return y
        # float32 holds every code of up to 24 bits exactly; a bfloat16 output (autocast)
        # comes back float32, so a 16-bit format's codes keep their low bits
        frac, lo, hi = f
        y = y.float()
        return _straight_through(y, _round_sat(y.detach(), frac, lo, hi))


def linear_weight_values(w: torch.Tensor, shift: torch.Tensor, width: int, per_channel: bool = True,
                         candidates: int = 3) -> torch.Tensor:
    """The real values of a linear weight's codes (float64 ``w`` of shape (K, N),
    input-channel row pre-scale ``shift`` (K,)): :func:`hwgen.quant.per_channel_int_bits`
    and :func:`hwgen.quant.quantize_per_channel` along the columns (one format
    for all of them unless ``per_channel``), in torch."""
    ws = w * torch.pow(2.0, shift)[:, None]
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    absmax = ws.abs().amax(dim=0)
    if not per_channel:
        absmax = absmax.max().expand_as(absmax)
    # int_bits_for: fewest integer bits covering absmax, stepped up if it lands beyond the top code
    top = torch.where(absmax > 0, torch.floor(torch.log2(torch.clamp(absmax, min=1e-300))) + 2,
                      torch.ones_like(absmax))
    top_val = hi * torch.pow(2.0, top - width)
    top = torch.where(absmax > top_val + torch.pow(2.0, top - width) / 2, top + 1, top)
    best_err = best_q = None
    for c in range(candidates):
        q = _round_sat(ws, (width - (top - c))[None, :], lo, hi)
        err = ((q - ws) ** 2).sum(dim=0)
        if not per_channel:
            err = err.sum().expand_as(err)
        if best_q is None:
            best_err, best_q = err, q
        else:
            better = err < best_err          # strictly: ties keep the wider format
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better[None, :], q, best_q)
    return best_q / torch.pow(2.0, shift)[:, None]

