"""cocotb bench: :class:`hwgen.rtl.PEArray` streamed tile by tile.

Vectors: ``a`` (sum K, rows) -- the columns of A, beat by beat; ``b`` (sum K,
cols) -- the rows of B; ``k`` (T,) -- beats per tile; ``c`` (T, rows, cols)
-- the expected accumulators. Config: ``rows``, ``cols``, ``i``/``o`` (port
names), ``i_fields``/``o_fields`` (:func:`sim.protocol.layout_fields`),
``valid_prob`` (random bubbles), ``seed``, ``max_cycles``. Both streams are
always ready; the driver keeps the array's one producer rule (a tile's
``last`` beat at least ``min_tile_gap`` cycles after the previous one) by
holding such a beat back, and the bench checks ``overrun`` stayed low.

Every output beat is compared: ``data`` (rows x cols per tile), ``row`` and
``last``. ``cycles``: first input transfer to last output transfer,
inclusive (the PE array docstring's count).
"""
from __future__ import annotations

import random
import time

import numpy as np

import cocotb
from cocotb.clock import Clock

from sim.protocol import Comparison, load_bench, write_result
from sim.streams import Packer, StreamDriver, StreamMonitor, reset, run_cycles


@cocotb.test()
async def bench(dut):
    cfg, vec = load_bench()
    rows, cols = cfg["rows"], cfg["cols"]
    ks = [int(k) for k in vec["k"]]
    n, tiles = sum(ks), len(ks)
    first = np.zeros(n, np.int64)
    last = np.zeros(n, np.int64)
    ends = np.cumsum(ks)
    first[ends - np.asarray(ks)] = 1
    last[ends - 1] = 1
    ip, op = Packer(cfg["i_fields"]), Packer(cfg["o_fields"])
    words = ip.pack({"a": vec["a"], "b": vec["b"], "first": first, "last": last}, n)

    Clock(dut.clk, 10, unit="ns").start()
    rng = random.Random(cfg["seed"])
    gap, prev_last = cfg["min_tile_gap"], [-(1 << 30)]

    def may_offer(index: int, cycle: int) -> bool:
        if not last[index]:
            return True
        if cycle - prev_last[0] < gap:
            return False
        prev_last[0] = cycle
        return True

    drv = StreamDriver(dut, cfg["i"], words, rng, cfg["valid_prob"], may_offer)
    mon = StreamMonitor(dut, cfg["o"], rng)
    await reset(dut, dut.clk)
    t0 = time.perf_counter()
    end = await run_cycles(dut.clk, [drv, mon], lambda: len(mon.words) >= tiles * rows,
                           cfg["max_cycles"], what="PEArray bench")
    wall = time.perf_counter() - t0

    out = op.unpack(mon.words)
    cmp = Comparison()
    cmp.add("data", vec["c"], out["data"].reshape(tiles, rows, cols))
    cmp.add("row", np.tile(np.arange(rows), tiles), out["row"])
    cmp.add("last", np.tile((np.arange(rows) == rows - 1).astype(np.int64), tiles), out["last"])
    cmp.add("overrun", np.zeros(1, np.int64), np.array([int(dut.overrun.value)]))
    write_result({**cmp.as_dict(),
                  "cycles": mon.transfer_cycles[-1] - drv.transfer_cycles[0] + 1,
                  "tile_cycles": [mon.transfer_cycles[(t + 1) * rows - 1]
                                  - drv.transfer_cycles[int(ends[t] - ks[t])] + 1 for t in range(tiles)],
                  "sim_cycles": end, "sim_wall_s": wall, "cycles_per_s": end / wall if wall else None})
