"""cocotb bench of hwgen.rtl.matmul.MatmulEngine: buffers loaded through the
write ports, run to ``done`` without Python in the loop, results read back
and compared code by code with the contract (MatmulSpec.reference) and with
the golden model on a real quantized linear; cycles equal MatmulSpec.cycles.
Corner cases: m not dividing the array, m = 1, an empty weight block,
saturating outputs (extreme codes), per-column shifts."""
import numpy as np

from hwgen.fixed import FixedType
from hwgen.golden import GoldenModel
from hwgen.rtl.matmul import MatmulSpec
from hwgen.rtl.verify import _sim_package

_sim_package()
from sim.kernels import matmul_bench  # noqa: E402

X8 = FixedType(8, 2, True)
W8 = FixedType(8, 0, True)
O8 = FixedType(8, 3, True, "AP_RND", "AP_SAT")


def test_matmul_corners_verilator():
    spec = MatmulSpec(rows=4, cols=4, k=20, n=10, max_m=12, x_fmt=X8, w_fmt=W8, out_fmt=O8,
                      bias_lo=-100, bias_hi=100, shift_min=3, shift_max=7, block_k=8,
                      name="matmul_corners")
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (20, 10))
    w[8:16, 4:8] = 0                               # one empty block: no beats issued for it
    bias = rng.integers(-100, 101, 10)
    shift = rng.integers(3, 8, 10)
    x = rng.integers(-128, 128, (7, 20))           # m = 7: not a multiple of rows
    x[0] = -128                                    # extreme codes: outputs saturate
    x[1] = 127
    res = matmul_bench(spec, x, w, bias, shift)
    print("matmul corners (verilator):", {k: res[k] for k in ("mismatches", "vectors", "cycles",
                                                               "model_cycles", "utilization")})
    want = spec.reference(x, w, bias, shift)
    assert (want == O8.max_code).any() and (want == O8.min_code).any()   # saturation exercised
    assert res["vectors"] == 70 and res["mismatches"] == 0, res["first_mismatches"]
    assert res["cycles"] == res["model_cycles"]


def test_tiny_decoder_linear_icarus_vs_golden(tiny_decoder_fixed):
    g = tiny_decoder_fixed
    node = next(n for n in g.nodes if n.op == "linear" and n.layer == 0 and n.name.endswith("linear")
                and g.tensors[n.outputs[0]].shape[-1] == 32)       # fc1: 16 -> 32
    vals = GoldenModel(g, workers=1)({"ids": np.array([[3, 1, 4, 1, 5]])}, record=True)
    x, y = vals[node.inputs[0]][0], vals[node.outputs[0]][0]
    spec = MatmulSpec.for_linear(g, node, rows=4, cols=4, max_m=8, block_k=8)
    from hwgen.rtl.matmul import linear_operands
    _, ops = linear_operands(g, node)
    # two runs on one load of the weights: the sequence (m = 5 on 4 rows), then a single token
    res = matmul_bench(spec, [x, x[:1]], ops["w"], ops["bias"], ops["shift"], expected=[y, y[:1]],
                       sim="icarus")
    print("tiny decoder fc1 (icarus):", {k: res[k] for k in ("mismatches", "vectors", "run_cycles")})
    assert res["vectors"] == y.size + y.shape[1] and res["mismatches"] == 0, res["first_mismatches"]
    assert res["run_cycles"] == res["model_run_cycles"] == [spec.cycles(5), spec.cycles(1)]


def test_matmul_rounding_ties_verilator():
    """Every output an exact rounding tie (+-0.5 LSB after the shift, both signs):
    identity weights, zero bias, per-column shifts 3..7 (same engine build as above)."""
    spec = MatmulSpec(rows=4, cols=4, k=20, n=10, max_m=12, x_fmt=X8, w_fmt=W8, out_fmt=O8,
                      bias_lo=-100, bias_hi=100, shift_min=3, shift_max=7, block_k=8,
                      name="matmul_corners")
    shift = np.array([3, 4, 5, 6, 7, 3, 4, 5, 6, 7])
    w = np.zeros((20, 10), np.int64)
    w[np.arange(10), np.arange(10)] = 1
    q = np.array([-3, -2, -1, 0, 1, 2])[:, None]
    x = np.zeros((6, 20), np.int64)
    x[:, :10] = np.clip(q * (1 << shift) + (1 << (shift - 1)), -128, 127)
    ties = (x[:, :10] % (1 << shift)) == (1 << (shift - 1))
    assert ties.mean() >= 0.75          # the rest clip at the int8 range
    res = matmul_bench(spec, x, w, np.zeros(10, np.int64), shift)
    assert res["vectors"] == 60 and res["mismatches"] == 0, res["first_mismatches"]
