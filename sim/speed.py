"""Simulation speed: what the Python side of a cocotb bench costs.

The same :class:`~hwgen.rtl.matmul.MatmulEngine` (same Verilog, same memory
images) runs

* under cocotb on Verilator (:func:`sim.kernels.matmul_bench`): images loaded
  through the write ports with Python driving every cycle, then ``R`` runs of
  ``start`` .. ``done`` during which Python only awaits ``done``;
* under ``verilator --binary`` with a SystemVerilog testbench
  (:func:`sv_testbench`): the images read with ``$readmemh`` and written
  through the same ports, then the same ``R`` runs, no Python at all.

Reported: cycles/s of the cocotb run phase (``run_cycles_per_s``), of the
whole cocotb bench including the Python-driven loads and reads
(``bench_cycles_per_s``), of the binary (``binary_cycles_per_s``), and the
ratios binary / cocotb. Also the PE array streamed with Python driving
every beat (``stream_cycles_per_s``), the worst case.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from .runner import DEFAULT_CACHE, SimError, simulator_version, verilator_env, verilator_root

PERIOD_NS = 10


def sv_testbench(spec, top: str, images: dict[str, int], m: int, runs: int) -> str:
    """A SystemVerilog testbench: load every ``images`` buffer (``name -> words``)
    from ``<name>.hex`` through its write port, then ``runs`` x (start with
    ``m``, wait for done); prints the cycles of the runs."""
    lines = ["`timescale 1ns/1ps", "module tb;",
             "  reg clk = 0, rst = 1, start = 0;", f"  reg [{spec.ports()['m']['width'] - 1}:0] m = {m};",
             "  wire busy, done;", "  integer i, r, cyc, total;"]
    conns = [".clk(clk)", ".rst(rst)", ".start(start)", ".m(m)", ".busy(busy)", ".done(done)",
             ".o_rd__en(1'b0)", ".o_rd__addr('0)", ".o_rd__data()"]
    ports = spec.ports()
    for b in images:
        aw, dw = ports[f"{b}_wr__addr"]["width"], ports[f"{b}_wr__data"]["width"]
        lines += [f"  reg [{aw - 1}:0] {b}_addr = 0;", f"  reg [{dw - 1}:0] {b}_data = 0;",
                  f"  reg {b}_en = 0;", f"  reg [{dw - 1}:0] {b}_img [0:{max(1, images[b]) - 1}];"]
        conns += [f".{b}_wr__addr({b}_addr)", f".{b}_wr__data({b}_data)", f".{b}_wr__en({b}_en)"]
    for b in ("a", "w", "ent", "bias", "shift"):
        if b not in images and f"{b}_wr__en" in ports:
            conns += [f".{b}_wr__addr('0)", f".{b}_wr__data('0)", f".{b}_wr__en(1'b0)"]
    lines += ["  always #5 clk = ~clk;", f"  {top} dut({', '.join(conns)});", "  initial begin"]
    for b, n in images.items():
        lines += [f'    $readmemh("{b}.hex", {b}_img);']
    lines += ["    repeat (2) @(posedge clk);", "    rst <= 0;"]
    for b, n in images.items():
        lines += [f"    for (i = 0; i < {n}; i = i + 1) begin",
                  f"      @(posedge clk); {b}_addr <= i; {b}_data <= {b}_img[i]; {b}_en <= 1;",
                  "    end", f"    @(posedge clk); {b}_en <= 0;"]
    lines += ["    total = 0;", f"    for (r = 0; r < {runs}; r = r + 1) begin",
              "      @(posedge clk); start <= 1;", "      @(posedge clk); start <= 0; cyc = 1;",
              "      while (!done) begin @(posedge clk); cyc = cyc + 1; end",
              "      total = total + cyc;", "    end",
              '    $display("HWGEN_CYCLES %0d", total);', "    $finish;", "  end", "endmodule"]
    return "\n".join(lines) + "\n"


def binary_run(verilog: str, top: str, tb: str, hexes: dict[str, list[int]],
               cache: Path = DEFAULT_CACHE) -> dict:
    """Build (cached by the sources' hash) and run ``verilator --binary``; returns
    the cycles the testbench printed and the run's wall seconds."""
    key = hashlib.sha256((verilog + "\0" + tb + "\0" + simulator_version("verilator")).encode()).hexdigest()
    final = cache / f"binary-{top}-{key[:20]}"
    exe = final / "obj" / "Vtb"
    env = {**os.environ, **verilator_env()}
    if not exe.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".binary-", dir=cache))
        try:
            (tmp / f"{top}.v").write_text(verilog)
            (tmp / "tb.sv").write_text(tb)
            cmd = [str(verilator_root() / "bin" / "verilator"), "--binary", "-Wno-fatal", "-Wno-lint",
                   "-Wno-style", "--top-module", "tb", "-Mdir", str(tmp / "obj"), "-j", "2",
                   "tb.sv", f"{top}.v"]
            r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
            if r.returncode != 0 or not (tmp / "obj" / "Vtb").is_file():
                raise SimError(f"verilator --binary build failed:\n{(r.stderr or r.stdout)[-2000:]}")
            try:
                os.rename(tmp, final)
            except OSError:
                if not exe.is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    run_dir = Path(tempfile.mkdtemp(prefix="binary-run-", dir=cache))
    try:
        for b, words in hexes.items():
            (run_dir / f"{b}.hex").write_text("\n".join(format(int(w), "x") for w in words) + "\n")
        t0 = time.perf_counter()
        r = subprocess.run([str(exe)], cwd=run_dir, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    m = re.search(r"HWGEN_CYCLES (\d+)", r.stdout)
    if not m:
        raise SimError(f"the --binary testbench printed no cycle count:\n{(r.stdout + r.stderr)[-1000:]}")
    return {"cycles": int(m.group(1)), "wall_s": wall}


def matmul_speed(rows: int = 16, cols: int = 16, k: int = 384, n: int = 384, m: int = 128,
                 runs: int = 4, seed: int = 0, say=lambda msg: None) -> dict:
    """The comparison of the module docstring on one int8 engine (k x n weights, m rows)."""
    from hwgen.fixed import FixedType
    from hwgen.rtl.matmul import IN_BUFFERS, MatmulSpec

    from .kernels import matmul_bench, pe_array_bench, to_verilog

    rng = np.random.default_rng(seed)
    x8, w8 = FixedType(8, 3, True), FixedType(8, 0, True)
    out = FixedType(8, 3, True, "AP_RND", "AP_SAT")
    spec = MatmulSpec(rows=rows, cols=cols, k=k, n=n, max_m=m, x_fmt=x8, w_fmt=w8, out_fmt=out,
                      bias_lo=-4096, bias_hi=4096, shift_min=6, shift_max=10, name=f"speed_mm_{rows}x{cols}")
    from hwgen.rtl.matmul import MatmulEngine

    x = rng.integers(-128, 128, (m, k))
    w = rng.integers(-128, 128, (k, n))
    bias = rng.integers(-4096, 4097, n)
    shift = rng.integers(6, 11, n)
    verilog = to_verilog(MatmulEngine(spec), spec.name)
    say(f"cocotb + Verilator: {spec.name}, {runs} run(s) of m={m}, k={k}, n={n}")
    res = matmul_bench(spec, [x] * runs, w, bias, shift, verilog=verilog, say=say)
    images = dict(spec.pack_weights(w, bias, shift))
    images["a"] = spec.pack_x(x)
    order = [b for b in IN_BUFFERS if images.get(b)]
    tb = sv_testbench(spec, spec.name, {b: len(images[b]) for b in order}, m, runs)
    say("verilator --binary with a SystemVerilog testbench, same engine and images")
    t0 = time.perf_counter()
    binr = binary_run(verilog, spec.name, tb, {b: images[b] for b in order})
    build_bin = time.perf_counter() - t0 - binr["wall_s"]
    load_words = sum(len(images[b]) for b in order)
    bin_total = binr["cycles"] + load_words + 4
    say(f"cocotb + Verilator: {rows} x {cols} PE array streamed, Python drives every beat")
    stream = pe_array_bench(rows, cols, 8, 8, 32, [(rng.integers(-128, 128, (rows, 64)),
                                                    rng.integers(-128, 128, (64, cols))) for _ in range(64)])
    return {
        "engine": spec.name, "shape": [m, k, n], "runs": runs,
        "mismatches": res["mismatches"] + stream["mismatches"],
        "cycles": res["cycles"], "model_cycles": res["model_cycles"],
        "utilization": res["utilization"],
        "run_cycles_per_s": res["run_cycles_per_s"],
        "bench_cycles_per_s": res["sim_cycles"] / res["sim_wall_s"],
        "binary_cycles": binr["cycles"], "binary_cycles_per_s": bin_total / binr["wall_s"],
        "binary_wall_s": binr["wall_s"], "binary_build_s": build_bin,
        "ratio_binary_to_run": (bin_total / binr["wall_s"]) / res["run_cycles_per_s"],
        "ratio_binary_to_bench": (bin_total / binr["wall_s"]) / (res["sim_cycles"] / res["sim_wall_s"]),
        "stream_cycles_per_s": stream["cycles_per_s"],
        "ratio_binary_to_stream": (bin_total / binr["wall_s"]) / stream["cycles_per_s"],
        "cocotb_build_s": res["build_s"], "simulator_version": res["simulator_version"],
    }
