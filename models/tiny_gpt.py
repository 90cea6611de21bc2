"""TinyGPT: a byte-level GPT-style causal decoder with a KV cache, plus its shipped checkpoint.

Model (GPT-2 layout, pre-norm)::

    h = tok_emb(ids) + pos_emb(positions)
    for block in blocks:                    # blocks[i]
        h = h + block.attn(block.ln1(h))    # causal MHA, q/k/v/o nn.Linear (with bias)
        h = h + block.fc2(block.act(block.fc1(block.ln2(h))))   # act: GELU, tanh approximation
    logits = lm_head(ln_f(h))               # untied from tok_emb

Contract:

- Vocabulary: the 256 byte values. :func:`encode` is ``text.encode('utf-8')`` as a 1-D
  LongTensor; :func:`decode` is ``bytes(ids).decode('utf-8', errors='replace')``.
- ``TinyGPT.forward(ids, past_kv=None) -> (logits, new_past_kv)``: ``ids`` is (batch, seq);
  ``past_kv`` is None or a list with one ``(k, v)`` per layer, each (batch, heads, t, head_dim);
  new tokens get positions ``t .. t+seq-1`` and attend causally to the cache and to each
  other. ``new_past_kv`` is the cache extended by ``seq``. ``t + seq`` must be <= ``ctx``.
  Incremental decoding with the cache equals the full forward (up to float rounding).
- :func:`generate` feeds the prompt once, then one token per step through the cache.
- :func:`eval_perplexity` is per-byte perplexity, ``exp(mean NLL in nats)``.
- :func:`load_tiny_gpt` loads ``models/tiny_gpt.pt`` (``{"config": dict, "state_dict": ...}``).

No dropout anywhere and no value-dependent control flow inside the modules, so the blocks
can be traced by torch.fx (the cache concatenation only happens when ``past`` is given).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TinyGPTConfig",
    "CausalSelfAttention",
    "Block",
    "TinyGPT",
    "encode",
    "decode",
    "generate",
    "generate_ids",
    "eval_perplexity",
    "load_tiny_gpt",
    "DEFAULT_CHECKPOINT",
    "DATA_DIR",
]

MODELS_DIR = Path(__file__).resolve().parent
DATA_DIR = MODELS_DIR / "data"
DEFAULT_CHECKPOINT = MODELS_DIR / "tiny_gpt.pt"

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TinyGPTConfig:
    """Hyper-parameters. ``gelu`` is the ``approximate`` argument of nn.GELU ("tanh" or "none")."""

    vocab: int = 256
    ctx: int = 128
    d: int = 128
    heads: int = 4
    layers: int = 4
    ffn: int = 512
    eps: float = 1e-5
    gelu: str = "tanh"


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with separate q/k/v/o projections and an optional KV cache."""

    def __init__(self, d: int, heads: int, ctx: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by heads={heads}")
        self.d = d
        self.heads = heads
        self.head_dim = d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        # causal[i, j]: position i may attend to position j (j <= i). Not saved in state_dict.
        self.register_buffer("causal", torch.ones(ctx, ctx, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: (b, s, d); past: (k, v) each (b, heads, t, head_dim). Returns (y, (k, v))."""
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        t_all = k.shape[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        # The s queries sit at absolute positions t_all - s .. t_all - 1.
        # (narrow rather than slicing, so torch.fx can trace it with symbolic shapes)
        allowed = self.causal.narrow(0, t_all - s, s).narrow(1, 0, t_all)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = F.softmax(scores, dim=-1)
        y = torch.matmul(probs, v).transpose(1, 2).contiguous().view(b, s, self.d)
        return self.o(y), (k, v)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(ln1(x)), then x + fc2(gelu(fc1(ln2(x))))."""

    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d, eps=cfg.eps)
        self.attn = CausalSelfAttention(cfg.d, cfg.heads, cfg.ctx)
        self.ln2 = nn.LayerNorm(cfg.d, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.d, cfg.ffn)
        self.act = nn.GELU(approximate=cfg.gelu)
        self.fc2 = nn.Linear(cfg.ffn, cfg.d)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        a, kv = self.attn(self.ln1(x), past)
        x = x + a
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return x, kv


class TinyGPT(nn.Module):
    """Byte-level GPT: token + learned position embeddings, ``layers`` pre-norm blocks, ln_f, lm_head."""

    def __init__(self, cfg: TinyGPTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TinyGPTConfig()
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d)
        self.pos_emb = nn.Embedding(cfg.ctx, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.d, cfg.vocab)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2*layers)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            for lin in (blk.attn.o, blk.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.cfg.layers))

    def forward(self, ids: torch.Tensor, past_kv: KVCache | None = None):
        """ids: (batch, seq) int64. Returns (logits (batch, seq, vocab), new_past_kv)."""
        _, s = ids.shape
        t0 = 0 if past_kv is None else past_kv[0][0].shape[2]
        if t0 + s > self.cfg.ctx:
            raise ValueError(f"sequence of {t0 + s} positions exceeds the context of {self.cfg.ctx}")
        pos = torch.arange(t0, t0 + s, device=ids.device)
        h = self.tok_emb(ids) + self.pos_emb(pos)[None]
        new_kv: KVCache = []
        for i, blk in enumerate(self.blocks):
            h, kv = blk(h, None if past_kv is None else past_kv[i])
            new_kv.append(kv)
        return self.lm_head(self.ln_f(h)), new_kv

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- text helpers


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a 1-D LongTensor."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    """Bytes (tensor or iterable of ints in 0..255) to str; invalid UTF-8 becomes U+FFFD."""
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@torch.no_grad()
def generate_ids(
    model: TinyGPT,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue a 1-D id tensor by exactly ``max_new_tokens`` bytes; returns only the new ids.

    The prompt is fed once (its last ``ctx`` bytes), then one token per step through the
    KV cache. When the cache is full, the last ``ctx // 2`` tokens are re-fed without a
    cache (positions restart at 0) and decoding continues incrementally from there.
    """
    model.eval()
    ctx = model.cfg.ctx
    ids = prompt_ids.flatten().tolist() or [ord("\n")]  # an empty prompt starts at a newline
    out: list[int] = []
    dev = next(model.parameters()).device
    logits, past = model(torch.tensor([ids[-ctx:]], device=dev))
    for _ in range(max_new_tokens):
        last = logits[0, -1].float()
        if greedy:
            nxt = int(last.argmax())
        else:
            probs = F.softmax(last / temperature, dim=-1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        out.append(nxt)
        ids.append(nxt)
        if past[0][0].shape[2] >= ctx:  # cache full: re-prime with a shorter window
            logits, past = model(torch.tensor([ids[-(ctx // 2):]], device=dev))
        else:
            logits, past = model(torch.tensor([[nxt]], device=dev), past)
    return torch.tensor(out, dtype=torch.long)


def generate(
    model: TinyGPT,
    prompt: str,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> str:
    """Return ``prompt`` followed by ``max_new_tokens`` generated bytes, decoded as UTF-8.

    Greedy (argmax) by default; ``greedy=False`` samples from softmax(logits / temperature)
    using ``generator`` (seed it for reproducible samples).
    """
    new = generate_ids(model, encode(prompt), max_new_tokens, greedy, temperature, generator)
    return decode(list(prompt.encode("utf-8")) + new.tolist())


@torch.no_grad()
def eval_perplexity(model: TinyGPT, text: str, ctx: int = 128, batch: int = 64) -> float:
    """Per-byte perplexity exp(mean NLL) of ``text`` with non-overlapping windows.

    The byte stream is cut into consecutive windows of ``ctx + 1`` bytes that overlap by one
    byte (stride ``ctx``); each window predicts its last ``ctx`` bytes from the preceding ones
    within the window (context 0..ctx-1 bytes; no state is carried across windows). So every
    byte except the first is scored exactly once; a shorter final window is included.
    """
    model.eval()
    ctx = min(ctx, model.cfg.ctx)
    data = encode(text)
    if data.numel() < 2:
        raise ValueError("text must have at least 2 bytes")
    dev = next(model.parameters()).device
    total_nll, count = 0.0, 0
    starts = list(range(0, data.numel() - 1, ctx))
    full = [s for s in starts if s + ctx + 1 <= data.numel()]
    tail = [s for s in starts if s + ctx + 1 > data.numel()]
    for i in range(0, len(full), batch):
        w = torch.stack([data[s : s + ctx + 1] for s in full[i : i + batch]]).to(dev)
        logits, _ = model(w[:, :-1])
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1), reduction="sum").item()
        count += w[:, 1:].numel()
    for s in tail:
        w = data[s:].to(dev)[None]
        logits, _ = model(w[:, :-1])
        total_nll += F.cross_entropy(logits[0].float(), w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    return math.exp(total_nll / count)


def load_tiny_gpt(path: str | Path = DEFAULT_CHECKPOINT, map_location: str = "cpu") -> TinyGPT:
    """Load a TinyGPT checkpoint (``{"config": dict, "state_dict": ...}``), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TinyGPT checkpoint {path} not found; train one with: python models/train_tiny_gpt.py")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = TinyGPT(TinyGPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def save_tiny_gpt(model: TinyGPT, path: str | Path, **extra) -> None:
    """Save ``{"config": asdict(cfg), "state_dict": ..., **extra}`` (extra: plain metadata)."""
    torch.save({"config": asdict(model.cfg), "state_dict": model.state_dict(), **extra}, Path(path))
