"""cocotb agents for Amaranth ``lib.stream`` ports (simulator side).

Amaranth's Verilog flattens a stream port ``x`` of a ``wiring.Component``
into ``x__valid``, ``x__ready`` and ``x__payload`` (the ``lib.data`` layout's
bits, field offsets as in :func:`sim.protocol.layout_fields`).

:class:`Packer` turns NumPy arrays of field values into payload integers and
back, vectorized (one ``packbits`` per batch of beats). :class:`StreamDriver`
and :class:`StreamMonitor` drive and watch one stream; :func:`run_cycles`
steps all agents with the portable handshake (DESIGN.md, Known traps): await
the rising edge, drive this cycle's inputs, ``await ReadOnly()``, then sample
valid/ready/payload. A transfer is a cycle whose sampled ``valid`` and
``ready`` are both 1. Back-pressure is random but seeded: a driver offers a
new beat with probability ``valid_prob`` (once offered, a beat stays valid
and unchanged until taken, as ``lib.stream`` requires), a monitor raises
``ready`` with probability ``ready_prob`` each cycle.

A stream declared ``always_ready`` has no ``x__ready`` port: the driver then
counts every offered beat as taken, and the monitor records every valid beat
(its ``ready_prob`` must be 1). A driver's ``may_offer(index, cycle)``, when
given, can hold a beat back (a producer's own pacing rule, e.g. the PE
array's gap between tile ends).
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np

from cocotb.triggers import ReadOnly, RisingEdge


def _u(handle) -> int:
    """A port's current value as an unsigned int (1-bit ports included)."""
    v = handle.value
    to_u = getattr(v, "to_unsigned", None)
    return to_u() if to_u is not None else int(v)


class Packer:
    """Packs/unpacks the bits of one flattened ``lib.data`` payload."""

    def __init__(self, fields: Sequence[dict]):
        self.fields = {f["name"]: f for f in fields}
        self.width = max((f["offset"] + f["width"] * max(1, f["count"]) for f in fields), default=0)
        self._nbytes = (self.width + 7) // 8

    def pack(self, values: dict[str, np.ndarray], n: int) -> list[int]:
        """``n`` payload ints; ``values[name]`` has shape ``(n,)`` (scalar field)
        or ``(n, count)`` (lanes); a missing field is 0."""
        bits = np.zeros((n, self._nbytes * 8), dtype=np.uint8)
        for name, v in values.items():
            f = self.fields[name]
            lanes = max(1, f["count"])
            a = np.asarray(v, dtype=np.int64).reshape(n, lanes)
            lo = -(1 << (f["width"] - 1)) if f["signed"] else 0
            hi = (1 << (f["width"] - 1)) - 1 if f["signed"] else (1 << f["width"]) - 1
            if a.size and (a.min() < lo or a.max() > hi):
                raise ValueError(f"field '{name}': values outside {lo}..{hi} "
                                 f"({f['width']}-bit {'signed' if f['signed'] else 'unsigned'})")
            w = f["width"]
            b = (a[:, :, None] >> np.arange(w, dtype=np.int64)) & 1  # two's complement bits
            bits[:, f["offset"]: f["offset"] + lanes * w] = b.reshape(n, lanes * w)
        packed = np.packbits(bits, axis=1, bitorder="little")
        return [int.from_bytes(row.tobytes(), "little") for row in packed]

    def unpack(self, words: Sequence[int]) -> dict[str, np.ndarray]:
        """Field arrays (``(n,)`` or ``(n, count)``, int64) of ``n`` payload ints."""
        n = len(words)
        raw = np.frombuffer(b"".join(int(w).to_bytes(self._nbytes, "little") for w in words),
                            dtype=np.uint8).reshape(n, self._nbytes)
        bits = np.unpackbits(raw, axis=1, bitorder="little").astype(np.int64)
        out = {}
        for name, f in self.fields.items():
            lanes, w = max(1, f["count"]), f["width"]
            b = bits[:, f["offset"]: f["offset"] + lanes * w].reshape(n, lanes, w)
            v = (b << np.arange(w, dtype=np.int64)).sum(axis=2)
            if f["signed"]:
                v = np.where(v >= (1 << (w - 1)), v - (1 << w), v)
            out[name] = v if f["count"] else v[:, 0]
        return out


