"""The HLS target of ``hwgen gen`` and ``hwgen verify``.

:func:`plan` picks the nodes of a fixed graph that have an HLS kernel and emits
them, plus one block top (:mod:`hwgen.hls.block`) per layer whose nodes all
have kernels; :func:`golden_io` records every kernel's input and output codes
with the golden model (for decoders with a KV cache: a prefill call and
:data:`DECODE_STEPS` single-token calls, in order, so the cache-owning kernels
see the same call sequence as the golden model's state); :func:`write_project`
writes a Vitis HLS project folder (kernel headers, one synthesis top
``<name>.cpp`` per kernel, one testbench, golden vectors, ``run_hls.tcl`` and
``manifest.json``) atomically; :func:`verify` C-simulates the kernels with g++
(:func:`hwgen.hls.csim.run_kernels`) and counts mismatches.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..files import atomic_directory
from ..ir import Graph, Node
from .block import block_io, emit_block
from .csim import run_kernels, write_vectors
from .emit import DEFAULT_PAR, HLS_OPS, HLSError, KernelSources, emit_node, emit_testbench, emit_top

DEFAULT_PART = "xcu250-figd2104-2L-e"
DEFAULT_CLOCK_NS = 5.0
TB_FILE = "hwgen_tb.cpp"
TCL_FILE = "run_hls.tcl"
MANIFEST_FILE = "manifest.json"
#: eval inputs for verify: first N sentences (minilm)
MINILM_SENTENCES = 4
#: tiny-gpt: the first eval-corpus line with at least this many characters
GPT_MIN_LINE = 32
#: decoders (KV cache): golden vectors are a prefill call and this many single-token calls
DECODE_STEPS = 4


def plan(graph: Graph, layer: int | None = None, par: int = DEFAULT_PAR, max_seq: int | None = None,
         blocks: bool = True) -> tuple[list[KernelSources], list[dict]]:
    """Kernels for every node (of ``layer``) that has one, then (``blocks``) one block
    top per layer whose nodes all have kernels, and the nodes skipped:
    ``{name, op, reason}``. ``par``: the parallelism setting of every kernel;
    ``max_seq``: S_MAX of the attention kernels (KV cache: its capacity)."""
    if not graph.is_fixed:
        raise HLSError(f"graph '{graph.name}' is a float graph; quantize it first (`hwgen quantize`)")
    kernels: list[KernelSources] = []
    skipped: list[dict] = []
    nodes = graph.layer_nodes(layer, HLSError)
    for node in nodes:
        if node.op not in HLS_OPS:
            skipped.append({"name": node.name, "op": node.op,
                            "reason": f"op '{node.op}' has no HLS kernel"})
            continue
        try:
            kernels.append(emit_node(graph, node, par, max_seq))
        except HLSError as e:
            skipped.append({"name": node.name, "op": node.op, "reason": str(e)})
    if blocks:
        bad = {s["name"] for s in skipped}
        layers = sorted({n.layer for n in nodes if n.layer is not None})
        for ly in layers:
            if any(n.name in bad for n in graph.nodes if n.layer == ly):
                continue
            kernels.append(emit_block(graph, ly, par, max_seq)[0])
    names = [k.name for k in kernels]
    if len(set(names)) != len(names):
        raise HLSError(f"node names collide as C identifiers: {names}")
    return kernels, skipped


# ----------------------------------------------------------------------------- inputs

def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise HLSError(f"{path}: cannot read inputs ({e})") from None


def builtin_feeds(graph: Graph) -> tuple[dict[str, np.ndarray], str]:
    """The graph's built-in evaluation inputs (one batch) and a description."""
    from .. import zoo

    model = str(graph.meta.get("model", "") or "")
    key = zoo._ALIASES.get(model.lower())
    if key is None and model.endswith(".pt"):
        key = "tiny-gpt"
    if key == "minilm":
        path = zoo.DATA_DIR / "sentences_eval.txt"
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()][:MINILM_SENTENCES]
        return zoo.feeds_from_text(model, "\n".join(lines)), f"{len(lines)} sentences of {path.name}"
    if key == "tiny-gpt":
        path = zoo.DATA_DIR / "tiny_corpus_eval.txt"
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        line = next((ln for ln in lines if len(ln) >= GPT_MIN_LINE), lines[0] if lines else "")
        return zoo.feeds_from_text(model, line), f"one line of {path.name}"
    if not model:
        raise HLSError(f"graph '{graph.name}' names no model (meta 'model'); give --inputs FILE.npz "
                       f"with one array per graph input {graph.inputs}")
    try:
        bundle = zoo.load(model)
    except Exception as e:  # noqa: BLE001 -- any load failure: ask for inputs
        raise HLSError(f"cannot load model '{model}' for its calibration inputs ({e}); give --inputs "
                       f"FILE.npz with one array per graph input {graph.inputs}") from None
    if not bundle.calib_feeds:
        raise HLSError(f"model '{model}' has no calibration inputs; give --inputs FILE.npz")
    return bundle.calib_feeds[0], f"calibration inputs of {model}"


