"""Distillation: loss terms, the float student equals the float executor, the
two-stage recipe (gradual pruning in float, QAT with the golden forward) on a
tiny decoder, and the `hwgen quantize --prune/--distill` CLI."""
import numpy as np
import pytest
import torch

from conftest import last_json, run_cli, tiny_decoder_feeds
from hwgen import distill as D
from hwgen import prune as P
from hwgen.float_exec import run_float
from hwgen.golden import GoldenModel
from hwgen.ir import Graph
from hwgen.quant import QuantConfig, prepare


def test_loss_terms():
    t = torch.randn(2, 5, 7, dtype=torch.float64)
    assert float(D.kd_logits(t, t)) == pytest.approx(0, abs=1e-12)
    assert float(D.kd_logits(t + 1.0, t)) == pytest.approx(0, abs=1e-12)   # softmax shift-invariant
    assert float(D.kd_logits(2 * t, t)) > 0
    assert float(D.hidden_mse(2 * t, t)) == pytest.approx(1.0)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[0, :2] = True
    s = t.clone()
    s[1] = 0                                          # wrong only where not valid
    assert float(D.hidden_mse(s, t, valid)) == 0
    assert float(D.cosine_loss(3 * t, t)) == pytest.approx(0, abs=1e-12)


def _encoder_block_graph():
    """A one-layer float encoder block with a key mask: ln -> q, k, v -> attention -> o."""
    from conftest import GraphBuilder

    b = GraphBuilder("enc", 3, layer=0)
    w, act, node = b.w, b.act, b.node
    b.input("x", "B", "S", 8, dtype="float")
    b.input("mask", "B", "S")
    q = node("linear", ["x", w("q.w", 8, 8), w("q.b", 8, scale=0.1)], act("q", "B", "S", 8))
    k = node("linear", ["x", w("k.w", 8, 8), w("k.b", 8, scale=0.1)], act("k", "B", "S", 8))
    v = node("linear", ["x", w("v.w", 8, 8), w("v.b", 8, scale=0.1)], act("v", "B", "S", 8))
    a = node("attention", [q, k, v, "mask"], act("a", "B", "S", 8), heads=2, head_dim=4, causal=False,
             scale=0.5)
    o = node("linear", [a, w("o.w", 8, 8), w("o.b", 8, scale=0.1)], act("o", "B", "S", 8))
    return b.done(o)


def test_attention_kl():
    g = _encoder_block_graph()
    node = next(n for n in g.nodes if n.op == "attention")
    rng = np.random.default_rng(0)
    q, k = (torch.from_numpy(rng.normal(size=(2, 5, 8))) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert float(D.attention_kl(q, k, q, k, node, mask)) == 0
    assert float(D.attention_kl(q, k + 0.3 * torch.randn_like(k), q, k, node, mask)) > 0
    # what the mask excludes does not count: keys and queries at padded positions
    q2, k2 = q.clone(), k.clone()
    q2[1, 3:] += 5
    k2[1, 3:] -= 5
    assert float(D.attention_kl(q2, k2, q, k, node, mask)) == pytest.approx(0, abs=1e-12)
    assert float(D.attention_kl(q2, k2, q, k, node)) > 0               # no mask: every position counts
    # by hand: one head's KL at one query, against the softmax of the scaled scores
    s_t = torch.softmax(0.5 * q[0, :, :4] @ k[0, :, :4].T, -1)
    k3 = k.clone()
    k3[0, :, :4] *= 2
    s_s = torch.softmax(0.5 * q[0, :, :4] @ k3[0, :, :4].T, -1)
    kl00 = (s_t * (s_t.log() - s_s.log())).sum(-1)                    # (S,) for head 0 of row 0
    got = D.attention_kl(q[:1], k3[:1], q[:1], k[:1], node)            # heads 0 and 1; head 1 unchanged
    assert float(got) == pytest.approx(float(kl00.sum()) / (2 * 5), rel=1e-9)


def test_distill_loss_linear_and_attention_terms():
    """The finer terms add their weights times the per-linear error and the
    attention KL; the teacher keeps the values they read."""
    g = _encoder_block_graph()
    rng = np.random.default_rng(1)
    feed = {"x": rng.normal(size=(2, 5, 8)).astype(np.float32), "mask": np.array([[1] * 5, [1, 1, 1, 0, 0]])}
    st = D.FloatStudent(g)
    with torch.no_grad():
        for p in st.weights:
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        vals = st(feed)
    base = D.DistillLoss(g, "block")
    full = D.DistillLoss(g, "block", linear_weight=0.5, attention_weight=2.0)
    assert full.linears == ["q", "k", "v", "o"] and [n.name for n in full.attentions] == [g.nodes[3].name]
    t = full.teacher(feed)
    assert {"q", "k", "v", "o"} <= set(t) and "q" not in base.teacher(feed)
    valid = torch.as_tensor(feed["mask"] != 0)
    lin = sum(D.hidden_mse(vals[n], t[n], valid) for n in "qkvo") / 4
    att = D.attention_kl(vals["q"], vals["k"], t["q"], t["k"], g.nodes[3], vals["mask"])
    assert float(lin) > 0 and float(att) > 0
    assert float(full(feed, vals)) == pytest.approx(float(base(feed, vals) + 0.5 * lin + 2.0 * att), rel=1e-12)


def test_layer_outputs(tiny_decoder):
    assert D.layer_outputs(tiny_decoder) == ["L0.r2", "L1.r2"]


def test_float_student_is_the_float_executor(tiny_decoder):
    g = prepare(tiny_decoder)
    st = D.FloatStudent(g)
    feed = tiny_decoder_feeds(1)[0]
    want = run_float(g, feed, record=True)
    got = st(feed)
    for name in ("L0.r2", "logits"):
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-5)
    # masks: zeros in the forward and in the exported float graph, no gradient behind them
    masks = P.compute_masks(g, P.PruneSpec.parse("2:4"))
    st.set_masks(masks)
    loss = st(feed)["logits"].square().mean()
    loss.backward()
    for name, p in zip(st.names, st.weights):
        if name in masks:
            assert float(p.grad[~torch.from_numpy(masks[name])].abs().sum()) == 0
    cg = st.current_graph()
    assert all(not np.any(cg.weights[n][~m]) for n, m in masks.items())
    with pytest.raises(D.DistillError, match="does not match a weight"):
        st.set_masks({"L0.q.w": np.ones((3, 3), bool)})


def test_float_student_trainable_subset(tiny_decoder):
    """trainable= freezes every other weight: only the named ones get gradients
    and change in a distillation step."""
    g = prepare(tiny_decoder)
    st = D.FloatStudent(g, trainable=["L0.fc1.w", "L0.fc1.b"])
    assert st.names == ["L0.fc1.b", "L0.fc1.w"]
    feeds = tiny_decoder_feeds(1)
    D.distill_float(st, feeds, D.DistillLoss(g, "decoder"), 1, lr=1e-2)
    cg = st.current_graph()
    assert not np.array_equal(cg.weights["L0.fc1.w"], g.weights["L0.fc1.w"])
    assert all(np.array_equal(cg.weights[n], g.weights[n]) for n in g.weights if not n.startswith("L0.fc1"))
    with pytest.raises(D.DistillError, match="not weights of the graph"):
        D.FloatStudent(g, trainable=["nope.w"])


