"""``hwgen flow``: every stage of hwgen in order, on one model, into one folder.

Contract
--------
``run_flow(cfg)`` runs the stages of :data:`STAGES` in order (quantize →
accuracy → gen hls → gen rtl → verify hls → verify rtl → impl → plan →
run). Each
stage is one ``hwgen`` verb, called in-process with the argv shown in the
summary, so a stage of the flow does exactly what the verb does by hand.

Reuse: a stage's *key* is a SHA-256 over its argv, the content of every file
it reads (the graph folder, for the stages after quantize) and the content of
the ``hwgen`` package's own sources. A stage whose key equals the key recorded
in ``OUT/flow.json`` after a successful run is not run again; its recorded
result is reused. Any change to the model, the options, the graph or the
code reruns the stages it affects and those after them.

Output folder ``OUT``:

``graph/``            the fixed graph (``hwgen quantize``)
``hls/``, ``rtl/``    the generated kernels (``hwgen gen``)
``results/<stage>.json``  each stage's JSON result (what the verb prints)
``flow.json``         per stage: key, status, wall seconds, argv
``report.html``       written by ``hwgen report OUT`` (not by the flow)

Stages that fail (a mismatch, a tool error) are recorded as ``failed`` with
their message; later stages that need their output are ``skipped``; the flow
goes on with the rest and exits 1 at the end if anything failed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .files import atomic_file

PACKAGE_DIR = Path(__file__).resolve().parent


class FlowError(ValueError):
    """A flow request that cannot run (bad option, unwritable folder)."""


@dataclass
class FlowConfig:
    """What the flow runs on, and how."""

    model: str = "minilm"
    out: Path = Path("build/minilm")
    bits: str = "w8a8"
    layer: int = 0
    qat_steps: int = 0
    sim: str = "verilator"
    rows: int = 16
    cols: int = 16
    part: str = "LFE5U-85F"
    impl_kernels: str = ""          # comma-separated nodes for impl ("": all of the layer's)
    impl_max_m: int = 0             # impl buffers' tokens per call (0: the verb's default)
    backend: str = "golden"
    text: str = "hwgen turns transformer blocks into verified FPGA kernels."
    sweep_bits: tuple[str, ...] = ("w4a8", "w8a8", "w8a16")
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    force: bool = False

    def __post_init__(self):
        self.out = Path(self.out)


@dataclass(frozen=True)
class Stage:
    """One step: ``argv(cfg)`` is the hwgen command line it runs; ``needs`` the
    earlier stages whose output it must have; ``reads_graph`` whether the graph
    folder's content is part of its key, ``reads(cfg)`` other files that are
    (when present); ``summary(result)`` the key numbers."""

    name: str
    argv: Callable[[FlowConfig], list[str]]
    needs: tuple[str, ...] = ()
    reads_graph: bool = True
    summary: Callable[[dict], str] = field(default=lambda r: "")
    reads: Callable[[FlowConfig], list[Path]] = field(default=lambda c: [])


def _graph(cfg: FlowConfig) -> str:
    return str(cfg.out / "graph")


def _array(cfg: FlowConfig) -> list[str]:
    return ["--rows", str(cfg.rows), "--cols", str(cfg.cols)]


def _impl_result(cfg: FlowConfig) -> Path:
    return cfg.out / "results" / "impl.json"


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _verify_summary(r: dict) -> str:
    ks = r.get("kernels", [])
    s = f"{len(ks)} kernels, {r.get('vectors', sum(k.get('vectors', 0) for k in ks)):,} codes, " \
        f"{r.get('mismatches')} mismatches"
    utils = [k["utilization"] for k in ks if k.get("utilization") is not None]
    if utils:
        s += f", utilization {min(utils):.3f}..{max(utils):.3f}"
    return s


STAGES: tuple[Stage, ...] = (
    Stage("quantize",
          lambda c: ["quantize", "--model", c.model, "--bits", c.bits, "--out", _graph(c),
                     "--qat-steps", str(c.qat_steps)],
          reads_graph=False,
          summary=lambda r: f"{r['bits']}: cosine mean {_fmt(r.get('cosine_mean'))} "
                            f"min {_fmt(r.get('cosine_min'))}"
                            + (f", ppl {r['ppl_float']:.4f} -> {r['ppl_quant']:.4f}"
                               if r.get("ppl_float") else "")),
    Stage("accuracy",
          lambda c: ["accuracy", "--graph", _graph(c), "--bits", ",".join(c.sweep_bits)],
          needs=("quantize",),
          summary=lambda r: "per layer " + " ".join(f"{x['cosine_mean']:.4f}" for x in r["layers"])),
    Stage("gen-hls",
          lambda c: ["gen", "--graph", _graph(c), "--target", "hls", "--out", str(c.out / "hls"),
                     "--layer", str(c.layer)],
          needs=("quantize",),
          summary=lambda r: f"{len(r['kernels'])} kernels, {r.get('files')} files"),
    Stage("gen-rtl",
          lambda c: ["gen", "--graph", _graph(c), "--target", "rtl", "--out", str(c.out / "rtl"),
                     "--layer", str(c.layer)] + _array(c),
          needs=("quantize",),
          summary=lambda r: f"{len(r['kernels'])} kernels"),
    Stage("verify-hls",
          lambda c: ["verify", "--graph", _graph(c), "--target", "hls", "--layer", str(c.layer)],
          needs=("quantize",),
          summary=_verify_summary),
    Stage("verify-rtl",
          lambda c: ["verify", "--graph", _graph(c), "--target", "rtl", "--layer", str(c.layer),
                     "--sim", c.sim] + _array(c),
          needs=("quantize",),
          summary=_verify_summary),
    Stage("impl",
          lambda c: ["impl", "--graph", _graph(c), "--part", c.part, "--layer", str(c.layer)] + _array(c)
                    + (["--kernels", c.impl_kernels] if c.impl_kernels else [])
                    + (["--max-m", str(c.impl_max_m)] if c.impl_max_m else []),
          needs=("quantize",),
          summary=lambda r: f"{_fmt(r.get('fmax_mhz'), '.1f')} MHz, {r.get('lut')} LUT, "
                            f"{r.get('dsp')} DSP, {r.get('bram')} BRAM"),
    Stage("plan",
          lambda c: ["plan", "--graph", _graph(c)]
                    + (["--prompt" if c.model == "tiny-gpt" else "--text", c.text])
                    + (["--impl", str(_impl_result(c))] if _impl_result(c).is_file() else []),
          needs=("quantize",),
          reads=lambda c: [_impl_result(c)],
          summary=lambda r: f"{r.get('accel_cycles'):,} accel cycles at {r.get('clock_mhz')} MHz, "
                            f"predicted {r.get('predicted_s', 0) * 1e3:.1f} ms vs host only "
                            f"{r.get('host_only_s', 0) * 1e3:.1f} ms"),
    Stage("run",
          lambda c: ["run", "--graph", _graph(c), "--backend", c.backend,
                     "--trace", str(c.out / "trace.json")]
                    + (["--prompt", c.text] if c.model == "tiny-gpt" else ["--text", c.text]),
          needs=("quantize",),
          summary=lambda r: f"{r.get('backend')}: bit-exact {r.get('bitexact_vs_golden')}, "
                            f"cosine {_fmt(r.get('cosine_vs_float'))}, "
                            f"{r.get('accel_cycles')} accel cycles"),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


# ----------------------------------------------------------------------------
# content hashes
# ----------------------------------------------------------------------------

def _hash_tree(h, root: Path, suffixes: tuple[str, ...] | None = None) -> None:
    """Feed every file under ``root`` (sorted relative paths and bytes) into ``h``."""
    if root.is_file():
        h.update(root.read_bytes())
        return
    for p in sorted(root.rglob("*")):
        if not p.is_file() or "__pycache__" in p.parts:
            continue
        if suffixes and p.suffix not in suffixes:
            continue
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())


_SOURCE_DIGEST: str | None = None


def source_digest() -> str:
    """SHA-256 of the hwgen package's sources: code changes invalidate stages."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        h = hashlib.sha256()
        _hash_tree(h, PACKAGE_DIR, (".py", ".cpp", ".h", ".tcl", ".sv", ".v", ".vlt"))
        sim = PACKAGE_DIR.parent / "sim"
        if sim.is_dir():
            _hash_tree(h, sim, (".py", ".sv", ".v", ".vlt"))
        _SOURCE_DIGEST = h.hexdigest()
    return _SOURCE_DIGEST


