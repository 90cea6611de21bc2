"""hls4ml interoperation: the same quantized layers through hls4ml's PyTorch frontend.

For every node of a fixed graph that hls4ml 1.x's PyTorch frontend can express
(``torch.nn.Linear`` -> Dense, ``torch.nn.LayerNorm`` -> LayerNormalization,
``torch.nn.Softmax`` -> Softmax, ``torch.nn.ReLU`` -> Activation, ``a + b`` ->
Merge add), :func:`plan` builds a one-layer torch module holding the graph's
*dequantized integer weights* (exact in float32) and an hls4ml configuration
whose precisions are the graph's formats:

* inputs and results: the tensor's ``ap_fixed``/``ap_ufixed`` type with its
  rounding and saturation modes. A per-channel tensor has no single ap_fixed
  type: as an *input* it is given the narrowest type that holds every
  channel's values exactly (finest fractional bits, widest integer bits); a
  linear reads its per-channel input codes at the finest channel's
  fractional bits (its weight rows are pre-scaled, ``hwgen.quant``), so that is
  what hls4ml is fed. As a layernorm *result* the hls4ml output is taken at the
  widened type and requantized per channel in NumPy (reported, not exact).
* Dense weights and biases: per-output-column formats widened to one exact type
  (AP_RND so the decimal text hls4ml writes reads back exactly); ``accum``:
  the graph's exact accumulator (``acc_bits``) widened the same way. So a
  Dense computes exactly the contract's ``linear`` and must agree bit for bit.
* LayerNormalization: ``accum`` wide enough for exact sums; ``table`` an
  ``ap_ufixed`` with the graph's isqrt table's 16 fractional bits and 20
  integer bits (1/sqrt(1e-12) = 1e6). The algorithm and table are hls4ml's own
  (1/sqrt over var in [10^-eps_power, 1) split linearly into TableSize entries,
  var >= 1 clamped to the last entry) -- it differs from the contract's.
* Softmax (the attention node's softmax, on the exact integer scores of rows
  whose keys are all valid): input = the score format, result = the
  probability format, ``table`` (hls4ml's x_max - x type) = the contract's
  exp-index format and TableSize = its 2^width entries, ``exp_table`` = the exp
  table's format; the reciprocal is hls4ml's (a table indexed by the top bits
  of the sum) -- the contract normalizes the sum first.

:func:`run` converts, compiles (``compile()``: g++ of hls4ml's own project,
cached under ``.hwgen-cache/hls4ml/`` by a hash of the layer, its weights and
configuration, hls4ml's version and the compiler) and runs hls4ml's own
C-simulation (``predict()``) on the golden model's recorded input codes, and
compares every output code: ``mismatches`` and ``max_abs_diff_lsb`` (in units
of the output format's last bit). :func:`write_projects` writes one hls4ml
project per expressible layer (``hwgen gen --target hls4ml``).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import contract as C
from ..fixed import FixedType
from ..ir import Graph, Node
from .csim import _compiler_id, compiler
from .emit import HLSError, sanitize

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = _REPO / ".hwgen-cache" / "hls4ml"
#: ops hls4ml's PyTorch frontend converts (hwgen op -> the torch module / hls4ml layer)
HLS4ML_LAYERS = {"linear": "torch.nn.Linear -> Dense", "layernorm": "torch.nn.LayerNorm -> LayerNormalization",
                 "relu": "torch.nn.ReLU -> Activation", "add": "a + b -> Merge (add)",
                 "softmax": "torch.nn.Softmax -> Softmax (the attention node's softmax)"}
#: ops with no hls4ml PyTorch handler, and why
NOT_EXPRESSIBLE = {
    "attention": "hls4ml's PyTorch frontend has no attention layer (its MultiHeadAttention is Keras-only); "
                 "only the softmax inside it is compared",
    "gelu": "hls4ml's PyTorch frontend has no GELU activation",
    "embedding": "hls4ml's PyTorch frontend has no embedding layer",
    "mean_pool": "masked mean pooling has no hls4ml PyTorch handler",
    "quantize": "the float -> fixed input quantizer is the hls4ml input precision itself",
}
#: layernorm table type: the contract's isqrt fractional bits, 20 integer bits (1/sqrt(1e-12) = 1e6)
LN_TABLE_INT_BITS = 20
#: layers compared per record on at most this many rows (hls4ml's C-sim is per sample)
MAX_ROWS = 4096


class HLS4MLError(HLSError):
    """hls4ml cannot convert, compile or run a layer; the message names it."""


def _hls4ml():
    try:
        import hls4ml  # noqa: F401
    except ImportError as e:
        raise HLS4MLError(f"hls4ml is not importable ({e}): pip install hls4ml") from None
    return hls4ml


def _ptype(f) -> str:
    """The hls4ml precision string of a format (ap_fixed<W,I,Q,O> / ap_ufixed)."""
    kind = "ap_fixed" if f.signed else "ap_ufixed"
    return f"{kind}<{f.width},{f.int_bits},{f.q},{f.o}>"


#: ap_fixed's widest type with the headers' default AP_INT_MAX_W
AP_MAX_WIDTH = 1024


class _AP:
    """An ap_fixed type of any width the headers allow (FixedType stops at 48 bits)."""

    def __init__(self, width: int, int_bits: int, signed: bool = True, q: str = "AP_RND", o: str = "AP_SAT"):
        if not 1 <= width <= AP_MAX_WIDTH:
            raise HLS4MLError(f"a {width}-bit type is beyond what ap_fixed allows (1..{AP_MAX_WIDTH} bits)")
        self.width, self.int_bits, self.signed, self.q, self.o = width, int_bits, signed, q, o

    @property
    def frac_bits(self) -> int:
        return self.width - self.int_bits


def _wide(width: int, fracs, signed: bool = True, q: str = "AP_RND", o: str = "AP_SAT") -> _AP:
    """The narrowest type holding codes of ``width`` bits at every one of ``fracs``
    fractional bits exactly."""
    fr = np.asarray(fracs, dtype=np.int64).reshape(-1)
    fmax, imax = int(fr.max()), int((width - fr).max())
    return _AP(imax + fmax, imax, signed, q, o)


def _tensor_type(graph: Graph, t: str):
    """A tensor's format, or (per channel) the exact widened one."""
    tt = graph.tensors[t]
    f = tt.fmt
    if f is None:
        raise HLS4MLError(f"tensor '{t}' has no fixed-point format: hls4ml needs ap_fixed precisions")
    if not tt.per_channel:
        return f
    return _wide(f.width, tt.frac_bits(), f.signed, f.q, f.o)