def test_distill_recipe_tiny_decoder(tiny_decoder, one_torch_thread):
    """Float stage lowers the distillation loss while 2:4 pruning is phased in;
    the QAT stage's forward is the golden model of the exported student."""
    cfg = QuantConfig.from_bits("w8a8")
    feeds = tiny_decoder_feeds(2)
    spec = P.PruneSpec.parse("2:4")
    res = D.distill(tiny_decoder, "decoder", feeds, cfg, spec, float_steps=30, qat_steps=2, lr=3e-3,
                    qat_lr=1e-4)
    assert len(res.float_losses) == 30 and len(res.qat_losses) == 2
    assert res.schedule[0] < 1 and res.schedule[-1] == 1
    assert P.mask_violations(res.fixed, res.masks) == 0
    for node in P.prunable_linears(res.fixed):
        assert P.nm_violations(res.fixed.weights[node.inputs[1]], 2, 4) == 0
    # after pruning is complete (step 15 on), distillation recovers: the loss falls
    assert np.mean(res.float_losses[-5:]) < np.mean(res.float_losses[15:20])
    assert "distill_float" in res.fixed.meta["passes"] and "distill_qat" in res.fixed.meta["passes"]
    # the exported graph is a valid fixed graph the golden model runs
    out = GoldenModel(res.fixed)(tiny_decoder_feeds(1, seed=4)[0])["logits"]
    assert out.shape == (2, 12, 40)


def test_distill_errors(tiny_decoder):
    with pytest.raises(D.DistillError, match="encoder, decoder, block"):
        D.DistillLoss(prepare(tiny_decoder), "classifier")
    with pytest.raises(D.DistillError, match="at least one input batch"):
        D.distill_float(D.FloatStudent(prepare(tiny_decoder)), [], D.DistillLoss(prepare(tiny_decoder), "decoder"), 1)


def test_corpus_sentences_exclude_eval():
    from hwgen.zoo import DATA_DIR

    sents = D.corpus_sentences(50)
    assert len(sents) == 50 and len(set(sents)) == 50
    evals = set((DATA_DIR / "sentences_eval.txt").read_text().splitlines())
    assert not evals & set(sents)


# ---------------------------------------------------------------- CLI

def test_cli_prune_block_reports_engine_cycles(capsys, tmp_path):
    out = tmp_path / "bb"
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "block:0.5",
                          "--out", out, "--json", "--quiet")
    assert code == 0
    r = last_json(so)
    assert r["prune"] == "block:0.5" and r["sparsity"] >= 0.5 and r["distill"] is False
    g = Graph.load(out)
    assert P.check_sparsity(g) == len(P.prunable_linears(g)) == 6
    # the cycle keys are the engine's own count, summed over the pruned linears
    from hwgen.rtl.matmul import MatmulSpec

    rows, cols, bk = P.engine_geometry()
    dense = sparse = 0
    for node in P.prunable_linears(g):
        spec = MatmulSpec.for_linear(g, node, rows, cols, 128, bk)
        dense += spec.cycles(128)
        sparse += spec.cycles(128, np.asarray(node.attrs["sparsity"]["bitmap"]))
    assert (r["cycles_dense"], r["cycles_sparse"], r["cycles_m"]) == (dense, sparse, 128)
    assert r["cycles_ratio"] <= 0.55


def test_cli_prune_distill(capsys, tmp_path):
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "2:4", "--distill",
                          "--distill-steps", "6", "--qat-steps", "1", "--out", tmp_path / "b", "--json",
                          "--quiet")
    assert code == 0
    r = last_json(so)
    assert r["distill"] is True and r["distill_steps"] == 6 and r["qat_steps"] == 1
    assert r["sparsity"] >= 0.5 and r["cycles_sparse"] == r["cycles_dense"]
    assert r["prune_schedule"] == "oneshot+refit"
    g = Graph.load(tmp_path / "b")
    for node in P.prunable_linears(g):
        assert P.nm_violations(g.weights[node.inputs[1]], 2, 4) == 0
    assert r["distill_loss_first"] is not None and r["qat_loss_last"] is not None


def test_cli_gradual(capsys, tmp_path):
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "unstructured:0.6",
                          "--gradual", "--qat-steps", "2", "--out", tmp_path / "b", "--json", "--quiet")
    assert code == 0
    r = last_json(so)
    assert r["prune_schedule"] == "gradual" and r["sparsity"] >= 0.6 and len(P.prunable_linears(
        Graph.load(tmp_path / "b"))) == 6


def test_cli_prune_layers_selective(capsys, tmp_path):
    """--prune-layers prunes exactly the named linears; the JSON reports the
    selection, its weight share and the cycles of the pruned linears and of all."""
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "block:0.5",
                          "--prune-layers", "inter,out", "--out", tmp_path / "b", "--json", "--quiet")
    assert code == 0
    r = last_json(so)
    g = Graph.load(tmp_path / "b")
    lin = P.prunable_linears(g)
    assert r["prune_selection"] == "layers:inter,out" and r["pruned_linears"] == ["inter", "out"]
    assert (r["linears_pruned"], r["linears"]) == (2, 6) and r["sensitivity"] is None
    sizes = {n.name: g.weights[n.inputs[1]].size for n in lin}
    assert r["weight_share"] == pytest.approx((sizes["inter"] + sizes["out"]) / sum(sizes.values()))
    for node in lin:
        bm = np.asarray(node.attrs["sparsity"]["bitmap"])
        assert bm.all() == (node.name not in ("inter", "out"))
    assert r["cycles_pruned_ratio"] <= 0.55 and r["cycles_pruned_ratio"] < r["cycles_ratio"] < 1


def test_cli_prune_budget(capsys, tmp_path):
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "block:0.5",
                          "--prune-budget", "0.999", "--distill", "--distill-steps", "2", "--distill-pruned-only",
                          "--out", tmp_path / "b", "--json", "--quiet")
    assert code == 0
    r = last_json(so)
    assert r["distill"] is True and r["distill_steps"] == 2
    assert r["prune_selection"] == "budget:0.999" and len(r["sensitivity"]) == 6
    assert r["linears_pruned"] >= 1
    assert sorted(r["pruned_linears"]) == sorted(x["name"] for x in r["sensitivity"] if x["chosen"])
    g = Graph.load(tmp_path / "b")
    for node in P.prunable_linears(g):
        assert (node.attrs["sparsity"]["pattern"] == "dense") == (node.name not in r["pruned_linears"])


