"""`hwgen verify --target rtl`: the kernels' Verilog simulated bit-exact (placeholder)."""
from __future__ import annotations

import sys
from pathlib import Path


class SimError(RuntimeError):
    """A simulator that is missing or broken, a failed build, a bench without a result."""


def _sim_package():
    """Import the repository's ``sim`` package (cocotb benches live in sim/)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "sim" / "__init__.py").is_file():
        raise SimError(f"the cocotb benches (sim/) are not next to the hwgen package ({root}): "
                       "RTL verification runs from a source checkout (pip install -e .)")
    if str(root) not in sys.path:
        sys.path.append(str(root))
    import sim  # noqa: F401
    return sim
