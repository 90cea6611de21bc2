"""Channel-pair pruning (hwgen.prune_channels): pairs found, permutations exact,
whole blocks of both linears emptied, refit, and the CLI path."""
import copy
import json

import numpy as np
import pytest

from conftest import last_json, run_cli, tiny_decoder_feeds
from hwgen import prune as P
from hwgen import prune_channels as C
from hwgen.float_exec import run_float
from hwgen.ir import Graph
from hwgen.quant import QuantConfig, prepare, quantize


@pytest.fixture(scope="module")
def folded(tiny_decoder):
    return prepare(tiny_decoder)


def _out(g, feeds):
    return np.concatenate([run_float(g, f)[g.outputs[0]].numpy().reshape(-1) for f in feeds])


def test_channel_pairs_of_a_decoder(folded):
    pairs = C.channel_pairs(folded)
    w = {n.name: n.inputs[1] for n in folded.nodes if n.op == "linear"}
    assert [(p.name, [w[n] for n in p.producers], p.consumer and w[p.consumer], p.heads, p.channels)
            for p in pairs] == [
        ("layer0.qk", ["L0.q.w", "L0.k.w"], None, 2, 16), ("layer0.vo", ["L0.v.w"], "L0.o.w", 2, 16),
        ("layer0.ffn", ["L0.fc1.w"], "L0.fc2.w", 1, 32),
        ("layer1.qk", ["L1.q.w", "L1.k.w"], None, 2, 16), ("layer1.vo", ["L1.v.w"], "L1.o.w", 2, 16),
        ("layer1.ffn", ["L1.fc1.w"], "L1.fc2.w", 1, 32)]
    assert [p.name for p in C.channel_pairs(folded, ["ffn"])] == ["layer0.ffn", "layer1.ffn"]
    with pytest.raises(P.PruneError, match="kind 'up'"):
        C.channel_pairs(folded, ["up"])


def test_permutation_inside_heads_is_exact_across_heads_is_not(folded):
    feeds = tiny_decoder_feeds(2)
    ref = _out(folded, feeds)
    rng = np.random.default_rng(3)
    g = copy.copy(folded)
    g.weights = dict(folded.weights)
    for p in C.channel_pairs(g):
        per = p.channels // p.heads
        C.permute_pair(g, p, np.concatenate([h * per + rng.permutation(per) for h in range(p.heads)]))
    np.testing.assert_allclose(_out(g, feeds), ref, rtol=1e-5, atol=1e-5)
    # the same move across heads changes the function: the test can fail
    bad = copy.copy(folded)
    bad.weights = dict(folded.weights)
    vo = C.channel_pairs(bad, ["vo"])[0]
    C.permute_pair(bad, vo, np.roll(np.arange(vo.channels), 4))
    assert np.abs(_out(bad, feeds) - ref).max() > 1e-3


def test_choose_keeps_a_prefix_of_each_head():
    imp = np.array([5, 1, 9, 0, 3, 3, 8, 2, 7, 6, 1, 1, 0, 0, 4, 4], dtype=float)
    perm, keep = C.choose(imp, heads=2, group=2, ratio=0.5)
    assert sorted(perm[:8]) == list(range(8)) and sorted(perm[8:]) == list(range(8, 16))
    assert list(perm[:4]) == [2, 6, 0, 4]          # head 0, most important first (ties: lower)
    # group sums in new order: head 0 (17, 8, 5, 1), head 1 (13, 8, 2, 0): prune the 4 smallest
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4
    assert C.choose(imp, 2, 2, 0.25)[1].reshape(-1, 2)[:, 0].tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    # 5 groups: the tie 8 / 8 prunes the later group (head 1's)
    assert C.choose(imp, 2, 2, 0.625)[1].reshape(-1, 2)[:, 0].tolist() == [1, 1, 0, 0, 1, 0, 0, 0]


def test_group_must_divide_a_head(folded):
    vo = C.channel_pairs(folded, ["vo"])[0]
    with pytest.raises(P.PruneError, match=r"layer0.vo: 8 channels per head are not a multiple of the "
                                           r"16-channel block group \(block_k 16, block_n 16\)"):
        C.group_size(vo, 16, 16)
    assert C.group_size(vo, 4, 2) == 4 and C.group_size(C.channel_pairs(folded, ["qk"])[0], 16, 8) == 8


