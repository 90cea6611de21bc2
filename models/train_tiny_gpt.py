"""Train TinyGPT on models/data/tiny_corpus_train.txt (CPU, seeded) and save models/tiny_gpt.pt.

Recipe: random windows of ctx+1 bytes from the training text (teacher forcing on all ctx
positions), AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine
decay to 10 % of the peak LR, gradient-norm clip 1.0. Every ``--eval-every`` steps it logs
the per-byte perplexity on the held-out split (models/data/tiny_corpus_eval.txt); the eval
text is only measured, never used to pick a checkpoint: the saved model is the last step.

    python models/train_tiny_gpt.py                       # the recipe in models/README.md
    python models/train_tiny_gpt.py --steps 50 --out /tmp/t.pt   # a quick smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.tiny_gpt import (  # noqa: E402
    DATA_DIR,
    DEFAULT_CHECKPOINT,
    TinyGPT,
    TinyGPTConfig,
    encode,
    eval_perplexity,
    generate,
    save_tiny_gpt,
)


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine down to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    train = encode((DATA_DIR / "tiny_corpus_train.txt").read_text(encoding="utf-8"))
    eval_text = (DATA_DIR / "tiny_corpus_eval.txt").read_text(encoding="utf-8")
    cfg = TinyGPTConfig(ctx=args.ctx, d=args.d, heads=args.heads, layers=args.layers, ffn=args.ffn)
    model = TinyGPT(cfg)
    print(f"config {cfg}; {model.num_params()} params; train {train.numel()} bytes", file=sys.stderr)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    offsets = torch.arange(cfg.ctx + 1)
    t_start = time.time()
    ema = None
    for step in range(args.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, train.numel() - cfg.ctx - 1, (args.batch,), generator=gen)
        w = train[starts[:, None] + offsets]
        logits, _ = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            ppl = eval_perplexity(model, eval_text, ctx=cfg.ctx)
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} (ema {ema:.4f}) "
                  f"eval ppl/byte {ppl:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{time.time() - t_start:.0f}s", file=sys.stderr, flush=True)

    elapsed = time.time() - t_start
    # Final train loss: mean over 32 fixed-seed batches (less noisy than the last step).
    model.eval()
    fg = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = []
        for _ in range(32):
            w = train[torch.randint(0, train.numel() - cfg.ctx - 1, (args.batch,), generator=fg)[:, None] + offsets]
            logits, _ = model(w[:, :-1])
            losses.append(F.cross_entropy(logits.reshape(-1, cfg.vocab), w[:, 1:].reshape(-1)).item())
    train_loss = sum(losses) / len(losses)
    ppl = eval_perplexity(model, eval_text, ctx=cfg.ctx)
    meta = {
        "train": {
            "command": " ".join(["python", "models/train_tiny_gpt.py", *(argv if argv is not None else sys.argv[1:])]),
            "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "warmup": args.warmup, "weight_decay": args.wd, "threads": args.threads,
            "seconds": round(elapsed, 1), "final_train_loss_nats": round(train_loss, 4),
            "eval_ppl_per_byte": round(ppl, 4), "torch": str(torch.__version__),
        }
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_tiny_gpt(model, args.out, **meta)
    print(f"trained {args.steps} steps in {elapsed:.0f}s; final train loss {train_loss:.4f} nats/byte; "
          f"eval ppl/byte {ppl:.3f}; saved {args.out}", file=sys.stderr)
    print(repr(generate(model, "The ", 300)), file=sys.stderr)


if __name__ == "__main__":
    main()
