"""The torch host backend equals the golden model bit for bit (hwgen.runtime.torch_ops)."""
import numpy as np
import pytest
import torch

from hwgen.fixed import OVERFLOW_MODES, QUANT_MODES, FixedType, requantize
from hwgen.golden import GoldenModel, GoldenState
from hwgen.ir import Graph
from hwgen.runtime.torch_ops import HostState, TorchHost, from_float, requantize as t_requantize, to_device

from conftest import tiny_decoder_feeds

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_host(graph, feeds, device="cpu", state=None, offset=0):
    host = TorchHost(graph, device)
    vals = {k: to_device(v, host.device) for k, v in feeds.items()}
    for n in graph.nodes:
        vals[n.outputs[0]] = host.run(n, [vals.get(t) if t else None for t in n.inputs], offset, state)
    return {k: v.cpu().numpy() for k, v in vals.items()}


def assert_all_tensors_equal(graph, rec, got):
    bad = {n.name: int((rec[n.outputs[0]] != got[n.outputs[0]]).sum()) for n in graph.nodes}
    assert sum(bad.values()) == 0, {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_prefill_and_decode_steps_equal_golden(tiny_decoder_fixed, device):
    g = tiny_decoder_fixed
    ids = tiny_decoder_feeds(1, b=2, s=9)[0]["ids"]
    gstate, hstate = GoldenState(), HostState()
    gm = GoldenModel(g)
    steps = [ids[:, :6], ids[:, 6:7], ids[:, 7:8], ids[:, 8:9]]
    offset = 0
    for x in steps:
        rec = gm({"ids": x}, state=gstate, record=True)
        got = run_host(g, {"ids": x}, device, hstate, offset)
        assert_all_tensors_equal(g, rec, got)
        offset += x.shape[1]
    assert hstate.kv and all(k.shape[2] == 9 for k, _ in hstate.kv.values())


@pytest.mark.parametrize("device", DEVICES)
def test_bert_block_float_input_and_mask_equal_golden(bert_block_graph, device):
    g = Graph.load(bert_block_graph)
    rng = np.random.default_rng(3)
    feeds = {"x": rng.normal(0, 1.5, (2, 7, g.tensors["x"].shape[-1]))}
    if "mask" in g.inputs:
        feeds["mask"] = np.array([[1] * 7, [1] * 4 + [0] * 3])
    rec = GoldenModel(g)(feeds, record=True)
    assert_all_tensors_equal(g, rec, run_host(g, feeds, device))


def test_requantize_every_mode_matches_fixed():
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(-2 ** 40, 2 ** 40, 3000), rng.integers(-300, 300, 3000),
                            np.array([0, 1, -1, 2 ** 61, -2 ** 61, 2 ** 62, -2 ** 62])])
    for q in QUANT_MODES:
        for o in OVERFLOW_MODES:
            for width, signed in ((8, True), (5, False), (16, True), (1, True)):
                for fi, fo in ((12, 4), (4, 4), (3, 9), (70, 2), (0, 64)):
                    want = requantize(codes, fi, width, fo, signed, q, o)
                    got = t_requantize(torch.as_tensor(codes), fi, width, fo, signed, q, o).numpy()
                    assert np.array_equal(want, got), (q, o, width, signed, fi, fo)


def test_requantize_per_channel_shifts_match_fixed():
    rng = np.random.default_rng(1)
    codes = rng.integers(-2 ** 20, 2 ** 20, (50, 6))
    fo = np.array([2, 5, 9, 12, 14, 30])
    for q in ("AP_RND", "AP_TRN", "AP_RND_CONV"):
        for o in ("AP_SAT", "AP_WRAP", "AP_SAT_SYM"):
            want = requantize(codes, 12, 10, fo, True, q, o)
            got = t_requantize(torch.as_tensor(codes), 12, 10, fo, True, q, o).numpy()
            assert np.array_equal(want, got), (q, o)


def test_from_float_matches_fixed_including_ties():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 8, 5000), np.arange(-40, 40) / 8 + 1 / 16, [0.0, -0.0, 1e9, -1e9]])
    for q in QUANT_MODES:
        for o in OVERFLOW_MODES:
            f = FixedType(8, 4, True, q, o)
            assert np.array_equal(f.from_float(x), from_float(torch.as_tensor(x), f).numpy()), (q, o)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is present")
def test_cuda_without_gpu_is_refused(tiny_decoder_fixed):
    from hwgen.runtime.driver import Driver, DriverError

    with pytest.raises(DriverError, match="torch sees no CUDA GPU"):
        Driver(tiny_decoder_fixed, device="cuda")
