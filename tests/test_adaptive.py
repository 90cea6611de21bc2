"""Adaptive precision: per-row dispatch gives exactly the low or the high
graph's integers, checks, thresholds, cycles from the engines, the report."""
import math

import numpy as np
import pytest

from conftest import tiny_decoder_feeds
from hwgen import adaptive as A
from hwgen import prune as P
from hwgen.golden import GoldenModel
from hwgen.quant import QuantConfig, quantize


@pytest.fixture(scope="module")
def pair(tiny_decoder):
    feeds = tiny_decoder_feeds()
    low, _ = quantize(tiny_decoder, feeds, QuantConfig.from_bits("w4a6"))
    high, _ = quantize(tiny_decoder, feeds, QuantConfig.from_bits("w8a8"))
    low.meta["bits"], high.meta["bits"] = "w4a6", "w8a8"
    return low, high


def test_dispatch_rows_exact(pair):
    low, high = pair
    feed = {"ids": np.random.default_rng(3).integers(0, 40, (6, 10))}
    r = A.AdaptiveRunner(low, high, "entropy")
    _, scores = r.low_pass(feed)
    r.threshold = float(np.median(scores))
    run = r.run(feed)
    assert 0 < run.rerun.sum() < 6 and np.array_equal(run.rerun, scores > r.threshold)
    lo = GoldenModel(low)(feed)["logits"]
    hi = GoldenModel(high)(feed)["logits"]
    want = np.where(run.rerun[:, None, None], hi, lo)
    assert int(np.sum(run.outputs["logits"] != want)) == 0
    assert np.array_equal(run.low_outputs["logits"], lo)
    # cycles: the low pass for every row, plus the high pass for rerun rows
    cl, ch = r.cycles_low(10), r.cycles_high(10)
    assert np.array_equal(run.cycles, np.where(run.rerun, cl + ch, cl))


def test_cycles_are_the_engines(pair):
    """GraphCycles = sum of MatmulSpec.cycles over linears + the driver's
    attention cycle model; a block-sparse record lowers the linears' share."""
    from hwgen.rtl.matmul import MatmulSpec
    from hwgen.runtime.cost import CycleModel

    low, _ = pair
    rows, cols, bk = P.engine_geometry()
    s = 7
    want = sum(MatmulSpec.for_linear(low, n, rows, cols, 128, bk).cycles(s) for n in low.nodes
               if n.op == "linear")
    cm = CycleModel(low, rows=rows, cols=cols)
    want += sum(cm.node_cycles(n, {"B": 1, "S": s}) for n in low.nodes if n.op == "attention")
    assert A.graph_cycles(low, s) == want
    sparse = low.__class__(**{**low.__dict__, "weights": dict(low.weights), "nodes": [
        n.__class__(**{**n.__dict__, "attrs": dict(n.attrs)}) for n in low.nodes]})
    node = sparse.node("n13.linear")             # L0.fc2: K = 32, two blocks of 16 rows
    assert node.outputs[0] == "L0.fc2"
    w = sparse.weights[node.inputs[1]].copy()
    w[:16] = 0                                   # one whole block row of W
    sparse.weights[node.inputs[1]] = w
    P.record_sparsity(sparse, None, bk, cols)
    assert A.graph_cycles(sparse, s) < want


def test_thresholds_and_checks(pair):
    low, high = pair
    feeds = tiny_decoder_feeds(2, b=4)
    r = A.AdaptiveRunner(low, high, "saturation")
    assert r.fit_threshold(feeds, 0.0) == math.inf
    assert not r.run(feeds[0]).rerun.any()
    assert r.fit_threshold(feeds, 1.0) == -math.inf
    assert r.run(feeds[0]).rerun.all()
    r.fit_threshold(feeds, 0.5)
    n = sum(int(r.run(f).rerun.sum()) for f in feeds)
    assert 2 <= n <= 6
    for check in A.CHECKS:
        _, s = A.AdaptiveRunner(low, high, check).low_pass(feeds[0])
        assert s.shape == (4,) and np.all(np.isfinite(s))