def kernel_inputs(node: Node, vals: dict[str, np.ndarray], reset: bool = True):
    """A kernel's inputs as :func:`run_csim` takes them, from recorded golden values
    (``reset``: a KV-cache attention call that starts a new sequence)."""
    if node.op == "attention" and node.attrs.get("kv_cache"):
        return tuple(vals[t] for t in node.inputs[:3]) + (reset,)
    if node.op == "attention":
        return tuple(vals[t] for t in node.inputs[:4] if t)
    if node.op == "add":
        return (vals[node.inputs[0]], vals[node.inputs[1]])
    return vals[node.inputs[0]]


def stateful(graph: Graph) -> bool:
    return any(n.op == "attention" and n.attrs.get("kv_cache") for n in graph.nodes)


def decode_calls(graph: Graph, feeds: dict[str, np.ndarray], steps: int = DECODE_STEPS) -> list[dict]:
    """The golden calls for ``feeds``: one call, or for a decoder with a KV cache a
    prefill over all but the last ``steps`` positions and one call per remaining position."""
    if not stateful(graph):
        return [feeds]
    s = int(np.asarray(feeds[graph.inputs[0]]).shape[1])
    p = max(1, s - steps)
    calls = [{k: np.asarray(v)[:, :p] for k, v in feeds.items()}]
    calls += [{k: np.asarray(v)[:, t:t + 1] for k, v in feeds.items()} for t in range(p, s)]
    return calls


def golden_io(graph: Graph, kernels: list[KernelSources], feeds: dict[str, np.ndarray] | list[dict]):
    """Node name -> kernel inputs and -> output codes, from golden runs with record=True.

    ``feeds``: one feed dict (a decoder with a KV cache is split by :func:`decode_calls`)
    or an explicit list of calls made in order with one :class:`~hwgen.golden.GoldenState`.
    With several calls every value is a list (one entry per call)."""
    from ..golden import GoldenModel, GoldenState

    calls = feeds if isinstance(feeds, list) else decode_calls(graph, feeds)
    model, state = GoldenModel(graph), GoldenState()
    xs: dict = {ks.node: [] for ks in kernels}
    ys: dict = {ks.node: [] for ks in kernels}
    for i, call in enumerate(calls):
        vals = model(call, state=state, record=True)
        for ks in kernels:
            if ks.op == "block":
                x, y = block_io(ks, vals, reset=(i == 0))
            else:
                node = graph.node(ks.node)
                x, y = kernel_inputs(node, vals, reset=(i == 0)), np.asarray(vals[node.outputs[0]])
            xs[ks.node].append(x)
            ys[ks.node].append(y)
    if len(calls) == 1:
        return {k: v[0] for k, v in xs.items()}, {k: v[0] for k, v in ys.items()}
    return xs, ys


def first_batch(feeds: dict[str, np.ndarray], n: int = 1) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[:n] for k, v in feeds.items()}


# ----------------------------------------------------------------------------- gen

def _formats(graph: Graph, ks: KernelSources) -> dict:
    fmt = lambda t: str(graph.tensors[t].fmt) + (" per channel" if graph.tensors[t].per_channel else "")
    if ks.op == "block":
        ports = ks.meta["ports"]
        return {"inputs": {t: fmt(t) for t in ports.inputs}, "output": {t: fmt(t) for t in ports.outputs}}
    return _node_formats(graph, graph.node(ks.node))


def _node_formats(graph: Graph, node: Node) -> dict:
    data = [t for t in node.inputs[:1 if node.op in ("linear", "layernorm", "gelu") else
                                    (2 if node.op == "add" else 3)] if t]
    fmt = lambda t: str(graph.tensors[t].fmt) + (" per channel" if graph.tensors[t].per_channel else "")
    return {"inputs": {t: fmt(t) for t in data}, "output": {node.outputs[0]: fmt(node.outputs[0])}}


