import pytest

from tngraph.data import read_lines, sentence_sets
from tngraph.errors import DataError


def test_sets_are_deterministic_and_disjoint():
    a = sentence_sets(512, 2000, seed=0)
    b = sentence_sets(512, 2000, seed=0)
    assert a == b
    assert len(a.calibration) == 512 and len(a.evaluation) == 2000
    assert not set(a.calibration) & set(a.evaluation)
    assert len(set(a.evaluation)) == 2000
    assert sentence_sets(512, 2000, seed=1).evaluation != a.evaluation


def test_sentences_are_prose():
    for s in sentence_sets(50, 50).evaluation:
        assert 40 <= len(s) <= 300 and s[-1] in ".!?" and len(s.split()) >= 6


def test_too_many_sentences_is_a_clear_error():
    with pytest.raises(DataError, match="built-in corpus has only"):
        sentence_sets(10**6, 10)


def test_read_lines(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("first sample\n\n  second sample  \n", encoding="utf-8")
    assert read_lines(f) == ["first sample", "second sample"]
    with pytest.raises(DataError, match="does not exist"):
        read_lines(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no samples"):
        read_lines(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="cannot read"):
        read_lines(tmp_path / "bin.txt")


def test_package_sentences_are_another_domain_than_the_corpus():
    from tngraph.data import corpus, package_sentences

    sentences = package_sentences(("safetensors", "no_such_package_here"))  # a missing package is skipped
    assert sentences and sentences == sorted(set(sentences))
    assert not set(sentences) & set(corpus())
    assert all(40 <= len(s) <= 300 for s in sentences)
    assert package_sentences(("no_such_package_here",)) == []
