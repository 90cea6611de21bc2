"""FPGA implementation numbers (issue 6): synthesis and place and route of the
generated kernels (:mod:`.flow`), the parts (:mod:`.parts`), the roofline
(:mod:`.roofline`) and the design-space sweep (:mod:`.sweep`)."""
from .parts import DEVICES, ImplError, Part, parse_part

__all__ = ["DEVICES", "ImplError", "Part", "parse_part"]