@dataclass
class Layer:
    """One graph node (or the softmax inside an attention node) as an hls4ml model."""

    name: str               # C identifier / project folder
    node: str
    op: str                 # linear | layernorm | relu | add | softmax
    exact: bool             # hwgen claims bit-exact agreement (Dense, add, relu)
    precision: dict         # hls4ml 'LayerName' entries: layer name -> {'Precision': {...}, ...}
    in_shapes: list         # per input: the hls4ml input shape
    out_fmt: FixedType      # the output tensor's format (per channel: see out_frac)
    out_frac: np.ndarray    # output fractional bits per channel
    build: object = None    # () -> torch module
    in_frac: list = field(default_factory=list)   # fractional bits each input's codes are read at
    note: str = ""


# ----------------------------------------------------------------------------- per-op specs

def _linear(graph: Graph, node: Node) -> Layer:
    import torch

    xt, wt, yt = (graph.tensors[t] for t in (node.inputs[0], node.inputs[1], node.outputs[0]))
    if yt.per_channel:
        raise HLS4MLError(f"output '{yt.name}' has per-channel formats: an hls4ml Dense has one result type")
    w = np.asarray(graph.weights[wt.name]).astype(np.int64)
    k, n = w.shape
    x_frac = int(np.max(np.asarray(xt.frac_bits())))
    x_type = _AP(xt.fmt.width, xt.fmt.width - x_frac, xt.fmt.signed, xt.fmt.q, xt.fmt.o)
    w_frac = np.broadcast_to(np.asarray(wt.frac_bits()).reshape(-1), (n,))
    w_type = _wide(wt.fmt.width, w_frac)
    acc = int(node.attrs["acc_bits"])
    acc_type = _wide(acc, x_frac + w_frac)
    wf = np.ldexp(w.astype(np.float64), -w_frac[None, :])
    bname = graph.node_input(node, "bias")
    prec = {"weight": _ptype(w_type), "accum": _ptype(acc_type), "result": _ptype(yt.fmt)}
    b = None
    if bname:
        bc = np.asarray(graph.weights[bname]).astype(np.int64).reshape(-1)
        bw = graph.tensors[bname].fmt.width if graph.tensors[bname].fmt is not None else acc
        prec["bias"] = _ptype(_wide(bw, x_frac + w_frac))
        b = np.ldexp(bc.astype(np.float64), -(x_frac + w_frac))
    for arr, what in ((wf, "weights"), (b, "bias")):
        if arr is not None and not np.array_equal(arr.astype(np.float32).astype(np.float64), arr):
            raise HLS4MLError(f"{what} of '{node.name}' are not exact in float32 (hls4ml reads torch weights)")

    def build():
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(k, n, bias=b is not None)
                with torch.no_grad():
                    self.layer.weight.copy_(torch.tensor(wf.T, dtype=torch.float32))
                    if b is not None:
                        self.layer.bias.copy_(torch.tensor(b, dtype=torch.float32))

            def forward(self, x):
                return self.layer(x)
        return M()

    return Layer(sanitize(node.name), node.name, "linear", True,
                 {"x": {"Precision": {"result": _ptype(x_type)}}, "layer": {"Precision": prec}},
                 [(k,)], yt.fmt, np.full(n, yt.fmt.frac_bits), build, [x_frac])


