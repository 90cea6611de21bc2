import pytest

from hwgen import augment as A
from hwgen.zoo import DATA_DIR

SENTS = ["The cat slept on the warm windowsill all afternoon.",
         "Rain is expected tomorrow.",
         "She bought three loaves of bread and a jar of honey.",
         "Go!",
         "Our guide showed us the old harbour before lunch."]


def test_count_order_seeded():
    a = A.augment(SENTS, 3)
    assert len(a) == 3 * len(SENTS)
    assert A.augment(SENTS, 3) == a == A.augment(SENTS, 3, seed=A.SEED)
    assert A.augment(SENTS, 3, seed=A.SEED + 1) != a
    assert A.augment(SENTS, 1) == a[:len(SENTS)]            # copy by copy
    assert A.augment(SENTS, 0) == [] and A.augment([], 4) == []
    assert all(v and v == " ".join(v.split()) for v in a)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_copies(bad):
    with pytest.raises(A.AugmentError, match=f"--distill-augment {bad}: the number of copies must be an integer >= 0"):
        A.augment(SENTS, bad)


def _kinds(src: str, v: str, pool: set[str]) -> set[str]:
    """Which augmentations can have made ``v`` from ``src`` (the sets may overlap)."""
    s, w = src.split(), v.split()
    kinds = set()
    for cut in range(1, max(2, len(s))):
        if w[:cut] == s[:cut] and any(w[cut:] == o.split()[j:] for o in SENTS for j in range(max(1, len(o.split()) - 1))):
            kinds.add("splice")
    if len(w) == len(s) and all(a == b or a in pool for a, b in zip(w, s)):
        kinds.add("replace")
    for a in range(len(s)):
        for n in range(A.MIN_SPAN, len(s) + 1):
            span = s[a:a + n]
            if len(span) == n and w[1:] == span[1:] and w[0] == span[0][:1].upper() + span[0][1:]:
                kinds.add("span")
    return kinds


def test_every_variant_is_one_of_the_kinds_and_all_kinds_occur(monkeypatch):
    pool = {A._NOT_WORD.sub("", t) for s in SENTS for t in s.split()}
    seen = set()
    for k, v in enumerate(A.augment(SENTS, 40)):
        src = SENTS[k % len(SENTS)]
        kinds = _kinds(src, v, pool)
        assert kinds, (src, v)
        if len(src.split()) <= A.MIN_SPAN:
            assert "splice" in kinds, (src, v)
        seen |= kinds
    assert seen == set(A.AUGMENTATIONS)
    monkeypatch.setattr(A, "AUGMENTATIONS", ("replace",))        # about REPLACE_RATE of the words
    long = " ".join(f"w{i}" for i in range(200))
    changed = sum(a != b for v in A.augment([long, "x y z q"], 20)[::2] for a, b in zip(v.split(), long.split()))
    assert 0.18 < changed / (200 * 20) < 0.32


def test_shipped_corpus_variants_hold_no_evaluation_or_calibration_sentence():
    held = set()
    for name in ("sentences_eval.txt", "sentences_calib.txt"):
        held |= {line.strip() for line in (DATA_DIR / name).read_text().splitlines() if line.strip()}
    corpus = [line.strip() for line in (DATA_DIR / "sentences_distill.txt").read_text().splitlines() if line.strip()]
    variants = A.augment(corpus, 2)
    assert len(variants) == 2 * len(corpus)
    assert held and not held & set(variants)
    assert len(set(variants) - set(corpus)) > 0.9 * len(variants)     # new inputs, mostly not the corpus again
