"""Host side of the per-kernel benches: build the component, its Verilog, the
vectors and config of :mod:`sim.protocol`, and run the cocotb bench module.

Every function returns the bench's result dict (``mismatches`` first) from
:func:`sim.runner.run_bench`; expected values come from the contract
(:mod:`hwgen.contract`, :mod:`hwgen.fixed`), never from the hardware.
"""
from __future__ import annotations

import numpy as np

from hwgen import contract as C
from hwgen.fixed import requantize
from hwgen.rtl import PEArray, Requant
from hwgen.rtl import verilog as hdl_verilog

from .protocol import layout_fields
from .runner import run_bench


def to_verilog(component, top: str) -> str:
    """Amaranth's Verilog of ``component`` with module name ``top``."""
    return hdl_verilog.convert(component, name=top, emit_src=False)


def _stream_fields(component, port: str) -> list[dict]:
    return layout_fields(getattr(component, port).payload.shape())


# ----------------------------------------------------------------------------- PEArray

def pe_array_bench(rows: int, cols: int, a_width: int, b_width: int, acc_width: int,
                   tiles: list[tuple[np.ndarray, np.ndarray]], sim: str = "verilator",
                   valid_prob: float = 1.0, seed: int = 0,
                   waves: bool = False, component=None, say=lambda msg: None, **kw) -> dict:
    """Stream ``tiles`` (``(A[rows x K], B[K x cols])``) through a PEArray with
    random bubbles (``valid_prob``); the expected accumulators are
    ``contract.matmul_int(A, B)``. ``component`` replaces the PEArray (the
    mutation test passes a wrong variant)."""
    dut = component if component is not None else PEArray(rows, cols, a_width, b_width, acc_width)
    a = np.concatenate([np.asarray(t[0]).T for t in tiles]).astype(np.int64)
    b = np.concatenate([np.asarray(t[1]) for t in tiles]).astype(np.int64)
    k = np.array([np.asarray(t[0]).shape[1] for t in tiles], np.int64)
    c = np.stack([C.matmul_int(np.asarray(t[0], np.int64), np.asarray(t[1], np.int64),
                               1 << (a_width + b_width)) for t in tiles])
    cfg = {"rows": rows, "cols": cols, "i": "i", "o": "o",
           "i_fields": _stream_fields(dut, "i"), "o_fields": _stream_fields(dut, "o"),
           "valid_prob": valid_prob, "seed": seed, "min_tile_gap": dut.min_tile_gap,
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


# ----------------------------------------------------------------------------- MatmulEngine

def matmul_bench(spec, x, w: np.ndarray, bias=None, shift=None, bitmap=None,
                 expected=None, sim: str = "verilator", waves: bool = False,
                 component=None, verilog: str | None = None, say=lambda msg: None, **kw) -> dict:
    """Run activations through a :class:`MatmulEngine` of ``spec`` loaded once with
    ``w``/``bias``/``shift`` (the engine's own packing functions build every
    image). ``x``: one (m x k) code array or a list of them (one engine run
    each); ``expected``: the golden (m x n) output codes, same structure
    (default: the contract, ``spec.reference``). Adds ``mismatches``/
    ``vectors``/``first_mismatches``, ``model_cycles`` (``spec.cycles``),
    ``ideal_cycles`` and ``utilization`` (ideal / measured cycles), summed over
    the runs, to the bench's result."""
    from hwgen.rtl.matmul import IN_BUFFERS, MatmulEngine

    from .protocol import Comparison, hex_words

    xs = [np.asarray(x, dtype=np.int64)] if not isinstance(x, (list, tuple)) else \
        [np.asarray(v, dtype=np.int64) for v in x]
    if expected is None:
        expected = [spec.reference(v, w, bias, shift) for v in xs]
    elif not isinstance(expected, (list, tuple)):
        expected = [expected]
    if bitmap is None:
        bitmap = spec.occupancy(w)
    images = dict(spec.pack_weights(w, bias, shift, bitmap))
    vectors = {f"img_{b}": hex_words(images[b]) for b in IN_BUFFERS if images.get(b)}
    runs, model, ideal = [], [], 0.0
    for r, v in enumerate(xs):
        m = int(v.shape[0])
        vectors[f"img_a_{r}"] = hex_words(spec.pack_x(v))
        model.append(spec.cycles(m, bitmap))
        ideal += spec.ideal_cycles(m)
        runs.append({"m": m, "out_words": m * spec.nt, "max_cycles": 4 * model[-1] + 1000})
    top = spec.name
    if verilog is None:
        dut = component if component is not None else MatmulEngine(spec)
        verilog = to_verilog(dut, top)
    cfg = {"buffers": [b for b in IN_BUFFERS if b != "a" and images.get(b)], "runs": runs,
           "out_read_latency": spec.read_latencies["out"]}
    res = run_bench(verilog, top, "sim.bench_matmul", vectors, cfg, sim=sim, waves=waves, say=say, **kw)
    outs = res.pop("outputs", {})
    cmp = Comparison()
    for r, (v, want) in enumerate(zip(xs, expected)):
        words = [int(str(h), 16) for h in outs.get(f"out_{r}", [])]
        m = int(v.shape[0])
        got = spec.unpack_out(words, m) if len(words) >= m * spec.nt else np.zeros((0,), np.int64)
        cmp.add(f"run{r}", want, got)
    res.update(cmp.as_dict())
    res.update({"shape": [int(xs[0].shape[0]), spec.k, spec.n], "runs": len(xs),
                "model_cycles": sum(model), "model_run_cycles": model, "ideal_cycles": ideal,
                "utilization": ideal / res["cycles"] if res.get("cycles") else None})
    return res


# ----------------------------------------------------------------------------- AttentionEngine

def attention_bench(engine, passes: list[dict], expected: list[np.ndarray], sim: str = "verilator",
                    valid_prob: float = 1.0, ready_prob: float = 1.0, seed: int = 0,
                    waves: bool = False, verilog: str | None = None, say=lambda msg: None,
                    **kw) -> dict:
    """Run ``passes`` (dicts of :meth:`AttentionEngine.pack` arguments: ``q``,
    ``k``, ``v`` (s_q x head_dim codes), ``valid``, ``offset``) through
    ``engine`` in order, sharing its KV cache; ``expected[p]``: the golden
    (s_q x head_dim) output codes of pass ``p``. Adds the comparison,
    ``model_cycles`` (sum of ``engine.cycles``), ``ideal_cycles`` and
    ``utilization`` to the bench's result."""
    from .protocol import Comparison, hex_words

    beats, sizes, model, ideal = [], [], [], 0
    for p in passes:
        w = engine.pack(p["q"], p["k"], p["v"], p.get("valid"), p.get("offset", 0))
        beats += w
        sizes.append(len(w))
        s_kv = p.get("offset", 0) + len(w)
        model.append(engine.cycles(len(w), s_kv))
        ideal += engine.ideal_cycles(len(w), s_kv)
    top = engine.name
    if verilog is None:
        verilog = to_verilog(engine, top)
    slack = 1 if valid_prob >= 1 and ready_prob >= 1 else int(4 / min(valid_prob, ready_prob))
    cfg = {"passes": sizes, "valid_prob": valid_prob, "ready_prob": ready_prob, "seed": seed,
           "max_cycles": slack * (sum(model) + 100 * len(passes)) + 1000}
    res = run_bench(verilog, top, "sim.bench_attention", {"beats": hex_words(beats)}, cfg,
                    sim=sim, waves=waves, say=say, **kw)
    words = [int(str(h), 16) for h in res.pop("outputs", {}).get("out", [])]
    cmp = Comparison()
    b = 0
    from hwgen.rtl import RTLError

    for i, (n, want) in enumerate(zip(sizes, expected)):
        try:
            got = engine.unpack(words[b:b + n])
        except RTLError:   # rows out of order / wrong last flags: every code of the pass counts
            got = np.zeros((0,), np.int64)
        cmp.add(f"pass{i}", want, got)
        b += n
    res.update(cmp.as_dict())
    res.update({"shape": [sizes, [p.get("offset", 0) + n for p, n in zip(passes, sizes)]],
                "model_cycles": sum(model), "model_pass_cycles": model, "ideal_cycles": ideal,
                "utilization": ideal / res["cycles"] if res.get("cycles") else None})
    return res