def emit_tcl(kernels: list[KernelSources], part: str, clock_ns: float, with_vectors: set[str],
             graph_name: str) -> str:
    lines = [f"# {TCL_FILE} -- Vitis HLS script generated by hwgen for graph '{graph_name}'",
             f"# usage: vitis_hls -f {TCL_FILE}",
             "# One project (hls_<kernel>) per kernel: C simulation against the golden vectors,",
             "# synthesis, C/RTL co-simulation and export as an IP catalog core.",
             "set here [file dirname [file normalize [info script]]]",
             "cd $here",
             ""]
    for ks in kernels:
        flags = "-I$here -std=c++14"
        macro = f"HWGEN_TOP_{ks.name.upper()}"
        argv = f"{ks.name} {ks.name}.in {ks.name}.out {ks.name}.golden"
        lines += [f"# ---- {ks.name}: node '{ks.node}' ({ks.op})",
                  f"open_project -reset hls_{ks.name}",
                  f"set_top {ks.name}_top",
                  f'add_files {ks.name}.cpp -cflags "{flags}"',
                  f'add_files -tb {TB_FILE} -cflags "{flags} -D{macro}"']
        if ks.name in with_vectors:
            lines += [f"add_files -tb vectors/{ks.name}.in", f"add_files -tb vectors/{ks.name}.golden"]
        lines += ["open_solution -reset solution1 -flow_target vivado",
                  f"set_part {{{part}}}",
                  f"create_clock -period {clock_ns:g} -name default"]
        if ks.name in with_vectors:
            lines.append(f'csim_design -argv "{argv}"')
        else:
            lines.append("# csim_design: no golden vectors were written (give `hwgen gen --inputs`)")
        lines.append("csynth_design")
        if ks.name in with_vectors:
            lines.append(f'cosim_design -argv "{argv}"')
        else:
            lines.append("# cosim_design: no golden vectors were written")
        lines += ["export_design -format ip_catalog", "close_project", ""]
    lines.append("exit")
    return "\n".join(lines) + "\n"


def write_project(graph: Graph, kernels: list[KernelSources], skipped: list[dict], out: str | os.PathLike,
                  part: str = DEFAULT_PART, clock_ns: float = DEFAULT_CLOCK_NS,
                  vectors: tuple[dict, dict] | None = None, inputs_note: str | None = None) -> dict:
    """Write the project folder ``out`` atomically; returns the manifest."""
    if not kernels:
        raise HLSError(f"graph '{graph.name}': no node has an HLS kernel "
                       f"(skipped: {', '.join(s['name'] for s in skipped) or 'none'})")
    if clock_ns <= 0:
        raise HLSError(f"--clock-ns must be positive, got {clock_ns}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise HLSError(f"{out} exists and is not an hwgen HLS project; choose another --out "
                       "(an existing project folder is replaced)")
    with atomic_directory(out) as tmp:
        files: dict[str, str] = {}
        for ks in kernels:
            files.update(ks.files)
            files[f"{ks.name}.cpp"] = emit_top(ks)
        files[TB_FILE] = emit_testbench(kernels)
        with_vectors: set[str] = set()
        rows: dict[str, int] = {}
        if vectors is not None:
            xs, ys = vectors
            (tmp / "vectors").mkdir()
            for ks in kernels:
                rows[ks.name] = write_vectors(ks, xs[ks.node], ys[ks.node], tmp / "vectors" / ks.name)
                with_vectors.add(ks.name)
        files[TCL_FILE] = emit_tcl(kernels, part, clock_ns, with_vectors, graph.name)
        manifest = {"graph": graph.name, "target": "hls", "part": part, "clock_ns": clock_ns,
                    "testbench": TB_FILE, "tcl": TCL_FILE, "inputs": inputs_note, "kernels": [],
                    "skipped": skipped}
        for ks in kernels:
            entry = {"name": ks.name, "node": ks.node, "op": ks.op, "top": f"{ks.name}_top",
                     "files": sorted(ks.files) + [f"{ks.name}.cpp"], "formats": _formats(graph, ks)}
            if ks.op == "block":
                entry["chains"] = ks.meta["kernels"]
            if ks.op == "linear":   # the MAC loop's trip count per row, and the blocks it visits
                entry.update({key: ks.meta[key] for key in ("mac_iterations", "mac_iterations_dense",
                                                            "blocks")})
            if ks.name in with_vectors:
                entry["vectors"] = {"in": f"vectors/{ks.name}.in", "golden": f"vectors/{ks.name}.golden",
                                    "records": rows[ks.name]}
            manifest["kernels"].append(entry)
        files[MANIFEST_FILE] = json.dumps(manifest, indent=1)
        for name, text in files.items():
            (tmp / name).write_text(text)
    manifest["files"] = sum(1 for p in out.rglob("*") if p.is_file())
    return manifest


