"""The host driver: run fixed graphs with their kernels on an accelerator backend
(``golden``, ``hls``, ``rtl``) and the rest on torch (CPU or CUDA), with packed
transfers, a cost model, request pipelining and a Perfetto trace.

Modules: :mod:`~hwgen.runtime.partition` (placement, segments),
:mod:`~hwgen.runtime.torch_ops` (host backend), :mod:`~hwgen.runtime.backends`
(accelerator backends), :mod:`~hwgen.runtime.pack` (link word format),
:mod:`~hwgen.runtime.cost` (cycles, link, plan), :mod:`~hwgen.runtime.driver`
(execution, scheduling), :mod:`~hwgen.runtime.trace` (Chrome trace),
:mod:`~hwgen.runtime.jobs` (``hwgen run`` / ``hwgen plan``).
"""
from .driver import DecodeState, Driver, RunStats
from .partition import ACCEL, HOST, DriverError, place, segments

__all__ = ["Driver", "DecodeState", "RunStats", "DriverError", "place", "segments", "ACCEL", "HOST"]
