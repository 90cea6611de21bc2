"""Float-vs-fixed accuracy: the only place tolerances belong.

The float reference is the torch module itself (:meth:`ModelBundle.reference`);
the quantized output is the golden model's, dequantized. Encoders (sentence
embeddings) and blocks are scored by cosine similarity per output vector
(per sentence, or per token for blocks); decoders also by perplexity of the
next byte over the evaluation windows.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .golden import GoldenModel, dequantize
from .ir import Graph


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (last axis), flattened over the rest."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, a.shape[-1])
    b = np.asarray(b, dtype=np.float64).reshape(-1, b.shape[-1])
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


def next_token_nll(logits: np.ndarray | torch.Tensor, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[:, 1:] under logits[:, :-1], and the count."""
    lg = torch.as_tensor(np.asarray(logits, dtype=np.float64) if not torch.is_tensor(logits) else logits)
    tgt = torch.as_tensor(np.asarray(ids))[:, 1:].long()
    nll = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).double(),
                                            tgt.reshape(-1), reduction="sum")
    return float(nll), int(tgt.numel())


def score(bundle, outputs: Callable[[dict], np.ndarray],
          progress: Callable[[int, int], None] | None = None) -> dict:
    """Cosine mean/min of ``outputs(feed)`` (float values of the graph output)
    against the float reference over the evaluation inputs; perplexities for
    decoders (``ppl_float``: the reference's, ``ppl_quant``: the outputs')."""
    cos = []
    nll_f = nll_q = 0.0
    count = 0
    for i, feed in enumerate(bundle.eval_feeds):
        ref = np.asarray(bundle.reference(feed), dtype=np.float64)
        got = outputs(feed)
        cos.append(cosine_rows(got, ref))
        if bundle.kind == "decoder":
            f, n = next_token_nll(ref, feed["ids"])
            q, _ = next_token_nll(got, feed["ids"])
            nll_f, nll_q, count = nll_f + f, nll_q + q, count + n
        if progress:
            progress(i + 1, len(bundle.eval_feeds))
    cos = np.concatenate(cos)
    res = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
           "eval_vectors": int(cos.size)}
    if bundle.kind == "decoder":
        res["ppl_float"] = math.exp(nll_f / count)
        res["ppl_quant"] = math.exp(nll_q / count)
    return res


def evaluate(bundle, fixed: Graph, progress: Callable[[int, int], None] | None = None) -> dict:
    """Cosine mean/min over the evaluation inputs; perplexities for decoders."""
    golden = GoldenModel(fixed)
    out = fixed.outputs[0]
    return score(bundle, lambda feed: dequantize(fixed, out, golden(feed)[out]), progress)


def evaluate_float(bundle, graph: Graph) -> dict:
    """:func:`evaluate`'s scores for a float graph of the bundle's model (for
    example a distillation student), run by :func:`hwgen.float_exec.run_float`
    on the CPU; for decoders ``ppl_quant`` is this graph's perplexity."""
    from .float_exec import run_float

    out = graph.outputs[0]
    return score(bundle, lambda feed: run_float(graph, feed)[out].cpu().double().numpy())


def qat_loss(bundle) -> Callable:
    """The fine-tuning loss for a bundle's kind: next-byte cross entropy for
    decoders, 1 - cosine to the float output otherwise."""
    refs: dict[int, torch.Tensor] = {}

    def loss(feed, step) -> torch.Tensor:
        y = next(iter(step.outputs.values()))
        if bundle.kind == "decoder":
            ids = torch.as_tensor(np.asarray(feed["ids"])).long()
            return torch.nn.functional.cross_entropy(
                y[:, :-1].reshape(-1, y.shape[-1]), ids[:, 1:].reshape(-1))
        key = id(feed)
        if key not in refs:
            refs[key] = torch.as_tensor(np.asarray(bundle.reference(feed), dtype=np.float64))
        r = refs[key]
        y2, r2 = y.reshape(-1, y.shape[-1]), r.reshape(-1, r.shape[-1])
        return (1 - torch.nn.functional.cosine_similarity(y2, r2, dim=-1)).mean()

    return loss


def layer_cosines(bundle, fixed: Graph, feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    """Per transformer block: cosine of the block's output, golden (dequantized)
    vs the float graph (same tensor names; attention scale folded exactly as the
    quantizer does), per token. Padded positions (``mask == 0``) are left out."""
    from .float_exec import run_float
    from .quant import prepare

    float_graph = prepare(bundle.graph)
    golden = GoldenModel(fixed)
    last = {}
    for n in fixed.nodes:
        if n.layer is not None:
            last[n.layer] = n.outputs[0]
    per_layer: dict[int, list[np.ndarray]] = {layer: [] for layer in last}
    for feed in feeds:
        got = golden(feed, record=True)
        ref = run_float(float_graph, feed, record=True)
        keep = None
        if "mask" in feed:
            keep = np.asarray(feed["mask"]).reshape(-1) != 0
        for layer, t in last.items():
            c = cosine_rows(dequantize(fixed, t, got[t]), ref[t].detach().cpu().numpy())
            per_layer[layer].append(c if keep is None or c.size != keep.size else c[keep])
    rows = []
    for layer in sorted(per_layer):
        c = np.concatenate(per_layer[layer])
        rows.append({"layer": layer, "tensor": last[layer], "cosine_mean": float(c.mean()),
                     "cosine_min": float(c.min()), "vectors": int(c.size)})
    return rows


def bits_sweep(bundle, bits: list[str]) -> list[dict]:
    """Post-training accuracy of the bundle's model at each ``wWaA`` bit width
    (one calibration, shared: statistics do not depend on the formats)."""
    from .quant import QuantConfig, calibrate, prepare, quantize

    stats = calibrate(prepare(bundle.graph), bundle.calib_feeds)
    rows = []
    for b in bits:
        cfg = QuantConfig.from_bits(b)
        fixed, _ = quantize(bundle.graph, bundle.calib_feeds, cfg, stats=stats)
        rows.append({"bits": cfg.name, **evaluate(bundle, fixed)})
    return rows