class StreamDriver:
    """Drives ``<prefix>__valid`` / ``__payload`` from a list of payload ints."""

    def __init__(self, dut, prefix: str, words: Sequence[int], rng: random.Random,
                 valid_prob: float = 1.0, may_offer: Callable[[int, int], bool] | None = None):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready", None)   # None: always ready
        self.payload = getattr(dut, f"{prefix}__payload", None)
        self.words = list(words)
        self.rng, self.valid_prob, self.may_offer = rng, valid_prob, may_offer
        self.sent = 0            # beats transferred
        self.offered = False     # the current beat is on the port
        self.transfer_cycles: list[int] = []
        self.valid.value = 0

    @property
    def done(self) -> bool:
        return self.sent >= len(self.words)

    def drive(self, cycle: int) -> None:
        if not self.offered and self.sent < len(self.words) and (
                self.valid_prob >= 1.0 or self.rng.random() < self.valid_prob) and (
                self.may_offer is None or self.may_offer(self.sent, cycle)):
            if self.payload is not None:
                self.payload.value = self.words[self.sent]
            self.valid.value = 1
            self.offered = True
        elif not self.offered:
            self.valid.value = 0

    def sample(self, cycle: int) -> None:
        if self.offered and (self.ready is None or _u(self.ready)):
            self.transfer_cycles.append(cycle)
            self.sent += 1
            self.offered = False


class StreamMonitor:
    """Drives ``<prefix>__ready`` and records the payload of every transfer."""

    def __init__(self, dut, prefix: str, rng: random.Random, ready_prob: float = 1.0):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready", None)   # None: always ready
        self.payload = getattr(dut, f"{prefix}__payload", None)
        self.rng, self.ready_prob = rng, ready_prob
        self.words: list[int] = []
        self.transfer_cycles: list[int] = []
        self._ready = self.ready is None
        if self.ready is None:
            if ready_prob < 1.0:
                raise ValueError(f"{prefix} is always ready: ready_prob must be 1, got {ready_prob}")
        else:
            self.ready.value = 0

    def drive(self, cycle: int) -> None:
        if self.ready is None:
            return
        r = self.ready_prob >= 1.0 or self.rng.random() < self.ready_prob
        if r != self._ready:
            self.ready.value = int(r)
            self._ready = r

    def sample(self, cycle: int) -> None:
        if self._ready and _u(self.valid):
            self.words.append(_u(self.payload) if self.payload is not None else 0)
            self.transfer_cycles.append(cycle)


class BenchTimeout(RuntimeError):
    pass


async def run_cycles(clk, agents: Sequence, until: Callable[[], bool], max_cycles: int,
                     start: int = 0, what: str = "the bench") -> int:
    """Step ``agents`` (objects with ``drive(cycle)`` / ``sample(cycle)``) once per
    clock cycle until ``until()`` holds after a sample; returns the next cycle
    number. Raises :class:`BenchTimeout` after ``max_cycles`` cycles."""
    cycle = start
    edge, ro = RisingEdge(clk), ReadOnly()
    while True:
        await edge
        for a in agents:
            a.drive(cycle)
        await ro
        for a in agents:
            a.sample(cycle)
        cycle += 1
        if until():
            return cycle
        if cycle - start >= max_cycles:
            raise BenchTimeout(f"{what} did not finish within {max_cycles} cycles")


async def reset(dut, clk, cycles: int = 2) -> None:
    """Hold Amaranth's synchronous ``rst`` high for ``cycles`` edges (if the top has one)."""
    rst = getattr(dut, "rst", None)
    if rst is None:
        return
    rst.value = 1
    for _ in range(cycles):
        await RisingEdge(clk)
    rst.value = 0
