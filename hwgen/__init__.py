"""hwgen: PyTorch transformer blocks to verified, bit-exact FPGA accelerator kernels.

Stages (one module each, data moving forward only): :mod:`hwgen.frontend`
(torch -> float graph), :mod:`hwgen.quant` and :mod:`hwgen.qat` (float graph ->
fixed graph), :mod:`hwgen.golden` (the integer-exact reference), all built on
:mod:`hwgen.fixed` and :mod:`hwgen.contract` (the arithmetic contract).
"""

__version__ = "0.1.0"
