"""sim.runner: the Verilator control file (only top ports public), the build
cache key, cache reuse, and the clear errors for a missing or broken
simulator and for a bench that ends without a result."""
import os

import numpy as np
import pytest

from hwgen.rtl import PEArray
from hwgen.rtl.verify import SimError, _sim_package

_sim_package()
from sim import runner  # noqa: E402
from sim.kernels import pe_array_bench, to_verilog  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


@pytest.fixture(scope="module")
def small_verilog():
    return to_verilog(PEArray(2, 2, 4, 4, 10), "pe_small")


def test_control_file_lists_only_top_ports(small_verilog):
    ports = runner.top_ports(small_verilog, "pe_small")
    assert sorted(ports) == sorted(["clk", "rst", "i__payload", "i__valid",
                                    "o__payload", "o__valid", "overrun"])
    vlt = runner.control_file(small_verilog, "pe_small")
    assert vlt.startswith("`verilator_config")
    assert vlt.count("public_flat_rw") == len(ports) and '-var "*"' not in vlt
    with pytest.raises(SimError, match="module 'nope' not found"):
        runner.top_ports(small_verilog, "nope")


def test_build_key_covers_source_simulator_and_waves(small_verilog):
    k = runner.build_key(small_verilog, "pe_small", "icarus", False)
    assert k == runner.build_key(small_verilog, "pe_small", "icarus", False)
    assert k != runner.build_key(small_verilog + "\n", "pe_small", "icarus", False)
    assert k != runner.build_key(small_verilog, "pe_small", "icarus", True)
    assert k != runner.build_key(small_verilog, "pe_small", "verilator", False)


def test_cached_build_is_reused(small_verilog, tmp_path):
    d1 = runner.build(small_verilog, "pe_small", "icarus", cache=tmp_path)
    stamp = (d1 / "built").stat().st_mtime_ns
    d2 = runner.build(small_verilog, "pe_small", "icarus", cache=tmp_path)
    assert d1 == d2 and (d2 / "built").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]


def test_icarus_waves_path_reported(tmp_path):
    rng = np.random.default_rng(0)
    r = pe_array_bench(2, 2, 4, 4, 10, [(rng.integers(-8, 8, (2, 3)), rng.integers(-8, 8, (3, 2)))],
                       sim="icarus", waves=True, cache=tmp_path)
    assert r["mismatches"] == 0
    assert r["waves"] and os.path.getsize(r["waves"]) > 0 and r["waves"].endswith(".fst")


def test_unknown_and_missing_simulators(monkeypatch, small_verilog, tmp_path):
    with pytest.raises(SimError, match="unknown simulator 'modelsim'"):
        runner.check_simulator("modelsim")
    runner.simulator_version.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SimError, match="Icarus Verilog is not installed.*apt-get install iverilog"):
        runner.build(small_verilog, "pe_small", "icarus", cache=tmp_path)
    monkeypatch.setenv("VERILATOR_ROOT", str(tmp_path))
    with pytest.raises(SimError, match="Verilator install at .* is broken"):
        runner.check_simulator("verilator")
    runner.simulator_version.cache_clear()


def test_bench_without_result_is_an_error(small_verilog, tmp_path):
    # vectors the bench cannot use: it raises inside the simulator, writes no result
    with pytest.raises(SimError, match="bench sim.bench_pe_array on 'pe_small' .*failed|without a result"):
        runner.run_bench(small_verilog, "pe_small", "sim.bench_pe_array", {"k": np.array([1])},
                         {"rows": 2}, sim="icarus", cache=tmp_path)


@pytest.mark.slow
def test_verilator_waves_path_reported(tmp_path):
    rng = np.random.default_rng(0)
    r = pe_array_bench(2, 2, 4, 4, 10, [(rng.integers(-8, 8, (2, 3)), rng.integers(-8, 8, (3, 2)))],
                       waves=True, cache=tmp_path)
    assert r["mismatches"] == 0 and r["waves"].endswith("dump.vcd") and os.path.getsize(r["waves"]) > 0