def stage_key(stage: Stage, cfg: FlowConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([stage.name, stage.argv(cfg)]).encode())
    h.update(source_digest().encode())
    if stage.reads_graph:
        g = Path(_graph(cfg))
        if g.is_dir():
            _hash_tree(h, g)
    for f in stage.reads(cfg):
        if Path(f).exists():
            _hash_tree(h, Path(f))
    return h.hexdigest()


# ----------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------

def _load_record(out: Path) -> dict:
    p = out / "flow.json"
    if not p.is_file():
        return {"stages": {}}
    try:
        rec = json.loads(p.read_text())
        return rec if isinstance(rec.get("stages"), dict) else {"stages": {}}
    except (OSError, ValueError):
        return {"stages": {}}


def _write_json(path: Path, obj) -> None:
    """Write JSON through a temporary file and a rename (never half-written)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))


def run_verb(argv: list[str], quiet: bool = True) -> tuple[dict, int]:
    """Run one hwgen verb in-process: (its JSON result, its exit status).

    hwgen's own errors raise (the caller records them); stdout of the verb is
    captured so that only the flow's own lines reach the terminal."""
    from .cli import build_parser

    args = build_parser().parse_args(argv + ["--json"] + (["--quiet"] if quiet else []))
    with contextlib.redirect_stdout(io.StringIO()):
        res = args.fn(args)
    code = 0
    if isinstance(res, tuple):
        res, code = res
    return res, code


def _selected(cfg: FlowConfig) -> list[Stage]:
    for n in (*cfg.only, *cfg.skip):
        if n not in STAGE_NAMES:
            raise FlowError(f"unknown stage '{n}'; stages are: {', '.join(STAGE_NAMES)}")
    return [s for s in STAGES if (not cfg.only or s.name in cfg.only) and s.name not in cfg.skip]


