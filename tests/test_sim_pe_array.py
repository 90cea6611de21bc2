"""cocotb bench of hwgen.rtl.PEArray on Verilator (random bubbles, tiles
shorter and longer than the drain, extreme operands) and
Icarus, every accumulator compared against contract.matmul_int, cycles
against PEArray.cycles."""
import numpy as np

from hwgen.rtl import PEArray
from hwgen.rtl.verify import _sim_package

_sim_package()
from sim.kernels import pe_array_bench  # noqa: E402


def _tiles(rows, cols, ks, seed=0):
    rng = np.random.default_rng(seed)
    tiles = [(rng.integers(-128, 128, (rows, k)), rng.integers(-128, 128, (k, cols))) for k in ks]
    k = 12  # extreme values: every product +2**14 or -2**14 + 1 ... sums at the accumulator's edge
    tiles.append((np.full((rows, k), -128), np.full((k, cols), -128)))
    tiles.append((np.full((rows, k), -128), np.full((k, cols), 127)))
    return tiles


def test_pe_array_verilator_and_icarus():
    """One Verilator build: random bubbles over tiles shorter and longer than
    the drain (the driver holds a tile end back until min_tile_gap cycles
    after the previous one; ``overrun`` must stay low), then one tile at full
    throughput (cycles == PEArray.cycles);
    the same tile on Icarus."""
    tiles = _tiles(4, 4, [1, 3, 4, 5, 9, 2])
    r = pe_array_bench(4, 4, 8, 8, 20, tiles, valid_prob=0.7, seed=3)
    print("pe_array verilator:", {k: r[k] for k in ("mismatches", "vectors", "cycles", "cycles_per_s")})
    assert r["vectors"] == len(tiles) * 4 * (4 + 2) + 1
    assert r["mismatches"] == 0, r["first_mismatches"]
    for sim in ("verilator", "icarus"):
        r = pe_array_bench(4, 4, 8, 8, 20, _tiles(4, 4, [9])[:1], sim=sim)
        assert r["mismatches"] == 0, (sim, r["first_mismatches"])
        assert r["cycles"] == PEArray.cycles(9, 4), sim
