"""The fixed-point graph: hwgen's one intermediate representation.

A :class:`Graph` is a list of :class:`Node` s in topological order over named
:class:`Tensor` s. The same structure carries a model through every stage:

* the frontend emits it with float weights and no formats (a *float graph*);
* the quantizer gives every tensor a :class:`~hwgen.fixed.FixedType` and
  replaces float weights by their integer codes (a *fixed graph*);
* the golden model, the HLS and RTL generators and the runtime read it, and
  never re-derive what it records.

On disk a graph is a directory holding ``graph.json`` (structure, formats,
attributes, schema version) and ``weights.npz`` (one array per weight tensor).
:meth:`Graph.load` validates everything it reads and raises
:class:`GraphError` naming the first thing that is wrong; :meth:`Graph.save`
writes into a temporary directory and renames it, so a failed save leaves
nothing half-written.

Shapes may hold symbolic dimensions (strings such as ``"B"`` for batch and
``"S"`` for sequence length) that are bound when the graph runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_directory
from .fixed import FixedFormatError, FixedType

SCHEMA_VERSION = 1
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.npz"


class GraphError(ValueError):
    """A graph (in memory or on disk) is inconsistent; the message names what."""


@dataclass(frozen=True)
class OpSpec:
    """Arity and attributes of one op kind; ``optional`` inputs may be absent."""

    inputs: tuple[str, ...]
    optional: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()


#: Every op the graph may hold. The golden model defines the integer semantics
#: of each (through :mod:`hwgen.contract`); the float executor defines the float.
OPS: dict[str, OpSpec] = {
    # float tensor -> codes of the output tensor's format (graph entry)
    "quantize": OpSpec(("x",)),
    # integer ids -> rows of table
    "embedding": OpSpec(("ids", "table")),
    # y[..., n] = sum_k x[..., k] * weight[k, n] + bias[n]
    "linear": OpSpec(("x", "weight"), optional=("bias",)),
    # multi-head attention on already-projected q, k, v of shape (B, S, heads*head_dim);
    # mask (B, S_kv) is 1 for valid keys. `scale` multiplies QK^T (float graphs only:
    # the quantizer folds it into the q projection and sets it to 1).
    "attention": OpSpec(("q", "k", "v"), optional=("mask",),
                        attrs=("heads", "head_dim", "causal", "scale")),
    "layernorm": OpSpec(("x", "gamma", "beta"), attrs=("eps",)),
    "gelu": OpSpec(("x",), attrs=("approximate",)),
    "relu": OpSpec(("x",)),
    "add": OpSpec(("a", "b")),
    # mean over valid positions of (B, S, H) -> (B, H); mask (B, S)
    "mean_pool": OpSpec(("x", "mask")),
}

TENSOR_KINDS = ("input", "weight", "activation")
DTYPES = ("float", "fixed", "index")


@dataclass
class Tensor:
    """A named value: a graph input, a weight, or an activation.

    ``dtype`` is ``"float"`` (float graph, or a float graph input), ``"fixed"``
    (integer codes of ``fmt``) or ``"index"`` (token ids, masks). A per-channel
    fixed tensor keeps ``fmt`` for width, signedness and modes and lists the
    integer bits of each channel along ``channel_axis`` in ``channel_int_bits``.
    """

    name: str
    shape: tuple[int | str, ...]
    kind: str = "activation"
    dtype: str = "float"
    fmt: FixedType | None = None
    channel_axis: int | None = None
    channel_int_bits: tuple[int, ...] | None = None

    @property
    def per_channel(self) -> bool:
        return self.channel_int_bits is not None

    def frac_bits(self) -> int | np.ndarray:
        """Fractional bits: an int, or for per-channel tensors an int64 array
        shaped to broadcast against the tensor (channels on ``channel_axis``)."""
        if self.fmt is None:
            raise GraphError(f"tensor '{self.name}' has no fixed-point format")
        if not self.per_channel:
            return self.fmt.frac_bits
        frac = self.fmt.width - np.asarray(self.channel_int_bits, dtype=np.int64)
        shape = [1] * len(self.shape)
        shape[self.channel_axis] = len(frac)
        return frac.reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "kind": self.kind,
                             "dtype": self.dtype}
        if self.fmt is not None:
            d["format"] = self.fmt.to_dict()
        if self.per_channel:
            d["channel_axis"] = self.channel_axis
            d["channel_int_bits"] = list(self.channel_int_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Tensor":
        where = f"tensor '{d.get('name', '?')}'"
        for key in ("name", "shape", "kind", "dtype"):
            if key not in d:
                raise GraphError(f"{where}: missing key '{key}'")
        fmt = None
        if "format" in d:
            try:
                fmt = FixedType.from_dict(d["format"])
            except (FixedFormatError, TypeError, KeyError) as e:
                raise GraphError(f"{where}: bad format: {e}") from None
        cib = d.get("channel_int_bits")
        return cls(name=d["name"], shape=tuple(d["shape"]), kind=d["kind"], dtype=d["dtype"],
                   fmt=fmt, channel_axis=d.get("channel_axis"),
                   channel_int_bits=None if cib is None else tuple(int(v) for v in cib))


@dataclass
class Node:
    """One op application. ``source`` is the torch module path it came from
    (for error messages and reports); ``layer`` the transformer block index."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    layer: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "attrs": self.attrs, "source": self.source,
                "layer": self.layer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Node":
        for key in ("name", "op", "inputs", "outputs"):
            if key not in d:
                raise GraphError(f"node '{d.get('name', '?')}': missing key '{key}'")
        return cls(name=d["name"], op=d["op"], inputs=list(d["inputs"]),
                   outputs=list(d["outputs"]), attrs=dict(d.get("attrs", {})),
                   source=d.get("source", ""), layer=d.get("layer"))