@pytest.mark.parametrize("argv,msg", [
    (["--prune-layers", "inter"], "--prune-layers and --prune-budget need --prune"),
    (["--prune", "2:4", "--prune-layers", "nope*"], "pattern 'nope*' matches no linear"),
    (["--prune", "2:4", "--prune-layers", "inter", "--prune-budget", "0.9"], "exclude each other"),
    (["--prune", "2:4", "--prune-budget", "2"], "--prune-budget must be a cosine"),
    (["--prune", "2:4", "--distill-pruned-only"], "--distill-pruned-only needs --distill"),
    (["--prune", "2:4", "--gradual", "--distill", "--distill-steps", "2", "--distill-pruned-only"],
     "needs one-shot pruning"),
    (["--prune", "2:4", "--gradual"], "--gradual needs --prune and fine-tuning steps"),
    (["--prune", "block:2"], "RATIO must be between 0 and 1"),
    (["--prune", "5:4"], "N:M needs 1 <= N < M"),
    (["--distill", "--distill-steps", "0"], "--distill needs --distill-steps > 0"),
    (["--distill-synthetic", "8"], "--distill-synthetic needs --distill"),
    (["--distill", "--distill-steps", "1", "--distill-synthetic", "-1"],
     "--distill-synthetic -1: the sentence count must be >= 0"),
    (["--distill", "--distill-steps", "1", "--distill-synthetic", "8"],
     "synthetic sentences are everyday English for minilm, not 'bert-block'"),
    (["--distill-text", "models/data/sentences_calib.txt"], "--distill-text needs --distill"),
    (["--distill-schedule", "cosine"], "--distill-schedule needs --distill with --distill-steps > 0"),
    (["--distill", "--distill-steps", "1", "--distill-schedule", "linear"],
     "--distill-schedule linear: expected one of constant, cosine"),
    (["--distill", "--distill-steps", "1", "--distill-text", "models/data/sentences_calib.txt"],
     "--distill-text: model 'bert-block' (block) takes tensors, not text"),
    (["--distill-lr", "1e-3"], "--distill-lr needs --distill with --distill-steps > 0"),
    (["--distill", "--distill-steps", "1", "--distill-lr", "0"], "--distill-lr 0.0: the learning rate must be > 0"),
    (["--distill-device", "cuda"], "--distill-device needs --distill with --distill-steps > 0"),
    (["--distill", "--distill-steps", "1", "--distill-device", "tpu"],
     "--distill-device tpu: unknown device, expected one of cpu, cuda"),
    (["--distill-linear-weight", "1"], "--distill-linear-weight needs --distill"),
    (["--distill", "--distill-steps", "1", "--distill-attention-weight", "-1"],
     "--distill-attention-weight -1.0: the weight must be >= 0"),
    (["--distill-precision", "bf16"], "--distill-precision needs --distill with --distill-steps > 0"),
    (["--distill", "--distill-steps", "1", "--distill-precision", "fp16"],
     "--distill-precision fp16: expected one of fp32, bf16"),
    (["--distill-group-by-length"], "--distill-group-by-length needs --distill"),
    (["--distill", "--distill-steps", "1", "--distill-group-by-length"],
     "--distill-group-by-length: model 'bert-block' (block) reads fixed-width inputs, not sentences"),
    (["--gradual"], "--gradual needs --prune and fine-tuning steps"),
    (["--distill-pruned-only"], "--distill-pruned-only needs --distill with --distill-steps > 0"),
    (["--distill-steps", "5"], "--distill-steps needs --distill"),
    (["--distill-augment", "2"], "--distill-augment needs --distill"),
    (["--distill", "--distill-steps", "1", "--distill-augment", "-1"],
     "--distill-augment -1: the number of copies must be an integer >= 0"),
    (["--distill", "--distill-steps", "1", "--distill-augment", "1"],
     "--distill-augment: model 'bert-block' (block) reads fixed-width inputs, not sentences"),
    (["--distill-teacher-cache", "2"], "--distill-teacher-cache needs --distill with --distill-steps > 0"),
    (["--distill", "--distill-steps", "1", "--distill-teacher-cache", "-1"],
     "--distill-teacher-cache -1.0: the budget (GiB) must be >= 0"),
    (["--distill-ema", "0.99"], "--distill-ema needs --distill with --distill-steps > 0"),
    (["--distill-train-embeddings"], "--distill-train-embeddings needs --distill with --distill-steps > 0"),
    (["--distill-fake-quant"], "--distill-fake-quant needs --distill with --distill-steps > 0"),
    (["--distill", "--distill-steps", "0", "--qat-steps", "1", "--distill-fake-quant"],
     "--distill-fake-quant needs --distill with --distill-steps > 0"),
    (["--distill", "--distill-steps", "1", "--distill-ema", "1"],
     "--distill-ema 1.0: the decay must be in [0, 1) (0: no average)"),
    (["--distill-eval-every", "2"], "--distill-eval-every needs --distill with --distill-steps > 0"),
    (["--distill", "--distill-steps", "1", "--distill-eval-every", "-1"],
     "--distill-eval-every -1: the interval must be an integer >= 1 (steps; 0: off)"),
    (["--distill-init", "s.npz"], "--distill-init needs --distill"),
    (["--prune", "2:4", "--gradual", "--distill", "--distill-steps", "1", "--distill-init", "s.npz"],
     "--distill-init starts from a saved student, whose zeros are its masks: drop --gradual"),
    (["--distill", "--distill-steps", "0", "--qat-steps", "1", "--distill-save", "s.npz"],
     "--distill-save needs --distill with --distill-steps > 0"),
    (["--distill", "--distill-steps", "1", "--distill-save", "no/such/folder/s.npz"],
     "--distill-save no/such/folder/s.npz: its folder does not exist"),
    (["--distill", "--distill-steps", "1", "--distill-init", "no-such-student.npz"],
     "--distill-init no-such-student.npz: cannot read it as a float student file"),
    pytest.param(["--distill", "--distill-steps", "1", "--distill-device", "cuda"],
                 "--distill-device cuda: torch sees no CUDA GPU here", id="no-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")),
])
def test_cli_bad_compression_args(capsys, tmp_path, argv, msg):
    out = tmp_path / "bad"
    code, _, err = run_cli(capsys, "quantize", "--model", "bert-block", "--out", out, *argv, "--quiet")
    assert code == 1 and msg in err and err.startswith("hwgen: error:")
    assert not out.exists()


def test_train_feeds_add_shuffled_synthetic_batches():
    from hwgen import zoo
    from hwgen.synth_sentences import sentences

    b = zoo.load("minilm")
    plain = D.train_feeds(b, extra=0)
    assert len(plain) == len(b.calib_feeds)
    mixed = D.train_feeds(b, extra=0, synthetic=40)
    want = plain + [b.encode(s) for s in (sentences(40)[:16], sentences(40)[16:32], sentences(40)[32:])]
    key = lambda f: f["ids"].tobytes() + f["mask"].tobytes()
    assert sorted(map(key, mixed)) == sorted(map(key, want))
    assert list(map(key, mixed)) != list(map(key, want))       # shuffled, so the loop alternates domains
    assert list(map(key, D.train_feeds(b, extra=0, synthetic=40))) == list(map(key, mixed))


