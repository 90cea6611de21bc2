"""Host side of the per-kernel benches: build the component, its Verilog, the
vectors and config of :mod:`sim.protocol`, and run the cocotb bench module.

Every function returns the bench's result dict (``mismatches`` first) from
:func:`sim.runner.run_bench`; expected values come from the contract
(:mod:`hwgen.contract`, :mod:`hwgen.fixed`), never from the hardware.
"""
from __future__ import annotations

import numpy as np
from amaranth.back import verilog as amaranth_verilog

from hwgen import contract as C
from hwgen.fixed import requantize
from hwgen.rtl import PEArray, Requant

from .protocol import layout_fields
from .runner import run_bench


def to_verilog(component, top: str) -> str:
    """Amaranth's Verilog of ``component`` with module name ``top``."""
    return amaranth_verilog.convert(component, name=top, emit_src=False)


def _stream_fields(component, port: str) -> list[dict]:
    return layout_fields(getattr(component, port).payload.shape())


# ----------------------------------------------------------------------------- PEArray

def pe_array_bench(rows: int, cols: int, a_width: int, b_width: int, acc_width: int,
                   tiles: list[tuple[np.ndarray, np.ndarray]], sim: str = "verilator",
                   valid_prob: float = 1.0, ready_prob: float = 1.0, seed: int = 0,
                   waves: bool = False, component=None, say=lambda msg: None, **kw) -> dict:
    """Stream ``tiles`` (``(A[rows x K], B[K x cols])``) through a PEArray; the
    expected accumulators are ``contract.matmul_int(A, B)``. ``component``
    replaces the PEArray (the mutation test passes a wrong variant)."""
    dut = component if component is not None else PEArray(rows, cols, a_width, b_width, acc_width)
    a = np.concatenate([np.asarray(t[0]).T for t in tiles]).astype(np.int64)
    b = np.concatenate([np.asarray(t[1]) for t in tiles]).astype(np.int64)
    k = np.array([np.asarray(t[0]).shape[1] for t in tiles], np.int64)
    c = np.stack([C.matmul_int(np.asarray(t[0], np.int64), np.asarray(t[1], np.int64),
                               1 << (a_width + b_width)) for t in tiles])
    cfg = {"rows": rows, "cols": cols, "i": "i", "o": "o",
           "i_fields": _stream_fields(dut, "i"), "o_fields": _stream_fields(dut, "o"),
           "valid_prob": valid_prob, "ready_prob": ready_prob, "seed": seed,
           "max_cycles": 20 * (int(k.sum()) + len(tiles) * (rows + 2)) + 1000}
    top = f"pe_array_{rows}x{cols}"
    res = run_bench(to_verilog(dut, top), top, "sim.bench_pe_array",
                    {"a": a, "b": b, "k": k, "c": c}, cfg, sim=sim, waves=waves, say=say, **kw)
    res["ideal_cycles"] = int(k.sum()) + PEArray.LATENCY + rows - 1
    return res


# ----------------------------------------------------------------------------- Requant

def requant_bench(in_width: int, shift, out_width: int, codes: np.ndarray, out_signed: bool = True,
                  lanes: int = 1, registered: bool = True, sim: str = "verilator", waves: bool = False,
                  component=None, say=lambda msg: None, **kw) -> dict:
    """Feed ``codes`` (n x lanes accumulator codes) through a Requant, one row per
    cycle; expected: ``fixed.requantize`` with AP_RND / AP_SAT."""
    dut = component if component is not None else Requant(in_width, shift, out_width, out_signed,
                                                           lanes, registered)
    codes = np.asarray(codes, np.int64).reshape(-1, lanes)
    shifts = [shift] * lanes if isinstance(shift, int) else list(shift)
    want = np.stack([requantize(codes[:, l], s, out_width, 0, out_signed, "AP_RND", "AP_SAT")
                     for l, s in enumerate(shifts)], axis=1)
    cfg = {"lanes": lanes, "latency": 1 if registered else 0,
           "i_fields": layout_fields(dut.i.shape()), "o_fields": layout_fields(dut.o.shape())}
    top = f"requant_{lanes}x{in_width}_{out_width}" + ("_reg" if registered else "")
    return run_bench(to_verilog(dut, top), top, "sim.bench_requant",
                     {"x": codes, "y": want}, cfg, sim=sim, waves=waves, say=say, **kw)