def _layernorm(graph: Graph, node: Node) -> Layer:
    import torch

    xt, gt, yt = (graph.tensors[t] for t in (node.inputs[0], node.inputs[1], node.outputs[0]))
    if xt.per_channel:
        raise HLS4MLError(f"input '{xt.name}' has per-channel formats")
    eps = float(node.attrs.get("eps", 1e-5))
    p10 = -round(np.log10(eps)) if eps > 0 else 0
    if eps <= 0 or p10 <= 0:
        raise HLS4MLError(f"eps {eps}: hls4ml's LayerNorm needs 0 < eps < 0.1")
    gamma = np.asarray(graph.weights[node.inputs[1]]).astype(np.int64)
    beta = np.asarray(graph.weights[node.inputs[2]]).astype(np.int64)
    h = gamma.size
    norm = FixedType.from_dict(node.attrs["norm_format"])
    gf = gt.fmt.frac_bits
    g = np.ldexp(gamma.astype(np.float64), -gf)
    bt = np.ldexp(beta.astype(np.float64), -(norm.frac_bits + gf))
    y_type = _tensor_type(graph, yt.name)
    isq = C.IsqrtTable(**node.attrs["isqrt"])
    xb = int(np.ceil(np.log2(h))) + 2
    accum = _AP(2 * xt.fmt.width + 2 * xb, 2 * xt.fmt.int_bits + 2 * xb)
    table = _AP(isq.out_bits + LN_TABLE_INT_BITS, LN_TABLE_INT_BITS, False)
    b_bits = max(int(np.abs(beta).max()).bit_length() + 1, 2)
    prec = {"scale": _ptype(_AP(gt.fmt.width, gt.fmt.int_bits)),
            "bias": _ptype(_AP(b_bits, b_bits - norm.frac_bits - gf)),
            "accum": _ptype(accum), "table": _ptype(table), "result": _ptype(y_type)}

    def build():
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.LayerNorm(h, eps=eps)
                with torch.no_grad():
                    self.layer.weight.copy_(torch.tensor(g, dtype=torch.float32))
                    self.layer.bias.copy_(torch.tensor(bt, dtype=torch.float32))

            def forward(self, x):
                return self.layer(x)
        return M()

    out_frac = np.broadcast_to(np.asarray(yt.frac_bits()).reshape(-1), (h,)).copy()
    return Layer(sanitize(node.name), node.name, "layernorm", False,
                 {"x": {"Precision": {"result": _ptype(xt.fmt)}},
                  "layer": {"Precision": prec, "table_t": prec["table"], "TableSize": 4096,
                            "TableRangePower2": 0}},
                 [(1, h)], yt.fmt, out_frac, build, [xt.fmt.frac_bits],
                 note="hls4ml's LayerNorm: 1/sqrt(var) from a linear table over [1e-eps, 1); var >= 1 "
                      "clamps to the last entry")


def _relu(graph: Graph, node: Node) -> Layer:
    import torch

    xt, yt = graph.tensors[node.inputs[0]], graph.tensors[node.outputs[0]]
    if yt.per_channel or xt.per_channel:
        raise HLS4MLError("per-channel formats: an hls4ml activation has one input and one result type")
    h = xt.shape[-1]

    def build():
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.ReLU()

            def forward(self, x):
                return self.layer(x)
        return M()

    return Layer(sanitize(node.name), node.name, "relu", True,
                 {"x": {"Precision": {"result": _ptype(xt.fmt)}}, "layer": {"Precision": {"result": _ptype(yt.fmt)}}},
                 [(h,)], yt.fmt, np.full(h, yt.fmt.frac_bits), build, [xt.fmt.frac_bits])