def test_text_feeds_minilm_lines_in_batches_shuffled_in(tmp_path):
    from hwgen import zoo

    b = zoo.load("minilm")
    lines = [f"Sentence number {i} is about {w}." for i, w in enumerate(["rain", "bread", "trains"] * 7)]
    a = tmp_path / "a.txt"
    a.write_text("\n".join(lines[:18]) + "\n\n   \n", encoding="utf-8")   # blank lines are skipped
    c = tmp_path / "c.txt"
    c.write_text("\n".join(lines[18:]), encoding="utf-8")
    key = lambda f: f["ids"].tobytes() + f["mask"].tobytes()
    got = D.text_feeds(b, [a, c])
    want = [b.encode(lines[:16]), b.encode(lines[16:18]), b.encode(lines[18:])]
    assert list(map(key, got)) == list(map(key, want))
    mixed = D.train_feeds(b, extra=0, texts=[a, c])
    assert sorted(map(key, mixed)) == sorted(map(key, list(b.calib_feeds) + want))
    assert list(map(key, mixed)) != list(map(key, list(b.calib_feeds) + want))   # shuffled
    assert list(map(key, D.train_feeds(b, extra=0))) == list(map(key, b.calib_feeds))  # none: not shuffled


def test_text_feeds_tiny_gpt_windows(tmp_path):
    from hwgen import zoo

    b = zoo.load("tiny-gpt")
    w = int(b.meta["window"])
    t = tmp_path / "t.txt"
    t.write_text("first line\n" + "x" * (3 * w) + "\n", encoding="utf-8")
    got = D.text_feeds(b, [t])
    data = np.frombuffer(("first line\n" + "x" * (3 * w)).encode(), dtype=np.uint8).astype(np.int64)
    ids = np.concatenate([f["ids"] for f in got])
    assert ids.shape == (len(data) // w, w)
    assert np.array_equal(ids.reshape(-1), data[:ids.size])


@pytest.mark.parametrize("content,msg", [
    (None, "distillation text file not found"),
    ("\n  \n", "distillation text file has no non-empty lines"),
    (b"\xff\xfe bad", "cannot read distillation text file"),
])
def test_text_feeds_refuse_bad_files(tmp_path, content, msg):
    from hwgen import zoo

    b = zoo.load("tiny-gpt")
    f = tmp_path / "d.txt"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    with pytest.raises(D.DistillError, match=msg) as e:
        D.text_feeds(b, [f])
    assert str(e.value).startswith(str(f))


def test_cli_distill_text_missing_file_refused_before_pruning(capsys, tmp_path):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", "--model", "tiny-gpt", "--out", out, "--prune", "2:4",
                           "--distill", "--distill-steps", "1", "--distill-text", tmp_path / "none.txt")
    assert code == 1 and "none.txt: distillation text file not found" in err
    assert "pruning" not in err                                     # refused before any work
    assert not out.exists()


def test_teacher_cache_budget_changes_time_not_losses(tiny_decoder):
    """The teacher cache keeps batches up to its byte budget; the batches beyond
    it are rerun, and the losses are the same bit for bit as with every batch kept."""
    g = prepare(tiny_decoder)
    feeds = tiny_decoder_feeds(3)
    full = D.DistillLoss(g, "decoder")
    one = full.teacher(feeds[0])
    per_batch = sum(t.numel() * 4 for t in one.values())
    budgets = {"all": full, "one": D.DistillLoss(g, "decoder", cache_bytes=per_batch),
               "none": D.DistillLoss(g, "decoder", cache_bytes=0)}
    losses = {}
    for name, loss in budgets.items():
        torch.manual_seed(0)
        st = D.FloatStudent(g)
        losses[name] = D.distill_float(st, feeds, loss, 7, lr=1e-2)
    assert losses["one"] == losses["all"] and losses["none"] == losses["all"]
    assert full.cached_bytes == 3 * per_batch and len(full._teacher) == 3
    assert budgets["one"].cached_bytes == per_batch and len(budgets["one"]._teacher) == 1
    assert budgets["none"].cached_bytes == 0 and not budgets["none"]._teacher
    assert all(t.dtype == torch.float64 for t in full.teacher(feeds[1]).values())


def test_cli_distill_lr_and_device_in_json(capsys, tmp_path):
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "2:4", "--distill",
                          "--distill-steps", "2", "--distill-lr", "3e-4", "--distill-device", "cpu",
                          "--distill-linear-weight", "1", "--distill-attention-weight", "0.5",
                          "--out", tmp_path / "b", "--json", "--quiet")
    r = last_json(so)
    assert code == 0 and r["distill_lr"] == 3e-4 and r["distill_device"] == "cpu"
    assert r["distill_linear_weight"] == 1 and r["distill_attention_weight"] == 0.5
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "2:4", "--distill",
                          "--distill-steps", "2", "--out", tmp_path / "c", "--json", "--quiet")
    r = last_json(so)
    assert r["distill_lr"] == D.DISTILL_LR and r["distill_device"] == "cpu"
    assert r["distill_precision"] == "fp32" and r["distill_group_by_length"] is False and r["distill_augment"] == 0
    assert r["distill_teacher_cache_gb"] == D.TEACHER_CACHE_BYTES / 2**30 and r["distill_teacher_cached"] >= 1
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "2:4", "--distill",
                          "--distill-steps", "2", "--distill-precision", "bf16", "--distill-teacher-cache", "0",
                          "--out", tmp_path / "e", "--json", "--quiet")
    r = last_json(so)
    assert code == 0 and r["distill_precision"] == "bf16"
    assert r["distill_teacher_cache_gb"] == 0 and r["distill_teacher_cached"] == 0    # nothing kept
    code, so, _ = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "2:4",
                          "--out", tmp_path / "d", "--json", "--quiet")
    r = last_json(so)
    assert r["distill_lr"] is None and r["distill_device"] is None
    assert r["distill_precision"] is None and r["distill_teacher_cache_gb"] is None
    assert r["distill_teacher_cached"] is None


def test_autocast_bf16_runs_the_matmuls_in_bfloat16(tiny_decoder):
    """``bf16``: the student's matmuls round to bfloat16 (every linear's output
    moves, by about bfloat16's precision) and its output stays near the fp32
    one; ``fp32`` is the plain forward, bit for bit; other names are refused."""
    g = prepare(tiny_decoder)
    feed = tiny_decoder_feeds(1)[0]
    st = D.FloatStudent(g)
    lin = [n.outputs[0] for n in g.nodes if n.op == "linear"]
    with torch.no_grad():
        plain = st(feed)
        with D.autocast(st.device, "fp32"):
            same = st(feed)
        with D.autocast(st.device, "bf16"):
            half = st(feed)
    assert all(same[n].dtype == torch.float32 and torch.equal(same[n], plain[n]) for n in lin)
    for n in lin:
        err = float((half[n].float() - plain[n]).norm() / plain[n].norm())
        assert 1e-4 < err < 0.02, (n, err)
    want, got = plain["logits"], half["logits"].float()
    assert not torch.equal(got, want)
    assert float((got - want).norm() / want.norm()) < 0.05
    with pytest.raises(D.DistillError, match="--distill-precision fp16: expected one of fp32, bf16"):
        D.autocast(st.device, "fp16")


