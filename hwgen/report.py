"""``hwgen report OUT``: one self-contained HTML page of a flow's results.

Contract
--------
:func:`write_report` reads what ``hwgen flow`` left in ``OUT`` (``flow.json``
and ``results/<stage>.json``) and writes ``OUT/report.html`` plus the PNG
plots it embeds (``OUT/report/*.png``; the HTML carries them inline as
base64, so the one file can be mailed or archived on its own). Sections, each
an element with a stable ``id``:

``overview``     model, bit width, every stage with status, time and result
``accuracy``     cosine per transformer block and per bit width (plots + tables)
``bitexact``     per kernel and simulator/target: vectors compared, mismatches
``cycles``       per RTL kernel: cycles, ideal cycles, utilization (plot)
``resources``    per kernel: LUT, FF, DSP, BRAM and Fmax from ``hwgen impl``
``placement``    the host driver's plan: op, device, predicted time, bytes
``timeline``     the execution trace of ``hwgen run`` (plot of its Chrome trace)

A section whose stage did not run says so in words (never an empty table).
The page has no external resources and no scripts other than a small check
that records load errors (used by the headless-browser test).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

from .files import atomic_file

SECTIONS = ("overview", "accuracy", "bitexact", "cycles", "resources", "placement", "timeline")


class ReportError(ValueError):
    """The folder holds no flow results to report on."""


def _load(out: Path, stage: str) -> dict | None:
    p = out / "results" / f"{stage}.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None


def _e(v) -> str:
    return html.escape(str(v))


def _num(v, spec: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return _e(v)
    if isinstance(v, float) and not spec:
        spec = ".4f"
    if isinstance(v, int) and not spec and not isinstance(v, bool):
        spec = ","
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return _e(v)


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


class _Plots:
    """Matplotlib figures saved to ``OUT/report/`` and embedded as base64."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: list[Path] = []

    def add(self, fig, name: str, alt: str) -> str:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        data = buf.getvalue()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.png"
        path.write_bytes(data)
        self.files.append(path)
        b64 = base64.b64encode(data).decode()
        return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------

def _overview(out: Path, flow: dict) -> str:
    from .flow import FlowConfig, summary_rows

    cfg = flow.get("config", {})
    rows = summary_rows(FlowConfig(out=out), flow)
    table = _table(["stage", "status", "time", "result"],
                   [[_e(r["stage"]), f'<span class="st-{_e(r["status"])}">{_e(r["status"])}</span>',
                     "–" if r["wall_s"] is None else f"{r['wall_s']:.1f} s", _e(r["detail"])]
                    for r in rows])
    return (f"<p>Model <b>{_e(cfg.get('model', '?'))}</b>, bits <b>{_e(cfg.get('bits', '?'))}</b>, "
            f"kernels of layer {_e(cfg.get('layer', '?'))}, simulator {_e(cfg.get('sim', '?'))}, "
            f"part {_e(cfg.get('part', '?'))}.</p>" + table)


def _accuracy(res: dict | None, quant: dict | None, plots: _Plots) -> str:
    if res is None:
        return "<p>The accuracy stage did not run.</p>"
    plt = _pyplot()
    parts = []
    layers = res.get("layers", [])
    if layers:
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.bar([str(r["layer"]) for r in layers], [r["cosine_mean"] for r in layers], color="#3b6ea8",
               label="mean")
        ax.plot([str(r["layer"]) for r in layers], [r["cosine_min"] for r in layers], "o-", color="#c0392b",
                label="min")
        lo = min(r["cosine_min"] for r in layers)
        ax.set_ylim(max(0.0, lo - 0.02), 1.0005)
        ax.set_xlabel("transformer block")
        ax.set_ylabel("cosine vs float")
        ax.legend(loc="lower left")
        parts.append(plots.add(fig, "accuracy_layers", "cosine per transformer block"))
        parts.append(_table(["block", "output tensor", "cosine mean", "cosine min", "vectors"],
                            [[r["layer"], _e(r["tensor"]), _num(r["cosine_mean"]), _num(r["cosine_min"]),
                              _num(r["vectors"])] for r in layers]))
    bits = res.get("bits", [])
    if bits:
        fig, ax = plt.subplots(figsize=(6, 2.8))
        names = [r["bits"] for r in bits]
        ax.bar(names, [r["cosine_mean"] for r in bits], color="#5b8c5a", label="mean")
        ax.plot(names, [r["cosine_min"] for r in bits], "o-", color="#c0392b", label="min")
        ax.set_ylim(max(0.0, min(r["cosine_min"] for r in bits) - 0.02), 1.0005)
        ax.set_ylabel("output cosine vs float")
        ax.legend(loc="lower right")
        parts.append(plots.add(fig, "accuracy_bits", "cosine per bit width"))
        parts.append(_table(["bits", "cosine mean", "cosine min", "vectors"],
                            [[_e(r["bits"]), _num(r["cosine_mean"]), _num(r["cosine_min"]),
                              _num(r.get("eval_vectors"))] for r in bits]))
    if quant:
        parts.append(f"<p>The flow's graph ({_e(quant.get('bits'))}, {_num(quant.get('qat_steps'))} QAT "
                     f"steps): output cosine mean {_num(quant.get('cosine_mean'))}, min "
                     f"{_num(quant.get('cosine_min'))} over {_num(quant.get('eval_vectors'))} vectors.</p>")
    return "".join(parts) or "<p>No accuracy rows.</p>"