@pytest.mark.parametrize("refit", [False, True])
def test_prune_pairs_empties_whole_blocks_of_both_linears(folded, one_torch_thread, refit):
    feeds = tiny_decoder_feeds(3)
    pairs = C.channel_pairs(folded)
    g, masks = C.prune_pairs(folded, pairs, 0.5, 4, 4, feeds, refit=refit)
    nodes = {n.name: n for n in g.nodes}
    pruned = {nodes[n].inputs[1] for p in pairs for n in p.linears()}
    assert set(masks) == pruned and "head.w" not in masks
    for name in pruned:
        w = g.weights[name]
        assert np.count_nonzero(w[~masks[name]]) == 0
        bm = P.block_bitmap(w, 4, 4)
        assert bm.size - bm.sum() == bm.size // 2                     # exactly half the blocks empty
        assert np.array_equal(P.expand_blocks(bm, w.shape, 4, 4), masks[name])
    for p in pairs:                                                   # producers' biases follow the columns
        keep = masks[nodes[p.producers[0]].inputs[1]][0]
        for prod in p.producers:
            assert np.count_nonzero(g.weights[nodes[prod].inputs[2]][~keep]) == 0
    for name in set(folded.weights) - pruned - {nodes[n].inputs[2] for p in pairs for n in p.linears()}:
        assert np.array_equal(g.weights[name], folded.weights[name])
    # quantized, the zeros stay zeros and the record is derived from them
    fixed, _ = quantize(g, feeds, QuantConfig.from_bits("w8a8"))
    assert P.mask_violations(fixed, masks) == 0
    P.record_sparsity(fixed, P.PruneSpec.parse("block:0.5", 4, 4), names=list(masks))
    assert P.check_sparsity(fixed) == len(masks) == 12


def test_pruning_pass_values_equal_a_run_of_the_pruned_graph(folded, one_torch_thread):
    """The ordered pass runs each pair's producers before they are pruned (the
    consumer's refit needs their dense output): the outputs it computes (what
    the budget search measures) still equal a fresh float run of the graph it
    returns."""
    feeds = tiny_decoder_feeds(2)
    pairs = C.channel_pairs(folded)
    for refit in (False, True):
        g, masks, outs = C._prune_pass(folded, pairs, 0.5, 4, 4, feeds, refit, 0.01, None, None)
        fresh = [run_float(g, f)[g.outputs[0]].numpy() for f in feeds]
        for a, b in zip(outs, fresh):
            np.testing.assert_array_equal(a, b)
        assert np.abs(np.concatenate(outs) - _out(folded, feeds).reshape(np.concatenate(outs).shape)).max() > 1e-3


def test_refit_brings_the_output_closer(folded, one_torch_thread):
    feeds = tiny_decoder_feeds(4, b=4, s=16)
    pairs = C.channel_pairs(folded, ["vo", "ffn"])
    ref = _out(folded, feeds)
    err = {r: np.linalg.norm(_out(C.prune_pairs(folded, pairs, 0.5, 4, 4, feeds, refit=r)[0], feeds) - ref)
           for r in (False, True)}
    assert err[True] < 0.8 * err[False]


def test_select_by_budget_over_pairs(folded, one_torch_thread):
    feeds = tiny_decoder_feeds(2)
    pairs = C.channel_pairs(folded)
    chosen, rows = C.select_by_budget(folded, pairs, 0.5, 4, 4, feeds, 0.9)
    assert sorted(r["name"] for r in rows) == sorted(p.name for p in pairs)
    assert [r["drop_per_mweight"] for r in rows] == sorted(r["drop_per_mweight"] for r in rows)
    assert [p.name for p in chosen] == [p.name for p in pairs if any(
        r["chosen"] and r["name"] == p.name for r in rows)]
    assert all(r["cosine_with"] >= 0.9 for r in rows if r["chosen"])
    assert all(r["cosine_with"] < 0.9 for r in rows if not r["chosen"])


def test_no_calibration_inputs_is_an_error(folded):
    """Without calibration batches there is no importance and no ranking: a
    PruneError, not a failure deep inside."""
    pairs = C.channel_pairs(folded)
    with pytest.raises(P.PruneError, match="channel importance needs at least one calibration batch"):
        C.select_by_budget(folded, pairs, 0.5, 4, 4, [], 0.9)
    with pytest.raises(P.PruneError, match="channel importance needs at least one calibration batch"):
        C.prune_pairs(folded, pairs, 0.5, 4, 4, [])
    with pytest.raises(P.PruneError, match="sensitivity needs at least one calibration batch"):
        P.sensitivity(folded, P.PruneSpec.parse("block:0.5", 4, 4), [])


