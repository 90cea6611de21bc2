"""HLS C++ backend: Vitis-HLS-style kernels emitted from a fixed graph, checked
bit for bit against the golden model by C-simulation with g++.

Only the ``linear`` kernel exists so far (:mod:`hwgen.hls.emit`); every value,
width and constant it uses is read from the :class:`~hwgen.ir.Graph` (formats,
``acc_bits``, integer weight codes), never re-derived.
"""
from .emit import HLSError, KernelSources, emit_linear, emit_kernels, sanitize
from .csim import ap_types_dir, csim_linear, run_csim

__all__ = ["HLSError", "KernelSources", "emit_linear", "emit_kernels", "sanitize",
           "run_csim", "csim_linear", "ap_types_dir"]