def test_distill_float_bf16_trains_float32_weights(tiny_decoder, one_torch_thread):
    """The bf16 float stage: the loss falls as in fp32 (not equal: the matmuls
    round), the weights and their masks stay float32 and exact zeros."""
    g = prepare(tiny_decoder)
    feeds = tiny_decoder_feeds(2)
    masks = P.compute_masks(g, P.PruneSpec.parse("2:4"))
    losses = {}
    for prec in D.FLOAT_PRECISIONS:
        torch.manual_seed(0)
        st = D.FloatStudent(g, masks)
        losses[prec] = D.distill_float(st, feeds, D.DistillLoss(g, "decoder"), 20, lr=3e-3, precision=prec)
        assert all(p.dtype == torch.float32 for p in st.parameters())
        assert all(not np.any(st.current_graph().weights[n][~m]) for n, m in masks.items())
    lf, lb = np.array(losses["fp32"]), np.array(losses["bf16"])
    assert lb[-5:].mean() < 0.7 * lb[:5].mean()
    assert not np.array_equal(lf, lb) and np.allclose(lb, lf, rtol=0.1)
    with pytest.raises(D.DistillError, match="expected one of fp32, bf16"):
        D.distill_float(st, feeds, D.DistillLoss(g, "decoder"), 1, precision="fp16")


def test_length_groups_sort_within_runs():
    sents = [f"s{i}" for i in range(7)]
    lengths = [3, 9, 3, 1, 8, 2, 8]
    assert D.length_groups(sents, lengths, run=4) == ["s1", "s0", "s2", "s3", "s4", "s6", "s5"]
    assert D.length_groups(sents, lengths, run=100) == ["s1", "s4", "s6", "s0", "s2", "s5", "s3"]
    assert D.length_groups(sents, lengths, run=1) == sents
    with pytest.raises(D.DistillError, match="7 sentences but 6 lengths"):
        D.length_groups(sents, lengths[:6])


def test_train_feeds_group_by_length_same_sentences_less_padding(tmp_path):
    from hwgen import zoo

    b = zoo.load("minilm")
    words = "the quick brown fox jumps over a lazy dog near our quiet river bank today".split()
    rng = np.random.default_rng(3)
    lines = [" ".join(words[:int(k)]).capitalize() + "." for k in rng.integers(2, len(words), 50)]
    t = tmp_path / "t.txt"
    t.write_text("\n".join(lines), encoding="utf-8")
    plain = D.train_feeds(b, extra=0, texts=[t])
    grouped = D.train_feeds(b, extra=0, texts=[t], group_by_length=True)
    rows = lambda fs: sorted(f["ids"][i][f["mask"][i] != 0].tobytes() for f in fs for i in range(len(f["ids"])))
    assert rows(grouped) == rows(plain)                               # the same sentences
    padded = lambda fs: sum(f["mask"].size for f in fs)
    assert padded(grouped) < padded(plain)
    assert sum(np.all(f["mask"] != 0) for f in grouped) > sum(np.all(f["mask"] != 0) for f in plain)
    again = D.train_feeds(b, extra=0, texts=[t], group_by_length=True)
    assert [f["ids"].tobytes() for f in again] == [f["ids"].tobytes() for f in grouped]   # seeded
    with pytest.raises(D.DistillError, match="reads fixed-width inputs, not sentences"):
        D.train_feeds(zoo.load("tiny-gpt"), group_by_length=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")
def test_distill_float_stage_on_cuda(tiny_decoder, one_torch_thread):
    """The float stage on the GPU: the student's forward equals the CPU's (float32,
    to rounding), its weights stay on the GPU while it trains, the masks hold, the
    losses follow the CPU run's, and the exported student is a fixed graph the
    golden model (CPU) runs."""
    g = prepare(tiny_decoder)
    feeds = tiny_decoder_feeds(2)
    masks = P.compute_masks(g, P.PruneSpec.parse("2:4"))
    cpu, gpu = D.FloatStudent(g, masks), D.FloatStudent(g, masks, device="cuda")
    assert all(p.is_cuda for p in gpu.parameters())
    with torch.no_grad():
        want, got = cpu(feeds[0])["logits"], gpu(feeds[0])["logits"]
    assert got.is_cuda and torch.allclose(got.cpu(), want, atol=1e-4, rtol=1e-4)
    loss_c, loss_g = D.DistillLoss(g, "decoder"), D.DistillLoss(g, "decoder", device="cuda")
    lc = D.distill_float(cpu, feeds, loss_c, 10, lr=3e-3)
    lg = D.distill_float(gpu, feeds, loss_g, 10, lr=3e-3)
    assert np.allclose(lg, lc, rtol=1e-2, atol=1e-4) and lg[-1] < lg[0]
    assert all(p.is_cuda for p in gpu.parameters())
    gpu16 = D.FloatStudent(g, masks, device="cuda")
    lb = D.distill_float(gpu16, feeds, loss_g, 10, lr=3e-3, precision="bf16")
    assert np.allclose(lb, lc, rtol=0.1) and lb[-1] < lb[0]
    cg = gpu.current_graph()
    assert all(not np.any(cg.weights[n][~m]) for n, m in masks.items())
    cfg = QuantConfig.from_bits("w8a8")
    res = D.distill(tiny_decoder, "decoder", feeds, cfg, P.PruneSpec.parse("2:4"), float_steps=6,
                    qat_steps=1, lr=3e-3, qat_lr=1e-4, start=g, masks=masks, device="cuda")
    assert P.mask_violations(res.fixed, res.masks) == 0 and len(res.qat_losses) == 1
    assert GoldenModel(res.fixed)(tiny_decoder_feeds(1, seed=4)[0])["logits"].shape == (2, 12, 40)


def test_cli_distill_save_then_init_goes_on_from_the_student(capsys, tmp_path):
    """``--distill-save`` writes the float student (its 2:4 zeros, the steps
    behind it); ``--distill-init`` starts there: with no further steps it
    exports the very same fixed graph, and further steps add to the count."""
    base = ["quantize", "--model", "bert-block", "--prune", "2:4", "--distill", "--json", "--quiet"]
    saved = tmp_path / "student.npz"
    code, so, _ = run_cli(capsys, *base, "--distill-steps", "3", "--distill-save", saved, "--out", tmp_path / "a")
    r = last_json(so)
    assert code == 0 and r["distill_save"] == str(saved) and r["distill_init"] is None
    assert r["distill_init_steps"] is None
    assert saved.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".part"))]
    from hwgen import zoo

    folded = prepare(zoo.load("bert-block").graph)
    weights, info = D.load_student(saved, folded, "bert-block")
    assert info["steps"] == 3 and info["prune"] == "2:4" and info["loss_last"] == r["distill_loss_last"]
    assert set(weights) == set(D.student_weights(folded))          # all but the embedding tables
    for node in P.prunable_linears(folded):
        w = weights[node.inputs[1]]
        assert P.nm_violations(w, 2, 4) == 0 and not np.array_equal(w, folded.weights[node.inputs[1]])

    code, so, err = run_cli(capsys, *base, "--distill-steps", "0", "--distill-init", saved, "--out", tmp_path / "b")
    r = last_json(so)
    assert code == 0 and r["distill_init"] == str(saved) and r["distill_init_steps"] == 3
    a, b = Graph.load(tmp_path / "a"), Graph.load(tmp_path / "b")
    assert a.weights.keys() == b.weights.keys()
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)   # the same student, exported

    again = tmp_path / "student2.npz"
    code, so, _ = run_cli(capsys, *base, "--distill-steps", "2", "--distill-init", saved, "--distill-save", again,
                          "--out", tmp_path / "c")
    r = last_json(so)
    assert code == 0 and r["distill_init_steps"] == 3
    assert D.load_student(again, folded, "bert-block")[1]["steps"] == 5

    code, _, err = run_cli(capsys, "quantize", "--model", "bert-block", "--prune", "unstructured:0.5", "--distill",
                           "--distill-steps", "1", "--distill-init", saved, "--out", tmp_path / "d", "--quiet")
    assert code == 1 and "saved with --prune 2:4, this run has --prune unstructured:0.5" in err
    assert not (tmp_path / "d").exists()


