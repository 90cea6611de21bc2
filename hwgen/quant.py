"""Quantization: float graph -> fixed graph.

The quantizer is a short pipeline of named passes over the float graph from
:mod:`hwgen.frontend`; each pass returns a new graph and records its name in
``graph.meta["passes"]``:

``fold_attention_scale``  multiply each attention's q projection by its scale
                          (exact in float), set the scale to 1.
``calibrate``             run the float graph on sample inputs and record, per
                          tensor, its range and a value sample.
``assign_formats``        choose every activation's format (width by role,
                          integer bits by MSE over the samples); layernorm
                          outputs may get per-channel formats (below).
``quantize_weights``      replace float weights by integer codes; derive each
                          linear's exact accumulator width and each
                          nonlinearity's table parameters, all recorded in
                          the graph so later stages never re-derive them.

Widths by role (see :class:`QuantConfig`): tensors that feed a matmul
(linear inputs, q/k/v, probabilities) get ``act_bits``; tensors that feed a
GELU/ReLU table get ``table_in_bits``; the residual stream and everything else
gets ``residual_bits``.

Per-channel activation formats (``smooth_bits``, see :meth:`QuantConfig.from_bits`): transformer layernorm and
GELU outputs have a few outlier channels (all-MiniLM-L6-v2: layernorm absmax
~30 against a median of ~1.6), which a per-tensor 8-bit format pays for with
a coarse LSB on every channel. A layernorm or GELU output whose consumers are
linears, adds or pooling may instead get integer bits per channel, at most
``smooth_bits`` finer than its widest channel. The hardware is unchanged: each consuming
linear's weight row k is pre-scaled by ``2**s_k`` (``s_k`` = the channel's
extra fractional bits, :func:`linear_row_shift`) before its per-column
quantization, so the integer MAC array sees the codes as they are — a
power-of-two form of SmoothQuant's migration of activation range into weights.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from . import contract as C
from .fixed import FixedType, bits_for_range
from .ir import Graph, GraphError, Node

BITS_RE = re.compile(r"^w(\d+)a(\d+)$")
SUPPORTED_WEIGHT_BITS = range(2, 17)
SUPPORTED_ACT_BITS = range(4, 17)


class QuantError(ValueError):
    """A quantization request the contract cannot honour; names the setting."""


@dataclass(frozen=True)
class QuantConfig:
    """Every precision decision of a quantization, in one record."""

    weight_bits: int = 8
    act_bits: int = 8
    residual_bits: int = 16
    table_in_bits: int = 10
    norm_bits: int = 16
    norm_param_bits: int = 16
    prob_bits: int = 8
    q: str = "AP_RND"
    o: str = "AP_SAT"
    exp: C.ExpTable = C.ExpTable()
    recip: C.RecipTable = C.RecipTable()
    isqrt: C.IsqrtTable = C.IsqrtTable()
    per_channel: bool = True
    smooth_bits: int = 4

    @classmethod
    def from_bits(cls, bits: str, **overrides) -> "QuantConfig":
        """``"w8a8"`` -> weights 8 bits, matmul activations 8 bits; the
        residual stream gets ``max(16, act_bits)``, GELU tables
        ``min(act_bits + 2, 12)``, probabilities ``act_bits``. Per-channel
        migration ``smooth_bits = clip(weight_bits - 4, 1, 4)``: every bit
        moved into a weight row costs that row a bit of its weight format, which
        narrow weights cannot spare (MiniLM W4A8 mean cosine: 0.92 at 1 bit,
        0.85 at 2, 0.85 at 3; W8A8: 0.9940 at 3, 0.9945 at 4)."""
        m = BITS_RE.match(bits.lower())
        if not m:
            raise QuantError(f"--bits must look like w8a8 (weights, activations), got {bits!r}")
        w, a = int(m.group(1)), int(m.group(2))
        if w not in SUPPORTED_WEIGHT_BITS:
            raise QuantError(f"weight bits {w} unsupported: choose {SUPPORTED_WEIGHT_BITS.start}.."
                             f"{SUPPORTED_WEIGHT_BITS.stop - 1}")
        if a not in SUPPORTED_ACT_BITS:
            raise QuantError(f"activation bits {a} unsupported: choose {SUPPORTED_ACT_BITS.start}.."
                             f"{SUPPORTED_ACT_BITS.stop - 1}")
        kw = dict(weight_bits=w, act_bits=a, residual_bits=max(16, a),
                  table_in_bits=min(a + 2, 12), prob_bits=a, smooth_bits=min(max(w - 4, 1), 4))
        kw.update(overrides)
        return cls(**kw)

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        d["exp"] = C.ExpTable(**d["exp"])
        d["recip"] = C.RecipTable(**d["recip"])
        d["isqrt"] = C.IsqrtTable(**d["isqrt"])
        return cls(**d)


# ----------------------------------------------------------------------------
# pass: fold_attention_scale
# ----------------------------------------------------------------------------

def _record_pass(g: Graph, name: str) -> None:
    g.meta.setdefault("passes", []).append(name)


def fold_attention_scale(graph: Graph) -> Graph:
    """Fold each attention's ``scale`` into the linear that produces its q."""
    g = copy.deepcopy(graph)
    for node in g.nodes:
        if node.op != "attention" or node.attrs["scale"] == 1:
            continue
        q = node.inputs[0]
        prod = g.producer(q)
        if prod is None or prod.op != "linear" or len(g.consumers(q)) != 1:
            raise QuantError(f"node '{node.name}' ({node.source}): attention scale can only be "
                             "folded into a linear q projection used by nothing else")
        s = float(node.attrs["scale"])
        for role in ("weight", "bias"):
            name = g.node_input(prod, role)
            if name:
                g.weights[name] = (g.weights[name].astype(np.float64) * s).astype(np.float32)
        node.attrs["scale"] = 1.0
        node.attrs["folded_scale"] = s
    _record_pass(g, "fold_attention_scale")
    return g


