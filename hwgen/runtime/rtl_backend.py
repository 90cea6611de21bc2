"""The ``rtl`` accelerator backend: the generated Verilog of the RTL engines, run in
Verilator through the cocotb benches of ``sim/``.

``linear``: :class:`hwgen.rtl.matmul.MatmulEngine` of the node's
:class:`~hwgen.rtl.matmul.MatmulSpec` (the same spec object the cost model's
:class:`~hwgen.runtime.cost.CycleModel` reads its cycles from); its buffers are
filled with the spec's own packing functions (``pack_weights``, ``pack_x``),
the bench ``sim.bench_matmul`` loads them through the write ports, runs to
``done`` and reads ``out`` back, unpacked with ``unpack_out``. M above the
engine's ``max_m`` runs in several passes.

``attention``: one :class:`hwgen.rtl.attention.AttentionEngine` per node, shared
by its heads (the cost model counts one pass per head and batch row); each head
of each batch row is one bench run of ``sim.bench_attention`` with the beats
of :meth:`AttentionEngine.pack`. With a KV cache the engine's on-chip cache is
what attends: a bench run starts with an empty cache, so a decoding step replays
the cached tokens as a first pass (offset 0), then runs the new tokens at their
offset; the step's result and cycles are those of the last pass.

Every measured cycle count is kept (``measured``: node -> list of
``(model_cycles, measured_cycles)``) so the bench can compare the cost model's
prediction with the simulation, kernel by kernel. Verilog and Verilator builds
are cached by ``sim.runner`` (hash of the Verilog, simulator and version).
"""
from __future__ import annotations

import numpy as np

from ..ir import Graph, Node
from .backends import AccelBackend, AccelState
from .partition import DriverError


class RTLAccel(AccelBackend):
    name = "rtl"
    kernel_ops = ("linear", "attention")

    def __init__(self, graph: Graph, cycles=None, sim: str = "verilator"):
        super().__init__(graph)
        from .cost import CycleModel

        self.cycles = cycles if cycles is not None else CycleModel(graph)
        self.sim = sim
        self._verilog: dict[str, tuple[str, str]] = {}
        self.measured: dict[str, list[tuple[int, int]]] = {}

    def _hw(self, node: Node):
        eng = self.cycles._engine(node)
        if eng is None:
            raise DriverError(f"node '{node.name}' ({node.op}): no RTL engine")
        if node.name not in self._verilog:
            from sim.kernels import to_verilog

            if node.op == "linear":
                from ..rtl.matmul import MatmulEngine
                top, comp = eng.name, MatmulEngine(eng)
            else:
                top, comp = eng.name, eng
            self._verilog[node.name] = (top, to_verilog(comp, top))
        return eng, self._verilog[node.name]

    def prepare(self, nodes, say=None):
        super().prepare(nodes)
        for i, n in enumerate(nodes):
            if say:
                say(f"rtl: Verilog of kernel {i + 1}/{len(nodes)} ({n.name})")
            self._hw(n)

    def run(self, node, ins, offset, state: AccelState):
        if node.op == "linear":
            return self._linear(node, ins[0])
        return self._attention(node, ins, offset, state)

    def _linear(self, node: Node, x: np.ndarray) -> np.ndarray:
        from sim.protocol import hex_words
        from sim.runner import run_bench

        from ..rtl.matmul import IN_BUFFERS, linear_operands

        spec, (top, verilog) = self._hw(node)
        _, ops = linear_operands(self.graph, node)
        w, bias, shift = ops["w"], ops["bias"], ops["shift"]
        bitmap = spec.occupancy(w)
        images = dict(spec.pack_weights(w, bias, shift, bitmap))
        vectors = {f"img_{b}": hex_words(images[b]) for b in IN_BUFFERS if b != "a" and images.get(b)}
        x2 = np.asarray(x, dtype=np.int64).reshape(-1, spec.k)
        runs, model = [], []
        for r, r0 in enumerate(range(0, x2.shape[0], spec.max_m)):
            xa = x2[r0:r0 + spec.max_m]
            m = int(xa.shape[0])
            vectors[f"img_a_{r}"] = hex_words(spec.pack_x(xa))
            model.append(spec.cycles(m, bitmap))
            runs.append({"m": m, "out_words": m * spec.nt, "max_cycles": 4 * model[-1] + 1000})
        cfg = {"buffers": [b for b in IN_BUFFERS if b != "a" and images.get(b)], "runs": runs}
        res = run_bench(verilog, top, "sim.bench_matmul", vectors, cfg, sim=self.sim)
        outs = []
        for r, run in enumerate(runs):
            words = [int(str(h), 16) for h in res.get("outputs", {}).get(f"out_{r}", [])]
            if len(words) < run["out_words"]:
                raise DriverError(f"rtl: kernel '{top}' returned {len(words)} words in run {r}, "
                                  f"expected {run['out_words']}")
            outs.append(spec.unpack_out(words, run["m"]))
        self.measured.setdefault(node.name, []).append((sum(model), int(res["cycles"])))
        return np.concatenate(outs).reshape(*np.shape(x)[:-1], spec.n)

    def _attention(self, node: Node, ins, offset: int, state: AccelState) -> np.ndarray:
        from sim.protocol import hex_words
        from sim.runner import run_bench

        eng, (top, verilog) = self._hw(node)
        a = node.attrs
        heads, hd = int(a["heads"]), int(a["head_dim"])
        q, k, v = (np.asarray(t, dtype=np.int64) for t in ins[:3])
        mask = ins[3] if len(ins) > 3 and ins[3] is not None else None
        b, s, _ = q.shape
        hist = None
        off = 0
        if a.get("kv_cache"):
            off = offset
            hist = state.kv.get(node.name)
            if (hist is None and offset) or (hist is not None and hist[0].shape[1] != offset):
                raise DriverError(f"rtl: node '{node.name}': KV cache holds "
                                  f"{0 if hist is None else hist[0].shape[1]} positions, decoding at {offset}")
            qkv = np.concatenate([q, k, v], axis=-1)
            state.kv[node.name] = (qkv if hist is None else np.concatenate([hist[0], qkv], axis=1), None)
        out = np.zeros_like(q)
        for bi in range(b):
            valid = None if mask is None else (np.asarray(mask[bi]) != 0).astype(np.int64)
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                passes = []
                if hist is not None and off:
                    past = hist[0][bi]
                    dm = q.shape[-1]
                    passes.append({"q": past[:, sl], "k": past[:, dm:][:, sl], "v": past[:, 2 * dm:][:, sl],
                                   "offset": 0})
                passes.append({"q": q[bi][:, sl], "k": k[bi][:, sl], "v": v[bi][:, sl], "valid": valid,
                               "offset": off})
                beats, sizes, model = [], [], []
                for p in passes:
                    w = eng.pack(p["q"], p["k"], p["v"], p.get("valid"), p["offset"])
                    beats += w
                    sizes.append(len(w))
                    model.append(eng.cycles(len(w), p["offset"] + len(w)))
                cfg = {"passes": sizes, "valid_prob": 1.0, "ready_prob": 1.0, "seed": 0,
                       "max_cycles": sum(model) + 100 * len(passes) + 1000}
                res = run_bench(verilog, top, "sim.bench_attention", {"beats": hex_words(beats)}, cfg,
                                sim=self.sim)
                words = [int(str(x), 16) for x in res.get("outputs", {}).get("out", [])]
                last = words[sum(sizes[:-1]):]
                out[bi, :, sl] = eng.unpack(last)
                self.measured.setdefault(node.name, []).append((model[-1], int(res["pass_cycles"][-1])))
        return out
