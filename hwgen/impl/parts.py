"""FPGA parts that ``hwgen impl`` knows: the nextpnr device, package and speed
grade of a part name, and its resources (the single source for the roofline,
the does-it-fit check and the sweep; ``tests/test_impl.py`` checks them against
what nextpnr reports as available).

Part names: ``LFE5U-85F`` (speed grade 6, package CABGA381) or with the grade
and package spelled out as Lattice does, ``LFE5U-85F-8BG381C``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass


class ImplError(ValueError):
    """A part, kernel or tool problem in ``hwgen impl`` / ``hwgen sweep``."""


@dataclass(frozen=True)
class Device:
    family: str        #: "ecp5"
    name: str          #: e.g. "LFE5U-85F"
    nextpnr: str       #: nextpnr-ecp5 device flag, e.g. "--85k"
    luts: int          #: LUT4 (TRELLIS_COMB) sites
    ffs: int           #: flip-flops
    dsp: int           #: MULT18X18D
    bram: int          #: DP16KD (EBR, 18 kbit each)
    packages: tuple    #: nextpnr package names


#: numbers as nextpnr-ecp5 reports them available (``utilization`` in its report)
DEVICES = {
    "LFE5U-25F": Device("ecp5", "LFE5U-25F", "--25k", 24288, 24288, 28, 56, ("CABGA256", "CABGA381")),
    "LFE5U-45F": Device("ecp5", "LFE5U-45F", "--45k", 43848, 43848, 72, 108, ("CABGA256", "CABGA381", "CABGA554")),
    "LFE5U-85F": Device("ecp5", "LFE5U-85F", "--85k", 83640, 83640, 156, 208, ("CABGA381", "CABGA554", "CABGA756")),
}

#: bits of one DP16KD
EBR_BITS = 18 * 1024

_PKG = {"BG256": "CABGA256", "BG381": "CABGA381", "BG554": "CABGA554", "BG756": "CABGA756"}


@dataclass(frozen=True)
class Part:
    device: Device
    speed: int
    package: str

    @property
    def name(self) -> str:
        return f"{self.device.name}-{self.speed}{self.package.replace('CABGA', 'BG')}"

    def as_dict(self) -> dict:
        return {"part": self.name, "speed": self.speed, "package": self.package,
                **{k: v for k, v in asdict(self.device).items() if k not in ("packages",)}}


def parse_part(name: str) -> Part:
    """``LFE5U-85F`` or ``LFE5U-85F-<speed><package>C`` -> :class:`Part`."""
    if not isinstance(name, str):
        raise ImplError(f"part must be a string, got {name!r}")
    mt = re.fullmatch(r"(LFE5U-\d+F)(?:-([678])(BG\d+)?[CI]?)?", name.strip().upper())
    if not mt or mt.group(1) not in DEVICES:
        raise ImplError(f"unknown part '{name}': expected one of {', '.join(DEVICES)} "
                        "(optionally with speed grade and package, e.g. LFE5U-85F-8BG381C)")
    dev = DEVICES[mt.group(1)]
    speed = int(mt.group(2) or 6)
    pkg = _PKG.get(mt.group(3) or "BG381")
    if pkg not in dev.packages:
        raise ImplError(f"part '{name}': package {mt.group(3)} does not exist for {dev.name} "
                        f"(packages: {', '.join(p.replace('CABGA', 'BG') for p in dev.packages)})")
    return Part(dev, speed, pkg)
