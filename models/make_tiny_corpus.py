"""Rebuild models/data/tiny_corpus_{train,eval}.txt from the Python stdlib's pydoc topics.

Source: ``pydoc_data/topics.py`` of the interpreter running this script (CPython docs text,
PSF License Version 2; see models/README.md). Topics are taken in sorted key order, each
followed by one blank line. Every 12th topic starting at index 5 goes to the held-out eval
split (about 6 % of the bytes); the rest is the training split. Whole topics are split, so
no section straddles train and eval.

    python models/make_tiny_corpus.py            # writes models/data/tiny_corpus_*.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

EVAL_EVERY, EVAL_OFFSET = 12, 5


def build() -> tuple[str, str, list[str]]:
    """Return (train_text, eval_text, eval_topic_keys)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    eval_keys = [k for i, k in enumerate(keys) if i % EVAL_EVERY == EVAL_OFFSET]
    train = "".join(topics[k].rstrip("\n") + "\n\n" for k in keys if k not in eval_keys)
    evalt = "".join(topics[k].rstrip("\n") + "\n\n" for k in eval_keys)
    return train, evalt, eval_keys


def main() -> None:
    out = Path(__file__).resolve().parent / "data"
    out.mkdir(exist_ok=True)
    train, evalt, eval_keys = build()
    (out / "tiny_corpus_train.txt").write_text(train, encoding="utf-8")
    (out / "tiny_corpus_eval.txt").write_text(evalt, encoding="utf-8")
    print(f"python {sys.version.split()[0]}: train {len(train.encode())} bytes, "
          f"eval {len(evalt.encode())} bytes, eval topics {eval_keys}")


if __name__ == "__main__":
    main()
