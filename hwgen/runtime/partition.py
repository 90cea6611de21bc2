"""Partition a fixed graph into accelerator and host segments.

Every node gets a device: ``"accel"`` (run by an accelerator backend's kernel)
or ``"host"`` (run by the torch host backend). The default puts the ops the
generated kernels are built for (:data:`DEFAULT_ACCEL_OPS`: ``linear``,
``attention``) on the accelerator and everything else on the host: embedding,
``quantize``, layernorm / GELU / add (they have HLS kernels, so a configuration
may move them with ``accel_ops``), pooling, and anything without a kernel.
``force`` overrides single nodes or whole ops (a node name beats an op name).

A *segment* is a maximal run of consecutive nodes (graph order, which is
topological) on the same device; data crosses the link only between segments.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..ir import OPS, Graph, Node

HOST, ACCEL = "host", "accel"
DEVICES = (HOST, ACCEL)
#: ops placed on the accelerator unless configured otherwise
DEFAULT_ACCEL_OPS = ("linear", "attention")


class DriverError(ValueError):
    """A run the driver cannot do as asked (placement, backend, device, inputs); the
    message names the thing and what to do."""


@dataclass
class Segment:
    device: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        first, last = self.nodes[0].name, self.nodes[-1].name
        return first if first == last else f"{first} .. {last}"


def parse_force(items: list[str] | None) -> dict[str, str]:
    """``["NAME=host", "linear=accel"]`` (CLI ``--place``) -> ``{NAME: device}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, dev = item.partition("=")
        if not sep or not key or not dev:
            raise DriverError(f"--place '{item}': expected NODE_OR_OP=host|accel")
        out[key.strip()] = dev.strip()
    return out


def place(graph: Graph, kernel_ops: tuple[str, ...], accel_ops: tuple[str, ...] | None = None,
          force: dict[str, str] | None = None) -> dict[str, str]:
    """Node name -> device.

    ``kernel_ops``: the ops the accelerator backend has kernels for; ``accel_ops``
    (default :data:`DEFAULT_ACCEL_OPS`): the ops put on the accelerator when it has
    their kernel; ``force``: node name or op name -> ``"host"``/``"accel"``.
    Forcing a node onto the accelerator without a kernel for its op is an error.
    """
    accel_ops = DEFAULT_ACCEL_OPS if accel_ops is None else tuple(accel_ops)
    for op in accel_ops:
        if op not in OPS:
            raise DriverError(f"accelerator op '{op}' is not a graph op (ops: {', '.join(OPS)})")
    force = dict(force or {})
    names = {n.name for n in graph.nodes}
    ops_in_graph = {n.op for n in graph.nodes}
    for key, dev in force.items():
        if dev not in DEVICES:
            raise DriverError(f"placement of '{key}': device '{dev}' is not one of {', '.join(DEVICES)}")
        if key not in names and key not in ops_in_graph:
            raise DriverError(f"placement of '{key}': graph '{graph.name}' has no node or op of that "
                              f"name (ops here: {', '.join(sorted(ops_in_graph))})")
    out: dict[str, str] = {}
    for n in graph.nodes:
        dev = force.get(n.name, force.get(n.op))
        if dev is None:
            dev = ACCEL if (n.op in accel_ops and n.op in kernel_ops) else HOST
        if dev == ACCEL and n.op not in kernel_ops:
            raise DriverError(f"node '{n.name}' ({n.op}) forced onto the accelerator, but this "
                              f"backend has kernels only for: {', '.join(kernel_ops)}")
        out[n.name] = dev
    return out


def segments(graph: Graph, placement: dict[str, str]) -> list[Segment]:
    """Maximal runs of consecutive nodes on one device, in graph order."""
    segs: list[Segment] = []
    for n in graph.nodes:
        dev = placement[n.name]
        if not segs or segs[-1].device != dev:
            segs.append(Segment(dev))
        segs[-1].nodes.append(n)
    return segs


def counts(graph: Graph, placement: dict[str, str]) -> dict[str, dict[str, int]]:
    """``{op: {"accel": n, "host": m}}`` (only non-zero entries)."""
    c: dict[str, Counter] = {}
    for n in graph.nodes:
        c.setdefault(n.op, Counter())[placement[n.name]] += 1
    return {op: dict(v) for op, v in c.items()}
