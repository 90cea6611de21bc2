"""Amaranth RTL for hwgen's integer kernels (first slice: the matmul PE array
and the accumulator requantizer), each verified bit-exact against
:mod:`hwgen.contract` / :mod:`hwgen.fixed` in Amaranth's simulator
(``tests/test_rtl_matmul.py``)."""
from .pe_array import PEArray, RTLError
from .requant import Requant

__all__ = ["PEArray", "Requant", "RTLError"]

from .attention import AttentionEngine  # noqa: E402

__all__ += ["AttentionEngine"]
