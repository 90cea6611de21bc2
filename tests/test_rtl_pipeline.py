"""hwgen.rtl.pipeline.delayed: values N cycles late, shapes and names kept."""
from amaranth import Module, Signal, signed, unsigned
from amaranth.lib import data
from amaranth.sim import Simulator

from hwgen.rtl.pipeline import delayed


def test_zero_stages_are_the_values():
    m, s = Module(), Signal(4)
    assert delayed(m, [s], 0, ("s",))[0] is s


def test_delay_shapes_and_names():
    """A signal, a layout view and an expression through 3 registers: each
    output equals its input 3 cycles earlier; shapes, initial values and
    names follow the inputs."""
    m = Module()
    a = Signal(signed(6), init=-3)
    v = Signal(data.ArrayLayout(unsigned(4), 2))
    b = Signal(3)
    qa, qv, qe = delayed(m, [a, v, b + 1], 3, ("a", "v", "e"))
    assert (qa.shape(), qa.init, qa.name) == (signed(6), -3, "a_d2")
    assert isinstance(qv, data.View) and qv.shape() == v.shape()
    assert len(qe) == len(b + 1)
    seen = []

    async def tb(ctx):
        for c in range(8):
            ctx.set(a, c - 4)
            ctx.set(v[0], c)
            ctx.set(b, c % 8)
            await ctx.tick()
            seen.append((ctx.get(qa), ctx.get(qv[0]), ctx.get(qe)))

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    for c in range(3, 8):   # sample c (after c + 1 ticks) shows the inputs of cycle c - 2
        src = c - 2
        assert seen[c] == (src - 4, src, src % 8 + 1)
    assert seen[0][0] == -3   # the initial value, before the first input arrives


def test_fanout_tree_levels_and_parents():
    """10 sinks, one copy per 8 then per 4: 2 then 3 kept copies, each loaded from
    the copy of the level before that serves its sinks; the last level shows the
    source two cycles later."""
    import re

    from amaranth.back import verilog

    from hwgen.rtl.pipeline import fanout_tree

    m = Module()
    src = Signal(signed(5))
    out = Signal(signed(5))
    last = fanout_tree(m, src, 10, [8, 4], ["x_l1_", "x_l2_"], reset_less=True)
    assert [q.name for q in last] == ["x_l2_0", "x_l2_1", "x_l2_2"]
    m.d.comb += out.eq(last[0] ^ last[1] ^ last[2])   # a ^ a ^ a == a
    text = verilog.convert(m, ports=[src, out])
    assert re.search(r"x_l2_2 <= x_l1_1;", text) and re.search(r"x_l2_1 <= x_l1_0;", text)
    assert text.count("keep") >= 5
    seen = []

    async def tb(ctx):
        for c in range(6):
            ctx.set(src, c - 3)
            await ctx.tick()
            seen.append(ctx.get(out))

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert seen[2:] == [c - 3 for c in range(1, 5)]