def test_saturation_counts_pinned_codes(pair):
    low, _ = pair
    feed = tiny_decoder_feeds(1, b=2)[0]
    rec = GoldenModel(low)(feed, record=True)
    t = low.tensors["L0.fc1"]
    rec = dict(rec)
    c = rec["L0.fc1"].copy()
    before = A.saturation_score(low, rec, feed)
    c[0, :3, 0] = t.fmt.max_code if c[0, 0, 0] != t.fmt.max_code else c[0, 0, 0]
    c[0, :3, 1] = t.fmt.min_code
    extra = int(np.sum(c[0] != rec["L0.fc1"][0]))
    rec["L0.fc1"] = c
    after = A.saturation_score(low, rec, feed)
    assert after[1] == before[1] and after[0] * 12 == pytest.approx(before[0] * 12 + extra)


def test_errors(pair, bert_block_graph):
    from hwgen.ir import Graph

    low, high = pair
    with pytest.raises(A.AdaptiveError, match="unknown check 'oracle'"):
        A.AdaptiveRunner(low, high, "oracle")
    bert = Graph.load(bert_block_graph)
    with pytest.raises(A.AdaptiveError, match="must take the same inputs"):
        A.AdaptiveRunner(low, bert)
    with pytest.raises(A.AdaptiveError, match="rerun fraction must be in"):
        A.AdaptiveRunner(low, high).fit_threshold([], 1.5)
    r = A.AdaptiveRunner(bert, bert, "entropy")
    with pytest.raises(A.AdaptiveError, match="needs per-position logits"):
        rng = np.random.default_rng(0)
        r.low_pass({"x": rng.normal(size=(1, 4, 64)).astype(np.float32)})


def test_evaluate_adaptive_report(pair, tiny_decoder):
    from types import SimpleNamespace

    low, high = pair
    # a bundle-like object: the float graph as reference, tiny feeds
    from hwgen.float_exec import run_float
    from hwgen.quant import prepare

    fg = prepare(tiny_decoder)
    bundle = SimpleNamespace(kind="decoder", calib_feeds=tiny_decoder_feeds(2, b=4),
                             eval_feeds=tiny_decoder_feeds(2, b=4, seed=7),
                             reference=lambda f: run_float(fg, f)["logits"].numpy())
    rep = A.evaluate_adaptive(bundle, low, high, "entropy", rerun_fraction=0.25)
    assert rep["inputs"] == 8 and rep["low_only"] + rep["rerun"] == 8
    lo_c, hi_c = rep["low"]["cycles_mean"], rep["high"]["cycles_mean"]
    # the same engines; W4A6 codes fill buffers of fewer block RAMs, which read no later
    assert lo_c <= hi_c <= 1.01 * lo_c
    want = (8 * lo_c + rep["rerun"] * hi_c) / 8
    assert rep["adaptive"]["cycles_mean"] == pytest.approx(want)
    assert rep["cycles_ratio_vs_low"] == pytest.approx(want / lo_c)
    for k in ("low", "high", "adaptive"):
        assert 0 <= rep[k]["top1"] <= 1 and rep[k]["ppl"] > 1 and -1 <= rep[k]["cosine_mean"] <= 1


def test_run_adaptive_other_model(capsys, tmp_path, tiny_decoder_fixed):
    """A graph that is not the model HIGH_BITS quantizes: one clear error."""
    from conftest import run_cli

    import copy

    g = copy.deepcopy(tiny_decoder_fixed)
    g.meta["model"] = "tiny-gpt"
    g.save(tmp_path / "g")
    code, _, err = run_cli(capsys, "run", "--graph", tmp_path / "g", "--prompt", "\x01\x02", "--adaptive", "w8a8",
                           "--no-float", "--quiet")
    assert code == 1 and "are not the same model" in err


def test_run_adaptive_tiny_gpt(capsys):
    """`hwgen run --model tiny-gpt --adaptive`: per generated token; counts add up,
    the cycles are the low passes plus the reruns' high passes."""
    from conftest import last_json, run_cli

    code, out, _ = run_cli(capsys, "run", "--model", "tiny-gpt", "--bits", "w4a8", "--prompt", "def f(x):",
                           "--max-new-tokens", "6", "--adaptive", "w8a8", "--no-float", "--json", "--quiet")
    assert code == 0
    res = last_json(out)
    a = res["adaptive"]
    assert a["mode"] == "per-token" and a["check"] == "margin" and a["steps"] == 7
    assert a["low_only"] + a["rerun"] == 7 and len(a["rerun_steps"]) == a["rerun"]
    assert (a["cycles_adaptive"] > a["cycles_low"]) == (a["rerun"] > 0)
    assert a["cycles_low"] == res["accel_cycles"]     # the driver's own count of the same low passes
    assert a["text"].startswith("def f(x):") and len(a["text"].encode()) >= 9


