"""The golden model: integer determinism, KV-cache decoding, batch
independence under padding, and input checking."""
import numpy as np
import pytest

from hwgen.golden import GoldenModel, GoldenState, InputError
from hwgen.ir import GraphError


def test_kv_cache_steps_equal_full_sequence(tiny_decoder_fixed):
    ids = np.random.default_rng(7).integers(0, 40, (2, 20))
    m = GoldenModel(tiny_decoder_fixed)
    full = m({"ids": ids})["logits"]
    state = GoldenState()
    parts = [m({"ids": ids[:, :7]}, state)["logits"]]
    for t in range(7, 20):
        parts.append(m({"ids": ids[:, t:t + 1]}, state)["logits"])
    assert state.offset == 20
    assert np.array_equal(np.concatenate(parts, axis=1), full)


def test_batch_rows_are_independent(tiny_decoder_fixed):
    ids = np.random.default_rng(8).integers(0, 40, (3, 10))
    m = GoldenModel(tiny_decoder_fixed)
    batched = m({"ids": ids})["logits"]
    for b in range(3):
        assert np.array_equal(m({"ids": ids[b:b + 1]})["logits"][0], batched[b])


def test_record_returns_every_tensor(tiny_decoder_fixed):
    vals = GoldenModel(tiny_decoder_fixed)({"ids": np.zeros((1, 4), dtype=np.int64)}, record=True)
    for name, t in tiny_decoder_fixed.tensors.items():
        assert name in vals
        if t.kind == "activation":
            assert vals[name].dtype == np.int64
            assert vals[name].min() >= t.fmt.min_code and vals[name].max() <= t.fmt.max_code


def test_position_overflow_and_bad_feeds(tiny_decoder_fixed):
    m = GoldenModel(tiny_decoder_fixed)
    with pytest.raises(InputError, match="position 24 is beyond the model's 24 positions"):
        m({"ids": np.zeros((1, 25), dtype=np.int64)})
    with pytest.raises(InputError, match="missing graph input"):
        m({})
    with pytest.raises(InputError, match="unknown input"):
        m({"ids": np.zeros((1, 3), dtype=np.int64), "x": np.zeros(3)})
    with pytest.raises(InputError, match="input 'ids' has shape"):
        m({"ids": np.zeros((3,), dtype=np.int64)})
    with pytest.raises(InputError, match="must hold integers"):
        m({"ids": np.zeros((1, 3))})


def test_float_graph_refused(tiny_decoder):
    with pytest.raises(GraphError, match="is a float graph"):
        GoldenModel(tiny_decoder)


def test_threaded_rows_equal_one_pass(tiny_decoder):
    """A stateless graph (no KV cache) splits rows over threads: same integers."""
    import copy

    from conftest import tiny_decoder_feeds
    from hwgen.quant import QuantConfig, quantize

    g = copy.deepcopy(tiny_decoder)
    for n in g.nodes:
        if n.op == "attention":
            n.attrs["kv_cache"] = False
    fixed, _ = quantize(g, tiny_decoder_feeds(), QuantConfig.from_bits("w8a8"))
    ids = np.random.default_rng(9).integers(0, 40, (5, 9))
    one = GoldenModel(fixed, workers=1)({"ids": ids})["logits"]
    threaded = GoldenModel(fixed, workers=2)
    assert threaded.workers == 2 and not threaded._stateful
    assert np.array_equal(threaded({"ids": ids})["logits"], one)


def test_real_tiny_gpt_kv_cache_decoding_is_exact():
    """The shipped tiny-gpt, quantized W8A8: prefill + single-token steps give
    the same integer logits as one pass, and greedy decoding is deterministic."""
    from hwgen import zoo
    from hwgen.quant import QuantConfig, quantize

    bundle = zoo.load("tiny-gpt")
    fixed, _ = quantize(bundle.graph, bundle.calib_feeds[:1], QuantConfig.from_bits("w8a8"))
    ids = zoo.feeds_from_text("tiny-gpt", "The for statement is used to iterate")["ids"]
    m = GoldenModel(fixed)
    full = m({"ids": ids})["logits"]
    state = GoldenState()
    steps = [m({"ids": ids[:, :10]}, state)["logits"]]
    for t in range(10, ids.shape[1]):
        steps.append(m({"ids": ids[:, t:t + 1]}, state)["logits"])
    assert np.array_equal(np.concatenate(steps, axis=1), full)


def test_state_truncate_forgets_positions(tiny_decoder_fixed):
    """A cache cut back to n and fed the rest again gives the uncut run's codes."""
    from hwgen.golden import GoldenModel, GoldenState

    gm = GoldenModel(tiny_decoder_fixed)
    ids = np.asarray([[3, 1, 4, 1, 5, 9, 2]])
    whole = gm({"ids": ids}, GoldenState())["logits"]
    st = GoldenState()
    gm({"ids": np.asarray([[3, 1, 4, 1, 7, 7]])}, st)      # a wrong draft from position 4 on
    st.truncate(4)
    assert st.offset == 4 and all(k.shape[2] == 4 and v.shape[2] == 4 for k, v in st.kv.values())
    again = gm({"ids": ids[:, 4:]}, st)["logits"]
    assert np.array_equal(again, whole[:, 4:])
    with pytest.raises(ValueError, match="cannot truncate a cache of 7 positions to 8"):
        st.truncate(8)