def run_flow(cfg: FlowConfig, say: Callable[[str], None] | None = None,
             quiet_verbs: bool = True) -> dict:
    """Run (or reuse) every selected stage; returns the flow record."""
    say = say or (lambda m: None)
    stages = _selected(cfg)
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlowError(f"cannot create output folder {cfg.out}: {e}") from None
    record = _load_record(cfg.out)
    old = record["stages"]
    status: dict[str, str] = {}
    t_flow = time.perf_counter()
    for i, st in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] {st.name:<10}"
        blocked = [n for n in st.needs if status.get(n, old.get(n, {}).get("status")) not in ("ok", "cached")]
        if blocked:
            status[st.name] = "skipped"
            old[st.name] = {"status": "skipped", "reason": f"needs {', '.join(blocked)}",
                            "argv": st.argv(cfg)}
            say(f"{tag} skipped (needs {', '.join(blocked)})")
            continue
        key = stage_key(st, cfg)
        prev = old.get(st.name, {})
        res_path = cfg.out / "results" / f"{st.name}.json"
        if not cfg.force and prev.get("key") == key and prev.get("status") in ("ok", "cached") \
                and res_path.is_file():
            status[st.name] = "cached"
            prev["status"] = "cached"
            say(f"{tag} unchanged, reused ({st.summary(json.loads(res_path.read_text()))})")
            continue
        say(f"{tag} running: hwgen {' '.join(st.argv(cfg))}")
        t0 = time.perf_counter()
        entry = {"argv": st.argv(cfg), "key": key}
        try:
            res, code = run_verb(st.argv(cfg), quiet=quiet_verbs)
        except SystemExit as e:  # argparse: the verb or option does not exist
            res, code = None, 2
            entry["error"] = f"hwgen {st.argv(cfg)[0]} rejected its arguments (exit {e.code})"
        except Exception as e:
            if not (type(e).__module__.startswith("hwgen.") or isinstance(e, OSError)):
                raise
            res, code = None, 1
            entry["error"] = str(e)
        entry["wall_s"] = round(time.perf_counter() - t0, 3)
        if res is not None:
            _write_json(res_path, res)
        entry["status"] = "ok" if code == 0 and res is not None else "failed"
        if entry["status"] == "failed" and "error" not in entry:
            entry["error"] = f"exit status {code}"
            if res is not None and "mismatches" in res:
                entry["error"] = f"{res['mismatches']} mismatches"
        status[st.name] = entry["status"]
        old[st.name] = entry
        _write_json(cfg.out / "flow.json", record)
        if entry["status"] == "ok":
            say(f"{tag} done in {entry['wall_s']:.1f}s ({st.summary(res)})")
        else:
            say(f"{tag} FAILED after {entry['wall_s']:.1f}s: {entry['error']}")
    record["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    record["wall_s"] = round(time.perf_counter() - t_flow, 3)
    record["order"] = [s.name for s in stages]
    _write_json(cfg.out / "flow.json", record)
    return record


def summary_rows(cfg: FlowConfig, record: dict) -> list[dict]:
    """One row per stage of the last flow: stage, status, seconds, key numbers."""
    rows = []
    for st in STAGES:
        if st.name not in record.get("order", STAGE_NAMES):
            continue
        e = record["stages"].get(st.name, {})
        res_path = cfg.out / "results" / f"{st.name}.json"
        detail = e.get("error") or e.get("reason") or ""
        if e.get("status") in ("ok", "cached") and res_path.is_file():
            try:
                detail = st.summary(json.loads(res_path.read_text()))
            except (KeyError, TypeError, ValueError) as exc:
                detail = f"(result without {exc})"
        rows.append({"stage": st.name, "status": e.get("status", "-"),
                     "wall_s": e.get("wall_s"), "detail": detail})
    return rows


def format_table(rows: list[dict]) -> str:
    w = max(len(r["stage"]) for r in rows) if rows else 5
    lines = [f"{'stage':<{w}}  {'status':<8} {'time':>8}  result", "-" * (w + 40)]
    for r in rows:
        t = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}s"
        lines.append(f"{r['stage']:<{w}}  {r['status']:<8} {t:>8}  {r['detail']}")
    return "\n".join(lines)


def main_flow(cfg: FlowConfig, quiet: bool = False) -> tuple[dict, int]:
    """The ``hwgen flow`` verb: run, print the summary table (stderr), return
    the JSON result and the exit status."""
    def say(m: str) -> None:
        if not quiet:
            print(f"[flow {time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)

    record = run_flow(cfg, say)
    rows = summary_rows(cfg, record)
    if not quiet:
        print(format_table(rows), file=sys.stderr, flush=True)
    failed = [r["stage"] for r in rows if r["status"] in ("failed", "skipped")]
    result = {"out": str(cfg.out), "model": cfg.model, "stages": rows, "failed": failed,
              "wall_s": record["wall_s"]}
    return result, (1 if failed else 0)