def test_run_adaptive_verify_tiny_gpt(capsys):
    """`hwgen run --adaptive w8a8 --adaptive-verify`: every generated token is the
    high graph's (compared in the run), the counts add up."""
    from conftest import last_json, run_cli

    code, out, _ = run_cli(capsys, "run", "--model", "tiny-gpt", "--bits", "w4a8", "--prompt", "def f(x):",
                           "--max-new-tokens", "12", "--adaptive", "w8a8", "--adaptive-verify", "--no-float",
                           "--json", "--quiet")
    assert code == 0
    a = last_json(out)["adaptive"]
    assert a["mode"] == "verified" and a["tokens"] == 12 and a["tokens_differ_from_high"] == 0
    assert a["accepted"] + a["rejected"] + a["bonus"] == 12
    assert a["accepted"] + a["rejected"] + a["discarded"] == a["drafted"] == a["low_passes"]
    assert a["cycles_ratio_vs_low"] == a["cycles_adaptive"] / a["cycles_low"] > 1
    assert a["max_draft"] == 15 and a["fit"] == {"rule": "rerun_fraction", "value": 0.2}
    assert a["text"].startswith("def f(x):")


def test_run_adaptive_verify_refuses_minilm(capsys):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "run", "--model", "minilm", "--text", "A cat.", "--adaptive", "w16a16",
                           "--adaptive-verify", "--no-float", "--quiet")
    assert code == 1 and "--adaptive-verify drafts and verifies generated tokens: it is for tiny-gpt" in err


@pytest.mark.slow
def test_run_adaptive_minilm(capsys):
    """`hwgen run --adaptive`: counts add up, rerun rows cost low + high cycles."""
    from conftest import last_json, run_cli

    text = "A cat sat on the mat.\nThe quarterly revenue rose 4.5% to $12.3 billion in 2023.\nHi."
    code, out, _ = run_cli(capsys, "run", "--model", "minilm", "--text", text, "--adaptive", "w16a16",
                           "--no-float", "--json", "--quiet")
    assert code == 0
    a = last_json(out)["adaptive"]
    assert a["inputs"] == 3 and a["low_only"] + a["rerun"] == 3 and len(a["rerun_rows"]) == a["rerun"]
    assert a["cycles_ratio_vs_low"] >= 1.0


# ----------------------------------------------------------------------------
# per decoded token (KV-cache decoder)
# ----------------------------------------------------------------------------

def test_token_dispatch_exact(pair):
    """Teacher-forced per-token dispatch: every step's prediction is bit-exact the
    low or the high graph's own logits at that position (the high graph's lazily
    caught-up cache gives the same integers as one pass); the rerun steps are
    exactly those whose low-pass score is over the threshold."""
    from hwgen.golden import dequantize

    low, high = pair
    ids = np.random.default_rng(4).integers(0, 40, (3, 12))
    dec = A.TokenAdaptive(low, high, "margin")
    lo_full = GoldenModel(low)({"ids": ids})["logits"]
    hi_full = GoldenModel(high)({"ids": ids})["logits"]
    scores = A.token_scores(low, lo_full, "margin")[:, :-1]
    dec.threshold = float(np.quantile(scores, 0.7))
    run = dec.score_ids(ids)
    assert np.array_equal(run.scores, scores)
    assert np.array_equal(run.rerun, scores > dec.threshold) and 0 < run.rerun.sum() < run.rerun.size
    yl = dequantize(low, "logits", lo_full)[:, :-1]
    yh = dequantize(high, "logits", hi_full)[:, :-1]
    assert np.array_equal(run.low_logits, yl)
    assert int(np.sum(run.logits != np.where(run.rerun[..., None], yh, yl))) == 0
    assert np.array_equal(run.high_passes, run.rerun.sum(1))


