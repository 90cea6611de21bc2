"""A BERT-style transformer encoder block in plain torch.

Structure (post-norm, as in BERT)::

    a = BertSelfAttention(x, mask)          # q/k/v/o nn.Linear, softmax attention
    x = LayerNorm1(x + a)
    f = out(GELU(inter(x)))                 # nn.Linear -> nn.GELU() (exact, erf) -> nn.Linear
    y = LayerNorm2(x + f)

Contract:

- input ``x``: float tensor (batch, seq, hidden); output has the same shape.
- optional ``attention_mask``: (batch, seq) with 1 for real tokens and 0 for padding
  (the HF convention); it becomes an additive bias ``(1 - mask) * -10000`` on the
  attention scores of the padded *keys*. Without it every position attends everywhere.
- The forward has no control flow that depends on tensor values (only on whether the
  mask argument is given), so torch.fx can trace it. No dropout.
- :func:`factory` returns ``(module.eval(), example_input)`` with seeded weights:
  hidden 64, 4 heads, FFN 256, batch 2, seq 16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BertSelfAttention", "BertBlock", "factory"]


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v, o projections (all with bias)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
        self.hidden = hidden
        self.heads = heads
        self.head_dim = hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        # (b, s, hidden) -> (b, heads, s, head_dim)
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if attention_mask is not None:
            # (b, s) 1/0 mask -> additive bias (b, 1, 1, s) over the keys.
            bias = (1.0 - attention_mask.to(scores.dtype)) * -10000.0
            scores = scores + bias[:, None, None, :]
        probs = F.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v)  # (b, heads, s, head_dim)
        ctx = ctx.transpose(1, 2).contiguous().view(b, s, self.hidden)
        return self.o(ctx)


class BertBlock(nn.Module):
    """One post-norm BERT encoder layer: attention + residual + LN, FFN + residual + LN."""

    def __init__(self, hidden: int = 64, heads: int = 4, ffn: int = 256, eps: float = 1e-12):
        super().__init__()
        self.attn = BertSelfAttention(hidden, heads)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.inter = nn.Linear(hidden, ffn)
        self.act = nn.GELU()  # exact (erf) GELU, as in BERT
        self.out = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, attention_mask))
        return self.ln2(x + self.out(self.act(self.inter(x))))


def factory(seed: int = 0) -> tuple[BertBlock, torch.Tensor]:
    """Seeded BertBlock(hidden=64, heads=4, ffn=256) in eval mode and an input (2, 16, 64).

    Weights use PyTorch's default init under ``torch.manual_seed(seed)``, except the
    LayerNorm affine parameters, which are perturbed around (1, 0) so they are not
    trivially identity. The same seed always gives the same module and input.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = BertBlock(hidden=64, heads=4, ffn=256)
    with torch.no_grad():
        for ln in (block.ln1, block.ln2):
            ln.weight.copy_(1.0 + 0.1 * torch.randn(ln.weight.shape, generator=gen))
            ln.bias.copy_(0.1 * torch.randn(ln.bias.shape, generator=gen))
    x = torch.randn(2, 16, 64, generator=gen)
    return block.eval(), x
