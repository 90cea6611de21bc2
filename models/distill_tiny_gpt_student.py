"""Distil models/tiny_gpt.pt (4 layers) into a TinyGPT with half the layers: models/tiny_gpt_student.pt.

Student: the teacher's config with ``layers = teacher.layers // 2`` (d, heads, ffn, ctx
unchanged). Initialisation: embeddings, final layernorm and head copied from the teacher;
student block ``i`` copied from teacher block ``init[i]`` (``--init``, default every other
block: 0, 2). Loss per batch (random windows of the training text, as in
models/train_tiny_gpt.py), from :mod:`hwgen.distill`:

    kd_weight * kd_logits(student, teacher, T)            # KL(teacher || student) * T^2
  + ce_weight * cross-entropy on the true next byte
  + hidden_weight * mean_i hidden_mse(h_student[i], h_teacher[match[i]])

with student block ``i``'s output matched to teacher block ``2i + 1``'s (the last block to
the last block). AdamW, warmup then cosine decay, grad-norm clip 1.0, seeded. The held-out
text (models/data/tiny_corpus_eval.txt) is only measured at the end, never used for
selection; the saved model is the last step.

    python models/distill_tiny_gpt_student.py                  # the recipe in models/README.md
    python models/distill_tiny_gpt_student.py --steps 20 --out /tmp/s.pt   # smoke run
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hwgen.distill import hidden_mse, kd_logits  # noqa: E402
from models.tiny_gpt import (  # noqa: E402
    DATA_DIR,
    MODELS_DIR,
    TinyGPT,
    TinyGPTConfig,
    encode,
    eval_perplexity,
    generate,
    load_tiny_gpt,
    save_tiny_gpt,
)

DEFAULT_STUDENT = MODELS_DIR / "tiny_gpt_student.pt"


def hidden_states(model: TinyGPT, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every block's output (the residual stream after block i)."""
    pos = torch.arange(ids.shape[1])
    h = model.tok_emb(ids) + model.pos_emb(pos)[None]
    hs = []
    for blk in model.blocks:
        h, _ = blk(h)
        hs.append(h)
    return model.lm_head(model.ln_f(h)), hs


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def make_student(teacher: TinyGPT, init: list[int]) -> TinyGPT:
    cfg = TinyGPTConfig(**{**teacher.cfg.__dict__, "layers": len(init)})
    student = TinyGPT(cfg)
    sd = student.state_dict()
    tsd = teacher.state_dict()
    for k in sd:
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            src = f"blocks.{init[int(i)]}.{rest}"
        else:
            src = k
        sd[k] = tsd[src].clone()
    student.load_state_dict(sd)
    return student


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=MODELS_DIR / "tiny_gpt.pt")
    ap.add_argument("--out", type=Path, default=DEFAULT_STUDENT)
    ap.add_argument("--init", default="0,2", help="teacher blocks copied into the student's blocks")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=0.5)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    teacher = load_tiny_gpt(args.teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    init = [int(v) for v in args.init.split(",")]
    if len(init) != teacher.cfg.layers // 2 or not all(0 <= i < teacher.cfg.layers for i in init):
        raise SystemExit(f"--init must name {teacher.cfg.layers // 2} teacher blocks in 0..{teacher.cfg.layers - 1}")
    student = make_student(teacher, init)
    tl, sl = teacher.cfg.layers, student.cfg.layers
    match = [min(2 * i + 1, tl - 1) for i in range(sl)]
    match[-1] = tl - 1
    train = encode((DATA_DIR / "tiny_corpus_train.txt").read_text(encoding="utf-8"))
    eval_text = (DATA_DIR / "tiny_corpus_eval.txt").read_text(encoding="utf-8")
    ctx = teacher.cfg.ctx
    print(f"student {student.cfg}; {student.num_params()} params (teacher {teacher.num_params()}); "
          f"init from teacher blocks {init}; hidden match {match}", file=sys.stderr)

    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    offsets = torch.arange(ctx + 1)
    t0 = time.time()
    for step in range(args.steps):
        student.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, train.numel() - ctx - 1, (args.batch,), generator=gen)
        w = train[starts[:, None] + offsets]
        x, y = w[:, :-1], w[:, 1:]
        with torch.no_grad():
            t_logits, t_hs = hidden_states(teacher, x)
        s_logits, s_hs = hidden_states(student, x)
        kd = kd_logits(s_logits, t_logits, args.temperature)
        ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), y.reshape(-1))
        hid = sum(hidden_mse(s_hs[i], t_hs[match[i]]) for i in range(sl)) / sl
        loss = args.kd_weight * kd + args.ce_weight * ce + args.hidden_weight * hid
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} (kd {kd.item():.4f} ce {ce.item():.4f} "
                  f"hidden {hid.item():.4f}) lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    elapsed = time.time() - t0
    student.eval()
    ppl_s = eval_perplexity(student, eval_text, ctx=ctx)
    ppl_t = eval_perplexity(teacher, eval_text, ctx=ctx)
    meta = {"distill": {
        "command": " ".join(["python", "models/distill_tiny_gpt_student.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "teacher": str(args.teacher.name), "init_blocks": init, "hidden_match": match,
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.wd, "temperature": args.temperature, "kd_weight": args.kd_weight,
        "ce_weight": args.ce_weight, "hidden_weight": args.hidden_weight, "seed": args.seed,
        "threads": args.threads, "seconds": round(elapsed, 1),
        "eval_ppl_per_byte": round(ppl_s, 4), "teacher_eval_ppl_per_byte": round(ppl_t, 4),
        "torch": str(torch.__version__)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_tiny_gpt(student, args.out, **meta)
    print(f"distilled {args.steps} steps in {elapsed:.0f}s; eval ppl/byte student {ppl_s:.4f}, teacher "
          f"{ppl_t:.4f} (ratio {ppl_s / ppl_t:.4f}); saved {args.out}", file=sys.stderr)
    print(repr(generate(student, "The ", 200)), file=sys.stderr)


if __name__ == "__main__":
    main()