def test_token_cycles_add_up(pair):
    """Cycles per row: one low step per position, plus for each rerun the high
    graph's catch-up pass over the positions its cache lacks."""
    low, high = pair
    ids = np.random.default_rng(5).integers(0, 40, (2, 10))
    dec = A.TokenAdaptive(low, high, "entropy")
    dec.fit_threshold([{"ids": ids}], 0.3)
    run = dec.score_ids(ids)
    for r in range(2):
        want_low = sum(dec.cycles_low.step(1, t) for t in range(9))
        want, seen = want_low, 0
        for t in np.flatnonzero(run.rerun[r]):
            want += dec.cycles_high.step(int(t) + 1 - seen, seen)
            seen = int(t) + 1
        assert run.cycles_low[r] == want_low and run.cycles[r] == want
        assert run.high_rows[r] == seen
    # a pass of 1..rows token rows costs the same matmul beats; the attention engine reads offset + s keys
    assert dec.cycles_low.step(1, 5) < dec.cycles_low.step(2, 5) < 2 * dec.cycles_low.step(1, 5)
    assert dec.cycles_low.step(1, 0) == A.graph_cycles(low, 1)


def test_token_threshold_fit_never_sees_eval(pair, monkeypatch):
    """The threshold is the quantile of the fit windows' scores: the evaluation
    windows never enter it (changing them leaves it unchanged), and every scored
    fit step counts (positions 0 .. T-2)."""
    low, high = pair
    fit = tiny_decoder_feeds(2, b=3, seed=11)
    ev = tiny_decoder_feeds(1, b=2, seed=12)
    seen = []
    orig = A.TokenAdaptive.score_ids
    monkeypatch.setattr(A.TokenAdaptive, "score_ids", lambda self, ids: seen.append(ids) or orig(self, ids))
    r1 = A.evaluate_token_adaptive(ev, low, high, fit, "margin", 0.25)
    ev2 = [{"ids": (f["ids"] + 7) % 40} for f in ev]
    r2 = A.evaluate_token_adaptive(ev2, low, high, fit, "margin", 0.25)
    assert r1["threshold"] == r2["threshold"]
    sc = np.concatenate([A.token_scores(low, GoldenModel(low)(f)["logits"], "margin")[:, :-1].ravel()
                         for f in fit])
    assert r1["threshold"] == float(np.quantile(sc, 0.75))
    assert all(any(np.array_equal(s, f["ids"]) for f in ev + ev2) for s in seen)   # only eval rows scored
    assert r1["steps"] == 2 * 11 and r1["low_passes"] == 22 and r1["high_passes"] == r1["rerun"]
    assert r1["low_only"] + r1["rerun"] == 22
    assert r1["cycles_ratio_vs_low"] == pytest.approx(r1["adaptive"]["cycles_mean"] / r1["low"]["cycles_mean"])
    assert r1["cycles_ratio_vs_low"] >= 1 + (r1["rerun"] > 0) * 0.01
    assert r1["same_cycles_low_high"] == (r1["low"]["cycles_mean"] == r1["high"]["cycles_mean"])
    for k in ("low", "high", "adaptive"):
        assert 0 <= r1[k]["top1"] <= 1 and r1[k]["ppl"] > 1


def test_token_generate(pair):
    """Greedy generation with per-token dispatch: threshold +inf gives the low
    graph's greedy tokens, -inf the high graph's (every step rerun)."""
    low, high = pair

    def plain(g):
        return A.greedy_golden(GoldenModel(g), [1, 2, 3], 8, 24)

    dec = A.TokenAdaptive(low, high, "margin", threshold=math.inf)
    g = dec.generate([1, 2, 3], 8, 24)
    assert g["ids"] == plain(low) and g["rerun"] == [] and g["cycles"] == g["cycles_low"]
    dec.threshold = -math.inf
    g = dec.generate([1, 2, 3], 8, 24)
    assert g["ids"] == plain(high) and g["rerun"] == list(range(9))
    assert g["high_rows"] == 3 + 8   # the prompt once, then one row per step