def _add(graph: Graph, node: Node) -> Layer:
    import torch

    at, bt, yt = (graph.tensors[t] for t in (node.inputs[0], node.inputs[1], node.outputs[0]))
    if yt.per_channel:
        raise HLS4MLError(f"output '{yt.name}' has per-channel formats: an hls4ml Merge has one result type")
    h = yt.shape[-1]
    a_type, b_type = _tensor_type(graph, at.name), _tensor_type(graph, bt.name)

    def build():
        class M(torch.nn.Module):
            def forward(self, a, b):
                return a + b
        return M()

    fr = lambda t: np.broadcast_to(np.asarray(t.frac_bits()).reshape(-1), (h,)).copy()
    return Layer(sanitize(node.name), node.name, "add", True,
                 {"a": {"Precision": {"result": _ptype(a_type)}}, "b": {"Precision": {"result": _ptype(b_type)}},
                  "add": {"Precision": {"result": _ptype(yt.fmt)}}},
                 [(h,), (h,)], yt.fmt, np.full(h, yt.fmt.frac_bits), build, [fr(at), fr(bt)])


def _softmax(graph: Graph, node: Node, s_kv: int) -> Layer:
    import torch

    a = node.attrs
    qf, kf = graph.tensors[node.inputs[0]].fmt, graph.tensors[node.inputs[1]].fmt
    s_bits = C.acc_width(qf, kf, int(a["head_dim"]))
    s_frac = qf.frac_bits + kf.frac_bits
    score = _AP(s_bits, s_bits - s_frac)
    pf = FixedType.from_dict(a["prob_format"])
    exp = C.ExpTable(**a["exp"])
    idx = exp.index_format()
    e_type = _AP(exp.out_bits + 1, 1, False)
    sum_int = int(np.ceil(np.log2(max(s_kv, 2)))) + 1
    sum_type = _AP(exp.out_bits + sum_int, sum_int, False)
    recip = C.RecipTable(**a["recip"])
    inv_type = _AP(recip.out_bits + 1, 1, False)
    prec = {"result": _ptype(pf), "table": _ptype(idx), "exp_table": _ptype(e_type),
            "inv_table": _ptype(inv_type), "inv_inp": _ptype(sum_type), "accum": _ptype(sum_type)}

    def build():
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Softmax(dim=-1)

            def forward(self, x):
                return self.layer(x)
        return M()

    return Layer(sanitize(node.name) + "_softmax", node.name, "softmax", False,
                 {"x": {"Precision": {"result": _ptype(score)}},
                  "layer": {"Precision": prec, "Implementation": "stable",
                            "exp_table_t": prec["exp_table"], "inv_table_t": prec["inv_table"],
                            "inv_inp_t": prec["inv_inp"], "inp_norm_t": prec["table"],
                            "exp_table_size": 2 ** idx.width, "inv_table_size": 1024}},
                 [(s_kv,)], pf, np.full(s_kv, pf.frac_bits), build, [s_frac],
                 note="hls4ml's Softmax (stable): exp table indexed by the top bits of x_max - x, "
                      "reciprocal table indexed by the top bits of the un-normalized sum")


# ----------------------------------------------------------------------------- planning

def plan(graph: Graph, layer: int | None = None, s_kv: int | None = None) -> tuple[list[Layer], list[dict]]:
    """The expressible layers (of ``layer``) and the skipped nodes ``{name, op, reason}``.
    ``s_kv``: the key count of the softmax layers (rows with every key valid)."""
    if not graph.is_fixed:
        raise HLS4MLError(f"graph '{graph.name}' is a float graph; quantize it first (`hwgen quantize`)")
    _hls4ml()
    nodes = [n for n in graph.nodes if layer is None or n.layer == layer]
    if not nodes:
        raise HLS4MLError(f"graph '{graph.name}' has no nodes in layer {layer}")
    layers: list[Layer] = []
    skipped: list[dict] = []
    fns = {"linear": _linear, "layernorm": _layernorm, "relu": _relu, "add": _add}
    for n in nodes:
        try:
            if n.op in fns or n.op == "attention":
                for t in [*n.inputs, *n.outputs]:
                    tt = graph.tensors.get(t) if t else None
                    if tt is not None and tt.dtype != "index" and tt.fmt is None:
                        raise HLS4MLError(f"tensor '{t}' has no fixed-point format: hls4ml needs "
                                          "ap_fixed precisions")
            if n.op in fns:
                layers.append(fns[n.op](graph, n))
                continue
            if n.op == "attention" and s_kv:
                layers.append(_softmax(graph, n, s_kv))
            reason = NOT_EXPRESSIBLE.get(n.op, f"op '{n.op}' has no hls4ml PyTorch handler")
            skipped.append({"name": n.name, "op": n.op, "reason": reason})
        except HLS4MLError as e:
            skipped.append({"name": n.name, "op": n.op, "reason": str(e)})
        except Exception as e:  # noqa: BLE001 -- a format hls4ml cannot express, named
            skipped.append({"name": n.name, "op": n.op, "reason": f"{type(e).__name__}: {e}"})
    return layers, skipped


