"""Pruning: exact patterns, zeros kept through quantization and QAT, the graph's
sparsity record derived from the codes, the golden model on pruned graphs."""
import numpy as np
import pytest

from conftest import tiny_decoder_feeds
from hwgen import prune as P
from hwgen.golden import GoldenModel
from hwgen.ir import Graph
from hwgen.qat import QATModel, finetune
from hwgen.quant import QuantConfig, prepare, quantize


# ---------------------------------------------------------------- spec parsing

@pytest.mark.parametrize("text,kind,target", [("2:4", "nm", 0.5), ("1:4", "nm", 0.75),
                                              ("block:0.5", "block", 0.5),
                                              ("unstructured:0.3", "unstructured", 0.3),
                                              ("Block:.25", "block", 0.25)])
def test_parse(text, kind, target):
    s = P.PruneSpec.parse(text)
    assert s.kind == kind and s.target_sparsity == pytest.approx(target)
    assert P.PruneSpec.parse(s.name) == s


@pytest.mark.parametrize("text,msg", [
    ("4:4", "1 <= N < M"), ("0:4", "1 <= N < M"), ("block:1.5", "between 0 and 1"),
    ("block:0", "between 0 and 1"), ("unstructured:1", "between 0 and 1"),
    ("rows:0.5", "expected N:M"), ("", "expected N:M"), ("2-4", "expected N:M")])
def test_parse_errors(text, msg):
    with pytest.raises(P.PruneError, match=msg):
        P.PruneSpec.parse(text)


def test_parse_block_geometry_errors():
    with pytest.raises(P.PruneError, match="block_k must be a positive integer"):
        P.PruneSpec.parse("block:0.5", block_k=0)
    with pytest.raises(P.PruneError, match="block_n must be a positive integer"):
        P.PruneSpec.parse("block:0.5", block_n=2.0)


# ---------------------------------------------------------------- masks

def test_unstructured_exact_count_and_smallest():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(37, 11))
    keep = P.mask_for(P.scores(w), P.PruneSpec.parse("unstructured:0.4"))
    assert keep.sum() == w.size - round(0.4 * w.size)
    assert np.abs(w[~keep]).max() <= np.abs(w[keep]).min()


def test_nm_along_reduction_dim():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(18, 7))          # 18 = 4 full groups + a partial group of 2
    keep = P.mask_for(P.scores(w), P.PruneSpec.parse("2:4"))
    for g in range(4):
        blk = keep[4 * g:4 * g + 4]
        assert (blk.sum(0) == 2).all()
        a = np.abs(w[4 * g:4 * g + 4])
        # the two kept ones are the two largest of the group, per column
        assert (np.where(blk, a, np.inf).min(0) >= np.where(blk, -np.inf, a).max(0)).all()
    assert keep[16:].all()                # partial group of 2 keeps min(2, 2)
    assert P.nm_violations(np.where(keep, 1, 0), 2, 4) == 0
    assert P.nm_violations(np.ones((8, 3)), 2, 4) == 6


def test_nm_fraction_thins_cheapest_groups():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(16, 8))
    half = P.nm_mask(P.scores(w), 2, 4, groups=0.5)
    thinned = (half.reshape(4, 4, 8).sum(1) == 2)
    assert thinned.sum() == 16 and (half.reshape(4, 4, 8).sum(1)[~thinned] == 4).all()


def test_block_mask_whole_blocks_and_bitmap():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(40, 20))          # blocks 16 x 8: 3 x 3 with partial edges
    spec = P.PruneSpec.parse("block:0.5", block_k=16, block_n=8)
    keep = P.mask_for(P.scores(w), spec)
    bm = P.block_bitmap(np.where(keep, w, 0), 16, 8)
    assert bm.shape == (3, 3) and bm.sum() == 9 - round(0.5 * 9)
    assert np.array_equal(P.expand_blocks(bm, w.shape, 16, 8), keep)
    # pruned blocks have the smallest L2 norms
    bs = P.block_scores(np.abs(w), 16, 8)
    assert bs[bm == 0].max() <= bs[bm == 1].min()