def test_token_errors(pair, bert_block_graph):
    from hwgen.ir import Graph

    low, high = pair
    with pytest.raises(A.AdaptiveError, match="per-token check 'saturation'"):
        A.TokenAdaptive(low, high, "saturation")
    bert = Graph.load(bert_block_graph)
    with pytest.raises(A.AdaptiveError, match="no KV-cache attention"):
        A.TokenAdaptive(bert, bert)
    with pytest.raises(A.AdaptiveError, match="no held-out inputs"):
        A.TokenAdaptive(low, high).fit_threshold([], 0.2)


def test_token_report_paired_counts(pair):
    """adaptive - high top-1 is exactly the kept steps' paired disagreements."""
    low, high = pair
    fit = tiny_decoder_feeds(2, b=3, seed=21)
    ev = tiny_decoder_feeds(2, b=3, seed=22)
    r = A.evaluate_token_adaptive(ev, low, high, fit, "margin", 0.3)
    p = r["paired"]
    n = r["steps"]
    assert r["adaptive_minus_high_top1"] == pytest.approx(
        (p["kept_low_right_high_wrong"] - p["kept_low_wrong_high_right"]) / n)
    assert r["low"]["top1"] - r["high"]["top1"] == pytest.approx(
        (p["kept_low_right_high_wrong"] + p["rerun_low_right_high_wrong"]
         - p["kept_low_wrong_high_right"] - p["rerun_low_wrong_high_right"]) / n)
    assert p["disagree"] >= sum(v for k, v in p.items() if k != "disagree")


# ----------------------------------------------------------------------------
# thresholds fitted to a cycle budget
# ----------------------------------------------------------------------------

def test_token_dispatch_cycles_equal_score_ids(pair):
    """``dispatch_cycles`` (the cycle model of a rerun pattern, no high-graph run,
    checked term by term in ``test_token_cycles_add_up``) is what teacher-forced
    decoding reports."""
    low, high = pair
    ids = np.random.default_rng(6).integers(0, 40, (3, 12))
    dec = A.TokenAdaptive(low, high, "margin")
    dec.fit_threshold([{"ids": ids}], 0.4)
    run = dec.score_ids(ids)
    assert 0 < run.rerun.sum() < run.rerun.size
    assert np.array_equal(dec.dispatch_cycles(run.rerun), run.cycles)
    assert np.array_equal(dec.dispatch_cycles(np.zeros_like(run.rerun)), run.cycles_low)


def test_token_budget_fit_is_the_most_reruns_within_the_budget(pair):
    """``fit_budget``: on the fit windows the dispatch stays within the budget,
    and rerunning the next step by score as well would exceed it; a budget of 1
    reruns nothing, a budget above rerunning everything reruns everything."""
    low, high = pair
    fit = tiny_decoder_feeds(2, b=3, seed=21)
    dec = A.TokenAdaptive(low, high, "margin")
    s = dec._fit_scores(fit)
    low_cyc = dec.dispatch_cycles(np.zeros(s.shape, dtype=bool)).sum()

    def ratio(thr):
        return dec.dispatch_cycles(s > thr).sum() / low_cyc

    all_ratio = ratio(-math.inf)
    for budget in (1.1, 1.3, 1.6):
        thr = dec.fit_budget(fit, budget)
        assert dec.threshold == thr and ratio(thr) <= budget
        below = s[s < thr]                       # one more distinct score rerun
        if below.size:
            assert ratio(float(below.max())) > budget
        assert 0 < (s > thr).mean() < 1
    assert dec.fit_budget(fit, 1.0) == math.inf
    assert dec.fit_budget(fit, all_ratio) == -math.inf
    with pytest.raises(A.AdaptiveError, match=r"cycle budget must be a ratio to the low graph's cycles >= 1, "
                                               r"got 0.9"):
        dec.fit_budget(fit, 0.9)


def test_input_budget_fit(pair):
    """Per input: the rows rerun on the fit inputs cost at most the budget, one
    row more (the next by score) would not fit."""
    low, high = pair
    feeds = tiny_decoder_feeds(3, b=4, seed=22)
    r = A.AdaptiveRunner(low, high, "margin")
    s = np.concatenate([r.low_pass(f)[1] for f in feeds])
    runs_cl = np.array([r.cycles_low(f["ids"].shape[1]) for f in feeds for _ in range(4)], dtype=float)
    runs_ch = np.array([r.cycles_high(f["ids"].shape[1]) for f in feeds for _ in range(4)], dtype=float)
    budget = 1 + 0.5 * runs_ch.sum() / runs_cl.sum()        # about half the rows
    thr = r.fit_budget(feeds, budget)
    rr = s > thr
    assert (runs_cl.sum() + runs_ch[rr].sum()) / runs_cl.sum() <= budget
    nxt = s[~rr].max()
    assert (runs_cl.sum() + runs_ch[s >= nxt].sum()) / runs_cl.sum() > budget
    assert sum(int(r.run(f).rerun.sum()) for f in feeds) == int(rr.sum())


