"""``hwgen sweep``: design-space exploration over PE-array shapes, bit widths
and parallel engines.

Per bit width (once, cached): the model is quantized (:func:`hwgen.quant.quantize`)
and evaluated (:func:`hwgen.accuracy.evaluate`: ``cosine_mean``, and
perplexities for decoders). Per point ``(rows x cols, bits, engines)``:

* ``cycles``: the layer's exact cycles from the engines' manifests
  (:func:`hwgen.impl.roofline.design_cycles`), with ``engines`` matmul engines
  splitting every linear's N columns (each runs a spec with ``ceil(N /
  engines)`` columns) and attention heads spread over ``engines`` attention
  engines; the linears and the attention run one after the other;
* ``lut``, ``ff``, ``dsp``, ``bram``, ``fmax_mhz``: the tools' numbers
  (:func:`hwgen.impl.flow.implement_ecp5`) for one matmul engine of the
  point's shape running ``kernel`` (default the layer's largest linear), times
  ``engines`` (Fmax is that of one engine);
* ``latency_s = cycles / fmax``; ``resource_fraction`` = the largest of
  lut, ff, dsp, bram over what the part has (the binding resource).

Each point runs in its own worker (local processes by default, Ray tasks with
``--ray ADDRESS``) and its result is cached under ``.hwgen-cache/sweep/`` keyed
by a hash of the point, the model, the part, the tool versions and the hwgen
RTL/impl sources, so an interrupted sweep resumes without redoing finished
points. A point that fails (a shape the engine refuses, a design that does
not fit the part, a tool crash or timeout) is recorded with ``status:
"failed"`` and its ``reason``; the sweep goes on.

Outputs (folder replaced atomically): ``sweep.json``, ``sweep.csv`` and
``pareto.png`` (latency vs resource fraction, coloured by accuracy, the
Pareto-optimal points joined).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .parts import ImplError, parse_part

CSV_KEYS = ("rows", "cols", "bits", "engines", "status", "cycles", "fmax_mhz", "latency_s", "lut", "ff",
            "dsp", "bram", "resource_fraction", "accuracy", "pareto", "cached", "reason")


def cache_dir() -> Path:
    return Path(os.environ.get("HWGEN_CACHE", ".hwgen-cache")) / "sweep"


def _parse_list(text: str, what: str, conv) -> list:
    out = []
    for x in str(text).split(","):
        x = x.strip()
        if not x:
            continue
        try:
            out.append(conv(x))
        except (ValueError, TypeError):
            raise ImplError(f"--{what}: cannot read '{x}'") from None
    if not out:
        raise ImplError(f"--{what}: empty list")
    return out


def _shape(x: str) -> tuple[int, int]:
    mt = re.fullmatch(r"(-?\d+)x(-?\d+)", x.lower())
    if not mt:
        raise ValueError(x)
    return int(mt.group(1)), int(mt.group(2))


@dataclasses.dataclass
class SweepConfig:
    model: str = "bert-block"
    shapes: list = dataclasses.field(default_factory=lambda: [(4, 4), (8, 8)])
    bits: list = dataclasses.field(default_factory=lambda: ["w8a8"])
    engines: list = dataclasses.field(default_factory=lambda: [1])
    part: str = "LFE5U-85F"
    freq_mhz: float = 200.0
    seq: int | None = None
    kernel: str | None = None
    timeout: float = 3600.0
    layer: int = 0

    @classmethod
    def from_args(cls, a) -> "SweepConfig":
        from ..quant import QuantConfig

        bits = _parse_list(a.bits, "bits", str)
        for b in bits:
            QuantConfig.from_bits(b)  # names the bad one
        parse_part(a.part)
        return cls(model=a.model, shapes=_parse_list(a.shapes, "shapes", _shape), bits=bits,
                   engines=_parse_list(a.engines, "engines", int), part=a.part, freq_mhz=a.freq,
                   seq=a.seq, kernel=a.kernel, timeout=a.timeout)

    def points(self) -> list[dict]:
        return [{"rows": r, "cols": c, "bits": b, "engines": e}
                for (r, c), b, e in itertools.product(self.shapes, self.bits, self.engines)]


def _source_hash() -> str:
    """Hash of the sources that decide a point's numbers (RTL and this flow)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for sub in ("rtl", "impl"):
        for f in sorted((root / sub).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    for f in ("contract.py", "fixed.py"):
        h.update((root / f).read_bytes())
    return h.hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------
# per bit width: the quantized graph and its accuracy (cached)
# ----------------------------------------------------------------------------

def _zip_dir(d: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(d.iterdir()):
            z.write(f, f.name)
    return buf.getvalue()


def quantized(model: str, bits: str, say) -> tuple[bytes, dict]:
    """(the fixed graph folder as zip bytes, accuracy) for ``model`` at ``bits``."""
    from ..quant import QuantConfig

    key = hashlib.sha256(json.dumps([model, bits, _source_hash()]).encode()).hexdigest()[:16]
    d = cache_dir() / "graphs" / f"{re.sub(r'[^0-9A-Za-z_.-]', '_', model)}-{bits}-{key}"
    acc_f = d / "accuracy.json"
    if not acc_f.exists():
        from .. import zoo
        from ..accuracy import evaluate
        from ..files import atomic_directory
        from ..quant import quantize

        say(f"quantizing {model} {bits} (accuracy; once per bit width)")
        bundle = zoo.load(model)
        fixed, _ = quantize(bundle.graph, bundle.calib_feeds, QuantConfig.from_bits(bits))
        acc = evaluate(bundle, fixed)
        with atomic_directory(d) as tmp:
            fixed.save(tmp / "graph")
            (tmp / "accuracy.json").write_text(json.dumps(acc))
    return _zip_dir(d / "graph"), json.loads(acc_f.read_text())


def _accuracy_value(acc: dict) -> float:
    return float(acc["cosine_mean"])


# ----------------------------------------------------------------------------
# one point (runs in a worker process or a Ray task)
# ----------------------------------------------------------------------------

def _layer_cycles(graph, layer: int, seq: int, rows: int, cols: int, engines: int) -> int:
    from ..rtl.matmul import MatmulSpec
    from .roofline import design_cycles

    total = 0
    for n in graph.nodes:
        if n.layer != layer:
            continue
        if n.op == "linear":
            spec = MatmulSpec.for_linear(graph, n, rows=rows, cols=cols, max_m=seq)
            part = dataclasses.replace(spec, n=-(-spec.n // engines))
            total += part.cycles(seq)
    att = [k for k in design_cycles(graph, layer, seq, rows, cols)["kernels"] if k["op"] == "attention"]
    for k in att:
        if k["cycles"] is None:
            raise ImplError(f"attention '{k['name']}': {k['reason']}")
        per_head = k["cycles"] // k["heads"]
        total += -(-k["heads"] // engines) * per_head
    return total


def evaluate_point(point: dict, graph_zip: bytes, accuracy: dict, cfg: dict) -> dict:
    """Cycles, resources, Fmax of one point; never raises: a failure is a row
    with ``status: "failed"`` and its ``reason``."""
    from ..ir import Graph
    from ..rtl.matmul import MatmulEngine
    from ..rtl.pe_array import RTLError
    from .flow import implement_ecp5, kernel_verilog

    row = {**point, "status": "failed", "accuracy": _accuracy_value(accuracy)}
    t0 = time.perf_counter()
    try:
        part = parse_part(cfg["part"])
        for k in ("rows", "cols", "engines"):
            if not isinstance(point[k], int) or point[k] < 1:
                raise ImplError(f"{k} must be a positive integer, got {point[k]!r}")
        with tempfile.TemporaryDirectory(prefix="hwgen-sweep-") as tmp:
            with zipfile.ZipFile(io.BytesIO(graph_zip)) as z:
                z.extractall(tmp)
            graph = Graph.load(tmp)
        layer, seq = cfg["layer"], cfg["seq"]
        lins = [n for n in graph.nodes if n.layer == layer and n.op == "linear"]
        if not lins:
            raise ImplError(f"graph '{graph.name}' has no linear in layer {layer}")
        if cfg["kernel"]:
            node = graph.node(cfg["kernel"])
        else:
            node = max(lins, key=lambda n: graph.weights[n.inputs[1]].size)
        row["kernel"] = node.name
        row["cycles"] = _layer_cycles(graph, layer, seq, point["rows"], point["cols"], point["engines"])
        eng = MatmulEngine.for_linear(graph, node, rows=point["rows"], cols=point["cols"], max_m=seq)
        v = kernel_verilog(eng, part.device.dsp // point["engines"])  # each engine's share
        r = implement_ecp5(v, part, freq_mhz=cfg["freq_mhz"], timeout=cfg["timeout"])
        e = point["engines"]
        row.update({"fmax_mhz": r["fmax_mhz"], "lut": r["lut"] * e, "ff": r["ff"] * e,
                    "dsp": r["dsp"] * e, "bram": r["bram"] * e,
                    "critical_path": r["critical_path"]})
        dev = part.device
        row["resource_fraction"] = max(row["lut"] / dev.luts, row["ff"] / dev.ffs,
                                       row["dsp"] / dev.dsp, row["bram"] / dev.bram)
        if row["resource_fraction"] > 1:
            raise ImplError(f"{e} engines do not fit {part.name} (binding resource at "
                            f"{row['resource_fraction']:.0%})")
        row["latency_s"] = row["cycles"] / (r["fmax_mhz"] * 1e6)
        row["status"] = "ok"
        row.pop("reason", None)
    except (ImplError, RTLError, OSError, ValueError, KeyError) as e:
        row["reason"] = f"{type(e).__name__}: {e}" if not isinstance(e, (ImplError, RTLError)) else str(e)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


# ----------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------

def _point_key(point: dict, cfgd: dict, tools: dict, src: str) -> str:
    blob = json.dumps({"point": point, "cfg": cfgd, "tools": tools, "src": src}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _transient(row: dict) -> bool:
    """A failure worth retrying on the next run (not cached): timeouts, lost workers."""
    why = str(row.get("reason", ""))
    return row.get("status") != "ok" and ("timed out" in why or "ray task failed" in why)


def pareto(rows: list[dict]) -> None:
    """Mark ``pareto`` on ok rows no other ok row beats in both latency and
    resource fraction (ties kept)."""
    ok = [r for r in rows if r["status"] == "ok"]
    for r in rows:
        r["pareto"] = False
    for r in ok:
        r["pareto"] = not any(
            q is not r and q["latency_s"] <= r["latency_s"] and q["resource_fraction"] <= r["resource_fraction"]
            and (q["latency_s"] < r["latency_s"] or q["resource_fraction"] < r["resource_fraction"])
            for q in ok)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    if ok:
        xs = [r["resource_fraction"] * 100 for r in ok]
        ys = [r["latency_s"] * 1e3 for r in ok]
        sc = ax.scatter(xs, ys, c=[r["accuracy"] for r in ok], cmap="viridis", s=60, edgecolors="k")
        fig.colorbar(sc, ax=ax, label="accuracy (cosine mean vs float)")
        for r, x, y in zip(ok, xs, ys):
            ax.annotate(f"{r['rows']}x{r['cols']} {r['bits']} x{r['engines']}", (x, y), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        front = sorted((r for r in ok if r["pareto"]), key=lambda r: r["resource_fraction"])
        ax.plot([r["resource_fraction"] * 100 for r in front], [r["latency_s"] * 1e3 for r in front],
                "r--", lw=1, label="Pareto front")
        ax.legend(loc="upper right")
    failed = len(rows) - len(ok)
    ax.set_xlabel("resources: binding resource, % of the part")
    ax.set_ylabel("layer latency (ms)")
    ax.set_title(title + (f" ({failed} point(s) failed)" if failed else ""), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _run_local(tasks, jobs, on_done):
    if jobs == 1:
        for key, args in tasks:
            on_done(key, evaluate_point(*args))
        return
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        futs = {ex.submit(evaluate_point, *args): key for key, args in tasks}
        for f in as_completed(futs):
            on_done(futs[f], f.result())


def _run_ray(tasks, address, on_done):
    try:
        import ray
    except ImportError:
        raise ImplError("--ray needs the ray package: pip install ray") from None
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ImplError(f"cannot connect to the Ray cluster at '{address}': {e}") from None
    remote = ray.remote(num_cpus=1)(evaluate_point)
    refs = {remote.remote(*args): key for key, args in tasks}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                on_done(refs[ref], ray.get(ref))
            except ray.exceptions.RayError as e:  # a worker died: that point failed
                on_done(refs[ref], {"status": "failed", "reason": f"ray task failed: {e}"})


def run_sweep(cfg: SweepConfig, out, ray_address: str | None = None, jobs: int | None = None,
              say=None) -> dict:
    from ..files import atomic_directory
    from .flow import tool_versions

    say = say or (lambda m: None)
    t0 = time.perf_counter()
    part = parse_part(cfg.part)
    points = cfg.points()
    tools, src = tool_versions(), _source_hash()
    graphs = {}
    for b in cfg.bits:
        graphs[b] = quantized(cfg.model, b, say)
    seq = cfg.seq or 128
    cfgd = {"model": cfg.model, "part": part.name, "freq_mhz": cfg.freq_mhz, "seq": seq,
            "kernel": cfg.kernel, "timeout": cfg.timeout, "layer": cfg.layer}
    pdir = cache_dir() / "points"
    results, tasks = {}, []
    for p in points:
        key = _point_key(p, cfgd, tools, src)
        f = pdir / f"{key}.json"
        if f.exists():
            try:
                r = json.loads(f.read_text())
                r["cached"] = True
                results[key] = r
                continue
            except ValueError:
                pass
        g, acc = graphs[p["bits"]]
        tasks.append((key, (p, g, acc, cfgd)))
    say(f"{len(points)} point(s): {len(points) - len(tasks)} cached, {len(tasks)} to run "
        + (f"on Ray at {ray_address}" if ray_address else f"on {jobs or os.cpu_count()} local worker(s)"))
    point_of = {_point_key(p, cfgd, tools, src): p for p in points}

    def on_done(key, row):
        row = {**point_of[key], **row, "cached": False}
        results[key] = row
        if not _transient(row):
            _atomic_write(pdir / f"{key}.json", json.dumps(row))  # resume point
        say(f"{row['rows']}x{row['cols']} {row['bits']} x{row['engines']}: {row['status']}"
            + (f", {row['cycles']} cycles at {row['fmax_mhz']} MHz, {row['lut']} LUT, {row['dsp']} DSP"
               if row["status"] == "ok" else f" ({row.get('reason')})"))

    if tasks:
        if ray_address:
            _run_ray(tasks, ray_address, on_done)
        else:
            _run_local(tasks, max(1, min(jobs or os.cpu_count() or 1, len(tasks))), on_done)
    rows = [results[_point_key(p, cfgd, tools, src)] for p in points]
    pareto(rows)
    with atomic_directory(out) as tmp:
        (tmp / "sweep.json").write_text(json.dumps({"config": cfgd, "points": rows}, indent=1))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_KEYS})
        (tmp / "sweep.csv").write_text(buf.getvalue())
        plot(rows, tmp / "pareto.png", f"{cfg.model} layer {cfg.layer}, seq {seq}, {part.name}")
    ok = [r for r in rows if r["status"] == "ok"]
    best = min(ok, key=lambda r: r["latency_s"]) if ok else None
    return {"out": str(out), "points": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
            "cached": sum(1 for r in rows if r.get("cached")), "part": part.name, "seq": seq,
            "pareto": [{k: r[k] for k in ("rows", "cols", "bits", "engines", "latency_s",
                                          "resource_fraction", "accuracy")} for r in rows if r["pareto"]],
            "fastest": None if best is None else {k: best[k] for k in ("rows", "cols", "bits", "engines",
                                                                        "cycles", "fmax_mhz", "latency_s")},
            "failures": [{k: r.get(k) for k in ("rows", "cols", "bits", "engines", "reason")}
                         for r in rows if r["status"] != "ok"],
            "files": ["sweep.json", "sweep.csv", "pareto.png"], "ray": ray_address,
            "wall_s": round(time.perf_counter() - t0, 1)}