# ----------------------------------------------------------------------------- convert + compile

def _config(layer: Layer, module) -> dict:
    hls4ml = _hls4ml()
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = hls4ml.utils.config_from_pytorch_model(module, layer.in_shapes if len(layer.in_shapes) > 1
                                                     else layer.in_shapes[0], granularity="name",
                                                     backend="Vivado")
    for lname, entry in layer.precision.items():
        if lname not in cfg["LayerName"]:
            raise HLS4MLError(f"layer '{layer.name}': hls4ml named its layers {list(cfg['LayerName'])}, "
                              f"not '{lname}'")
        for k, v in entry.items():
            if k == "Precision":
                cfg["LayerName"][lname]["Precision"].update(v)
            else:
                cfg["LayerName"][lname][k] = v
    cfg["Model"]["Strategy"] = "Latency"
    return cfg


def _key(layer: Layer, module, cfg: dict) -> str:
    import torch

    hls4ml = _hls4ml()
    h = hashlib.sha256()
    h.update(f"{hls4ml.__version__}\0{_compiler_id(compiler())}\0{layer.op}\0{layer.in_shapes}\0".encode())
    h.update(json.dumps({k: v for k, v in cfg.items() if k != "PytorchModel"}, sort_keys=True,
                        default=str).encode())
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode() + b"\0" + p.detach().cpu().numpy().astype(np.float32).tobytes())
    if isinstance(module, torch.nn.Module):
        h.update(type(module).__name__.encode())
    return h.hexdigest()


def convert(layer: Layer, output_dir: str | os.PathLike):
    """The hls4ml model of ``layer`` (not written, not compiled)."""
    import warnings

    hls4ml = _hls4ml()
    module = layer.build()
    cfg = _config(layer, module)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hm = hls4ml.converters.convert_from_pytorch_model(
                module, hls_config=cfg, output_dir=str(output_dir), backend="Vivado", io_type="io_parallel",
                project_name="myproject")
    except Exception as e:  # noqa: BLE001 -- hls4ml raises bare Exceptions
        raise HLS4MLError(f"hls4ml cannot convert layer '{layer.name}' ({layer.op}): {e}") from None
    return hm, module, cfg


def compiled(layer: Layer, cache: Path | None = None, say=lambda m: None):
    """The hls4ml model of ``layer`` with its C-simulation library loaded: compiled
    once per key (``compile()`` in ``<cache>/<key>``), reused afterwards."""
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    module = layer.build()
    key = _key(layer, module, _config(layer, module))[:24]
    d = cache / key
    hm, _, _ = convert(layer, d)
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = d / "hwgen-done"
        sos = sorted((d / "firmware").glob("myproject-*.so")) if d.is_dir() else []
        if done.is_file() and sos:
            hm._top_function_lib = ctypes.cdll.LoadLibrary(str(sos[-1]))
            return hm, key, True
        if d.exists():
            import shutil
            shutil.rmtree(d)
        say(f"hls4ml compile() of {layer.name} ({layer.op})")
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                hm.compile()
        except Exception as e:  # noqa: BLE001
            raise HLS4MLError(f"hls4ml compile() of layer '{layer.name}' failed: {e}\n"
                              f"{out.getvalue()[-1500:]}") from None
        done.write_text(key + "\n")
    return hm, key, False


def _codes_to_float(codes: np.ndarray, frac) -> np.ndarray:
    return np.ldexp(np.asarray(codes, dtype=np.float64), -np.asarray(frac, dtype=np.int64))


def predict(layer: Layer, hm, xs: list[np.ndarray]) -> np.ndarray:
    """hls4ml's C-simulation on input codes ``xs`` (one (rows, ...) array per input)
    -> output codes (rows, N) in the layer's output format (per channel: requantized)."""
    vals = [np.ascontiguousarray(_codes_to_float(x, f).reshape(len(x), -1)) for x, f in zip(xs, layer.in_frac)]
    with contextlib.redirect_stdout(io.StringIO()):
        y = hm.predict(vals[0] if len(vals) == 1 else vals)
    y = np.asarray(y, dtype=np.float64).reshape(len(xs[0]), -1)
    of = layer.out_fmt
    frac = np.asarray(layer.out_frac, dtype=np.int64)
    if np.unique(frac).size == 1:
        codes = np.ldexp(y, int(frac[0]))
        if not np.array_equal(codes, np.round(codes)):
            raise HLS4MLError(f"layer '{layer.name}': hls4ml returned values off the output grid")
        return codes.astype(np.int64)
    # per-channel result: hls4ml's widened type, requantized per channel (round/saturate)
    wide_frac = int(frac.max())
    codes = np.ldexp(y, wide_frac).astype(np.int64)
    from ..fixed import requantize
    return requantize(codes, wide_frac, of.width, frac, of.signed, of.q, of.o)


