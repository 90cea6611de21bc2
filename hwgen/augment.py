"""Augmented distillation sentences: new inputs made from a corpus's own sentences.

A distillation teacher labels any text, so a sentence encoder's student needs
inputs that look like what it will embed, not labelled ones. Trained long on a
fixed corpus, the student fits that corpus's sentences better than unseen ones
(MiniLM 2:4 after 49,000 float steps: output cosine 0.9905 on its training
sentences, 0.9791 on the evaluation sentences; README: Compression). Variants
of the corpus's sentences are more inputs of the same vocabulary and shapes,
in the spirit of TinyBERT's data augmentation (which replaces words with a
masked language model's guesses; hwgen has no such model, so it draws the
replacements from the corpus's own words). Each variant is one of
:data:`AUGMENTATIONS`, drawn uniformly:

``splice``
    the sentence's first words (at least one, not all), then another
    sentence's words from a random word on (not only its last);
``replace``
    the sentence with each word, with probability :data:`REPLACE_RATE`,
    replaced by a word drawn from the corpus's words (by frequency, punctuation
    stripped);
``span``
    a run of at least :data:`MIN_SPAN` consecutive words (possibly all), its
    first letter capitalised.

Sentences of fewer than ``MIN_SPAN + 1`` words are always spliced.
:func:`augment` is seeded and deterministic; ``tests/test_augment.py`` checks
each kind's shape and that the shipped corpus's variants include no evaluation
or calibration sentence.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

#: the kinds of variant, drawn uniformly for each (copy, sentence)
AUGMENTATIONS = ("splice", "replace", "span")

#: ``replace``: the probability that a word is replaced
REPLACE_RATE = 0.25

#: ``span``: the fewest words a span keeps
MIN_SPAN = 3

#: the seed of :func:`augment`'s draws (``--distill-augment``)
SEED = 1

_NOT_WORD = re.compile(r"[^\w'-]")


class AugmentError(ValueError):
    """Bad augmentation request (the message names the flag)."""


def check_copies(copies: int) -> None:
    """Refuse a count of variants that is not an integer >= 0."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise AugmentError(f"--distill-augment {copies}: the number of copies must be an integer >= 0")


def augment(sentences: Sequence[str], copies: int, seed: int = SEED) -> list[str]:
    """``copies`` variants of every one of ``sentences``: one variant of each
    sentence in order, then a second of each, and so on
    (``copies * len(sentences)`` strings). Words are split on whitespace and
    joined by one space."""
    check_copies(copies)
    words = [s.split() for s in sentences]
    if copies == 0 or not words:
        return []
    pool = [w for w in (_NOT_WORD.sub("", t) for ws in words for t in ws) if w]
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(copies):
        for ws in words:
            kind = AUGMENTATIONS[int(rng.integers(len(AUGMENTATIONS)))]
            if kind == "splice" or len(ws) <= MIN_SPAN or not pool:
                other = words[int(rng.integers(len(words)))]
                cut = int(rng.integers(1, max(2, len(ws))))
                v = ws[:cut] + other[int(rng.integers(0, max(1, len(other) - 1))):]
            elif kind == "replace":
                v = [pool[int(rng.integers(len(pool)))] if rng.random() < REPLACE_RATE else w for w in ws]
            else:
                n = int(rng.integers(MIN_SPAN, len(ws) + 1))
                a = int(rng.integers(0, len(ws) - n + 1))
                v = ws[a:a + n]
                v[0] = v[0][:1].upper() + v[0][1:]
            out.append(" ".join(v))
    return out