def _bitexact(results: dict[str, dict | None]) -> str:
    rows = []
    for stage, label in (("verify-hls", "HLS C-sim (g++)"), ("verify-rtl", "RTL")):
        r = results.get(stage)
        if r is None:
            rows.append([_e(label), "–", "–", "–", "stage did not run"])
            continue
        sim = r.get("simulator") or r.get("target")
        for k in r.get("kernels", []):
            mm = k.get("mismatches")
            cls = "ok" if mm == 0 else "bad"
            rows.append([_e(f"{label}: {sim}"), _e(k.get("name")), _num(k.get("vectors")),
                         f'<span class="{cls}">{_num(mm)}</span>', _e(k.get("shape", ""))])
    return _table(["target / simulator", "kernel", "output codes compared", "mismatches", "shape"], rows)


def _cycles(r: dict | None, plots: _Plots) -> str:
    if r is None or not r.get("kernels"):
        return "<p>RTL verification did not run, so there are no measured cycle counts.</p>"
    ks = [k for k in r["kernels"] if k.get("cycles") is not None]
    if not ks:
        return "<p>The RTL verification reported no cycle counts.</p>"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(ks) + 1))
    names = [k["name"] for k in ks]
    ax.barh(names, [k.get("utilization") or 0 for k in ks], color="#8e6bb8")
    ax.axvline(0.9, color="#c0392b", ls="--", lw=1)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("utilization = (MACs / PEs) / measured cycles")
    ax.invert_yaxis()
    img = plots.add(fig, "utilization", "utilization per kernel")
    tab = _table(["kernel", "shape", "cycles (measured)", "ideal cycles", "utilization"],
                 [[_e(k["name"]), _e(k.get("shape", "")), _num(k.get("cycles")), _num(k.get("ideal_cycles")),
                   _num(k.get("utilization"), ".3f")] for k in ks])
    return img + tab


def _resources(r: dict | None) -> str:
    if r is None:
        return "<p>The implementation stage did not run.</p>"
    cols = ["lut", "ff", "dsp", "bram", "fmax_mhz"]
    rows = []
    for k in r.get("kernels", []):
        rows.append([_e(k.get("name"))] + [_num(k.get(c), ".1f" if c == "fmax_mhz" and k.get(c) else "")
                                           for c in cols])
    rows.append(["<b>total</b>"] + [_num(r.get(c), ".1f" if c == "fmax_mhz" and r.get(c) else "")
                                    for c in cols])
    return (f"<p>Part {_e(r.get('part'))}.</p>"
            + _table(["kernel", "LUT", "FF", "DSP", "BRAM", "Fmax (MHz)"], rows))


def _placement(plan: dict | None, run: dict | None) -> str:
    if plan is None and run is None:
        return "<p>Neither the plan nor the run stage ran, so there is no placement plan.</p>"
    parts = []
    if plan is not None:
        parts.append(f"<p>Accelerator clock {_num(plan.get('clock_mhz'), '.1f')} MHz, link "
                     f"{_num(plan.get('link_gbps'), '.1f')} GB/s: predicted "
                     f"{_num((plan.get('predicted_s') or 0) * 1e3, '.2f')} ms per request "
                     f"({_num(plan.get('accel_cycles'))} accelerator cycles) vs "
                     f"{_num((plan.get('host_only_s') or 0) * 1e3, '.2f')} ms all on the host.</p>")
        rows = plan.get("rows") or []
        parts.append(_table(["node", "op", "device", "predicted (ms)", "cycles", "bytes moved"],
                            [[_e(p.get("node")), _e(p.get("op")), _e(p.get("device")),
                              _num((p.get("predicted_s") or 0) * 1e3, ".3f"), _num(p.get("cycles")),
                              _num(p.get("bytes"))] for p in rows]))
    if run is not None:
        pl = run.get("placement")
        if isinstance(pl, dict):
            parts.append("<p>What the run placed:</p>"
                         + _table(["op", "device counts"],
                                  [[_e(op), _e(", ".join(f"{d}: {n}" for d, n in v.items()) if isinstance(v, dict)
                                                else v)] for op, v in pl.items()]))
        facts = [f"<code>{k}</code> {_num(run[k])}" for k in
                 ("backend", "bytes_to_accel", "bytes_from_accel", "accel_cycles", "bitexact_vs_golden",
                  "cosine_vs_float", "wall_s") if k in run]
        parts.append("<p>" + ", ".join(facts) + "</p>")
    return "".join(parts)


