"""The host driver: one fixed graph, run with its kernels on an accelerator backend and
the rest on the torch host backend.

:class:`Driver` partitions the graph (:mod:`hwgen.runtime.partition`), builds
what the accelerator backend needs once, and runs requests segment by segment.
Every tensor lives on the host, on the accelerator, or both; a node whose input
is only on the other side pulls it across the link: the codes are packed into
the link's word format (:mod:`hwgen.runtime.pack`), the bytes counted, and the
consumer gets the unpacked codes. Weights of accelerator nodes are loaded once
(``weight_bytes``) and stay resident.

:meth:`Driver.run` runs one request; :meth:`Driver.run_many` runs several
with one host worker and one accelerator worker thread, so one request's host
segment runs while the accelerator works on another's (the trace shows it);
:meth:`Driver.generate` decodes with a KV cache.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..devices import torch_device
from ..golden import check_feeds
from ..ir import Graph, Node
from . import cost as cost_mod
from .backends import AccelState, make_backend
from .pack import DEFAULT_BUS_BITS, pack, tensor_format, unpack
from .partition import ACCEL, HOST, DriverError, counts, place, segments
from .torch_ops import HostState, TorchHost, to_device, to_numpy
from .trace import Tracer


def check_device(device: str) -> torch.device:
    """The host device of ``--device`` (:func:`hwgen.devices.torch_device`), as a
    :class:`DriverError`."""
    try:
        return torch_device(device, "--device")
    except ValueError as e:
        raise DriverError(str(e)) from None


@dataclass
class DecodeState:
    """Positions consumed so far and the KV caches of both sides."""

    offset: int = 0
    host: HostState = field(default_factory=HostState)
    accel: AccelState = field(default_factory=AccelState)


@dataclass
class RunStats:
    bytes_to_accel: int = 0
    bytes_from_accel: int = 0
    transfers: int = 0
    accel_cycles: int | None = 0
    node_s: dict[str, float] = field(default_factory=dict)

    def add(self, other: "RunStats") -> None:
        self.bytes_to_accel += other.bytes_to_accel
        self.bytes_from_accel += other.bytes_from_accel
        self.transfers += other.transfers
        if self.accel_cycles is None or other.accel_cycles is None:
            self.accel_cycles = None
        else:
            self.accel_cycles += other.accel_cycles
        for k, v in other.node_s.items():
            self.node_s[k] = self.node_s.get(k, 0.0) + v


class _Request:
    """One request in flight: its values on each side, its state and statistics."""

    def __init__(self, feeds: dict, state: DecodeState, tag: str):
        self.host: dict[str, torch.Tensor] = {}
        self.accel: dict[str, np.ndarray] = {}
        self.state = state
        self.stats = RunStats()
        self.tag = tag
        self.dims: dict[str, int] = {}
        self.feeds = feeds


class Driver:
    """Runs one fixed graph across the torch host and an accelerator backend.

    ``backend``: ``golden`` | ``hls`` | ``rtl``; ``device``: the host backend's torch
    device (``cpu`` | ``cuda``); ``accel_ops``/``force``: placement
    (:func:`hwgen.runtime.partition.place`); ``bus_bits``: link word width;
    ``cycles``: the accelerator's cycle model (:class:`hwgen.runtime.cost.CycleModel`).
    """

    def __init__(self, graph: Graph, backend: str = "golden", device: str = "cpu",
                 accel_ops: tuple[str, ...] | None = None, force: dict[str, str] | None = None,
                 bus_bits: int = DEFAULT_BUS_BITS, cycles: "cost_mod.CycleModel | None" = None,
                 tracer: Tracer | None = None, say=None):
        self.graph = graph
        self.device = check_device(device)
        self.cycles = cycles if cycles is not None else cost_mod.CycleModel(graph)
        self.accel = make_backend(backend, graph, self.cycles)
        self.backend = backend
        self.placement = place(graph, self.accel.kernel_ops, accel_ops, force)
        self.segments = segments(graph, self.placement)
        self.host = TorchHost(graph, self.device)
        self.bus_bits = bus_bits
        self.tracer = tracer
        self._accel_lane = f"accel ({backend})"
        self._host_lane = f"host ({self.device.type})"
        accel_nodes = [n for n in graph.nodes if self.placement[n.name] == ACCEL]
        self.accel.prepare(accel_nodes, say=say)
        self.weight_bytes = sum(
            tensor_format(graph, t, bus_bits).nbytes(int(graph.weights[t].size))
            for n in accel_nodes for t in n.inputs if t and graph.tensors[t].kind == "weight")

    # -- placement summary -----------------------------------------------------
    def placement_counts(self) -> dict[str, dict[str, int]]:
        return counts(self.graph, self.placement)

    def new_state(self) -> DecodeState:
        return DecodeState()

    # -- data movement ---------------------------------------------------------
    def _lane_event(self, lane, name, t0, t1, **args):
        if self.tracer is not None:
            self.tracer.add(lane, name, t0 - self.tracer.t0, t1 - self.tracer.t0, **args)

    def _over_link(self, req: _Request, name: str, codes: np.ndarray) -> tuple[np.ndarray, int]:
        """``codes`` of tensor ``name`` packed to bus words and unpacked on the far
        side (what arrives), and the bytes that crossed; one transfer counted."""
        fmt = tensor_format(self.graph, name, self.bus_bits)
        words = pack(codes, fmt)
        req.stats.transfers += 1
        return unpack(words, fmt, codes.size).reshape(codes.shape), words.size * 8

    def _to_accel(self, req: _Request, name: str) -> np.ndarray:
        t0 = time.perf_counter()
        arr, nbytes = self._over_link(req, name, to_numpy(req.host[name]))
        req.stats.bytes_to_accel += nbytes
        req.accel[name] = arr
        self._lane_event("link", f"to accel: {name}", t0, time.perf_counter(), bytes=nbytes,
                         direction="to_accel", request=req.tag)
        return arr

    def _to_host(self, req: _Request, name: str) -> torch.Tensor:
        t0 = time.perf_counter()
        arr, nbytes = self._over_link(req, name, req.accel[name])
        req.stats.bytes_from_accel += nbytes
        t = to_device(arr, self.device)
        req.host[name] = t
        self._lane_event("link", f"to host: {name}", t0, time.perf_counter(), bytes=nbytes,
                         direction="to_host", request=req.tag)
        return t

    # -- executing -------------------------------------------------------------
    def _start(self, feeds: dict, state: DecodeState | None, tag: str) -> _Request:
        feeds = check_feeds(self.graph, feeds)
        req = _Request(feeds, state if state is not None else DecodeState(), tag)
        for k, v in feeds.items():
            req.host[k] = to_device(v, self.device)
        first = feeds[self.graph.inputs[0]]
        req.dims = {"B": int(first.shape[0]), "S": int(first.shape[1]) if first.ndim > 1 else 1}
        return req

    def _run_node(self, req: _Request, node: Node) -> None:
        g = self.graph
        dev = self.placement[node.name]
        if dev == HOST:
            ins = [None if not t or g.tensors[t].kind == "weight" else
                   (req.host[t] if t in req.host else self._to_host(req, t)) for t in node.inputs]
            t0 = time.perf_counter()
            out = self.host.run(node, ins, req.state.offset, req.state.host)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            req.host[node.outputs[0]] = out
            self._lane_event(self._host_lane, node.name, t0, t1, op=node.op, request=req.tag)
        else:
            ins = [None if not t else g.weights[t] if g.tensors[t].kind == "weight" else
                   (req.accel[t] if t in req.accel else self._to_accel(req, t)) for t in node.inputs]
            t0 = time.perf_counter()
            out = self.accel.run(node, ins, req.state.offset, req.state.accel)
            t1 = time.perf_counter()
            req.accel[node.outputs[0]] = np.asarray(out, dtype=np.int64)
            cyc = self.cycles.node_cycles(node, req.dims, req.state.offset)
            if cyc is None or req.stats.accel_cycles is None:
                req.stats.accel_cycles = None
            else:
                req.stats.accel_cycles += cyc
            self._lane_event(self._accel_lane, node.name, t0, t1, op=node.op, request=req.tag,
                             cycles=cyc)
        req.stats.node_s[node.name] = req.stats.node_s.get(node.name, 0.0) + (t1 - t0)

    def _finish(self, req: _Request) -> dict[str, np.ndarray]:
        outs = {}
        for name in self.graph.outputs:
            t = req.host[name] if name in req.host else self._to_host(req, name)
            outs[name] = to_numpy(t).astype(np.int64)
        req.state.offset += req.dims["S"]
        return outs

    def run(self, feeds: dict, state: DecodeState | None = None, tag: str = "0"
            ) -> tuple[dict[str, np.ndarray], RunStats]:
        """One request: outputs (integer codes, NumPy) and its statistics."""
        req = self._start(feeds, state, tag)
        with torch.no_grad():
            for seg in self.segments:
                for node in seg.nodes:
                    self._run_node(req, node)
            return self._finish(req), req.stats

    def run_many(self, feed_list: list[dict], states: list[DecodeState] | None = None
                 ) -> tuple[list[dict[str, np.ndarray]], RunStats]:
        """Several independent requests, pipelined over a host and an accelerator worker:
        while the accelerator runs one request's segment, the host runs another's."""
        if states is None:
            states = [DecodeState() for _ in feed_list]
        reqs = [self._start(f, s, str(i)) for i, (f, s) in enumerate(zip(feed_list, states))]
        queues = {HOST: queue.Queue(), ACCEL: queue.Queue()}
        done = threading.Event()
        remaining = [len(reqs)]
        errors: list[BaseException] = []
        lock = threading.Lock()
        results: list[dict | None] = [None] * len(reqs)

        def submit(i: int, seg_idx: int) -> None:
            if seg_idx == len(self.segments):
                results[i] = self._finish(reqs[i])
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
                return
            queues[self.segments[seg_idx].device].put((i, seg_idx))

        def worker(dev: str) -> None:
            with torch.no_grad():
                while not done.is_set():
                    try:
                        i, si = queues[dev].get(timeout=0.05)
                    except queue.Empty:
                        continue
                    try:
                        for node in self.segments[si].nodes:
                            self._run_node(reqs[i], node)
                        submit(i, si + 1)
                    except BaseException as e:  # noqa: BLE001 -- re-raised in the caller
                        errors.append(e)
                        done.set()

        threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in (HOST, ACCEL)]
        for t in threads:
            t.start()
        for i in range(len(reqs)):
            submit(i, 0)
        if not reqs:
            done.set()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        total = RunStats()
        for r in reqs:
            total.add(r.stats)
        return results, total

    # -- decoding ----------------------------------------------------------------
    def generate(self, prompt_ids: list[int], max_new_tokens: int, ctx: int
                 ) -> tuple[list[int], list[np.ndarray], np.ndarray, RunStats]:
        """Greedy decoding with the KV cache: prefill the prompt, then one token per step.

        Mirrors ``models/tiny_gpt.py:generate_ids``: when the cache is full (``ctx``
        positions), the last ``ctx // 2`` tokens are fed again from position 0.
        Returns the new token ids, the last-position logits codes of every step, the
        prefill's output codes and the summed statistics."""
        total = RunStats()
        state = DecodeState()
        name = self.graph.outputs[0]

        def step(feed: np.ndarray, restart: bool, label: str) -> np.ndarray:
            nonlocal state
            if restart:
                state = DecodeState()
            outs, st = self.run({self.graph.inputs[0]: feed}, state, label)
            total.add(st)
            return outs[name]

        new, logits_seen, prefill = greedy_decode(step, prompt_ids, max_new_tokens, ctx)
        return new, logits_seen, prefill, total