@pytest.mark.parametrize("argv, msg", [
    (["--adaptive-budget", "1.2"], "--adaptive-rerun, --adaptive-budget and --adaptive-verify need --adaptive"),
    (["--adaptive-verify"], "--adaptive-rerun, --adaptive-budget and --adaptive-verify need --adaptive HIGH_BITS"),
    (["--adaptive", "w8a8", "--adaptive-verify", "--adaptive-budget", "1.2"],
     "--adaptive-verify fits its check with --adaptive-rerun FRACTION"),
    (["--adaptive", "w8a8", "--adaptive-budget", "1.2", "--adaptive-rerun", "0.1"],
     "give a rerun fraction or a cycle budget, not both"),
    (["--adaptive", "w8a8", "--adaptive-budget", "0.5"], "cycle budget must be a ratio to the low graph's cycles >= 1"),
    (["--adaptive", "w8a8", "--adaptive-rerun", "1.5"], "rerun fraction must be in [0, 1], got 1.5"),
])
def test_run_adaptive_fit_flags_errors(capsys, argv, msg):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "run", "--model", "tiny-gpt", "--bits", "w4a8", "--prompt", "x",
                           "--no-float", "--quiet", *argv)
    assert code == 1 and msg in err


def test_run_adaptive_tiny_gpt_budget(capsys):
    """`hwgen run --adaptive w8a8 --adaptive-budget 1.2`: the JSON names the fit
    rule; a budget of 1 reruns no token."""
    from conftest import last_json, run_cli

    for budget, rerun_none in (("1.2", False), ("1", True)):
        code, out, _ = run_cli(capsys, "run", "--model", "tiny-gpt", "--bits", "w4a8", "--prompt", "def f(x):",
                               "--max-new-tokens", "4", "--adaptive", "w8a8", "--adaptive-budget", budget,
                               "--no-float", "--json", "--quiet")
        assert code == 0
        a = last_json(out)["adaptive"]
        assert a["fit"] == {"rule": "cycles_budget", "value": float(budget)}
        if rerun_none:
            assert a["threshold"] == math.inf and a["rerun"] == 0 and a["cycles_adaptive"] == a["cycles_low"]


def _greedy(graph, prompt, n, ctx=24):
    return A.greedy_golden(GoldenModel(graph), prompt, n, ctx)


def test_verified_generation_is_the_high_graphs(pair):
    """Draft on the low graph, verify on the high graph: for any threshold and
    draft length the tokens are exactly the high graph's own greedy generation,
    although the low graph's differ; rejections (cache cut back) do happen."""
    low, high = pair
    dec = A.TokenAdaptive(low, high, "margin")
    prompts = [[1, 2, 3], [7], [5, 9, 11, 2, 30]]
    fit = dec.scores(low, GoldenModel(low)({"ids": np.asarray([[1, 2, 3, 4, 5, 6, 7, 8]])})["logits"])
    seen = {"rejected": 0, "discarded": 0, "bonus": 0, "check_stops": 0}
    differs = False
    for prompt in prompts:
        want = _greedy(high, prompt, 12)
        differs |= want != _greedy(low, prompt, 12)
        for thr in (math.inf, -math.inf, float(np.median(fit))):
            for max_draft in (1, 3, 15):
                dec.threshold = thr
                g = dec.generate_verified(prompt, 12, 24, max_draft=max_draft)
                assert g["ids"] == want, (prompt, thr, max_draft)
                for k in seen:
                    seen[k] += g[k]
    assert differs and all(seen.values()), seen