@dataclass
class Graph:
    name: str = "graph"
    tensors: dict[str, Tensor] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # -- building -------------------------------------------------------
    def add_tensor(self, tensor: Tensor) -> Tensor:
        if tensor.name in self.tensors:
            raise GraphError(f"tensor '{tensor.name}' defined twice")
        self.tensors[tensor.name] = tensor
        return tensor

    def add_weight(self, name: str, value: np.ndarray, **kw: Any) -> Tensor:
        value = np.asarray(value)
        t = self.add_tensor(Tensor(name, tuple(value.shape), kind="weight", **kw))
        self.weights[name] = value
        return t

    def add_node(self, node: Node) -> Node:
        if any(n.name == node.name for n in self.nodes):
            raise GraphError(f"node '{node.name}' defined twice")
        self.nodes.append(node)
        return node

    # -- queries --------------------------------------------------------
    def producer(self, tensor: str) -> Node | None:
        for n in self.nodes:
            if tensor in n.outputs:
                return n
        return None

    def consumers(self, tensor: str) -> list[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    def with_weights(self, weights: dict[str, np.ndarray]) -> "Graph":
        """This graph with some weights replaced (nodes and tensors shared, meta copied)."""
        return Graph(name=self.name, tensors=self.tensors, nodes=self.nodes, inputs=self.inputs,
                     outputs=self.outputs, weights={**self.weights, **weights}, meta=dict(self.meta))

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise GraphError(f"no node named '{name}'")

    @property
    def is_fixed(self) -> bool:
        """True once every activation and weight carries a fixed-point format."""
        return bool(self.meta.get("quantized"))

    @property
    def layers(self) -> list[int]:
        return sorted({n.layer for n in self.nodes if n.layer is not None})

    def layer_nodes(self, layer: int | None, error: type[Exception] = GraphError) -> list[Node]:
        """The nodes of transformer block ``layer`` (every node for ``None``); a
        layer with no node raises ``error`` (the calling stage's own class)
        naming the layers there are."""
        if layer is None:
            return list(self.nodes)
        nodes = [n for n in self.nodes if n.layer == layer]
        if not nodes:
            raise error(f"graph '{self.name}' has no nodes in layer {layer} "
                        f"(layers: {', '.join(map(str, self.layers)) or 'none'})")
        return nodes

    def node_input(self, node: Node, role: str) -> str | None:
        """The tensor bound to input ``role`` (e.g. ``"bias"``) of ``node``."""
        spec = OPS[node.op]
        roles = spec.inputs + spec.optional
        i = roles.index(role)
        return node.inputs[i] if i < len(node.inputs) and node.inputs[i] else None

    # -- validation -----------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`GraphError` naming the first inconsistency."""
        for name, t in self.tensors.items():
            if name != t.name:
                raise GraphError(f"tensor key '{name}' does not match its name '{t.name}'")
            if t.kind not in TENSOR_KINDS:
                raise GraphError(f"tensor '{name}': kind '{t.kind}' is not one of {TENSOR_KINDS}")
            if t.dtype not in DTYPES:
                raise GraphError(f"tensor '{name}': dtype '{t.dtype}' is not one of {DTYPES}")
            if t.dtype == "fixed" and t.fmt is None:
                raise GraphError(f"tensor '{name}': dtype fixed but no format")
            if t.per_channel:
                if t.channel_axis is None or not -len(t.shape) <= t.channel_axis < len(t.shape):
                    raise GraphError(f"tensor '{name}': channel_axis {t.channel_axis} out of range "
                                     f"for shape {list(t.shape)}")
                if len(t.channel_int_bits) != t.shape[t.channel_axis]:
                    raise GraphError(f"tensor '{name}': {len(t.channel_int_bits)} channel formats for "
                                     f"{t.shape[t.channel_axis]} channels")
        for name in self.inputs:
            if name not in self.tensors:
                raise GraphError(f"graph input '{name}' is not a tensor")
        for name in self.outputs:
            if name not in self.tensors:
                raise GraphError(f"graph output '{name}' is not a tensor")
        available = set(self.inputs) | {n for n, t in self.tensors.items() if t.kind == "weight"}
        for node in self.nodes:
            where = f"node '{node.name}' ({node.op})"
            spec = OPS.get(node.op)
            if spec is None:
                raise GraphError(f"{where}: unknown op '{node.op}'; known ops: {', '.join(OPS)}")
            lo, hi = len(spec.inputs), len(spec.inputs) + len(spec.optional)
            if not lo <= len(node.inputs) <= hi:
                raise GraphError(f"{where}: takes {lo}..{hi} inputs, got {len(node.inputs)}")
            for a in spec.attrs:
                if a not in node.attrs:
                    raise GraphError(f"{where}: missing attribute '{a}'")
            for t in node.inputs:
                if not t:
                    continue
                if t not in self.tensors:
                    raise GraphError(f"{where}: input tensor '{t}' is not defined")
                if t not in available:
                    raise GraphError(f"{where}: input '{t}' is used before it is produced "
                                     "(nodes must be in topological order)")
            for t in node.outputs:
                if t not in self.tensors:
                    raise GraphError(f"{where}: output tensor '{t}' is not defined")
                if t in available:
                    raise GraphError(f"{where}: output '{t}' is produced twice")
                available.add(t)
        for name in self.outputs:
            if name not in available:
                raise GraphError(f"graph output '{name}' is never produced")
        for name, t in self.tensors.items():
            if t.kind == "weight":
                self._validate_weight(t)

    def _validate_weight(self, t: Tensor) -> None:
        if t.name not in self.weights:
            raise GraphError(f"weight '{t.name}' has no data in {WEIGHTS_FILE}")
        w = self.weights[t.name]
        if tuple(w.shape) != tuple(t.shape):
            raise GraphError(f"weight '{t.name}': data shape {list(w.shape)} does not match "
                             f"declared shape {list(t.shape)}")
        if t.dtype == "float":
            if not np.issubdtype(w.dtype, np.floating):
                raise GraphError(f"weight '{t.name}': float tensor holds {w.dtype} data")
            if not np.all(np.isfinite(w)):
                raise GraphError(f"weight '{t.name}': contains NaN or Inf")
        elif t.dtype == "fixed":
            if not np.issubdtype(w.dtype, np.integer):
                raise GraphError(f"weight '{t.name}': fixed tensor holds {w.dtype} data, "
                                 "expected integer codes")
            if w.size and (int(w.min()) < t.fmt.min_code or int(w.max()) > t.fmt.max_code):
                raise GraphError(f"weight '{t.name}': codes [{int(w.min())}, {int(w.max())}] exceed "
                                 f"{t.fmt} range [{t.fmt.min_code}, {t.fmt.max_code}]")

    # -- persistence ----------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "tensors": [t.to_dict() for t in self.tensors.values()],
            "nodes": [n.to_dict() for n in self.nodes],
            "meta": self.meta,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Validate, then write ``graph.json`` + ``weights.npz`` atomically."""
        self.validate()
        with atomic_directory(directory) as tmp:
            (tmp / GRAPH_FILE).write_text(json.dumps(self.to_json(), indent=1, default=_json_default))
            np.savez_compressed(tmp / WEIGHTS_FILE, **self.weights)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Graph":
        directory = Path(directory)
        gpath, wpath = directory / GRAPH_FILE, directory / WEIGHTS_FILE
        if not gpath.is_file():
            raise GraphError(f"{gpath}: no such graph file (expected a directory written by "
                             "`hwgen quantize --out`)")
        try:
            doc = json.loads(gpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GraphError(f"{gpath}: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise GraphError(f"{gpath}: top level must be an object")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise GraphError(f"{gpath}: schema_version {version!r} is not supported "
                             f"(this hwgen reads version {SCHEMA_VERSION})")
        for key in ("name", "inputs", "outputs", "tensors", "nodes"):
            if key not in doc:
                raise GraphError(f"{gpath}: missing key '{key}'")
        try:
            with np.load(wpath, allow_pickle=False) as z:
                weights = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise GraphError(f"{wpath}: weights file is missing") from None
        except Exception as e:  # zipfile.BadZipFile, ValueError, OSError ...
            raise GraphError(f"{wpath}: unreadable weights file ({type(e).__name__}: {e})") from None
        g = cls(name=doc["name"], inputs=list(doc["inputs"]), outputs=list(doc["outputs"]),
                meta=dict(doc.get("meta", {})))
        for td in doc["tensors"]:
            g.add_tensor(Tensor.from_dict(td))
        for nd in doc["nodes"]:
            g.add_node(Node.from_dict(nd))
        extra = set(weights) - {n for n, t in g.tensors.items() if t.kind == "weight"}
        if extra:
            raise GraphError(f"{wpath}: arrays {sorted(extra)} belong to no weight tensor")
        g.weights = weights
        g.validate()
        return g


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, FixedType):
        return o.to_dict()
    raise TypeError(f"cannot serialize {type(o).__name__}")
