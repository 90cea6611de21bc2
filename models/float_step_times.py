"""Seconds per float distillation step of MiniLM 2:4: matmul precision x batching x teacher cache.

Each setting trains a fresh :class:`hwgen.distill.FloatStudent` (2:4 masks from
:func:`hwgen.prune.compute_masks`) with :func:`hwgen.distill.distill_float` on the
same 60 batches drawn (seeded) from :func:`hwgen.distill.train_feeds` of the shipped
written sentences, as written or with ``group_by_length``; "cached" fills the
teacher cache for those batches first (a later epoch), "rerun" keeps none (the first
epoch, or a cache too small). Prints one line per setting and the speed-ups over
fp32 / as written / rerun as JSON. Timings move with the machine's load: compare the
settings of one run.

    python models/float_step_times.py               # one thread
    python models/float_step_times.py --threads 2
"""
import argparse
import json
import time

import numpy as np
import torch

from hwgen import prune as P
from hwgen import zoo
from hwgen.distill import FLOAT_PRECISIONS, DistillLoss, FloatStudent, distill_float, train_feeds
from hwgen.quant import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, default=60)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bundle = zoo.load("minilm")
    graph = prepare(bundle.graph)
    rows, cols, block_k = P.engine_geometry()
    masks = P.compute_masks(graph, P.PruneSpec.parse("2:4", block_k=block_k, block_n=cols))
    texts = [zoo.DISTILL_SENTENCES]
    rng = np.random.default_rng(0)
    times = {}
    for grouped in (False, True):
        feeds = train_feeds(bundle, texts=texts, group_by_length=grouped)
        pick = [feeds[i] for i in rng.choice(len(feeds), a.batches, replace=False)]
        for precision in FLOAT_PRECISIONS:
            for cached in (False, True):
                loss = DistillLoss(graph, "encoder", cache_bytes=(8 << 30) if cached else 0)
                for feed in pick if cached else ():
                    loss.teacher(feed)
                student = FloatStudent(graph, masks)
                distill_float(student, pick[:3], loss, 3, lr=1e-5, precision=precision)   # warm-up
                t0 = time.perf_counter()
                distill_float(student, pick, loss, len(pick), lr=1e-5, precision=precision)
                key = f"{precision} {'by length' if grouped else 'as written'} {'cached' if cached else 'rerun'}"
                times[key] = (time.perf_counter() - t0) / len(pick)
                print(f"{key}: {times[key]:.3f} s/step", flush=True)
    base = times["fp32 as written rerun"]
    print(json.dumps({k: round(base / v, 2) for k, v in times.items()}))


if __name__ == "__main__":
    main()
