"""Verilog of an hwgen component: ``amaranth.back.verilog.convert`` with the
ports taken from the component's signature, leaving out members that are
constants (the ``ready`` of an ``always_ready`` stream, such as the PE array's
``i`` and ``o``): Amaranth refuses a constant as a top-level port, and a
constant is no port of the hardware either."""
from __future__ import annotations

from amaranth.back import verilog as amaranth_verilog
from amaranth.hdl import Const, Value, ValueCastable
from amaranth.hdl._ir import PortDirection  # not re-exported by amaranth.hdl (0.5)
from amaranth.lib import wiring


def ports(component: wiring.Component) -> dict:
    """``{"a__b": (signal, direction)}`` of every non-constant port member."""
    out = {}
    for path, member, value in component.signature.flatten(component):
        if isinstance(value, ValueCastable):
            value = value.as_value()
        if isinstance(value, Value) and not isinstance(value, Const):
            out["__".join(map(str, path))] = (
                value, PortDirection.Input if member.flow == wiring.In else PortDirection.Output)
    return out


def convert(component: wiring.Component, name: str = "top", platform=None, emit_src: bool = True) -> str:
    """Verilog text of ``component`` as module ``name`` (see the module docstring)."""
    return amaranth_verilog.convert(component, name=name, platform=platform, ports=ports(component),
                                    emit_src=emit_src)