def _timeline(r: dict | None, out: Path, plots: _Plots) -> str:
    trace = None
    if r is not None and r.get("trace"):
        p = Path(r["trace"])
        for cand in (p, out / p, out / p.name):
            if cand.is_file():
                trace = cand
                break
    if trace is None:
        return "<p>No execution trace (run <code>hwgen run ... --trace FILE</code>).</p>"
    try:
        ev = json.loads(trace.read_text())
    except ValueError:
        return f"<p>The trace {_e(trace)} is not valid JSON.</p>"
    events = ev.get("traceEvents", ev) if isinstance(ev, dict) else ev
    spans = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]
    if not spans:
        return "<p>The trace holds no complete events.</p>"
    plt = _pyplot()
    lanes = sorted({(str(e.get("pid")), str(e.get("tid"))) for e in spans})
    lane_of = {l: i for i, l in enumerate(lanes)}
    t0 = min(float(e["ts"]) for e in spans)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(lanes) + 1.2))
    colors = {}
    for e in spans:
        cat = e.get("cat", e.get("name", ""))
        c = colors.setdefault(cat, f"C{len(colors) % 10}")
        ax.barh(lane_of[(str(e.get("pid")), str(e.get("tid")))], float(e.get("dur", 0)) / 1e3,
                left=(float(e["ts"]) - t0) / 1e3, color=c, edgecolor="none")
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([f"{p}/{t}" for p, t in lanes])
    ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=7, loc="upper right")
    img = plots.add(fig, "timeline", "execution timeline")
    return img + f"<p>{len(spans)} events; open <code>{_e(trace)}</code> in Perfetto for detail.</p>"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}
.ok{color:#1e7b34;font-weight:bold}.bad{color:#b00020;font-weight:bold}
.st-failed,.st-skipped{color:#b00020}.st-ok,.st-cached{color:#1e7b34}
img.plot{max-width:100%;display:block;margin:.5em 0}
"""

# Records script errors and images that failed to decode on the body, so a
# headless browser's DOM dump shows whether the page rendered cleanly.
_CHECK = """
<script>
window.__errors=[];window.addEventListener('error',function(e){window.__errors.push(String(e.message||e.type))},true);
window.addEventListener('load',function(){
 var bad=[].filter.call(document.images,function(i){return !(i.complete&&i.naturalWidth>0)}).length;
 document.body.setAttribute('data-images',String(document.images.length));
 document.body.setAttribute('data-broken-images',String(bad));
 document.body.setAttribute('data-errors',String(window.__errors.length));
 document.body.setAttribute('data-rendered','yes');});
</script>
"""


def write_report(out: str | os.PathLike) -> dict:
    """Write ``OUT/report.html`` (and ``OUT/report/*.png``); returns a summary."""
    out = Path(out)
    flow_path = out / "flow.json"
    if not flow_path.is_file():
        raise ReportError(f"{out}: no flow.json; run `hwgen flow --out {out}` first")
    try:
        flow = json.loads(flow_path.read_text())
    except ValueError as e:
        raise ReportError(f"{flow_path}: not valid JSON ({e})") from None
    results = {s: _load(out, s) for s in ("quantize", "accuracy", "verify-hls", "verify-rtl",
                                           "impl", "plan", "run")}
    plots = _Plots(out / "report")
    body = {
        "overview": ("Overview", _overview(out, flow)),
        "accuracy": ("Accuracy per layer and per bit width",
                     _accuracy(results["accuracy"], results["quantize"], plots)),
        "bitexact": ("Bit-exact verification per kernel and simulator", _bitexact(results)),
        "cycles": ("Cycles and utilization per kernel", _cycles(results["verify-rtl"], plots)),
        "resources": ("Resources and Fmax", _resources(results["impl"])),
        "placement": ("Placement plan", _placement(results["plan"], results["run"])),
        "timeline": ("Execution timeline", _timeline(results["run"], out, plots)),
    }
    cfg = flow.get("config", {})
    sections = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>'
                       for sid, (title, content) in body.items())
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>hwgen report: {_e(cfg.get('model', out.name))}</title><style>{_CSS}</style>"
            f"{_CHECK}</head><body><h1>hwgen report: {_e(cfg.get('model', out.name))}</h1>"
            f"{sections}</body></html>")
    path = out / "report.html"
    with atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    present = [s for s, r in results.items() if r is not None]
    return {"report": str(path), "plots": [str(p) for p in plots.files], "sections": list(SECTIONS),
            "stages_with_results": present, "bytes": path.stat().st_size}
