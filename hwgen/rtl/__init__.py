"""Amaranth RTL for hwgen's integer kernels: the matmul PE array, the
accumulator requantizers, the linear-layer engine (:mod:`.matmul`) and the
attention engine, each verified bit-exact against :mod:`hwgen.contract` /
:mod:`hwgen.fixed` in Amaranth's simulator (``tests/test_rtl_*.py``)."""
from .matmul import MatmulEngine, MatmulSpec, linear_operands
from .pe_array import PEArray, RTLError
from .requant import Requant, ShiftRequant

__all__ = ["MatmulEngine", "MatmulSpec", "PEArray", "Requant", "RTLError", "ShiftRequant",
           "linear_operands"]

from .attention import AttentionEngine  # noqa: E402

__all__ += ["AttentionEngine"]