# ----------------------------------------------------------------------------- verify

def _rows(a: np.ndarray, d: int) -> np.ndarray:
    return np.asarray(a).reshape(-1, d)[:MAX_ROWS]


def _softmax_io(graph: Graph, node: Node, vals: dict) -> tuple[np.ndarray, np.ndarray]:
    """Score codes and golden probability codes of every (batch, head, query) row whose
    keys are all valid: no padding in that batch row, and for causal attention only the
    last query (it sees every key)."""
    a = node.attrs
    heads, hd = int(a["heads"]), int(a["head_dim"])
    q, k = (np.asarray(vals[t]) for t in node.inputs[:2])
    b, s, _ = q.shape
    qf, kf = graph.tensors[node.inputs[0]].fmt, graph.tensors[node.inputs[1]].fmt
    qh = q.reshape(b, s, heads, hd).transpose(0, 2, 1, 3)
    kh = k.reshape(b, k.shape[1], heads, hd).transpose(0, 2, 1, 3)
    scores = C.matmul_act(qh, qf, kh.swapaxes(-1, -2), kf)
    valid = np.ones(scores.shape, dtype=bool)
    keep = np.ones(b, dtype=bool)
    if len(node.inputs) > 3 and node.inputs[3]:
        m = np.asarray(vals[node.inputs[3]]) != 0
        keep = m.all(axis=1)
    p_fmt = FixedType.from_dict(a["prob_format"])
    p = C.softmax(scores, qf.frac_bits + kf.frac_bits, valid, C.ExpTable(**a["exp"]),
                  C.RecipTable(**a["recip"]), p_fmt)
    if a.get("causal"):
        scores, p = scores[:, :, -1:], p[:, :, -1:]
    return scores[keep].reshape(-1, scores.shape[-1]), p[keep].reshape(-1, p.shape[-1])


def layer_io(graph: Graph, layer: Layer, vals: dict) -> tuple[list[np.ndarray], np.ndarray]:
    node = graph.node(layer.node)
    if layer.op == "softmax":
        s, p = _softmax_io(graph, node, vals)
        return [s[:MAX_ROWS]], p[:MAX_ROWS]
    d_out = int(np.asarray(vals[node.outputs[0]]).shape[-1])
    ins = node.inputs[:2] if layer.op == "add" else node.inputs[:1]
    xs = [_rows(vals[t], int(np.asarray(vals[t]).shape[-1])) for t in ins]
    return xs, _rows(vals[node.outputs[0]], d_out)


def _var_detail(graph: Graph, ly: Layer, xs: list[np.ndarray], diff: np.ndarray) -> dict:
    """LayerNorm rows split by hls4ml's table range: var >= 1 clamps to its last entry."""
    f = graph.tensors[graph.node(ly.node).inputs[0]].fmt
    var = np.ldexp(xs[0].astype(np.float64), -f.frac_bits).var(axis=1)
    lo, hi = diff[var < 1], diff[var >= 1]
    return {"rows": int(len(var)), "rows_var_ge_1": int((var >= 1).sum()),
            "max_abs_diff_lsb_var_lt_1": int(lo.max()) if lo.size else None,
            "max_abs_diff_lsb_var_ge_1": int(hi.max()) if hi.size else None}


