"""Data movement: tensors packed into the accelerator link's word format and back.

A transfer carries integer codes of one tensor, each ``width`` bits (the
tensor's format width from the graph; index tensors such as padding masks: one
bit). Codes are packed little-endian into 64-bit limbs, ``64 // width`` codes
per limb, a code never straddling a limb; ``bus_bits / 64`` limbs make one bus
word (AXI data width), the last word zero-padded. The transfer size in bytes is
``words * bus_bits / 8``: what crosses the link, padding included.

:func:`pack` / :func:`unpack` are exact inverses for codes inside the width
(signed codes are sign-extended back); :func:`pack` refuses codes outside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir import Graph
from .partition import DriverError

DEFAULT_BUS_BITS = 128


@dataclass(frozen=True)
class WordFormat:
    """How one tensor's codes travel: ``width`` bits each, ``signed``, on a ``bus_bits`` bus."""

    width: int
    signed: bool
    bus_bits: int = DEFAULT_BUS_BITS

    def __post_init__(self):
        if not 1 <= self.width <= 64:
            raise DriverError(f"word format: code width {self.width} is outside 1..64")
        if self.bus_bits < 64 or self.bus_bits % 64:
            raise DriverError(f"word format: bus width {self.bus_bits} must be a multiple of 64 bits")

    @property
    def per_limb(self) -> int:
        return 64 // self.width

    @property
    def per_word(self) -> int:
        return self.per_limb * (self.bus_bits // 64)

    def words(self, count: int) -> int:
        return -(-count // self.per_word)

    def nbytes(self, count: int) -> int:
        return self.words(count) * self.bus_bits // 8


def tensor_format(graph: Graph, name: str, bus_bits: int = DEFAULT_BUS_BITS) -> WordFormat:
    """The word format of a graph tensor: its fixed-point width, or 1 bit for an index
    tensor that is a 0/1 mask (masks are the only index tensors the kernels take)."""
    t = graph.tensors[name]
    if t.dtype == "fixed":
        return WordFormat(t.fmt.width, t.fmt.signed, bus_bits)
    if t.dtype == "index":
        return WordFormat(1, False, bus_bits)
    raise DriverError(f"tensor '{name}' holds floats; only integer codes travel to the accelerator "
                      "(keep its consumer on the host)")


def pack(codes: np.ndarray, fmt: WordFormat) -> np.ndarray:
    """Codes -> bus words, an array of uint64 limbs shaped ``(words, bus_bits // 64)``."""
    c = np.asarray(codes, dtype=np.int64).reshape(-1)
    lo = -(1 << (fmt.width - 1)) if fmt.signed else 0
    hi = (1 << (fmt.width - 1)) - 1 if fmt.signed else (1 << fmt.width) - 1
    if c.size and (int(c.min()) < lo or int(c.max()) > hi):
        raise DriverError(f"codes [{int(c.min())}, {int(c.max())}] do not fit the {fmt.width}-bit "
                          f"{'signed' if fmt.signed else 'unsigned'} word format")
    n_words = fmt.words(c.size)
    flat = np.zeros(n_words * fmt.per_word, dtype=np.uint64)
    mask = np.uint64((1 << fmt.width) - 1) if fmt.width < 64 else np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    flat[:c.size] = c.view(np.uint64) & mask
    lanes = flat.reshape(-1, fmt.per_limb)
    shifts = (np.arange(fmt.per_limb, dtype=np.uint64) * np.uint64(fmt.width))
    limbs = np.bitwise_or.reduce(lanes << shifts, axis=1) if fmt.per_limb > 1 else lanes[:, 0]
    return limbs.reshape(n_words, fmt.bus_bits // 64)


def unpack(words: np.ndarray, fmt: WordFormat, count: int) -> np.ndarray:
    """Bus words -> the first ``count`` codes (int64, sign-extended when signed)."""
    limbs = np.asarray(words, dtype=np.uint64).reshape(-1)
    if limbs.size * fmt.per_limb < count:
        raise DriverError(f"{limbs.size} limbs hold fewer than the {count} codes asked for")
    shifts = (np.arange(fmt.per_limb, dtype=np.uint64) * np.uint64(fmt.width))
    vals = (limbs[:, None] >> shifts[None, :]).reshape(-1)[:count]
    if fmt.width == 64:
        return vals.view(np.int64)
    vals = vals & np.uint64((1 << fmt.width) - 1)
    if fmt.signed:
        k = np.uint64(64 - fmt.width)
        return (vals << k).view(np.int64) >> np.int64(64 - fmt.width)
    return vals.astype(np.int64)
