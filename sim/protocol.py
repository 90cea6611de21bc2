"""The one bench protocol shared by pytest, the CLI and every cocotb bench.

A bench run lives in one directory (``$HWGEN_BENCH_DIR`` inside the simulator):

``vectors.npz``   integer arrays: the inputs the bench feeds and the expected
                  outputs it compares against (computed on the host, e.g. by
                  the golden model);
``config.json``   everything else the bench needs: port layouts (from the
                  Amaranth component, see :func:`layout_fields`), kernel
                  parameters, the back-pressure probabilities and seed, a
                  cycle limit;
``outputs.npz``   optional raw outputs (memory words as hex strings) that the
                  host decodes with the kernel's own unpacking function and
                  compares (:class:`Comparison`), merging into the result;
``result.json``   written by the bench: ``mismatches`` (every output integer
                  compared; 0 is the only pass), ``vectors`` (integers
                  compared), ``cycles`` (clock cycles the bench measured, as
                  the bench defines them), ``first_mismatches`` (up to
                  :data:`FIRST_MISMATCHES` of ``{output, index, expected,
                  actual}``), ``sim_cycles`` (every clock cycle simulated),
                  ``sim_wall_s`` and bench-specific keys.

This module imports only NumPy and :mod:`hwgen.mismatch` (itself NumPy only until
it explains an element; Amaranth lazily, host side), so the simulator's Python
loads it quickly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hwgen.mismatch import FIRST_MISMATCHES, Comparison  # noqa: F401  (the benches' comparison)

ENV_DIR = "HWGEN_BENCH_DIR"
VECTORS = "vectors.npz"
CONFIG = "config.json"
RESULT = "result.json"
OUTPUTS = "outputs.npz"
#: how many mismatches a result lists in full


# ----------------------------------------------------------------------------- host side

def layout_fields(shape) -> list[dict]:
    """Flatten an Amaranth shape (``lib.data`` layout or plain shape) into leaf
    fields ``{name, offset, width, signed, count}``: ``count`` lanes of
    ``width`` bits at ``offset + lane * width`` (count 0 for a scalar).
    Nested structs give dotted names; arrays of scalars are one field."""
    from amaranth import Shape
    from amaranth.lib import data

    out: list[dict] = []

    def walk(sh, name: str, offset: int) -> None:
        if isinstance(sh, data.ArrayLayout):
            el = sh.elem_shape
            if not isinstance(el, data.Layout):
                s = Shape.cast(el)
                out.append({"name": name, "offset": offset, "width": s.width, "signed": s.signed,
                            "count": sh.length})
                return
            for k in range(sh.length):
                walk(el, f"{name}.{k}" if name else str(k), offset + k * el.size)
            return
        if isinstance(sh, data.Layout):
            for fname, f in sh:
                walk(f.shape, f"{name}.{fname}" if name else str(fname), offset + f.offset)
            return
        s = Shape.cast(sh)
        out.append({"name": name, "offset": offset, "width": s.width, "signed": s.signed, "count": 0})

    walk(shape, "", 0)
    return out


def write_bench_dir(directory: str | os.PathLike, vectors: dict[str, np.ndarray], config: dict) -> Path:
    """Fill a bench directory with ``vectors.npz`` and ``config.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / VECTORS, **{k: np.asarray(v) for k, v in vectors.items()})
    (d / CONFIG).write_text(json.dumps(config, indent=1))
    return d


def read_result(directory: str | os.PathLike) -> dict | None:
    p = Path(directory) / RESULT
    return json.loads(p.read_text()) if p.is_file() else None


def read_outputs(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    p = Path(directory) / OUTPUTS
    if not p.is_file():
        return {}
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def hex_words(words) -> np.ndarray:
    """Word integers of any width as an array of hex strings (npz-safe)."""
    return np.array([format(int(w), "x") for w in words], dtype=str)


def words_of(hexes) -> list[int]:
    return [int(str(h), 16) for h in hexes]


# ----------------------------------------------------------------------------- simulator side

def bench_dir() -> Path:
    d = os.environ.get(ENV_DIR)
    if not d:
        raise RuntimeError(f"${ENV_DIR} is not set: run benches through sim.runner.run_bench")
    return Path(d)


def load_bench() -> tuple[dict, dict[str, np.ndarray]]:
    """The config and the vectors of this run."""
    d = bench_dir()
    cfg = json.loads((d / CONFIG).read_text())
    with np.load(d / VECTORS, allow_pickle=False) as z:
        vec = {k: z[k] for k in z.files}
    return cfg, vec


def write_result(result: dict) -> None:
    d = bench_dir()
    tmp = d / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(d / RESULT)


def write_outputs(arrays: dict) -> None:
    """Raw outputs the host decodes and compares (e.g. memory words as hex)."""
    d = bench_dir()
    np.savez(d / (OUTPUTS + ".tmp.npz"), **{k: np.asarray(v) for k, v in arrays.items()})
    (d / (OUTPUTS + ".tmp.npz")).replace(d / OUTPUTS)
