"""cocotb bench: :class:`hwgen.rtl.Requant`, one row of lanes per cycle.

Vectors: ``x`` (n, lanes) accumulator codes, ``y`` (n, lanes) expected
outputs. Config: ``lanes``, ``latency`` (0: combinational, 1: registered),
``i_fields``/``o_fields``. A registered Requant is clocked (row r is driven in
cycle r and read ``latency`` cycles later, after ReadOnly); a combinational one
has no clock: each row is driven, then read once the values settle.
"""
from __future__ import annotations

import time

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge, Timer

from sim.protocol import Comparison, load_bench, write_result
from sim.streams import Packer, _u


@cocotb.test()
async def bench(dut):
    cfg, vec = load_bench()
    x, y = vec["x"], vec["y"]
    n, lanes = x.shape
    ip, op = Packer(cfg["i_fields"]), Packer(cfg["o_fields"])
    words = ip.pack({"": x}, n)
    lat = cfg["latency"]
    got: list[int] = []
    t0 = time.perf_counter()
    if lat == 0:
        for w in words:
            dut.i.value = w
            await Timer(1, unit="ns")
            await ReadOnly()
            got.append(_u(dut.o))
            await Timer(1, unit="ns")
        cycles = n
    else:
        Clock(dut.clk, 10, unit="ns").start()
        edge, ro = RisingEdge(dut.clk), ReadOnly()
        cycles = 0
        for cyc in range(n + lat):
            await edge
            if cyc < n:
                dut.i.value = words[cyc]
            await ro
            if cyc >= lat:
                got.append(_u(dut.o))
            cycles += 1
    wall = time.perf_counter() - t0
    cmp = Comparison()
    cmp.add("o", y, op.unpack(got)[""].reshape(-1, lanes))
    write_result({**cmp.as_dict(), "cycles": cycles, "sim_cycles": cycles, "sim_wall_s": wall})
