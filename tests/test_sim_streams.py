"""sim.protocol / sim.streams host-testable parts: payload packing against
Amaranth's own layout constants, layout flattening, exact comparison counts."""
import numpy as np
import pytest
from amaranth import signed, unsigned
from amaranth.lib import data

from hwgen.rtl import PEArray
from hwgen.rtl.verify import _sim_package

_sim_package()
from sim.protocol import Comparison, layout_fields  # noqa: E402
from sim.streams import Packer  # noqa: E402

# components built only for their port layouts
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def test_layout_fields_of_pe_array_ports():
    dut = PEArray(3, 2, 8, 6, 20)
    f = {x["name"]: x for x in layout_fields(dut.i.payload.shape())}
    assert f["a"] == {"name": "a", "offset": 0, "width": 8, "signed": True, "count": 3}
    assert f["b"] == {"name": "b", "offset": 24, "width": 6, "signed": True, "count": 2}
    assert f["first"]["offset"] == 36 and f["last"]["offset"] == 37 and f["last"]["count"] == 0
    g = {x["name"]: x for x in layout_fields(dut.o.payload.shape())}
    assert g["data"]["count"] == 2 and g["data"]["width"] == 20 and not g["row"]["signed"]


def test_layout_fields_nested():
    lay = data.StructLayout({"x": data.StructLayout({"p": 3, "q": signed(5)}),
                             "v": data.ArrayLayout(data.StructLayout({"u": unsigned(2)}), 2)})
    names = [(x["name"], x["offset"], x["width"]) for x in layout_fields(lay)]
    assert names == [("x.p", 0, 3), ("x.q", 3, 5), ("v.0.u", 8, 2), ("v.1.u", 10, 2)]


def test_packer_matches_amaranth_const_and_round_trips():
    dut = PEArray(4, 3, 8, 5, 24)
    lay = dut.i.payload.shape()
    p = Packer(layout_fields(lay))
    rng = np.random.default_rng(0)
    n = 50
    vals = {"a": rng.integers(-128, 128, (n, 4)), "b": rng.integers(-16, 16, (n, 3)),
            "first": rng.integers(0, 2, n), "last": rng.integers(0, 2, n)}
    vals["a"][0] = -128
    vals["b"][0] = 15
    words = p.pack(vals, n)
    for i in range(n):
        want = lay.const({"a": [int(v) for v in vals["a"][i]], "b": [int(v) for v in vals["b"][i]],
                          "first": int(vals["first"][i]), "last": int(vals["last"][i])})
        assert words[i] == want.as_value().value
    back = p.unpack(words)
    for k, v in vals.items():
        np.testing.assert_array_equal(back[k], v)


def test_packer_refuses_out_of_range():
    p = Packer(layout_fields(data.ArrayLayout(signed(4), 2)))
    with pytest.raises(ValueError, match="outside -8..7"):
        p.pack({"": np.array([[8, 0]])}, 1)


def test_comparison_counts_every_integer():
    c = Comparison(limit=2)
    c.add("x", np.arange(6).reshape(2, 3), np.array([[0, 1, 9], [3, 9, 9]]))
    c.add("y", np.zeros(4), np.zeros(3))
    d = c.as_dict()
    assert d["vectors"] == 10 and d["mismatches"] == 3 + 4
    assert d["first_mismatches"][0] == {"output": "x", "index": [0, 2], "expected": 2, "actual": 9}
    assert len(d["first_mismatches"]) == 2