def test_load_student_refuses_what_does_not_fit(tmp_path, tiny_decoder):
    g = prepare(tiny_decoder)
    good = tmp_path / "s.npz"
    D.save_student(good, g, {"model": "tiny", "prune": None, "steps": 4})
    weights, info = D.load_student(good, g, "tiny")
    assert info == {"format": D.STUDENT_FORMAT, "model": "tiny", "prune": None, "steps": 4}
    assert all(np.array_equal(weights[k], g.weights[k]) for k in weights)
    lin = next(n.inputs[1] for n in g.nodes if n.op == "linear")

    def refused(make, msg, model="tiny"):
        path = tmp_path / "bad.npz"
        make(path)
        with pytest.raises(D.DistillError, match=msg):
            D.load_student(path, g, model)

    def variant(**change):
        def make(path):
            arrays = {**D.student_weights(g), **change.pop("weights", {})}
            for k in change.pop("drop", ()):
                arrays.pop(k)
            np.savez(path, **arrays, **change)
        return make

    import json
    meta = np.array(json.dumps({"format": D.STUDENT_FORMAT, "model": "tiny", "prune": None, "steps": 1}))
    refused(lambda p: p.write_bytes(b"not a zip"), "cannot read it as a float student file")
    refused(variant(), "not a float student file")

    def npy(path):
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    refused(npy, "not a float student file")
    refused(variant(__hwgen__=np.array(json.dumps({"format": "other/9", "model": "tiny"}))), "format 'other/9'")
    refused(variant(__hwgen__=meta), "saved for model 'tiny', not 'minilm'", model="minilm")
    refused(variant(__hwgen__=meta, drop=[lin]), rf"1 name\(s\) differ, e.g. '{lin}'")
    refused(variant(__hwgen__=meta, weights={lin: np.zeros((3, 3), np.float32)}), f"weight '{lin}' is float32")
    bad = np.array(g.weights[lin], dtype=np.float32)
    bad[0, 0] = np.nan
    refused(variant(__hwgen__=meta, weights={lin: bad}), f"weight '{lin}' holds non-finite values")
    keep = np.ones(g.weights[lin].shape, dtype=bool)
    keep[0, :] = False
    with pytest.raises(D.DistillError, match=f"weight '{lin}' has {keep.shape[1]} nonzero value"):
        D.check_init_masks(good, weights, {lin: keep}, "2:4", "2:4")
    with pytest.raises(D.DistillError, match="saved with --prune none, this run has --prune 2:4"):
        D.check_init_masks(good, weights, {}, None, "2:4")
    D.check_init_masks(good, {lin: np.where(keep, weights[lin], 0)}, {lin: keep}, "2:4", "2:4")   # zeros: fine


def test_distill_float_ema_ends_at_the_weights_average(tiny_decoder, one_torch_thread):
    """``ema``: the student ends with the moving average of the weights after
    every step, started at the start, masks still applied; 0 is the last step."""
    g = prepare(tiny_decoder)
    feeds = tiny_decoder_feeds(2)
    masks = P.compute_masks(g, P.PruneSpec.parse("2:4"))
    torch.manual_seed(0)
    st = D.FloatStudent(g, masks)
    avg = [p.detach().clone().double() for p in st.parameters()]

    def track(i, loss):
        for a, p in zip(avg, st.parameters()):
            a.mul_(0.8).add_(0.2 * p.detach().double())
    D.distill_float(st, feeds, D.DistillLoss(g, "decoder"), 5, lr=3e-3, progress=track)
    last = [p.detach().clone() for p in st.parameters()]
    torch.manual_seed(0)
    st2 = D.FloatStudent(g, masks)
    D.distill_float(st2, feeds, D.DistillLoss(g, "decoder"), 5, lr=3e-3, ema=0.8)
    for a, p, q in zip(avg, st2.parameters(), last):
        assert torch.allclose(p.double(), a, rtol=1e-5, atol=1e-7)
        assert not torch.equal(p, q)
    assert all(not np.any(st2.current_graph().weights[n][~m]) for n, m in masks.items())
    with pytest.raises(D.DistillError, match="--distill-ema -0.5: the decay must be in"):
        D.distill_float(st2, feeds, D.DistillLoss(g, "decoder"), 1, ema=-0.5)


