"""Partition, packing, transfers, scheduling, trace and cost model of the host driver."""
import json
import threading
import time

import numpy as np
import pytest

from hwgen.golden import GoldenModel
from hwgen.runtime import cost, jobs
from hwgen.runtime.backends import GoldenAccel
from hwgen.runtime.driver import Driver
from hwgen.runtime.pack import WordFormat, pack, tensor_format, unpack
from hwgen.runtime.partition import ACCEL, HOST, DriverError, parse_force, place, segments
from hwgen.runtime.trace import Tracer

from conftest import tiny_decoder_feeds

KERNELS = ("linear", "attention", "layernorm", "gelu", "add")


# ----------------------------------------------------------------------------- partition

def test_default_placement_puts_kernels_on_the_accelerator(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    p = place(g, KERNELS)
    for n in g.nodes:
        assert p[n.name] == (ACCEL if n.op in ("linear", "attention") else HOST), n.name
    segs = segments(g, p)
    assert [n.name for s in segs for n in s.nodes] == [n.name for n in g.nodes]
    assert all(a.device != b.device for a, b in zip(segs, segs[1:]))


def test_forced_placement_node_beats_op(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    lin = [n.name for n in g.nodes if n.op == "linear"]
    p = place(g, KERNELS, force={"linear": "host", lin[0]: "accel", "gelu": "accel"})
    assert p[lin[0]] == ACCEL and all(p[n] == HOST for n in lin[1:])
    assert all(p[n.name] == ACCEL for n in g.nodes if n.op == "gelu")
    p = place(g, KERNELS, accel_ops=("layernorm",))
    assert {n.op for n in g.nodes if p[n.name] == ACCEL} == {"layernorm"}


@pytest.mark.parametrize("force,msg", [
    ({"embedding": "accel"}, "forced onto the accelerator, but this backend has kernels only for"),
    ({"linear": "fpga"}, "device 'fpga' is not one of host, accel"),
    ({"no.such.node": "host"}, "has no node or op of that name"),
])
def test_bad_placement_is_refused(tiny_decoder_fixed, force, msg):
    with pytest.raises(DriverError, match=msg):
        place(tiny_decoder_fixed, KERNELS, force=force)


def test_parse_force():
    assert parse_force(["a.b=host", "linear=accel"]) == {"a.b": "host", "linear": "accel"}
    with pytest.raises(DriverError, match="expected NODE_OR_OP=host"):
        parse_force(["linear"])


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("width,signed,bus", [(8, True, 128), (5, False, 64), (16, True, 256),
                                              (24, True, 128), (1, False, 128), (48, True, 64)])
def test_pack_unpack_roundtrip(width, signed, bus):
    f = WordFormat(width, signed, bus)
    lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
    codes = np.random.default_rng(width).integers(lo, hi + 1, 1001)
    codes[:2] = lo, hi
    words = pack(codes, f)
    assert words.shape == (f.words(codes.size), bus // 64)
    assert words.size * 8 == f.nbytes(codes.size)
    assert np.array_equal(unpack(words, f, codes.size), codes)


def test_pack_refuses_codes_outside_the_width():
    with pytest.raises(DriverError, match="do not fit the 8-bit signed word format"):
        pack(np.array([128]), WordFormat(8, True))


def test_pack_size_counts_padding():
    f = WordFormat(8, True, 128)           # 16 codes per 128-bit word
    assert f.nbytes(16) == 16 and f.nbytes(17) == 32 and f.nbytes(0) == 0


# ----------------------------------------------------------------------------- driver

def test_driver_run_equals_golden_and_counts_predicted_bytes(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    feeds = tiny_decoder_feeds(1, b=2, s=10)[0]
    d = Driver(g, "golden")
    outs, st = d.run(feeds)
    assert np.array_equal(outs["logits"], GoldenModel(g)(feeds)["logits"])
    moves = cost.predict_transfers(g, d.placement, {"B": 2, "S": 10})
    assert st.bytes_to_accel == sum(m["to_accel"] for m in moves.values()) > 0
    assert st.bytes_from_accel == sum(m["from_accel"] for m in moves.values()) > 0
    assert st.transfers == sum(m["transfers"] for m in moves.values())
    # q/k/v read one layernorm output: it crosses once
    ln = [n for n in g.nodes if n.op == "layernorm"][0].outputs[0]
    assert moves["n4.linear"]["to_accel"] == tensor_format(g, ln).nbytes(2 * 10 * 16)
    assert "n5.linear" not in moves
    assert d.weight_bytes > 0


def test_everything_on_the_host_moves_nothing(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    feeds = tiny_decoder_feeds(1, b=1, s=5)[0]
    d = Driver(g, "golden", force={op: "host" for op in ("linear", "attention")})
    outs, st = d.run(feeds)
    assert st.bytes_to_accel == st.bytes_from_accel == st.transfers == d.weight_bytes == 0
    assert np.array_equal(outs["logits"], GoldenModel(g)(feeds)["logits"])


def test_generate_equals_golden_decoding_loop(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    prompt = [3, 7, 11, 2, 5]
    d = Driver(g, "golden", accel_ops=KERNELS)
    # ctx 12: the cache fills after 7 new tokens and is re-primed with the last 6
    new, seen, prefill, st = d.generate(prompt, 10, ctx=12)
    g_new, g_seen = jobs.golden_generate(g, prompt, 10, ctx=12)
    assert new == g_new and len(new) == 10
    assert all(np.array_equal(a, b) for a, b in zip(seen, g_seen))
    assert prefill.shape == (1, 5, 40)


class _SlowGolden(GoldenAccel):
    """The golden accelerator, slowed down (sleep releases the GIL like a device wait)."""

    def run(self, node, ins, offset, state):
        time.sleep(0.01)
        return super().run(node, ins, offset, state)


def test_run_many_pipelines_host_and_accelerator(tiny_decoder_fixed, monkeypatch, tmp_path):
    g = tiny_decoder_fixed
    import hwgen.runtime.driver as drv_mod

    monkeypatch.setattr(drv_mod, "make_backend", lambda name, graph, *a: _SlowGolden(graph))
    tr = Tracer()
    d = Driver(g, "golden", tracer=tr)
    feeds = [{"ids": f["ids"][:1]} for f in tiny_decoder_feeds(4, b=1, s=6)]
    outs, st = d.run_many(feeds)
    gm = GoldenModel(g)
    for f, o in zip(feeds, outs):
        assert np.array_equal(o["logits"], gm(f)["logits"])
    assert tr.overlap("host", "accel") > 0            # one request's host work under another's kernels
    path = tr.write(tmp_path / "t.json")
    doc = json.loads(path.read_text())
    lanes = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    assert lanes == {"host (cpu)", "accel (golden)", "link"}
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["args"]["request"] for e in xs} == {"0", "1", "2", "3"}
    assert all(e["dur"] >= 0 for e in xs)


def test_run_many_propagates_errors(tiny_decoder_fixed, monkeypatch):
    g = tiny_decoder_fixed

    class Broken(GoldenAccel):
        def run(self, node, ins, offset, state):
            raise DriverError("boom in " + node.name)

    import hwgen.runtime.driver as drv_mod
    monkeypatch.setattr(drv_mod, "make_backend", lambda name, graph, *a: Broken(graph))
    d = Driver(g, "golden")
    with pytest.raises(DriverError, match="boom in"):
        d.run_many(tiny_decoder_feeds(2, b=1, s=4))
    assert threading.active_count() < 10


# ----------------------------------------------------------------------------- cost model

def test_cycle_model_reads_the_engines(tiny_decoder_fixed):
    from hwgen.rtl.attention import AttentionEngine
    from hwgen.rtl.matmul import MatmulSpec

    g = tiny_decoder_fixed
    cm = cost.CycleModel(g, max_m=8)
    lin = next(n for n in g.nodes if n.op == "linear")
    spec = MatmulSpec.for_linear(g, lin, rows=16, cols=16, max_m=8)
    assert cm.node_cycles(lin, {"B": 2, "S": 10}) == spec.cycles(8) + spec.cycles(8) + spec.cycles(4)
    att = next(n for n in g.nodes if n.op == "attention")
    eng = AttentionEngine.for_node(g, att, max_seq=128)
    assert cm.node_cycles(att, {"B": 2, "S": 1}, offset=5) == eng.cycles(1, 6) * att.attrs["heads"] * 2
    assert cm.node_cycles(next(n for n in g.nodes if n.op == "gelu"), {"B": 1, "S": 1}) is None


def test_plan_rows_and_cost_placement(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    feeds = {"ids": tiny_decoder_feeds(1, b=1, s=8)[0]["ids"][:1]}
    r = jobs.plan(g, feeds, "golden", repeats=1)
    rows = {x["node"]: x for x in r["rows"]}
    lin = next(n for n in g.nodes if n.op == "linear")
    assert rows[lin.name]["device"] == ACCEL and rows[lin.name]["cycles"] > 0
    assert rows[lin.name]["predicted_s"] >= rows[lin.name]["cycles"] / 200e6
    assert r["accel_cycles"] == sum(x["cycles"] for x in r["rows"] if x["device"] == ACCEL)
    # an absurdly slow clock makes every kernel lose to the host
    slow = jobs.plan(g, feeds, "golden", policy="cost", clock_mhz=1e-6, repeats=1)
    assert all(x["device"] == HOST for x in slow["rows"])
    fast = jobs.plan(g, feeds, "golden", policy="cost", clock_mhz=1e6,
                     link=cost.Link(1e15, 0.0), repeats=1)
    assert {x["op"] for x in fast["rows"] if x["device"] == ACCEL} == {"linear", "attention"}
    assert "pred ms" in cost.format_table(r["rows"])


def test_clock_from_impl(tmp_path):
    p = tmp_path / "impl.json"
    p.write_text('progress\n{"part": "LFE5U-85F", "fmax_mhz": 151.5}\n')
    assert cost.clock_from_impl(p) == 151.5
    p.write_text('{"part": "x"}\n')
    with pytest.raises(DriverError, match="no positive 'fmax_mhz'"):
        cost.clock_from_impl(p)