def test_verified_generation_counts_and_cycles(pair):
    """Every draft is accepted, rejected or discarded; every token is an accepted
    draft, a replacement or a pass's extra token; the cycles are the passes'
    engine cycles, and the passes cover the sequence with cut-backs only after
    a rejection."""
    low, high = pair
    for thr, max_draft in ((-1.0, 4), (math.inf, 6), (math.inf, 15), (-math.inf, 2)):
        _check_verified_counts(A.TokenAdaptive(low, high, "margin", threshold=thr), max_draft)


def _check_verified_counts(dec, max_draft):
    thr = dec.threshold
    g = dec.generate_verified([4, 8, 15, 16], 14, 24, max_draft=max_draft)
    assert g["accepted"] + g["rejected"] + g["discarded"] == g["drafted"] == len(g["scores"])
    assert g["accepted"] + g["rejected"] + g["bonus"] == g["tokens"] == len(g["ids"]) == 14
    assert g["check_stops"] == sum(s > thr for s in g["scores"])
    cyc = {"low": dec.cycles_low, "high": dec.cycles_high}
    assert g["cycles"] == sum(cyc[k].step(rows, off) for k, rows, off in g["passes"])
    for kind in ("low", "high"):
        passes = [(rows, off) for k, rows, off in g["passes"] if k == kind]
        assert len(passes) == g[f"{kind}_passes"] and sum(r for r, _ in passes) == g[f"{kind}_rows"]
        assert passes[0] == (4, 0) if kind == "low" else passes[0][1] == 0
        ends = [off + rows for rows, off in passes]
        assert all(off <= end for (_, off), end in zip(passes[1:], ends))   # never a gap
        assert sum(off < end for (_, off), end in zip(passes[1:], ends)) <= g["rejected"]
    assert g["cycles_low"] == dec.cycles_low.step(4, 0) + sum(dec.cycles_low.step(1, t) for t in range(4, 17))
    assert g["high_passes"] <= g["drafted"] and g["low_passes"] == g["drafted"]


def test_verified_generation_errors(pair):
    low, high = pair
    dec = A.TokenAdaptive(low, high)
    with pytest.raises(A.AdaptiveError, match="a prompt of at least one token"):
        dec.generate_verified([], 4, 24)
    with pytest.raises(A.AdaptiveError, match="max_new_tokens 0: generate at least one token"):
        dec.generate_verified([1], 0, 24)
    with pytest.raises(A.AdaptiveError, match="max_draft 0: draft at least one token"):
        dec.generate_verified([1], 4, 24, max_draft=0)
    with pytest.raises(A.AdaptiveError, match=r"one cache of 24 positions: the prompt \(20\) and the new "
                       r"tokens \(5\) must fit"):
        dec.generate_verified(list(range(20)), 5, 24)


def test_evaluate_verified_report(pair):
    """The bench's verified-generation report: every token compared with the high
    graph's own generation (0 differ), the low graph alone differs, the counts
    and cycles add up, the threshold is fitted on the fit windows only."""
    low, high = pair
    evals = tiny_decoder_feeds(n=2, b=3, s=12, seed=8)
    fit = tiny_decoder_feeds(n=2, b=2, s=12, seed=9)
    r = A.evaluate_verified(evals, low, high, fit, "margin", 0.3, prompt_len=4, new_tokens=8, max_draft=5)
    dec = A.TokenAdaptive(low, high, "margin")
    assert r["threshold"] == dec.fit_threshold(fit, 0.3)
    assert r["prompts"] == 6 and r["tokens"] == 48 and r["identical_to_high"] == 6
    assert r["mismatches_vs_high"] == 0 and r["target_tokens_of_high"]
    assert r["low_alone_differs"] > 0 and r["low_alone_tokens_differ"] > 0
    dec.threshold = r["threshold"]
    runs = [dec.generate_verified([int(t) for t in row[:4]], 8, 12, max_draft=5)
            for f in evals for row in f["ids"]]
    for k in ("drafted", "accepted", "rejected", "check_stops", "high_passes"):
        assert r[k] == sum(g[k] for g in runs)
    assert r["cycles_adaptive"] == sum(g["cycles"] for g in runs)
    assert r["cycles_ratio_vs_low"] == r["cycles_adaptive"] / r["cycles_low"] > 1
    assert r["max_draft"] == 5 and r["fit"] == {"rule": "rerun_fraction", "value": 0.3}
