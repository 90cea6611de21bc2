"""Every accelerator backend gives the golden model's integers (hwgen.runtime.backends)."""
import numpy as np
import pytest

from hwgen.golden import GoldenModel
from hwgen.ir import Graph
from hwgen.runtime import jobs
from hwgen.runtime.backends import make_backend
from hwgen.runtime.driver import Driver
from hwgen.runtime.partition import DriverError

HLS_KERNELS = ("linear", "attention", "layernorm", "gelu", "add")


def test_hls_decoder_steps_equal_golden(tiny_decoder_fixed):
    """tiny decoder, every HLS-kernel op on the C-simulated kernels: prefill, decode steps
    through the KV cache, and a cache re-prime, token for token and logit for logit."""
    g = tiny_decoder_fixed
    d = Driver(g, "hls", accel_ops=HLS_KERNELS)
    assert {n.op for n in g.nodes if d.placement[n.name] == "accel"} == set(HLS_KERNELS)
    prompt = [1, 9, 4, 30, 22, 17]
    new, seen, prefill, st = d.generate(prompt, 8, ctx=12)
    g_new, g_seen = jobs.golden_generate(g, prompt, 8, ctx=12)
    assert new == g_new
    assert sum(int((a != b).sum()) for a, b in zip(seen, g_seen)) == 0
    assert st.bytes_to_accel > 0 and st.bytes_from_accel > 0


def test_hls_bert_layer_with_padding_equals_golden(bert_block_graph):
    """A BERT layer (MiniLM's layer shape, hidden 64) with a padding mask, batch 2."""
    g = Graph.load(bert_block_graph)
    rng = np.random.default_rng(5)
    feeds = {"x": rng.normal(0, 1.5, (2, 9, g.tensors["x"].shape[-1]))}
    if "mask" in g.inputs:
        feeds["mask"] = np.array([[1] * 9, [1] * 5 + [0] * 4])
    want = GoldenModel(g)(feeds)
    d = Driver(g, "hls")  # default placement: linear and attention on the kernels, the rest on torch
    outs, st = d.run(feeds)
    for k in want:
        assert int((outs[k] != want[k]).sum()) == 0, k
    assert st.transfers > 0 and st.accel_cycles > 0


def test_unknown_backend_is_refused(tiny_decoder_fixed):
    with pytest.raises(DriverError, match="unknown backend 'vhdl': expected one of golden, hls, rtl"):
        make_backend("vhdl", tiny_decoder_fixed)


def test_hls_refuses_a_node_without_kernel(tiny_decoder_fixed):
    with pytest.raises(DriverError, match="has kernels only for"):
        Driver(tiny_decoder_fixed, "hls", force={"embedding": "accel"})


@pytest.mark.slow
def test_rtl_decoder_steps_equal_golden_and_cycles_match(tiny_decoder_fixed):
    """A linear and an attention node of the tiny decoder on the Verilated RTL engines
    (4x4 PE array, 2 attention lanes): prefill and decoding steps through the engine's
    KV cache give the golden tokens and logits, and every kernel run takes exactly the
    cycles the cost model predicts. (Verilator builds and a cocotb run per pass: slow.)"""
    from hwgen.runtime.backends import rtl_available
    from hwgen.runtime.cost import CycleModel

    if rtl_available():
        pytest.fail(f"rtl backend unavailable: {rtl_available()}")
    g = tiny_decoder_fixed
    lin = next(n.name for n in g.nodes if n.op == "linear")
    att = next(n.name for n in g.nodes if n.op == "attention")
    force = {"linear": "host", "attention": "host", lin: "accel", att: "accel"}
    d = Driver(g, "rtl", force=force, cycles=CycleModel(g, rows=4, cols=4, lanes=2, max_m=16))
    prompt = [1, 9, 4, 30, 22]
    new, seen, prefill, st = d.generate(prompt, 3, ctx=24)
    g_new, g_seen = jobs.golden_generate(g, prompt, 3, ctx=24)
    assert new == g_new
    assert sum(int((a != b).sum()) for a, b in zip(seen, g_seen)) == 0
    runs = [r for v in d.accel.measured.values() for r in v]
    assert runs and all(model == measured for model, measured in runs), d.accel.measured


@pytest.mark.slow
def test_hls_minilm_layer_equals_golden():
    """The real quantized MiniLM (W8A8): layer 0's linears and attention on the HLS kernels,
    the rest on torch, two sentences of different length (padding): every embedding code."""
    from hwgen import zoo

    g = jobs.load_graph("minilm")
    layer0 = [n.name for n in g.nodes if n.layer == 0 and n.op in ("linear", "attention")]
    force = {"linear": "host", "attention": "host", **{n: "accel" for n in layer0}}
    feeds = zoo.feeds_from_text("minilm", "The cat sat on the mat.\nA much longer sentence about FPGA kernels.")
    outs, st = Driver(g, "hls", force=force).run(feeds)
    want = GoldenModel(g)(feeds)
    assert int((outs["embedding"] != want["embedding"]).sum()) == 0
    assert st.transfers > 0
