"""cocotb bench: :class:`hwgen.rtl.attention.AttentionEngine`, pass after pass.

Vectors: ``beats`` (hex strings: the ``i`` payloads of every pass, built on
the host by :meth:`AttentionEngine.pack`). Config: ``passes`` (beats per
pass, in order: e.g. a prefill pass then one-token decode passes against the
KV cache), ``valid_prob``, ``ready_prob``, ``seed``, ``max_cycles``.

All beats go through one :class:`sim.streams.StreamDriver` (the engine takes
a pass's tokens only while it is loading, so passes follow each other by its
own ``i.ready``) and every ``o`` beat is recorded by a
:class:`sim.streams.StreamMonitor`. ``pass_cycles[p]``: first accepted beat of
pass ``p`` to its last output beat taken, inclusive (the engine's
``cycles(s_q, s_kv)`` definition). The output payloads go back to the host
in ``outputs.npz`` (``out``, hex) and are decoded with
:meth:`AttentionEngine.unpack`.
"""
from __future__ import annotations

import random
import time

import cocotb
from cocotb.clock import Clock

from sim.protocol import hex_words, load_bench, words_of, write_outputs, write_result
from sim.streams import StreamDriver, StreamMonitor, reset, run_cycles


@cocotb.test()
async def bench(dut):
    cfg, vec = load_bench()
    passes = [int(p) for p in cfg["passes"]]
    total = sum(passes)
    Clock(dut.clk, 10, unit="ns").start()
    rng = random.Random(cfg["seed"])
    drv = StreamDriver(dut, "i", words_of(vec["beats"]), rng, cfg["valid_prob"])
    mon = StreamMonitor(dut, "o", rng, cfg["ready_prob"])
    await reset(dut, dut.clk)
    t0 = time.perf_counter()
    end = await run_cycles(dut.clk, [drv, mon], lambda: len(mon.words) >= total,
                           cfg["max_cycles"], what="AttentionEngine bench")
    wall = time.perf_counter() - t0
    pass_cycles, b = [], 0
    for p in passes:
        pass_cycles.append(mon.transfer_cycles[b + p - 1] - drv.transfer_cycles[b] + 1)
        b += p
    write_outputs({"out": hex_words(mon.words)})
    write_result({"cycles": sum(pass_cycles), "pass_cycles": pass_cycles, "sim_cycles": end,
                  "sim_wall_s": wall, "cycles_per_s": end / wall if wall else None})
