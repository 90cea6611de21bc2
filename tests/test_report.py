"""hwgen report: one self-contained HTML file, opened in a real headless
browser (Debian's chromium, installed by the Makefile), which must render it
with no script error, no broken image, and every section present."""
import json
import re
import shutil
import subprocess

import pytest
from conftest import last_json, run_cli

from hwgen import flow as F
from hwgen.report import SECTIONS, ReportError, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _stage_results(out):
    """Results of the stages this test does not run (RTL, impl, run), in the
    shapes those verbs print, so that every section has content to render."""
    res = out / "results"
    (res / "verify-rtl.json").write_text(json.dumps({
        "target": "rtl", "simulator": "verilator", "mismatches": 0, "kernels": [
            {"name": "attn_q", "shape": [128, 384, 384], "vectors": 49152, "mismatches": 0,
             "cycles": 76000, "ideal_cycles": 73728, "utilization": 0.97}]}))
    (res / "impl.json").write_text(json.dumps({
        "part": "LFE5U-85F", "fmax_mhz": 151.2, "lut": 20000, "ff": 30000, "dsp": 156, "bram": 40,
        "kernels": [{"name": "attn_q", "fmax_mhz": 151.2, "lut": 20000, "ff": 30000, "dsp": 156,
                     "bram": 40}]}))
    trace = out / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"name": "embedding", "cat": "host", "ph": "X", "ts": 0, "dur": 900, "pid": "cpu", "tid": 0},
        {"name": "attn_q", "cat": "accel", "ph": "X", "ts": 900, "dur": 400, "pid": "accel", "tid": 0}]}))
    (res / "run.json").write_text(json.dumps({
        "backend": "golden", "device": "cpu", "placement": {"linear": {"accel": 6}, "embedding": {"cpu": 2}},
        "bytes_to_accel": 1000, "bytes_from_accel": 800, "accel_cycles": 76000, "bitexact_vs_golden": True,
        "cosine_vs_float": 0.995, "wall_s": 0.2, "trace": str(trace)}))
    (res / "plan.json").write_text(json.dumps({
        "clock_mhz": 151.2, "link_gbps": 8.0, "accel_cycles": 76000, "predicted_s": 0.0011,
        "host_only_s": 0.02, "rows": [
            {"node": "emb", "op": "embedding", "device": "host", "predicted_s": 0.0009, "cycles": None,
             "bytes": 0},
            {"node": "attn.q", "op": "linear", "device": "accel", "predicted_s": 0.0005, "cycles": 76000,
             "bytes": 4992}]}))
    rec = json.loads((out / "flow.json").read_text())
    rec["order"] += ["verify-rtl", "impl", "plan", "run"]
    for s in ("verify-rtl", "impl", "plan", "run"):
        rec["stages"][s] = {"status": "ok", "wall_s": 1.0}
    (out / "flow.json").write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "bert"
    F.run_flow(F.FlowConfig(model="bert-block", out=out, only=("quantize", "accuracy", "verify-hls")))
    _stage_results(out)
    return out


def test_report_is_self_contained_and_has_every_section(report_dir, capsys):
    code, out, _ = run_cli(capsys, "report", report_dir, "--json")
    assert code == 0
    res = last_json(out)
    page = (report_dir / "report.html").read_text()
    for s in SECTIONS:
        assert f'<section id="{s}">' in page
    # no external resource: every image is inline, no src/href to another file
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert page.count("data:image/png;base64,") == len(res["plots"]) == 4
    assert "0.970" in page and "151.2" in page and "attn_q" in page
    placement = page.split('id="placement"')[1].split("</section>")[0]
    assert "attn.q" in placement and "4,992" in placement and "accel" in placement
    assert "did not run" not in page.split('id="cycles"')[1].split("</section>")[0]


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    assert CHROMIUM, "chromium is missing: `make tools` (part of `make test`) installs Debian's chromium"
    write_report(report_dir)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
           (report_dir / "report.html").resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(0)))
    assert attrs.get("rendered") == "yes", attrs
    assert attrs["errors"] == "0" and attrs["broken-images"] == "0" and attrs["images"] == "4", attrs
    for s in SECTIONS:
        assert f'<section id="{s}">' in dom


def test_report_without_flow_is_an_error(tmp_path, capsys):
    with pytest.raises(ReportError, match="no flow.json"):
        write_report(tmp_path)
    code, _, err = run_cli(capsys, "report", tmp_path)
    assert code == 1 and "hwgen flow" in err