# ----------------------------------------------------------------------------
# pass: calibrate
# ----------------------------------------------------------------------------

@dataclass
class TensorStats:
    lo: float = math.inf
    hi: float = -math.inf
    samples: list[np.ndarray] = field(default_factory=list)
    chan_absmax: np.ndarray | None = None   # over the last axis

    def update(self, x: np.ndarray, rng: np.random.Generator, keep: int) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.size == 0:
            return
        if x.ndim >= 2:
            ca = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            self.chan_absmax = ca if self.chan_absmax is None else np.maximum(self.chan_absmax, ca)
        x = x.reshape(-1)
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        if x.size > keep:
            x = rng.choice(x, keep, replace=False)
        self.samples.append(x)

    @property
    def absmax(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def sample(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(1)


def calibrate(graph: Graph, feeds: Iterable[dict[str, np.ndarray]], keep: int = 20000,
              seed: int = 0) -> dict[str, TensorStats]:
    """Run the float graph on ``feeds``; range and samples of every activation."""
    from .float_exec import run_float  # torch is imported only when calibrating

    rng = np.random.default_rng(seed)
    stats: dict[str, TensorStats] = {}
    activations = [n for n, t in graph.tensors.items() if t.kind == "activation"]
    for feed in feeds:
        vals = run_float(graph, feed, record=True)
        for name in activations:
            if name in vals:
                v = vals[name]
                v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
                stats.setdefault(name, TensorStats()).update(v, rng, keep)
    return stats


# ----------------------------------------------------------------------------
# pass: assign_formats
# ----------------------------------------------------------------------------

def int_bits_for(absmax: float, width: int, signed: bool) -> int:
    """Fewest integer bits whose range covers ``absmax`` (no clipping)."""
    if absmax <= 0:
        return 1 if signed else 0
    ib = math.floor(math.log2(absmax)) + 1 + (1 if signed else 0)
    # the top code is 2**(ib-s) - lsb: step up if absmax lands beyond it
    t = FixedType(width, ib, signed)
    if absmax > t.to_float(np.array([t.max_code]))[0] + t.lsb / 2:
        ib += 1
    return ib


def choose_format(samples: np.ndarray, absmax: float, width: int, signed: bool, q: str, o: str,
                  candidates: int = 4) -> FixedType:
    """The format of ``width`` bits whose quantization of ``samples`` has the
    least squared error, among the no-clip format and ``candidates - 1``
    formats that clip one, two, ... more integer bits."""
    top = int_bits_for(absmax, width, signed)
    best, best_err = None, math.inf
    for ib in range(top, top - candidates, -1):
        t = FixedType(width, ib, signed, q, o)
        err = float(np.sum((t.to_float(t.from_float(samples)) - samples) ** 2))
        if err < best_err:
            best, best_err = t, err
    return best


@dataclass(frozen=True)
class ActFormat:
    """An activation's format: one FixedType, or per channel (last axis) integer bits."""

    fmt: FixedType
    channel_int_bits: tuple[int, ...] | None = None

    @property
    def frac(self) -> int | np.ndarray:
        if self.channel_int_bits is None:
            return self.fmt.frac_bits
        return self.fmt.width - np.asarray(self.channel_int_bits, dtype=np.int64)


def foldable_per_channel(graph: Graph, name: str) -> bool:
    """Consumers that take per-channel formats for free: a linear's x (folded
    into its weight rows), adds (exact alignment), mean pooling."""
    cons = graph.consumers(name)
    return bool(cons) and all(
        (n.op == "linear" and n.inputs[0] == name) or n.op in ("add", "mean_pool") for n in cons) \
        and name not in graph.outputs


def tensor_width(graph: Graph, name: str, cfg: QuantConfig) -> int:
    """The width a tensor's role asks for (see module docstring)."""
    roles = set()
    for n in graph.consumers(name):
        i = n.inputs.index(name)
        if n.op == "linear" and i == 0 or n.op == "attention" and i < 3:
            roles.add("matmul")
        elif n.op in ("gelu", "relu"):
            roles.add("table")
    if "matmul" in roles:
        return cfg.act_bits
    if "table" in roles:
        return cfg.table_in_bits
    return cfg.residual_bits


def assign_formats(graph: Graph, stats: dict[str, TensorStats], cfg: QuantConfig) -> dict[str, ActFormat]:
    """Every activation tensor's format (graph inputs of dtype index excluded)."""
    fmts: dict[str, ActFormat] = {}
    for node in graph.nodes:
        out = node.outputs[0]
        if node.op == "embedding":
            continue  # takes its table's format (quantize_weights)
        if node.op == "mean_pool":
            fmts[out] = fmts[node.inputs[0]]
            continue
        st = stats.get(out)
        if st is None:
            raise QuantError(f"tensor '{out}' was never seen during calibration")
        width = tensor_width(graph, out, cfg)
        if node.op == "gelu" and width < cfg.act_bits:
            width = cfg.act_bits
        fmt = choose_format(st.sample(), st.absmax, width, True, cfg.q, cfg.o)
        chan = None
        if (cfg.smooth_bits > 0 and node.op in ("layernorm", "gelu") and st.chan_absmax is not None
                and foldable_per_channel(graph, out)):
            need = np.array([int_bits_for(float(a), width, True) for a in st.chan_absmax])
            top = int(need.max())
            chan = tuple(int(v) for v in np.clip(need, top - cfg.smooth_bits, top))
            fmt = FixedType(width, top, True, cfg.q, cfg.o)
        fmts[out] = ActFormat(fmt, chan)
    return fmts


# ----------------------------------------------------------------------------
# pass: quantize_weights (produces the fixed graph)
# ----------------------------------------------------------------------------

def per_channel_int_bits(w: np.ndarray, width: int, axis: int, per_channel: bool,
                         q: str = "AP_RND", o: str = "AP_SAT", candidates: int = 3) -> np.ndarray:
    """Integer bits per channel (along ``axis``): for each channel, the format
    with the least squared error among the one covering its max |w| and
    ``candidates - 1`` that clip one, two, ... more integer bits (what
    :func:`choose_format` does for activations, vectorized over channels)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    absmax = np.abs(w).max(axis=reduce)
    if not per_channel:
        absmax = np.full_like(absmax, absmax.max())
    top = np.array([int_bits_for(float(a), width, True) for a in absmax], dtype=np.int64)
    best, best_err = top, None
    for c in range(candidates):
        ib = top - c
        codes = quantize_per_channel(w, width, ib, axis, q, o)
        shape = [1] * w.ndim
        shape[axis] = -1
        err = ((np.ldexp(codes.astype(np.float64), -(width - ib).reshape(shape)) - w) ** 2).sum(axis=reduce)
        if not per_channel:
            err = np.full_like(err, err.sum())
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best = np.where(better, ib, best)
            best_err = np.where(better, err, best_err)
    return best


def quantize_per_channel(w: np.ndarray, width: int, int_bits: np.ndarray, axis: int,
                         q: str = "AP_RND", o: str = "AP_SAT") -> np.ndarray:
    """Codes of ``w`` with per-channel integer bits: each channel is scaled by
    its exact power of two and quantized with one frac-0 format."""
    shape = [1] * w.ndim
    shape[axis] = -1
    frac = (width - np.asarray(int_bits, dtype=np.int64)).reshape(shape)
    unit = FixedType(width, width, True, q, o)
    return unit.from_float(np.ldexp(w.astype(np.float64), frac))


def code_dtype(width: int, signed: bool = True) -> np.dtype:
    """Smallest NumPy integer type that stores codes of this width."""
    for bits in (8, 16, 32):
        if width <= bits:
            return np.dtype(f"{'' if signed else 'u'}int{bits}")
    return np.dtype(np.int64)


def linear_row_shift(graph: Graph, node: Node) -> np.ndarray:
    """Per input channel k of a linear: the extra fractional bits ``s_k`` its
    weight row is pre-scaled by (0 for a per-tensor x format), shape (K,)."""
    x = graph.tensors[node.inputs[0]]
    k = graph.tensors[node.inputs[1]].shape[0]
    if x.fmt is None or not x.per_channel:
        return np.zeros(k, dtype=np.int64)
    frac = x.fmt.width - np.asarray(x.channel_int_bits, dtype=np.int64)
    return frac.max() - frac


def accumulator_codes(values: np.ndarray, frac: int | np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """Codes of ``values`` at ``frac`` fractional bits (per channel allowed), rounded
    half up, and the minimal signed width that holds them: biases that join an
    accumulator. Raises if a value needs more than the contract's widest format."""
    wide = FixedType(C.MAX_ACC_WIDTH, C.MAX_ACC_WIDTH, True, "AP_RND", "AP_SAT")
    codes = wide.from_float(np.ldexp(np.asarray(values, dtype=np.float64), frac))
    if codes.size and (codes.max() >= wide.max_code or codes.min() <= wide.min_code):
        raise QuantError(f"{what} needs more than {C.MAX_ACC_WIDTH} bits at the accumulator's "
                         "fractional bits; the contract supports at most that")
    return codes, bits_for_range(min(int(codes.min()), 0), max(int(codes.max()), 0), True)


def quantize_weights(graph: Graph, fmts: dict[str, ActFormat], cfg: QuantConfig) -> Graph:
    """The fixed graph: formats on every tensor, integer codes for every weight."""
    g = copy.deepcopy(graph)
    fmts = dict(fmts)  # embedding outputs are added below
    fw = {k: v for k, v in g.weights.items()}
    g.weights = {}

    def set_fmt(name: str, fmt: FixedType, **kw) -> None:
        t = g.tensors[name]
        t.fmt, t.dtype = fmt, "fixed"
        for k, v in kw.items():
            setattr(t, k, v)

    def put(name: str, codes: np.ndarray, fmt: FixedType) -> None:
        g.weights[name] = codes.astype(code_dtype(fmt.width, fmt.signed))

    for name, af in fmts.items():
        set_fmt(name, af.fmt, channel_axis=None if af.channel_int_bits is None else -1,
                channel_int_bits=af.channel_int_bits)

    for node in g.nodes:
        where = f"node '{node.name}' ({node.source or node.op})"
        if node.op == "embedding":
            tname = node.inputs[1]
            w = fw[tname]
            fmt = choose_format(w.reshape(-1)[:: max(1, w.size // 200000)], float(np.abs(w).max()),
                                cfg.residual_bits if node.attrs.get("positions") else cfg.weight_bits,
                                True, cfg.q, cfg.o)
            set_fmt(tname, fmt)
            put(tname, fmt.from_float(w), fmt)
            set_fmt(node.outputs[0], fmt)
            fmts[node.outputs[0]] = ActFormat(fmt)
        elif node.op == "linear":
            x_fmt = fmts[node.inputs[0]].fmt
            x_frac = int(np.max(fmts[node.inputs[0]].frac))
            wname = node.inputs[1]
            w = np.ldexp(fw[wname].astype(np.float64), linear_row_shift(g, node)[:, None])
            ib = per_channel_int_bits(w, cfg.weight_bits, 1, cfg.per_channel, cfg.q, cfg.o)
            wcodes = quantize_per_channel(w, cfg.weight_bits, ib, 1, cfg.q, cfg.o)
            wfmt = FixedType(cfg.weight_bits, int(ib.max()), True, cfg.q, cfg.o)
            set_fmt(wname, wfmt, channel_axis=1, channel_int_bits=tuple(int(v) for v in ib))
            put(wname, wcodes, wfmt)
            acc_frac = x_frac + (cfg.weight_bits - ib)
            blo = bhi = 0
            bname = g.node_input(node, "bias")
            if bname:
                bcodes, bwidth = accumulator_codes(fw[bname], acc_frac, f"{where}: bias")
                blo, bhi = int(bcodes.min()), int(bcodes.max())
                bfmt = FixedType(bwidth, bwidth - int(acc_frac.max()), True, "AP_RND", "AP_SAT")
                set_fmt(bname, bfmt, channel_axis=0,
                        channel_int_bits=tuple(int(bwidth - f) for f in acc_frac))
                put(bname, bcodes, bfmt)
            k = w.shape[0]
            try:
                node.attrs["acc_bits"] = C.acc_width(x_fmt, wfmt, k, blo, bhi)
            except C.ContractError as e:
                raise QuantError(f"{where}: {e}") from None
        elif node.op == "attention":
            node.attrs["exp"] = cfg.exp.to_dict()
            node.attrs["recip"] = cfg.recip.to_dict()
            node.attrs["prob_format"] = FixedType(cfg.prob_bits, 0, False, cfg.q, "AP_SAT").to_dict()
        elif node.op == "layernorm":
            x_fmt = fmts[node.inputs[0]].fmt
            if fmts[node.inputs[0]].channel_int_bits is not None:
                raise QuantError(f"{where}: layernorm input must have one format for all channels")
            h = g.tensors[node.inputs[0]].shape[-1]
            try:
                C.layernorm_check(x_fmt, h)
            except C.ContractError as e:
                raise QuantError(f"{where}: {e}") from None
            norm = C.layernorm_norm_format(h, cfg.norm_bits)
            gname, bname = node.inputs[1], node.inputs[2]
            gamma = fw[gname].astype(np.float64)
            gfmt = FixedType(cfg.norm_param_bits, int_bits_for(float(np.abs(gamma).max()),
                                                               cfg.norm_param_bits, True),
                             True, "AP_RND", "AP_SAT")
            set_fmt(gname, gfmt)
            put(gname, gfmt.from_float(gamma), gfmt)
            bfrac = norm.frac_bits + gfmt.frac_bits
            bcodes, bwidth = accumulator_codes(fw[bname], bfrac, f"{where}: beta")
            bfmt = FixedType(bwidth, bwidth - bfrac, True, "AP_RND", "AP_SAT")
            set_fmt(bname, bfmt)
            put(bname, bcodes, bfmt)
            node.attrs["eps_code"] = C.layernorm_eps_code(float(node.attrs["eps"]), h, x_fmt.frac_bits)
            node.attrs["isqrt"] = cfg.isqrt.to_dict()
            node.attrs["norm_format"] = norm.to_dict()
        elif node.op == "gelu":
            out = fmts[node.outputs[0]]
            table_fmt = out.fmt if out.channel_int_bits is None else C.gelu_fine_format(out.fmt, out.frac)
            C.gelu_table(fmts[node.inputs[0]].fmt, table_fmt, node.attrs["approximate"])
    for name, t in g.tensors.items():
        if t.kind == "weight" and name not in g.weights:
            raise GraphError(f"weight '{name}' is used by no op the quantizer knows")
    g.meta["quantized"] = True
    g.meta["quant_config"] = cfg.to_dict()
    _record_pass(g, "quantize_weights")
    return g


# ----------------------------------------------------------------------------
# the whole pipeline
# ----------------------------------------------------------------------------

def check_float_graph(graph: Graph) -> None:
    for name, w in graph.weights.items():
        if not np.all(np.isfinite(w)):
            raise QuantError(f"weight '{name}' contains NaN or Inf")


def prepare(graph: Graph) -> Graph:
    """Float-graph passes that come before calibration."""
    check_float_graph(graph)
    return fold_attention_scale(graph)


def quantize(graph: Graph, calib_feeds: Iterable[dict[str, np.ndarray]], cfg: QuantConfig,
             stats: dict[str, TensorStats] | None = None) -> tuple[Graph, dict[str, ActFormat]]:
    """Float graph + calibration inputs -> (fixed graph, activation formats)."""
    g = prepare(graph)
    if stats is None:
        stats = calibrate(g, calib_feeds)
    _record_pass(g, "calibrate")
    fmts = assign_formats(g, stats, cfg)
    _record_pass(g, "assign_formats")
    return quantize_weights(g, fmts, cfg), fmts