def test_activation_aware_scores():
    w = np.ones((4, 2))
    s = P.scores(w, np.array([1.0, 5.0, 0.1, 2.0]))
    keep = P.mask_for(s, P.PruneSpec.parse("2:4"))
    assert np.array_equal(keep[:, 0], [False, True, False, True])


def test_gradual_fraction_monotone_and_complete():
    f = [P.gradual_fraction(i, 20, 0.0, 0.5) for i in range(20)]
    assert all(a <= b for a, b in zip(f, f[1:])) and f[0] > 0 and f[9] == 1.0 and f[-1] == 1.0
    assert P.gradual_fraction(0, 10, start=0.3) == 0.0


# ---------------------------------------------------------------- through quantization

@pytest.fixture(scope="module")
def pruned(tiny_decoder, one_torch_thread):
    spec = P.PruneSpec.parse("block:0.5", block_k=4, block_n=4)
    folded = prepare(tiny_decoder)
    norms = P.activation_norms(folded, tiny_decoder_feeds(1))
    g, masks = P.prune(folded, spec, norms)
    cfg = QuantConfig.from_bits("w8a8")
    fixed, fmts = quantize(g, tiny_decoder_feeds(), cfg)
    P.record_sparsity(fixed, spec)
    return spec, g, masks, fixed, fmts, cfg


def test_pruned_zero_codes_and_record(pruned, tmp_path):
    spec, _, masks, fixed, _, _ = pruned
    lin = P.prunable_linears(fixed)
    assert {n.inputs[1] for n in lin} == set(masks) and "head.w" not in masks
    assert P.mask_violations(fixed, masks) == 0
    for node in lin:
        rec = node.attrs["sparsity"]
        codes = fixed.weights[node.inputs[1]]
        assert rec["pattern"] == "block:0.5" and (rec["block_k"], rec["block_n"]) == (4, 4)
        assert np.array_equal(np.asarray(rec["bitmap"]), P.block_bitmap(codes, 4, 4))
        assert rec["blocks_empty"] >= round(0.5 * np.asarray(rec["bitmap"]).size)
    assert fixed.meta["prune"]["sparsity"] >= 0.5
    # survives save/load, and check_sparsity catches a tampered bitmap
    fixed.save(tmp_path / "g")
    back = Graph.load(tmp_path / "g")
    assert P.check_sparsity(back) == len(lin)
    node = P.prunable_linears(back)[0]
    node.attrs["sparsity"]["bitmap"][0][0] ^= 1
    with pytest.raises(P.PruneError, match="recorded block bitmap disagrees"):
        P.check_sparsity(back)
    node.attrs["sparsity"]["bitmap"][0][0] ^= 1
    node.attrs["sparsity"]["zeros"] += 1
    with pytest.raises(P.PruneError, match="zero count"):
        P.check_sparsity(back)


def test_linear_bitmap_reads_record_or_derives(pruned):
    _, _, _, fixed, _, _ = pruned
    node = P.prunable_linears(fixed)[0]
    codes = fixed.weights[node.inputs[1]]
    assert np.array_equal(P.linear_bitmap(fixed, node, 4, 4), np.asarray(node.attrs["sparsity"]["bitmap"]))
    assert np.array_equal(P.linear_bitmap(fixed, node, 2, 8), P.block_bitmap(codes, 2, 8))


def test_hls_csim_bit_exact_on_pruned_graph(pruned):
    """The hardware check covers pruned graphs: every layer-0 linear of the
    block-pruned graph, C-simulated (g++, ap_fixed headers) on the golden
    model's recorded inputs, gives the golden output codes: 0 mismatches."""
    from hwgen.hls import run_csim

    _, _, _, fixed, _, _ = pruned
    nodes = [n for n in P.prunable_linears(fixed) if n.layer == 0]
    m = GoldenModel(fixed)
    xs, ys = {n.name: [] for n in nodes}, {n.name: [] for n in nodes}
    for feed in tiny_decoder_feeds(2, seed=5):
        rec = m(feed, record=True)
        for n in nodes:
            xs[n.name].append(rec[n.inputs[0]])
            ys[n.name].append(rec[n.outputs[0]])
    out = run_csim(fixed, {k: np.concatenate(v) for k, v in xs.items()})
    mismatches = sum(int(np.sum(out[k] != np.concatenate(ys[k]))) for k in xs)
    print(f"\npruned graph, {len(nodes)} linear kernels C-simulated: {mismatches} mismatches")
    assert len(nodes) == 6 and mismatches == 0