# ----------------------------------------------------------------------------- verify

def all_files(kernels: list[KernelSources], tb: str = TB_FILE) -> dict[str, str]:
    """Every kernel's files and one testbench over all of them."""
    files: dict[str, str] = {}
    for ks in kernels:
        files.update(ks.files)
    files[tb] = emit_testbench(kernels)
    return files


def _mismatches(got, want) -> tuple[int, int]:
    gs, ws = (got, want) if isinstance(want, list) else ([got], [want])
    bad = size = 0
    for g, w in zip(gs, ws):
        w = np.asarray(w)
        size += int(w.size)
        bad += int((g != w).sum()) if np.shape(g) == w.shape else int(w.size)
    return bad, size


def fit_seq(graph: Graph, kernels: list[KernelSources], feeds: dict[str, np.ndarray], layer: int | None,
            par: int = DEFAULT_PAR) -> list[KernelSources]:
    """``kernels`` again with S_MAX raised to the feeds' sequence length where an
    attention kernel (or a block) would hold fewer positions."""
    s = int(np.asarray(feeds[graph.inputs[0]]).shape[1]) if graph.inputs else 0
    short = [k for k in kernels if k.op in ("attention", "block") and k.meta["s_max"] < s]
    if not short:
        return kernels
    return plan(graph, layer, par, max_seq=s, blocks=any(k.op == "block" for k in kernels))[0]


def _first_mismatches(graph: Graph, ks: KernelSources, x, y, got, limit: int = 5) -> list[dict]:
    """The first mismatching output codes of one kernel, with the operands and
    the contract's intermediates (:mod:`hwgen.mismatch`) for kernels of one graph
    node called once; for block tops and multi-call (decoding) kernels the
    output (``call<i>``), index, expected and actual codes only."""
    from ..mismatch import Comparison, explain

    if not isinstance(y, list) and ks.node in {n.name for n in graph.nodes}:
        acts = list(x) if isinstance(x, tuple) else [x]
        return explain(graph, ks.node, acts, y, got, limit)["first"]
    cmp = Comparison(limit)
    for call, (yy, gg) in enumerate(zip(*((y, got) if isinstance(y, list) else ([y], [got])))):
        cmp.add(f"call{call}", yy, gg)
    return cmp.first


def verify(graph: Graph, kernels: list[KernelSources], feeds: dict[str, np.ndarray],
           par: int = DEFAULT_PAR, say=lambda msg: None, layer: int | None = None) -> list[dict]:
    """C-simulate ``kernels`` on the golden model's recorded inputs; one report per kernel."""
    say(f"golden model on {', '.join(f'{k} {list(np.shape(v))}' for k, v in feeds.items())}"
        + (f", as a prefill and {DECODE_STEPS} single-token decoding steps" if stateful(graph) else ""))
    kernels = fit_seq(graph, kernels, feeds, layer, par)
    xs, ys = golden_io(graph, kernels, feeds)
    say(f"C-simulating {len(kernels)} kernel(s) with g++ (one binary, cached by its sources' hash)")
    outs = run_kernels(kernels, all_files(kernels), xs)
    report = []
    for ks in kernels:
        bad, size = _mismatches(outs[ks.node], ys[ks.node])
        entry = {"name": ks.name, "node": ks.node, "op": ks.op, "vectors": size, "mismatches": bad}
        if bad:
            entry["first_mismatches"] = _first_mismatches(graph, ks, xs[ks.node], ys[ks.node], outs[ks.node])
            for e in entry["first_mismatches"][:3]:
                say(f"  mismatch in {ks.name} at {e['index']}: expected {e['expected']}, got {e['actual']}"
                    + (f"; contract {e['contract']}" if e.get("contract") else ""))
        report.append(entry)
        say(f"  {ks.name:24s} {ks.op:10s} {size:8d} codes  mismatches {bad}")
    return report