def verify(graph: Graph, feeds: dict, layer: int | None = None, cache: Path | None = None,
           say=lambda m: None, only: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Every expressible layer (``only``: those named, by layer or node name) through
    hls4ml's own C-simulation vs the golden model: per layer ``name, node, op, exact,
    vectors, mismatches, max_abs_diff_lsb, mean_abs_diff_lsb, cached`` (+ ``detail``)."""
    from ..golden import GoldenModel

    say("golden model, every tensor recorded")
    vals = GoldenModel(graph)(feeds, record=True)
    s_kv = int(np.asarray(feeds[graph.inputs[0]]).shape[1]) if graph.inputs else None
    layers, skipped = plan(graph, layer, s_kv)
    if only:
        unknown = [o for o in only if not any(o in (ly.name, ly.node) for ly in layers)]
        if unknown:
            raise HLS4MLError(f"no hls4ml layer named {unknown}; expressible: {[ly.name for ly in layers]}")
        layers = [ly for ly in layers if ly.name in only or ly.node in only]
    report = []
    for ly in layers:
        xs, want = layer_io(graph, ly, vals)
        if not len(want):
            skipped.append({"name": ly.node, "op": ly.op, "reason": "no row with every key valid"})
            continue
        hm, key, hit = compiled(ly, cache, say)
        got = predict(ly, hm, xs)
        diff = np.abs(got - want)
        r = {"name": ly.name, "node": ly.node, "op": ly.op, "exact": ly.exact, "vectors": int(want.size),
             "mismatches": int((diff != 0).sum()), "max_abs_diff_lsb": int(diff.max()) if diff.size else 0,
             "mean_abs_diff_lsb": float(diff.mean()) if diff.size else 0.0, "cached": hit}
        if ly.op == "layernorm":
            r["detail"] = _var_detail(graph, ly, xs, diff)
        report.append(r)
        say(f"  {ly.name:28s} {ly.op:10s} {r['vectors']:8d} codes  mismatches {r['mismatches']:7d}  "
            f"max |diff| {r['max_abs_diff_lsb']} LSB{'  (cached build)' if hit else ''}")
    return report, skipped


# ----------------------------------------------------------------------------- gen

def write_projects(graph: Graph, out: str | os.PathLike, layer: int | None = None, s_kv: int | None = None,
                   say=lambda m: None) -> dict:
    """One hls4ml project (``hls_model.write()``: firmware/, build_prj.tcl, ...) per
    expressible layer under ``out/<name>/`` plus ``manifest.json``, written atomically."""
    from ..files import atomic_directory

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise HLS4MLError(f"{out} exists and is not an hwgen hls4ml project; choose another --out")
    layers, skipped = plan(graph, layer, s_kv)
    if not layers:
        raise HLS4MLError(f"graph '{graph.name}': no layer hls4ml can express "
                          f"(skipped: {', '.join(s['name'] for s in skipped) or 'none'})")
    with atomic_directory(out) as tmp:
        entries = []
        for ly in layers:
            say(f"hls4ml project {ly.name} ({ly.op})")
            hm, module, cfg = convert(ly, tmp / ly.name)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    hm.write()
            except Exception as e:  # noqa: BLE001
                raise HLS4MLError(f"hls4ml cannot write layer '{ly.name}': {e}") from None
            entries.append({"name": ly.name, "node": ly.node, "op": ly.op, "dir": ly.name,
                            "exact": ly.exact, "input_shapes": [list(s) for s in ly.in_shapes],
                            "precision": {k: v.get("Precision", {}) for k, v in ly.precision.items()},
                            "note": ly.note})
        manifest = {"graph": graph.name, "target": "hls4ml", "hls4ml": _hls4ml().__version__,
                    "layers": entries, "skipped": skipped}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    manifest["files"] = sum(1 for p in out.rglob("*") if p.is_file())
    return manifest


# ----------------------------------------------------------------------------- frontend coverage

def _fx_ops(mod) -> tuple[list[tuple[str, bool]], str | None]:
    """Each op of ``mod`` as hls4ml's PyTorch frontend sees it (its own fx tracer and its
    own support lists): (name, converted?). If hls4ml's tracer fails, the leaf modules
    (an upper bound of what it could convert) and the error."""
    from hls4ml.converters import get_supported_pytorch_layers
    from hls4ml.converters.pytorch_to_hls import layer_name_map
    from hls4ml.utils.torch import CustomFXTracer

    supported = set(get_supported_pytorch_layers())
    noop = {"Dropout", "Sequential", "Identity"}   # hls4ml skips these; not counted as ops
    try:
        graph = CustomFXTracer().trace(mod)
    except Exception as e:  # noqa: BLE001 -- data-dependent control flow in HF modules
        leaves = [type(m).__name__ for _, m in mod.named_modules() if not list(m.children())]
        return ([(n, n in supported) for n in leaves if n not in noop],
                f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    ops = []
    for n in graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if n.op == "call_module":
            name = type(mod.get_submodule(n.target)).__name__
            if name in noop:
                continue
        else:
            name = n.name.rsplit("_", 1)[0] if n.name.split("_")[-1].isdigit() else n.name
            name = layer_name_map.get(name, name)
            if name == "getitem":
                continue
        ops.append((name, name in supported))
    return ops, None


def frontend_coverage() -> dict:
    """Which ops of an HF BertLayer and GPT2Block hls4ml's PyTorch frontend converts
    (op by op, and whether the whole block converts), vs the ops hwgen's frontend
    converts and those it has HLS kernels for."""
    import warnings

    from .. import frontend
    from .emit import HLS_OPS

    hls4ml = _hls4ml()
    out = {}
    for label, (mod, x) in _hf_blocks().items():
        ops, trace_err = _fx_ops(mod)
        bad: dict[str, int] = {}
        for name, ok in ops:
            if not ok:
                bad[name] = bad.get(name, 0) + 1
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = hls4ml.utils.config_from_pytorch_model(mod, tuple(x.shape[1:]), granularity="name")
                hls4ml.converters.convert_from_pytorch_model(mod, hls_config=cfg, backend="Vivado",
                                                             output_dir=str(DEFAULT_CACHE / "probe"))
            whole = "converted"
        except Exception as e:  # noqa: BLE001
            whole = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        g = frontend.trace(mod, example_input=x)
        hw = [n.op for n in g.nodes if n.op != "quantize"]   # quantize: the input's ap_fixed type
        out[label] = {"hls4ml_whole_block": whole,
                      "hls4ml_counted": "leaf modules (hls4ml's fx trace fails)" if trace_err else "traced ops",
                      "hls4ml_ops": len(ops), "hls4ml_handled": sum(ok for _, ok in ops),
                      "hls4ml_handled_ops": sorted({n for n, ok in ops if ok}),
                      "hls4ml_unsupported": bad,
                      "hwgen_ops": len(hw), "hwgen_hls_kernels": sum(o in HLS_OPS for o in hw),
                      "hwgen_op_counts": {o: hw.count(o) for o in sorted(set(hw))}}
    return out


def _hf_blocks() -> dict:
    import torch
    from transformers import BertConfig, GPT2Config
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    torch.manual_seed(0)
    bert = BertLayer(BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128)).eval()
    gpt = GPT2Block(GPT2Config(n_embd=64, n_head=4, n_inner=128)).eval()
    x = torch.randn(1, 8, 64)
    return {"BertLayer": (bert, x), "GPT2Block": (gpt, x)}


# ----------------------------------------------------------------------------- CLI

def _feeds(args, graph, say):
    from .project import builtin_feeds, load_inputs

    if getattr(args, "inputs", None):
        return load_inputs(args.inputs), f"--inputs {args.inputs}"
    feeds, note = builtin_feeds(graph)
    say(f"inputs: {note}")
    return feeds, note


def cmd_verify_hls4ml(args, say) -> tuple[dict, int]:
    """``hwgen verify --target hls4ml``: exit status 1 if a layer hwgen claims exact
    (Dense, add, relu) differs; layernorm/softmax differences are reported only."""
    import time

    from ..ir import Graph

    t0 = time.perf_counter()
    graph = Graph.load(args.graph)
    feeds, note = _feeds(args, graph, say)
    report, skipped = verify(graph, feeds, args.layer, say=say, only=getattr(args, "kernel", None))
    if not report:
        raise HLS4MLError(f"graph '{graph.name}': no layer"
                          + (f" of layer {args.layer}" if args.layer is not None else "")
                          + " that hls4ml can express")
    total = sum(r["mismatches"] for r in report)
    exact_bad = sum(r["mismatches"] for r in report if r["exact"])
    result = {"target": "hls4ml", "graph": str(args.graph), "layer": args.layer, "inputs": note,
              "kernels": report, "vectors": sum(r["vectors"] for r in report), "mismatches": total,
              "mismatches_exact": exact_bad, "skipped": skipped, "wall_s": time.perf_counter() - t0}
    say(f"{len(report)} hls4ml layer(s), {result['vectors']} output codes, {total} mismatch(es) "
        f"({exact_bad} in layers expected bit-exact)")
    return result, (1 if exact_bad else 0)


def cmd_gen_hls4ml(args, say) -> dict:
    """``hwgen gen --target hls4ml``: one hls4ml project per expressible layer."""
    from ..ir import Graph

    graph = Graph.load(args.graph)
    s_kv = None
    if not getattr(args, "no_vectors", False):
        try:
            feeds, _ = _feeds(args, graph, say)
            s_kv = int(np.asarray(feeds[graph.inputs[0]]).shape[1]) if graph.inputs else None
        except HLSError as e:
            if getattr(args, "inputs", None):
                raise
            say(f"no inputs ({e}): the attention softmax is not written (its length is unknown)")
    man = write_projects(graph, args.out, args.layer, s_kv, say)
    say(f"wrote {args.out}: one hls4ml project per layer (cd <layer> && vitis_hls -f build_prj.tcl)")
    return {"target": "hls4ml", "out": str(args.out), "kernels": [e["name"] for e in man["layers"]],
            "files": man["files"], "skipped": [s["name"] for s in man["skipped"]]}
