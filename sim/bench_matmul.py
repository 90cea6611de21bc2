"""cocotb bench: :class:`hwgen.rtl.matmul.MatmulEngine`, loaded in bulk, run to ``done``.

Vectors: ``img_<buffer>`` (hex strings: the memory images that
:meth:`MatmulSpec.pack_weights` built on the host) and ``img_a_<r>`` (the
activation image of run ``r``, :meth:`MatmulSpec.pack_x`). Config:
``buffers`` (weight-side buffers, load order), ``runs`` (``[{"m", "out_words",
"max_cycles"}]``).

1. Load the weight-side images once, every image through its write port
   ``<buffer>_wr`` (``addr``, ``data``, ``en``), one word per cycle, as host
   DMA feeds the engine. Then for each run:
2. load its activations (``a_wr``), pulse ``start`` with ``m``, then await
   ``done`` without touching a cycle in Python, so the simulator runs at its
   own speed. The run's cycles = the cycle in which ``done`` is high,
   counting the cycle in which ``start`` is sampled as 0
   (``MatmulSpec.cycles``'s definition);
3. read ``out_words`` words through ``o_rd`` (data ``out_read_latency`` cycles after addr).

The words read are returned in ``outputs.npz`` (``out_<r>``, hex); the host
unpacks them with :meth:`MatmulSpec.unpack_out` and compares every code.
"""
from __future__ import annotations

import time

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import First, ReadOnly, RisingEdge, Timer
from cocotb.utils import get_sim_time

from sim.protocol import hex_words, words_of, load_bench, write_outputs, write_result
from sim.streams import _u, reset

PERIOD_NS = 10


async def load_buffers(dut, images: list[tuple[str, object]]) -> int:
    """Write every ``(buffer, hex image)`` through its write port; returns cycles spent."""
    edge = RisingEdge(dut.clk)
    n = 0
    for b, img in images:
        words = words_of(img)
        addr, data, en = (getattr(dut, f"{b}_wr__{f}") for f in ("addr", "data", "en"))
        for a, w in enumerate(words):
            await edge
            addr.value = a
            data.value = w
            en.value = 1
            n += 1
        await edge
        en.value = 0
    return n


async def run_to_done(dut, m: int, max_cycles: int) -> int:
    """Pulse ``start`` with ``m``; the cycle in which ``done`` is high."""
    edge = RisingEdge(dut.clk)
    await edge
    dut.m.value = m
    dut.start.value = 1
    t0 = get_sim_time("ns")
    await edge
    dut.start.value = 0
    await ReadOnly()
    if not _u(dut.done):
        done = cocotb.start_soon(_first_done(dut))
        await First(done, Timer(max_cycles * PERIOD_NS, unit="ns"))
        if not done.done():
            raise RuntimeError(f"MatmulEngine: no done within {max_cycles} cycles of start")
    return round((get_sim_time("ns") - t0) // PERIOD_NS)


async def _first_done(dut):
    await RisingEdge(dut.done)


async def read_out(dut, n: int, latency: int) -> list[int]:
    """Words 0 .. n-1 of ``out``, one address per cycle, each word ``latency``
    cycles after its address (``MatmulSpec.read_latencies["out"]``, passed in the config)."""
    edge = RisingEdge(dut.clk)
    ro = ReadOnly()
    words = []
    for c in range(n + latency):
        await edge
        if c < n:
            dut.o_rd__addr.value = c
            dut.o_rd__en.value = 1
        else:
            dut.o_rd__en.value = 0
        await ro
        if c >= latency:
            words.append(_u(dut.o_rd__data))
    return words


@cocotb.test()
async def bench(dut):
    cfg, vec = load_bench()
    Clock(dut.clk, PERIOD_NS, unit="ns").start()
    dut.start.value = 0
    for b in ("a", *cfg["buffers"]):
        getattr(dut, f"{b}_wr__en").value = 0
    dut.o_rd__en.value = 0
    await reset(dut, dut.clk)
    t0 = time.perf_counter()
    load_cycles = await load_buffers(dut, [(b, vec[f"img_{b}"]) for b in cfg["buffers"]])
    t_load = time.perf_counter() - t0
    run_cycles, run_wall, outs, sim_cycles = [], 0.0, {}, load_cycles
    for r, run in enumerate(cfg["runs"]):
        t1 = time.perf_counter()
        sim_cycles += await load_buffers(dut, [("a", vec[f"img_a_{r}"])])
        t2 = time.perf_counter()
        cyc = await run_to_done(dut, run["m"], run["max_cycles"])
        t3 = time.perf_counter()
        words = await read_out(dut, run["out_words"], cfg["out_read_latency"])
        t4 = time.perf_counter()
        outs[f"out_{r}"] = hex_words(words)
        run_cycles.append(cyc)
        run_wall += t3 - t2
        t_load += (t2 - t1) + (t4 - t3)
        sim_cycles += cyc + 2 + len(words) + 1
    write_outputs(outs)
    write_result({"cycles": sum(run_cycles), "run_cycles": run_cycles, "load_cycles": load_cycles,
                  "sim_cycles": sim_cycles, "io_wall_s": t_load, "run_wall_s": run_wall,
                  "sim_wall_s": time.perf_counter() - t0,
                  "run_cycles_per_s": sum(run_cycles) / run_wall if run_wall > 0 else None})
