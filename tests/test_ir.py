"""The graph IR: round trip, and every kind of corruption rejected by name."""
import json

import numpy as np
import pytest

from hwgen.ir import GRAPH_FILE, WEIGHTS_FILE, Graph, GraphError


def test_round_trip_is_identical(tiny_decoder_fixed, tmp_path):
    d = tiny_decoder_fixed.save(tmp_path / "g")
    g = Graph.load(d)
    assert g.to_json() == json.loads(json.dumps(tiny_decoder_fixed.to_json()))
    assert set(g.weights) == set(tiny_decoder_fixed.weights)
    for k, v in g.weights.items():
        assert v.dtype == tiny_decoder_fixed.weights[k].dtype
        assert np.array_equal(v, tiny_decoder_fixed.weights[k])


def _saved(g, tmp_path):
    return g.save(tmp_path / "g")


def _edit_json(d, fn):
    doc = json.loads((d / GRAPH_FILE).read_text())
    fn(doc)
    (d / GRAPH_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize("edit, message", [
    (lambda doc: doc.update(schema_version=99), "schema_version 99 is not supported"),
    (lambda doc: doc.pop("nodes"), "missing key 'nodes'"),
    (lambda doc: doc["nodes"][3].update(op="conv2d"), "unknown op 'conv2d'"),
    (lambda doc: doc["nodes"][3]["inputs"].__setitem__(0, "nope"), "input tensor 'nope' is not defined"),
    (lambda doc: doc["nodes"].reverse(), "used before it is produced"),
    (lambda doc: doc["tensors"][0].update(kind="bogus"), "kind 'bogus'"),
    (lambda doc: next(t for t in doc["tensors"] if "format" in t)["format"].update(width=99),
     "bad format"),
    (lambda doc: next(n for n in doc["nodes"] if n["op"] == "layernorm")["attrs"].pop("eps"),
     "missing attribute 'eps'"),
    (lambda doc: doc["outputs"].append("ghost"), "graph output 'ghost' is not a tensor"),
])
def test_corrupted_json_rejected(tiny_decoder_fixed, tmp_path, edit, message):
    d = _saved(tiny_decoder_fixed, tmp_path)
    _edit_json(d, edit)
    with pytest.raises(GraphError, match=message):
        Graph.load(d)


def test_unreadable_files(tiny_decoder_fixed, tmp_path):
    d = _saved(tiny_decoder_fixed, tmp_path)
    (d / GRAPH_FILE).write_text("{not json")
    with pytest.raises(GraphError, match="not valid JSON"):
        Graph.load(d)
    d = _saved(tiny_decoder_fixed, tmp_path)
    (d / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(GraphError, match="unreadable weights file"):
        Graph.load(d)
    with pytest.raises(GraphError, match="no such graph file"):
        Graph.load(tmp_path / "missing")


def test_weight_data_checked(tiny_decoder_fixed, tmp_path):
    d = _saved(tiny_decoder_fixed, tmp_path)
    w = dict(np.load(d / WEIGHTS_FILE))
    w["L0.q.w"] = w["L0.q.w"][:, :3]
    np.savez(d / WEIGHTS_FILE, **w)
    with pytest.raises(GraphError, match="weight 'L0.q.w': data shape"):
        Graph.load(d)
    d = _saved(tiny_decoder_fixed, tmp_path)
    w = dict(np.load(d / WEIGHTS_FILE))
    w["L0.q.w"] = w["L0.q.w"].astype(np.int64) * 1000
    np.savez(d / WEIGHTS_FILE, **w)
    with pytest.raises(GraphError, match="weight 'L0.q.w': codes .* exceed"):
        Graph.load(d)
    d = _saved(tiny_decoder_fixed, tmp_path)
    w = dict(np.load(d / WEIGHTS_FILE))
    del w["L0.q.b"]
    np.savez(d / WEIGHTS_FILE, **w)
    with pytest.raises(GraphError, match="weight 'L0.q.b' has no data"):
        Graph.load(d)


def test_float_weights_with_nan_rejected(tiny_decoder):
    g = Graph(**{**tiny_decoder.__dict__, "weights": dict(tiny_decoder.weights)})
    g.weights["L0.q.w"] = g.weights["L0.q.w"].copy()
    g.weights["L0.q.w"][0, 0] = np.nan
    with pytest.raises(GraphError, match="weight 'L0.q.w': contains NaN or Inf"):
        g.validate()


def test_failed_save_leaves_previous_output_untouched(tiny_decoder_fixed, tmp_path):
    d = _saved(tiny_decoder_fixed, tmp_path)
    before = (d / GRAPH_FILE).read_text()
    bad = Graph(**{**tiny_decoder_fixed.__dict__, "outputs": ["ghost"]})
    with pytest.raises(GraphError):
        bad.save(d)
    assert (d / GRAPH_FILE).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g"]
