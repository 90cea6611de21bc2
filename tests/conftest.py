"""Shared fixtures: small graphs built directly with the IR API, so the golden
model, quantizer and QAT are tested independently of the torch frontend."""
import json

import numpy as np
import pytest
from amaranth import ClockDomain, Elaboratable, Module, Signal

from hwgen.ir import Graph, Node, Tensor


class GraphBuilder:
    """Builds small float graphs with the IR API: random weights, named activations."""

    def __init__(self, name: str, seed: int, prefix: str = "n", layer: int | None = None):
        self.g = Graph(name=name, meta={"quantized": False})
        self.rng = np.random.default_rng(seed)
        self.prefix, self.layer = prefix, layer

    def input(self, name, *shape, dtype="index"):
        self.g.add_tensor(Tensor(name, shape, kind="input", dtype=dtype))
        self.g.inputs.append(name)
        return name

    def w(self, name, *shape, scale=None):
        scale = scale if scale is not None else 1 / np.sqrt(shape[0])
        self.g.add_weight(name, (self.rng.normal(0, scale, shape)).astype(np.float32))
        return name

    def gamma(self, name, d):
        return self.g.add_weight(name, (1 + 0.1 * self.rng.normal(size=d)).astype(np.float32)).name

    def act(self, name, *shape):
        self.g.add_tensor(Tensor(name, shape))
        return name

    def node(self, op, ins, out, layer=None, **attrs):
        layer = self.layer if layer is None else layer
        self.g.add_node(Node(f"{self.prefix}{len(self.g.nodes)}.{op}", op, ins, [out], attrs,
                             source=out, layer=layer))
        return out

    def done(self, *outputs) -> Graph:
        self.g.outputs = list(outputs)
        self.g.validate()
        return self.g


def build_tiny_decoder(vocab=40, ctx=24, d=16, heads=2, ffn=32, layers=2, seed=0) -> Graph:
    """A pre-norm causal decoder with a KV cache, in float (random weights)."""
    b = GraphBuilder("tiny-decoder", seed)
    w, act, node = b.w, b.act, b.node
    b.input("ids", "B", "S")
    h = ("B", "S", d)
    tok = node("embedding", ["ids", w("tok", vocab, d, scale=1.0)], act("tok_e", *h))
    pos = node("embedding", ["ids", w("pos", ctx, d, scale=0.3)], act("pos_e", *h), positions=True)
    x = node("add", [tok, pos], act("x0", *h))
    for i in range(layers):
        p = f"L{i}"
        a = node("layernorm", [x, b.gamma(f"{p}.ln1.g", d), w(f"{p}.ln1.b", d, scale=0.1)],
                 act(f"{p}.ln1", *h), i, eps=1e-5)
        q = node("linear", [a, w(f"{p}.q.w", d, d), w(f"{p}.q.b", d, scale=0.1)], act(f"{p}.q", *h), i)
        k = node("linear", [a, w(f"{p}.k.w", d, d), w(f"{p}.k.b", d, scale=0.1)], act(f"{p}.k", *h), i)
        v = node("linear", [a, w(f"{p}.v.w", d, d), w(f"{p}.v.b", d, scale=0.1)], act(f"{p}.v", *h), i)
        o = node("attention", [q, k, v], act(f"{p}.attn", *h), i, heads=heads, head_dim=d // heads,
                 causal=True, scale=1 / np.sqrt(d // heads), kv_cache=True, max_positions=ctx)
        o = node("linear", [o, w(f"{p}.o.w", d, d), w(f"{p}.o.b", d, scale=0.1)], act(f"{p}.o", *h), i)
        x = node("add", [x, o], act(f"{p}.r1", *h), i)
        a = node("layernorm", [x, b.gamma(f"{p}.ln2.g", d), w(f"{p}.ln2.b", d, scale=0.1)],
                 act(f"{p}.ln2", *h), i, eps=1e-5)
        f = node("linear", [a, w(f"{p}.fc1.w", d, ffn), w(f"{p}.fc1.b", ffn, scale=0.1)],
                 act(f"{p}.fc1", "B", "S", ffn), i)
        f = node("gelu", [f], act(f"{p}.gelu", "B", "S", ffn), i, approximate="tanh")
        f = node("linear", [f, w(f"{p}.fc2.w", ffn, d), w(f"{p}.fc2.b", d, scale=0.1)], act(f"{p}.fc2", *h), i)
        x = node("add", [x, f], act(f"{p}.r2", *h), i)
    gm = b.g.add_weight("lnf.g", np.ones(d, dtype=np.float32)).name
    x = node("layernorm", [x, gm, w("lnf.b", d, scale=0.1)], act("lnf", *h), eps=1e-5)
    node("linear", [x, w("head.w", d, vocab), w("head.b", vocab, scale=0.1)], act("logits", "B", "S", vocab))
    return b.done("logits")


def tiny_decoder_feeds(n=3, b=2, s=12, vocab=40, seed=1):
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, vocab, (b, s))} for _ in range(n)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny torch matmuls are far faster single-threaded on a busy 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_decoder():
    return build_tiny_decoder()


@pytest.fixture(scope="session")
def tiny_decoder_fixed(tiny_decoder):
    from hwgen.quant import QuantConfig, quantize

    fixed, _ = quantize(tiny_decoder, tiny_decoder_feeds(), QuantConfig.from_bits("w8a8"))
    return fixed


class WithReset(Elaboratable):
    """An elaboratable holding ``dut`` in a ``sync`` domain whose reset is the
    signal ``rst``, so a testbench can pulse the reset (the simulator's own
    domain reset cannot be driven)."""

    def __init__(self, dut):
        self.dut, self.rst = dut, Signal(name="rst_tb")

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = cd = ClockDomain("sync")
        m.d.comb += cd.rst.eq(self.rst)
        m.submodules.dut = self.dut
        return m


def run_cli(capsys, *argv):
    """Run `hwgen ARGV` in-process: (exit code, stdout, stderr)."""
    from hwgen.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    """The JSON object a verb prints as the last line of stdout."""
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def bert_block_graph(tmp_path_factory):
    """models/bert_block.py quantized to W8A8 by the CLI, saved once per session."""
    from hwgen.cli import main

    out = tmp_path_factory.mktemp("q") / "bert"
    assert main(["quantize", "--model", "bert-block", "--bits", "w8a8", "--out", str(out),
                 "--json", "--quiet"]) == 0
    return out