def test_cli_distill_init_from_a_quantize_output_folder(capsys, tmp_path):
    """``--distill-init`` an earlier ``--out`` folder: its student recovered from
    the codes, each weight within half a code step of the float student saved by
    the same run; the folder records the float steps behind it."""
    base = ["quantize", "--model", "bert-block", "--prune", "2:4", "--distill", "--json", "--quiet"]
    saved = tmp_path / "student.npz"
    code, so, _ = run_cli(capsys, *base, "--distill-steps", "3", "--distill-ema", "0.5", "--distill-save", saved,
                          "--out", tmp_path / "a")
    r = last_json(so)
    assert code == 0 and r["distill_ema"] == 0.5 and r["distill_float_steps_total"] == 3
    fixed = Graph.load(tmp_path / "a")
    assert fixed.meta["distill"] == {"float_steps": 3, "embeddings": False}
    from hwgen import zoo
    from hwgen.golden import frac_of
    from hwgen.quant import linear_row_shift

    folded = prepare(zoo.load("bert-block").graph)
    floats, _ = D.load_student(saved, folded, "bert-block")
    got, info = D.load_student(tmp_path / "a", folded, "bert-block")
    assert info["steps"] == 3 and info["prune"] == "2:4" and set(got) == set(floats)
    for node in fixed.nodes:
        if node.op == "linear":
            w = node.inputs[1]
            step = np.ldexp(1.0, -np.asarray(frac_of(fixed, w)) - linear_row_shift(fixed, node)[:, None])
            codes = fixed.weights[w]
            inside = (codes > codes.min()) & (codes < codes.max())     # not saturated
            assert np.all(np.abs(got[w] - floats[w])[inside] <= (step / 2 * (1 + 1e-6))[inside]), w
            assert np.all(np.abs(floats[w][~inside]) >= np.abs(got[w][~inside]) - step[~inside] / 2), w
            assert np.all(got[w][floats[w] == 0] == 0)                  # pruned stays pruned
    code, so, _ = run_cli(capsys, *base, "--distill-steps", "2", "--distill-init", tmp_path / "a",
                          "--out", tmp_path / "b")
    r = last_json(so)
    assert code == 0 and r["distill_init_steps"] == 3 and r["distill_float_steps_total"] == 5
    code, _, err = run_cli(capsys, *base, "--distill-steps", "1", "--distill-init", tmp_path,
                           "--out", tmp_path / "c")
    assert code == 1 and f"--distill-init {tmp_path}: {tmp_path / 'graph.json'}: no such graph file" in err
    dense = ["quantize", "--model", "bert-block", "--distill", "--json", "--quiet"]
    code, so, _ = run_cli(capsys, *dense, "--distill-steps", "1", "--out", tmp_path / "d")
    assert code == 0 and D.load_student(tmp_path / "d", folded, "bert-block")[1]["prune"] is None
    code, so, _ = run_cli(capsys, *dense, "--distill-steps", "0", "--distill-init", tmp_path / "d",
                          "--out", tmp_path / "e")
    assert code == 0 and last_json(so)["distill_float_steps_total"] == 1
    code, _, err = run_cli(capsys, *base, "--distill-steps", "1", "--distill-init", tmp_path / "d",
                           "--out", tmp_path / "f")
    assert code == 1 and "saved with --prune none, this run has --prune 2:4" in err


def test_compression_record_mirrors_the_quantize_flags():
    """One field per compression flag of ``hwgen quantize`` (named as the flag),
    filled from the parsed arguments; any of them set away from its default
    makes the run a compression run (so none is silently ignored)."""
    from dataclasses import fields

    from hwgen.cli import build_parser

    parse = lambda *a: build_parser().parse_args(["quantize", "--model", "bert-block", "--out", "x", *a])
    args = parse()
    flags = {k for k in vars(args) if k.startswith(("prune", "distill", "gradual"))} | {"qat_steps", "lr"}
    names = {f.name for f in fields(D.Compression)}
    assert flags == names - {"cycles_m"}
    plain = D.Compression.from_args(args)
    assert plain == D.Compression() and not plain.requested
    assert not D.Compression.from_args(parse("--qat-steps", "3", "--lr", "1e-4")).requested   # plain QAT
    c = D.Compression.from_args(parse("--prune", "2:4", "--distill", "--distill-text", "a.txt",
                                      "--distill-text", "b.txt", "--distill-steps", "7"))
    assert c.requested and c.prune == "2:4" and c.distill and c.distill_steps == 7
    assert c.distill_text == ("a.txt", "b.txt") and D.Compression(distill_text=[]) == D.Compression()
    for name in names - set(D.Compression.PLAIN):
        f = next(f for f in fields(D.Compression) if f.name == name)
        other = {bool: True, int: 1, float: 0.5}.get(type(f.default), "x") if f.default != () else ("t",)
        assert D.Compression(**{name: other}).requested, name


def test_cli_distill_fake_quant(capsys, tmp_path):
    """``--distill-fake-quant``: the float stage's forward rounds as W8A8 does,
    so its first loss (same student, same batch) differs from the plain float
    stage's; the JSON says which ran."""
    base = ["quantize", "--model", "tiny-gpt", "--prune", "2:4", "--distill", "--distill-steps", "2",
            "--json", "--quiet"]
    code, so, _ = run_cli(capsys, *base, "--out", tmp_path / "a")
    plain = last_json(so)
    code2, so, _ = run_cli(capsys, *base, "--distill-fake-quant", "--out", tmp_path / "b")
    fake = last_json(so)
    assert code == code2 == 0
    assert plain["distill_fake_quant"] is False and fake["distill_fake_quant"] is True
    assert np.isfinite(fake["distill_loss_first"]) and fake["distill_loss_first"] != plain["distill_loss_first"]


def test_cli_distill_train_embeddings_saved_and_recovered(capsys, tmp_path):
    """``--distill-train-embeddings``: the float stage trains the embedding
    tables; the saved student holds them, the output folder records it and the
    student recovered from its codes holds them (within half a code step), and a
    run from such an init keeps, saves and records them though it trains them no
    further."""
    from hwgen import zoo
    from hwgen.golden import frac_of

    base = ["quantize", "--model", "tiny-gpt", "--prune", "2:4", "--distill", "--json", "--quiet"]
    saved = tmp_path / "s.npz"
    code, so, _ = run_cli(capsys, *base, "--distill-steps", "2", "--distill-lr", "1e-3",
                          "--distill-train-embeddings", "--distill-save", saved, "--out", tmp_path / "a")
    r = last_json(so)
    assert code == 0 and r["distill_train_embeddings"] is True
    folded = prepare(zoo.load("tiny-gpt").graph)
    tables = D.embedding_tables(folded)
    assert tables
    w, info = D.load_student(saved, folded, "tiny-gpt")
    assert info["embeddings"] is True and set(w) == set(D.student_weights(folded, embeddings=True))
    assert all(not np.array_equal(w[t], folded.weights[t]) for t in tables)         # trained
    fixed = Graph.load(tmp_path / "a")
    assert fixed.meta["distill"] == {"float_steps": 2, "embeddings": True}
    got, finfo = D.load_student(tmp_path / "a", folded, "tiny-gpt")
    assert finfo["embeddings"] is True and set(got) == set(w)
    for t in tables:
        step = np.ldexp(1.0, -np.asarray(frac_of(fixed, t), dtype=np.int64))
        codes = fixed.weights[t]
        inside = (codes > codes.min()) & (codes < codes.max())
        assert np.all(np.abs(got[t] - w[t])[inside] <= (np.broadcast_to(step, w[t].shape) / 2 * (1 + 1e-6))[inside])
    again = tmp_path / "s2.npz"
    code, so, _ = run_cli(capsys, *base, "--distill-steps", "1", "--distill-init", saved, "--distill-save", again,
                          "--out", tmp_path / "b")
    assert code == 0 and last_json(so)["distill_train_embeddings"] is False
    w2, info2 = D.load_student(again, folded, "tiny-gpt")
    assert info2["embeddings"] is True and all(np.array_equal(w2[t], w[t]) for t in tables)   # kept as they were
    assert Graph.load(tmp_path / "b").meta["distill"]["embeddings"] is True
    plain = tmp_path / "s3.npz"
    code, _, _ = run_cli(capsys, *base, "--distill-steps", "1", "--distill-save", plain, "--out", tmp_path / "c")
    assert code == 0 and not tables & set(D.load_student(plain, folded, "tiny-gpt")[0])
    assert len(tables) == 2
    with pytest.raises(D.DistillError, match=r"1 name\(s\) differ"):        # one table but not the other
        D._check_student({k: v for k, v in w.items() if k != sorted(tables)[0]}, folded, "x")


