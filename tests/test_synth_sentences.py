import pytest

from hwgen import synth_sentences as S
from hwgen.zoo import DATA_DIR


def test_sentences_are_distinct_seeded_and_prefix_stable():
    a = S.sentences(500)
    assert len(a) == 500 and len(set(a)) == 500
    assert S.sentences(500) == a
    assert S.sentences(120) == a[:120]
    assert S.sentences(500, seed=1) != a
    assert S.sentences(0) == []
    assert all(s[0].isupper() and s[-1] in ".?" and "{" not in s for s in a)


def test_sentences_never_evaluation_or_calibration_sentences():
    held = set()
    for name in ("sentences_eval.txt", "sentences_calib.txt"):
        held |= {line.strip() for line in (DATA_DIR / name).read_text().splitlines() if line.strip()}
    assert held and not held & set(S.sentences(20000))


def test_sentence_count_errors(monkeypatch):
    with pytest.raises(ValueError, match="count -1 must be >= 0"):
        S.sentences(-1)
    monkeypatch.setattr(S, "TEMPLATES", ("{name} ran.",))
    assert len(S.sentences(len(S.WORDS["name"]))) == len(S.WORDS["name"])
    with pytest.raises(ValueError, match=f"gave only {len(S.WORDS['name'])} distinct sentences of the 21"):
        S.sentences(len(S.WORDS["name"]) + 1)
