"""HLS C++ backend: Vitis-HLS-style kernels emitted from a fixed graph, checked
bit for bit against the golden model by C-simulation with g++.

Kernels: ``linear`` (:mod:`hwgen.hls.emit`) and ``attention`` (stateless, or
owning its KV cache for decoders), ``layernorm``, ``gelu``, ``add``
(:mod:`hwgen.hls.kernels`); the whole layer as one top function chaining them
(:mod:`hwgen.hls.block`); the Vitis project and verification
(:mod:`hwgen.hls.project`); hls4ml interoperation
(:mod:`hwgen.hls.hls4ml_interop`). Every value, width, table and constant the
kernels use is read from the :class:`~hwgen.ir.Graph` (formats, ``acc_bits``,
integer weight codes) or built by :mod:`hwgen.contract`, never re-derived.
"""
from .emit import HLS_OPS, HLSError, KernelSources, emit_kernels, emit_linear, emit_node, sanitize
from .kernels import emit_add, emit_attention, emit_gelu, emit_layernorm
from .csim import ap_types_dir, csim_linear, run_csim
from .block import emit_block

__all__ = ["HLS_OPS", "HLSError", "KernelSources", "emit_linear", "emit_attention", "emit_layernorm",
           "emit_gelu", "emit_add", "emit_node", "emit_kernels", "emit_block", "sanitize",
           "run_csim", "csim_linear", "ap_types_dir"]