def test_train_feeds_augment_adds_variants_of_the_text_sentences(tmp_path):
    from hwgen import zoo
    from hwgen.augment import augment

    b = zoo.load("minilm")
    t, u = tmp_path / "t.txt", tmp_path / "u.txt"
    lines = ["The ferry leaves the harbour at seven every morning.", "Our neighbour grows tomatoes on the balcony.",
             "Snow closed the mountain pass for two days last week."]
    t.write_text("\n".join(lines[:2]), encoding="utf-8")
    u.write_text(lines[2], encoding="utf-8")
    key = lambda f: f["ids"].tobytes() + f["mask"].tobytes()
    plain = D.train_feeds(b, extra=0, synthetic=20, texts=[t, u])
    aug = D.train_feeds(b, extra=0, synthetic=20, texts=[t, u], augment=3)
    extra = augment(lines, 3)                   # the files' sentences as one list; synthetic ones are not varied
    want = plain + [b.encode(extra[i:i + 16]) for i in range(0, len(extra), 16)]
    assert sorted(map(key, aug)) == sorted(map(key, want))
    assert list(map(key, D.train_feeds(b, extra=0, synthetic=20, texts=[t, u], augment=3))) == list(map(key, aug))
    v = tmp_path / "v.txt"                      # the same as giving the variants as one more text file
    v.write_text("\n".join(extra), encoding="utf-8")
    assert list(map(key, D.train_feeds(b, extra=0, texts=[t, u], augment=3))) == \
        list(map(key, D.train_feeds(b, extra=0, texts=[t, u, v])))
    with pytest.raises(D.DistillError, match="--distill-augment: model 'tiny-gpt' .decoder. reads fixed-width"):
        D.train_feeds(zoo.load("tiny-gpt"), texts=[t], augment=1)
    with pytest.raises(D.DistillError, match="--distill-augment -2: the number of copies must be an integer >= 0"):
        D.train_feeds(b, texts=[t], augment=-2)
    with pytest.raises(D.DistillError, match="varies the --distill-text sentences: give --distill-text"):
        D.train_feeds(b, augment=1)


def test_distill_float_checkpoints_see_the_average_and_leave_training_alone(tiny_decoder, one_torch_thread):
    """``checkpoint(n)`` runs every ``checkpoint_every`` steps short of the
    last, with the student holding what it would end with if stopped there
    (the weight average: the final weights of an ``n``-step run), and the
    run's own end is the same, bit for bit, as without checkpoints."""
    g = prepare(tiny_decoder)
    feeds = tiny_decoder_feeds(3)
    masks = P.compute_masks(g, P.PruneSpec.parse("2:4"))
    seen = {}

    def run(steps, every=0):
        st = D.FloatStudent(g, masks)
        D.distill_float(st, feeds, D.DistillLoss(g, "decoder"), steps, lr=3e-3, ema=0.8, checkpoint_every=every,
                        checkpoint=lambda n: seen.setdefault(n, st.current_graph().weights))
        return st.current_graph().weights

    end = run(5, every=2)
    assert sorted(seen) == [2, 4]
    plain = run(5)
    assert all(np.array_equal(end[k], plain[k]) for k in plain)
    for n in (2, 4):
        stopped = run(n)
        assert all(np.array_equal(seen[n][k], stopped[k]) for k in stopped), n
    assert not all(np.array_equal(seen[2][k], seen[4][k]) for k in plain)
    assert all(not np.any(seen[2][k][~m]) for k, m in masks.items())


def test_cli_distill_eval_every_scores_and_saves_checkpoints(capsys, tmp_path, monkeypatch):
    """``--distill-eval-every 2`` over 5 float steps: rows at steps 2 and 4 (not
    the last); a row's quantized score is what a run stopped there exports
    (the same command with ``--distill-steps 2``: its ``cosine_mean``); each
    checkpoint is written to ``--distill-save`` before the final student."""
    base = ["quantize", "--model", "bert-block", "--prune", "2:4", "--distill", "--json", "--quiet"]
    saves = []
    real = D.save_student
    monkeypatch.setattr(D, "save_student", lambda path, graph, info: (saves.append(info["steps"]),
                                                                      real(path, graph, info)))
    code, so, _ = run_cli(capsys, *base, "--distill-steps", "5", "--distill-eval-every", "2",
                          "--distill-save", tmp_path / "s.npz", "--out", tmp_path / "a")
    r = last_json(so)
    assert code == 0 and r["distill_eval_every"] == 2 and saves == [2, 4, 5]
    assert [e["step"] for e in r["distill_evals"]] == [2, 4]
    assert set(r["distill_evals"][0]) == {"step", "float_cosine_mean", "float_cosine_min", "cosine_mean",
                                          "cosine_min"}
    for e in r["distill_evals"]:
        assert 0 < e["cosine_min"] <= e["cosine_mean"] <= 1 and 0 < e["float_cosine_min"] <= e["float_cosine_mean"] <= 1
    code, so, _ = run_cli(capsys, *base, "--distill-steps", "2", "--out", tmp_path / "b")
    stopped = last_json(so)
    assert code == 0 and stopped["distill_evals"] == [] and stopped["distill_eval_every"] is None
    assert r["distill_evals"][0]["cosine_mean"] == stopped["cosine_mean"]
    assert r["distill_evals"][0]["cosine_min"] == stopped["cosine_min"]


def test_evaluate_float_scores_a_float_graph():
    """:func:`evaluate_float` runs a float graph through :func:`evaluate`'s
    scoring: the model's own float graph matches its reference (cosine 1, its
    perplexity the float one), a perturbed one does not."""
    from hwgen import zoo
    from hwgen.accuracy import evaluate_float

    tiny_gpt_bundle = zoo.load("tiny-gpt")
    g = prepare(tiny_gpt_bundle.graph)
    same = evaluate_float(tiny_gpt_bundle, g)
    assert same["cosine_min"] > 1 - 1e-6 and same["ppl_quant"] == pytest.approx(same["ppl_float"], rel=1e-6)
    lin = P.prunable_linears(g)[0].inputs[1]
    off = evaluate_float(tiny_gpt_bundle, g.with_weights({lin: g.weights[lin] * 0.5}))
    assert off["cosine_mean"] < same["cosine_mean"] and off["ppl_quant"] != same["ppl_quant"]