def greedy_decode(step, prompt_ids: list[int], max_new_tokens: int, ctx: int
                  ) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """The greedy decoding loop with a KV cache of ``ctx`` positions, once for
    every executor: ``step(feed, restart, label)`` runs ids ``feed`` (``[1, S]``)
    on the cache (a fresh one when ``restart``) and returns the output codes
    ``[1, S, V]``. The prompt (its last ``ctx`` ids) is the prefill; each step
    feeds the argmax of the last logits; when the cache is full the last
    ``ctx // 2`` tokens are fed again from position 0 (as
    ``models/tiny_gpt.py:generate_ids``). Returns the new ids, the last-position
    logits codes of every step and the prefill's output codes."""
    ids = list(prompt_ids)
    feed = np.asarray([ids[-ctx:]], dtype=np.int64)
    out = prefill = step(feed, True, "prefill")
    offset = feed.shape[1]
    new: list[int] = []
    seen: list[np.ndarray] = []
    for i in range(max_new_tokens):
        last = out[0, -1]
        seen.append(last)
        nxt = int(np.argmax(last))
        new.append(nxt)
        ids.append(nxt)
        restart = offset >= ctx
        feed = np.asarray([ids[-(ctx // 2):]] if restart else [[nxt]], dtype=np.int64)
        out = step(feed, restart, f"step {i}")
        offset = feed.shape[1] if restart else offset + 1
    return new, seen, prefill