@pytest.mark.parametrize("prune_it", [True, False])
def test_hls_kernel_visits_only_nonzero_blocks(pruned, tiny_decoder_fixed, tmp_path, prune_it):
    """A block-pruned linear's HLS kernel loops over its nonzero blocks only:
    the C-simulation counts its MAC loop iterations, and they equal the
    model's count (``mac_iterations`` in the manifest) times the rows, below
    the dense kernel's K * N / PAR; a dense linear keeps the dense loop and its
    count. Both give the golden model's output codes."""
    import subprocess

    from hwgen.hls.csim import build, emit_kernels, pack_calls, write_rows

    fixed = pruned[3] if prune_it else tiny_decoder_fixed
    node = P.prunable_linears(fixed)[4]                                  # layer 0's FFN up, 16 x 32
    m = GoldenModel(fixed)
    rec = m(tiny_decoder_feeds(1, seed=9)[0], record=True)
    x, y = rec[node.inputs[0]].reshape(-1, 16), rec[node.outputs[0]].reshape(-1, 32)
    (ks,), files = emit_kernels(fixed, [node.name], 4)
    k, n = fixed.weights[node.inputs[1]].shape
    bm = P.linear_bitmap(fixed, node, 4, 4)
    assert ks.meta["mac_iterations_dense"] == k * n // 4
    if prune_it:
        assert "MAC_BLK" in files[f"{ks.name}.h"] and ks.meta["blocks"]["visited"] == bm.sum()
        assert ks.meta["mac_iterations"] == bm.sum() * 4 * (4 // 4) < ks.meta["mac_iterations_dense"]
    else:
        assert "MAC_BLK" not in files[f"{ks.name}.h"] and ks.meta["blocks"] is None
        assert ks.meta["mac_iterations"] == ks.meta["mac_iterations_dense"]
    exe = build(files)
    write_rows(tmp_path / "in.txt", pack_calls(ks, x)[0])
    r = subprocess.run([str(exe), ks.name, str(tmp_path / "in.txt"), str(tmp_path / "out.txt")],
                       capture_output=True, text=True, check=True)
    assert r.stderr.split() == ["mac_iterations", str(len(x) * ks.meta["mac_iterations"])]
    assert np.array_equal(np.loadtxt(tmp_path / "out.txt", dtype=np.int64).reshape(y.shape), y)


def test_qat_keeps_pruned_weights_zero_and_gradual_schedule(tiny_decoder, pruned):
    import torch

    spec = P.PruneSpec.parse("2:4")
    _, _, _, _, fmts, cfg = pruned
    model = QATModel(prepare(tiny_decoder), fmts, cfg)
    hook = P.GradualPruner(model, spec, steps=4, end=0.5)

    def ce(feed, step):
        y = step.outputs["logits"]
        ids = torch.as_tensor(feed["ids"]).long()
        return torch.nn.functional.cross_entropy(y[:, :-1].reshape(-1, y.shape[-1]), ids[:, 1:].reshape(-1))

    finetune(model, tiny_decoder_feeds(2), ce, steps=4, lr=1e-2, before_step=hook)
    assert hook.history[0] < 1.0 and hook.history[-1] == 1.0
    fixed = model.export()
    assert P.mask_violations(fixed, model.masks) == 0
    for node in P.prunable_linears(fixed):
        assert P.nm_violations(fixed.weights[node.inputs[1]], 2, 4) == 0
    # the QAT forward is still the golden model of the export, bit for bit
    probe = tiny_decoder_feeds(1, seed=9)[0]
    step = model.step(probe)
    gold = GoldenModel(step.fixed)(probe, record=True)
    assert sum(int(np.sum(gold[k] != v)) for k, v in step.codes.items()) == 0


def test_reconstruct_refits_kept_weights(tiny_decoder, one_torch_thread):
    """Least-squares refit: zeros stay zeros, and each refitted linear's output on
    its (pruned-graph) inputs is closer to the dense linear's than plain pruning;
    for one linear the kept weights are the exact normal-equation solution."""
    from hwgen.float_exec import run_float

    folded = prepare(tiny_decoder)
    feeds = tiny_decoder_feeds(3, b=4)
    spec = P.PruneSpec.parse("2:4")
    masks = P.compute_masks(folded, spec)
    plain = P.apply_masks(folded, masks)
    refit = P.reconstruct(folded, masks, feeds, damp=0.0)
    assert all(not np.any(refit.weights[n][~m]) for n, m in masks.items())
    node = [n for n in P.prunable_linears(folded) if n.layer == 0][0]     # L0.q: input is layernorm
    x = np.concatenate([run_float(refit, f, record=True)[node.inputs[0]].numpy().reshape(-1, 16)
                        for f in feeds]).astype(np.float64)
    w0 = folded.weights[node.inputs[1]].astype(np.float64)
    err = {k: np.linalg.norm(x @ g.weights[node.inputs[1]].astype(np.float64) - x @ w0)
           for k, g in (("plain", plain), ("refit", refit))}
    assert err["refit"] < err["plain"]
    keep = masks[node.inputs[1]][:, 0]
    xs = x[:, keep]
    want = np.linalg.solve(xs.T @ xs, xs.T @ (x @ w0[:, 0]))
    assert np.allclose(refit.weights[node.inputs[1]][keep, 0], want, rtol=1e-4, atol=1e-5)


def test_reconstruct_block_pattern_exact(tiny_decoder, one_torch_thread):
    """Block masks share the kept rows across a column group: one solve with many
    right-hand sides, the same normal-equation solution per column."""
    from hwgen.float_exec import run_float

    folded = prepare(tiny_decoder)
    feeds = tiny_decoder_feeds(3, b=4)
    masks = P.compute_masks(folded, P.PruneSpec.parse("block:0.5", block_k=4, block_n=4))
    refit = P.reconstruct(folded, masks, feeds, damp=0.0)
    node = [n for n in P.prunable_linears(folded) if n.layer == 0][0]
    x = np.concatenate([run_float(refit, f, record=True)[node.inputs[0]].numpy().reshape(-1, 16)
                        for f in feeds]).astype(np.float64)
    w0 = folded.weights[node.inputs[1]].astype(np.float64)
    for col in (0, 5, 15):
        keep = masks[node.inputs[1]][:, col]
        if not keep.any():
            assert not np.any(refit.weights[node.inputs[1]][:, col])
            continue
        xs = x[:, keep]
        want = np.linalg.solve(xs.T @ xs, xs.T @ (x @ w0[:, col]))
        assert np.allclose(refit.weights[node.inputs[1]][keep, col], want, rtol=1e-4, atol=1e-5)


def test_rtl_engine_bit_exact_on_pruned_graph_with_recorded_bitmap(pruned):
    """The RTL matmul engine (Amaranth simulation) runs a block-pruned linear with
    the bitmap the graph records: the golden model's output codes, 0 mismatches,
    and exactly MatmulSpec.cycles(m, bitmap) cycles, fewer than dense."""
    from test_rtl_matmul_engine import run_engine

    from hwgen.rtl.matmul import MatmulSpec, linear_operands

    _, _, _, fixed, _, _ = pruned
    node = fixed.producer("L0.fc2")                       # K = 32, N = 16: 8 x 4 blocks of 4 x 4
    bm = P.linear_bitmap(fixed, node, 4, 4)
    assert bm.shape == (8, 4) and 0 < bm.sum() <= 16
    spec = MatmulSpec.for_linear(fixed, node, rows=4, cols=4, max_m=24, block_k=4)
    _, ops = linear_operands(fixed, node)
    rec = GoldenModel(fixed, workers=1)(tiny_decoder_feeds(1)[0], record=True)
    m = 10
    x = rec[node.inputs[0]].reshape(-1, spec.k)[:m]
    want = rec[node.outputs[0]].reshape(-1, spec.n)[:m]
    y, cycles = run_engine(spec, x, ops["w"], ops["bias"], ops["shift"], bitmap=bm)
    mismatches = int(np.sum(y != want))
    print(f"\nRTL engine on pruned L0.fc2 ({int(bm.sum())}/{bm.size} blocks): {mismatches} mismatches, "
          f"{cycles} cycles (dense {spec.cycles(m)})")
    assert mismatches == 0
    assert cycles == spec.cycles(m, bm) < spec.cycles(m)


# ---------------------------------------------------------------- layer-selective pruning

def test_select_linears_by_pattern():
    from conftest import build_tiny_decoder

    g = build_tiny_decoder()
    got = P.select_linears(g, "L0.fc*, L1.q.w")          # weight names (or node names) match
    assert [n.inputs[1] for n in got] == ["L0.fc1.w", "L0.fc2.w", "L1.q.w"]
    assert [n.inputs[1] for n in P.select_linears(g, "n4.linear")] == ["L0.q.w"]
    with pytest.raises(P.PruneError, match="pattern 'L9.*' matches no linear"):
        P.select_linears(g, "L0.q.w,L9.*")
    with pytest.raises(P.PruneError, match="expected comma-separated patterns"):
        P.select_linears(g, " , ")
    with pytest.raises(P.PruneError, match="matches no linear"):   # the LM head is not prunable
        P.select_linears(g, "head.w")


def test_selective_prune_leaves_other_linears_dense(tiny_decoder, one_torch_thread):
    """Only the named linears are pruned; every other linear keeps all its
    blocks (bitmap all ones) and is recorded as dense."""
    spec = P.PruneSpec.parse("block:0.5", block_k=4, block_n=4)
    folded = prepare(tiny_decoder)
    names = [n.inputs[1] for n in P.select_linears(folded, "L0.fc*,L1.o.w")]
    g, masks = P.prune(folded, spec, P.activation_norms(folded, tiny_decoder_feeds(1)), names=names)
    assert set(masks) == set(names)
    fixed, _ = quantize(g, tiny_decoder_feeds(), QuantConfig.from_bits("w8a8"))
    rec = P.record_sparsity(fixed, spec, names=names)
    total = sum(fixed.weights[n.inputs[1]].size for n in P.prunable_linears(fixed))
    for node in P.prunable_linears(fixed):
        r = node.attrs["sparsity"]
        bm = np.asarray(r["bitmap"])
        if node.inputs[1] in names:
            assert r["pattern"] == "block:0.5" and r["blocks_empty"] == round(0.5 * bm.size)
        else:
            assert r["pattern"] == "dense" and bm.all() and r["blocks_empty"] == 0
    assert rec["linears_pruned"] == 3 and rec["linears"] == 12
    assert rec["pruned_linears"] == [n.name for n in P.prunable_linears(fixed) if n.inputs[1] in names]
    assert rec["weight_share"] == pytest.approx(sum(fixed.weights[n].size for n in names) / total)
    assert P.check_sparsity(fixed) == 12
    # cycles: only the pruned linears save any
    pruned_nodes = [n for n in P.prunable_linears(fixed) if n.inputs[1] in names]
    other = [n for n in P.prunable_linears(fixed) if n.inputs[1] not in names]
    assert P.cycle_report(fixed, 16, 4, 4, 4, nodes=other)["cycles_ratio"] == 1.0
    assert P.cycle_report(fixed, 16, 4, 4, 4, nodes=pruned_nodes)["cycles_ratio"] < 0.6


def test_sensitivity_ranking_deterministic_and_budget(tiny_decoder, one_torch_thread):
    """The ranking is the same on a second run, sorted by cosine loss per
    weight; the budget's choice keeps the measured combined cosine >= budget
    and prunes exactly the linears it reports as chosen."""
    spec = P.PruneSpec.parse("block:0.5", block_k=4, block_n=4)
    folded = prepare(tiny_decoder)
    feeds = tiny_decoder_feeds(2)
    norms = P.activation_norms(folded, feeds)
    a = P.sensitivity(folded, spec, feeds, norms)
    b = P.sensitivity(folded, spec, feeds, norms)
    assert a == b and len(a) == 12
    key = [r["drop_per_mweight"] for r in a]
    assert key == sorted(key) and all(r["drop"] == pytest.approx(1 - r["cosine_mean"]) for r in a)
    # rerun from the pruned linear on (DenseRuns) = a full run of the pruned graph, exactly
    ref = P._float_outputs(folded, feeds)
    for r in a:
        full = P._output_cosine(P.apply_masks(folded, P.compute_masks(folded, spec, norms, names=[r["weight"]])),
                                feeds, ref)
        assert (r["cosine_mean"], r["cosine_min"]) == (float(full.mean()), float(full.min()))
    budget = float(np.median([r["cosine_mean"] for r in a]))   # some, not all, fit
    chosen, rows = P.select_by_budget(folded, spec, feeds, budget, norms, ranking=a)
    assert [r["name"] for r in rows] == [r["name"] for r in a]
    assert {n.name for n in chosen} == {r["name"] for r in rows if r["chosen"]}
    assert 0 < len(chosen) < 12
    assert all(r["cosine_with"] >= budget for r in rows if r["chosen"])
    assert all(r["cosine_with"] < budget for r in rows if not r["chosen"])
    # every combined cosine is a full run of the graph pruned with the chosen-so-far set plus
    # that linear (DenseRuns reruns from the new linear on the chosen set's run), exactly
    so_far = []
    for r in rows:
        g, _ = P.prune(folded, spec, norms, names=so_far + [r["weight"]])
        assert float(P._output_cosine(g, feeds, ref).mean()) == r["cosine_with"]
        so_far += [r["weight"]] if r["chosen"] else []
    assert so_far == [r["weight"] for r in rows if r["chosen"]] and len(so_far) >= 2
    assert P.select_by_budget(folded, spec, feeds, 1e-9, norms, ranking=a)[0] == P.prunable_linears(folded)
    with pytest.raises(P.PruneError, match="--prune-budget must be a cosine"):
        P.select_by_budget(folded, spec, feeds, 1.5, norms, ranking=a)


def test_dense_runs_rerun_from_the_first_changed_linear(tiny_decoder, one_torch_thread):
    """DenseRuns.outputs equals a full float run of the masked graph whether the
    masks extend the rebased set (rerun from the new linear) or not (rerun from
    the dense run)."""
    spec = P.PruneSpec.parse("block:0.5", block_k=4, block_n=4)
    folded = prepare(tiny_decoder)
    feeds = tiny_decoder_feeds(2)
    lin = [n.inputs[1] for n in P.prunable_linears(folded)]
    masks = lambda names: P.compute_masks(folded, spec, None, names=names)
    runs = P.DenseRuns(folded, feeds)
    full = lambda names: P._float_outputs(P.apply_masks(folded, masks(names)), feeds)
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b))
    assert same(runs.ref, P._float_outputs(folded, feeds))
    runs.rebase(masks([lin[1]]))
    for names in ([lin[1], lin[5]], [lin[1], lin[0]], [lin[4]], [lin[0], lin[6]], []):
        assert same(runs.outputs(masks(names)), full(names)), names


def test_refit_solve_singular_normal_matrix():
    """A normal matrix of rank-deficient inputs (damp 0) is solved by least
    squares, minimum norm, instead of failing; a regular one by the exact solve."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    x = np.concatenate([x, np.zeros((20, 1))], axis=1)             # a dead input: rank 3 of 4
    a, b = x.T @ x, x.T @ rng.normal(size=(20, 2))
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.solve(a, b)
    got = P._solve(a, b)
    assert np.allclose(a @ got, b) and np.allclose(got, np.linalg.pinv(a) @ b)
    batch = P._solve(np.stack([a, a + np.eye(4)]), np.stack([b, b]))
    assert np.allclose(batch[0], got) and np.allclose(batch[1], np.linalg.solve(a + np.eye(4), b))