def test_cli_prune_channels(capsys, tmp_path):
    """bert-block: every pair at block:0.5 halves each of the 6 linears' blocks
    (q, k, v, o, up, down). An N-tile with no block left still costs the PE
    array's ``min_beats`` (16 beats against 64 for a full tile at K = 64), so
    the column-pruned linears (q, k, v, up) run at 0.625 of dense, the
    row-pruned ones (o, down) at 0.5."""
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "block:0.5",
                          "--prune-channels", "--out", tmp_path / "b", "--json", "--quiet")
    assert code == 0
    r = last_json(so)
    assert r["prune_selection"] == "channels:all" and r["linears_pruned"] == 6
    assert r["channel_pairs"] == ["layer0.qk", "layer0.vo", "layer0.ffn"]
    assert 0.5 < r["cycles_ratio"] < 0.6 and r["cosine_mean"] > 0.9
    g = Graph.load(tmp_path / "b")
    assert P.check_sparsity(g) == 6
    rows, cols, bk = P.engine_geometry()
    for node in P.prunable_linears(g):
        bm = np.asarray(node.attrs["sparsity"]["bitmap"])
        assert bm.size - bm.sum() == bm.size // 2
        dense, sparse = P.linear_cycles(g, node, 128, rows, cols, bk)
        assert sparse / dense == pytest.approx(0.5 if node.name in ("attn.o", "out") else 0.625, abs=0.02)
    # the C-simulated HLS kernels (block loops over the nonzero blocks) give the golden codes
    code, so, _ = run_cli(capsys, "verify", "--graph", tmp_path / "b", "--target", "hls", "--json", "--quiet")
    v = last_json(so)
    assert code == 0 and v["mismatches"] == 0 and v["vectors"] > 0
    code, so, _ = run_cli(capsys, "gen", "--graph", tmp_path / "b", "--target", "hls", "--out", tmp_path / "h",
                          "--json", "--quiet")
    lin = {k["node"]: k for k in json.loads((tmp_path / "h" / "manifest.json").read_text())["kernels"]
           if k["op"] == "linear"}
    assert len(lin) == 6 and all(k["mac_iterations"] * 2 == k["mac_iterations_dense"] for k in lin.values())
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "block:0.5",
                          "--prune-channels", "--prune-layers", "out", "--out", tmp_path / "c", "--json",
                          "--quiet")
    assert code == 0
    r = last_json(so)
    assert r["channel_pairs"] == ["layer0.ffn"] and r["pruned_linears"] == ["inter", "out"]


@pytest.mark.parametrize("argv,msg", [
    (["--prune", "2:4", "--prune-channels"], "--prune-channels needs --prune block:RATIO"),
    (["--prune-channels"], "--prune-channels needs --prune block:RATIO"),
    (["--prune", "block:0.5", "--prune-channels", "--gradual", "--qat-steps", "1"],
     "--prune-channels is one-shot"),
])
def test_cli_prune_channels_errors(capsys, tmp_path, argv, msg):
    out = tmp_path / "bad"
    code, _, err = run_cli(capsys, "quantize", "--model", "bert-block", "--out", out, *argv, "--quiet")
    assert code == 1 and msg in err and err.startswith("hwgen: error:")
    assert not out.exists()


def test_bias_refit_keeps_the_consumer_mean(folded, one_torch_thread):
    """Without the row refit the consumer's bias takes the pruned channels'
    mean: on the inputs it was fitted on, the consumer's mean output is the
    dense one (a pair pruned alone, so its inputs are the dense graph's)."""
    feeds = tiny_decoder_feeds(3)
    ffn = C.channel_pairs(folded, ["ffn"])[0]
    consumer = folded.node(ffn.consumer)
    out = consumer.outputs[0]

    def mean_out(g):
        return np.concatenate([run_float(g, f, record=True)[out].numpy().reshape(-1, 16) for f in feeds]).mean(0)

    g, _ = C.prune_pairs(folded, [ffn], 0.5, 4, 4, feeds, refit=False)
    np.testing.assert_allclose(mean_out(g), mean_out(folded), atol=1e-5)
    zeroed = copy.copy(g)
    zeroed.weights = {**g.weights, consumer.inputs[2]: folded.weights[consumer.inputs[2]]}
    assert np.abs(mean_out(zeroed) - mean_out(folded)).max() > 1e-3      # the bias is what keeps it
