import sys

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


def test_out_of_domain_sets_split_into_a_reported_half_and_a_tuning_half():
    from tngraph.data import corpus, outside_documents, outside_sentences, outside_text, sentence_sets

    report, tune = outside_sentences(300, seed=0), outside_sentences(300, seed=0, part="tune")
    assert len(report) == len(tune) == 300 and len(set(report)) == 300
    assert not set(report) & set(tune)  # nothing that tunes is ever reported
    assert not set(report) & set(corpus()) and not set(report) & set(sentence_sets(64, 64).calibration)
    assert outside_sentences(300, seed=0) == report and outside_sentences(300, seed=1) != report  # seeded, deterministic
    assert set(outside_sentences(100, seed=0)) <= set(outside_sentences(10**6, seed=0))
    docs = outside_documents()
    assert docs and not set(docs) & set(outside_documents(part="tune")) and all(len(d) >= 200 for d in docs)
    text = outside_text(20_000, seed=0)
    assert 20_000 <= len(text) < 20_000 + max(map(len, docs)) + 2 and text == outside_text(20_000, seed=0)
    assert text.startswith(tuple(docs)) and text.endswith(tuple(docs))  # whole documents
    with pytest.raises(ValueError, match="part"):
        outside_sentences(10, part="heal")


def test_healing_mixes_other_packages_and_never_reads_what_is_scored(monkeypatch):
    """The default healing data: built-in sentences outside the evaluation set, spread evenly among
    three times as many sentences of other installed packages' docstrings (HEALING_SHARE); none of
    the latter is in either half of the out-of-domain set, in the evaluation set or in the corpus;
    seeded and deterministic; a short run reads only what its steps can use."""
    import tngraph.data
    from tngraph.data import HEALING_PACKAGES, HEALING_SHARE, OUTSIDE_PACKAGES, corpus, healing_pool, healing_sentences, package_sentences

    assert not set(HEALING_PACKAGES) & set(OUTSIDE_PACKAGES)
    small = ("pip", "numpy")  # quick to read

    class Watch:  # the packages are found by looking, never through the import system's finders
        asked: list = []

        def find_spec(self, name, path=None, target=None):
            self.asked.append(name)

    monkeypatch.setattr(sys, "meta_path", [Watch(), *sys.meta_path])
    other = healing_sentences(400, seed=0, packages=small)
    assert "pip" not in Watch.asked  # (setuptools' distutils hack, asked for pip, unloads distutils: torch.compile then fails)
    assert len(other) == len(set(other)) == 400
    assert not set(other) & set(package_sentences()) and not set(other) & set(corpus())
    assert healing_sentences(400, seed=0, packages=small) == other and healing_sentences(400, seed=1, packages=small) != other
    # an equal share from each package
    from_pip, from_numpy = (set(other) & set(package_sentences((name,))) for name in small)
    assert 180 <= len(from_pip) <= 220 and 180 <= len(from_numpy) <= 220
    assert healing_sentences(50, seed=0, packages=("no_such_package_here",)) == []
    builtin = corpus()[:300]
    monkeypatch.setattr(tngraph.data, "corpus", lambda: builtin)
    evaluation = list(builtin[::3])
    own = [s for s in builtin if s not in evaluation]
    assert healing_pool(evaluation, share=0.0) == own
    even = healing_pool(evaluation, share=0.5)
    assert len(even) == 2 * len(own) and even[0::2] == own  # spread evenly: every batch draws from both
    assert set(even[1::2]) == set(healing_sentences(len(own), seed=0)) and not set(even[1::2]) & set(package_sentences())
    # the default share: three package sentences to each built-in one, every built-in sentence kept
    mixed = healing_pool(evaluation)
    assert HEALING_SHARE == 0.75 and len(mixed) == 4 * len(own) and mixed[1::4] == own
    assert set(mixed) - set(own) == set(healing_sentences(3 * len(own), seed=0))
    # a short run reads no more than its steps can use: a quarter of it built-in, the rest the packages'
    short = healing_pool(evaluation, most=40)
    assert len(short) == 40 and set(short[1::4]) < set(own) and set(short) - set(own) == set(healing_sentences(30, seed=0))
    assert healing_pool(evaluation, most=10**6) == mixed  # the built-in ones run out: the packages give no more than their share
    assert healing_pool(evaluation, most=10**6, share=0.0) == own and len(healing_pool(evaluation, share=0.0, most=30)) == 30
    assert len(healing_pool(evaluation, share=1.0, most=30)) == 30 and not set(healing_pool(evaluation, share=1.0, most=30)) & set(own)
    for bad in (-0.5, 2, True):
        with pytest.raises(ValueError, match="share is a share in"):
            healing_pool(evaluation, share=bad)


def test_calibration_mixes_other_packages_evenly_and_keeps_the_evaluation_set():
    """sentence_sets(mix=): that share of the calibration sentences comes from other packages'
    docstrings (healing_sentences), spread evenly among the corpus's; the evaluation set is the same,
    and none of the calibration sentences is scored in or out of domain."""
    from tngraph.data import corpus, healing_sentences, outside_sentences, package_sentences

    plain, mixed = sentence_sets(400, 300, seed=0), sentence_sets(400, 300, seed=0, mix=0.25)
    assert mixed.evaluation == plain.evaluation and len(mixed.calibration) == len(set(mixed.calibration)) == 400
    own = set(corpus())
    source = [s in own for s in mixed.calibration]
    assert sum(source) == 300 and [s for s in mixed.calibration if s in own] == plain.calibration[:300]
    assert set(s for s in mixed.calibration if s not in own) == set(healing_sentences(100, seed=0))
    assert all(sum(source[i : i + 8]) == 6 for i in range(0, 400, 8))  # every batch draws from both
    assert not set(mixed.calibration) & (set(mixed.evaluation) | set(package_sentences()) | set(outside_sentences(10**6, part="tune")))
    assert sentence_sets(400, 300, seed=0, mix=0.25) == mixed and sentence_sets(400, 300, seed=0, mix=0.0) == plain
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="mix is a share in"):
            sentence_sets(10, 10, mix=bad)


def test_a_causal_lms_calibration_mixes_passages_of_other_packages():
    """A causal LM's built-in calibration: Config.calibration_mix of its passages come from other
    packages' docstrings (healing_passages), spread evenly among the built-in documents' passages;
    none of them is in a built-in document (held out or not) or an out-of-domain one; the scored
    texts are the same as unmixed. Healing spreads every training passage among as many of theirs."""
    import tngraph
    from tngraph.data import healing_passages, lm_documents, outside_documents, passages
    from tngraph.workflow.common import compress_texts

    small = ("pip", "numpy")
    other = healing_passages(60, seed=0, packages=small)
    assert len(other) == len(set(other)) == 60 and all(50 <= len(t) <= 1200 for t in other)
    assert healing_passages(60, seed=0, packages=small) == other and healing_passages(60, seed=1, packages=small) != other
    known = set(passages(lm_documents().train + lm_documents().heldout)) | set(passages(outside_documents(part="report") + outside_documents(part="tune")))
    assert not set(other) & known
    assert healing_passages(5, packages=("no_such_package_here",)) == []
    plain = compress_texts(True, tngraph.Config(calibration_mix=0.0, calibration_samples=40, heal_steps=0), outside=False)
    mixed = compress_texts(True, tngraph.Config(calibration_mix=0.25, calibration_samples=40, heal_steps=0), outside=False)
    assert len(plain.calibration) == len(mixed.calibration) == 40 and set(plain.calibration) <= set(passages(lm_documents().train))
    own = set(plain.heal)
    source = [t in own for t in mixed.calibration]
    assert [t for t in mixed.calibration if t in own] == plain.calibration[:30]
    assert set(t for t in mixed.calibration if t not in own) == set(healing_passages(10, seed=0))
    assert all(sum(source[i : i + 4]) == 3 for i in range(0, 40, 4))  # every batch draws from both
    assert mixed.heal == plain.heal and mixed.evaluation == plain.evaluation  # nothing heals: the packages are not read
    # healing: every training passage, spread evenly among as many of the packages' (300 steps use them all)
    healing = compress_texts(True, tngraph.Config(calibration_samples=40, heal_steps=300), outside=False).heal
    assert len(healing) == 2 * len(plain.heal) and healing[0::2] == plain.heal and not set(healing[1::2]) & known
    # a short run reads no more than its steps use (5 x 32 + 256 held out): half of them passages of the packages
    short = compress_texts(True, tngraph.Config(calibration_samples=40, heal_steps=5), outside=False).heal
    assert len(short) == 416 and len(set(short[0::2])) == 208 and set(short[0::2]) <= own
    assert set(short[1::2]) == set(healing_passages(208, seed=0)) and not set(short[1::2]) & known


def test_calibration_mix_is_refused_where_nothing_built_in_calibrates(tmp_path):
    import tngraph
    from tngraph.errors import ConfigError
    from tngraph.workflow.common import calibration_only, compress_texts

    lines = tmp_path / "c.txt"
    lines.write_text("one calibration sentence about parsing files.\nanother one about sockets and threads.\n", encoding="utf-8")
    assert calibration_only(tngraph.Config(), str(lines)) == read_lines(lines)  # the default: the file alone
    assert calibration_only(tngraph.Config(calibration_mix=0.0), str(lines)) == read_lines(lines)
    with pytest.raises(ConfigError, match="--calibration-mix 0.3 mixes tngraph's built-in calibration texts.*--calibration FILE"):
        calibration_only(tngraph.Config(calibration_mix=0.3), str(lines))
    for causal in (True, False):
        with pytest.raises(ConfigError, match="but the lines of --calibration FILE calibrate"):
            compress_texts(causal, tngraph.Config(calibration_mix=0.3, heal_steps=0), str(lines), outside=False)
    with pytest.raises(ConfigError, match=r"calibration_mix must lie in \[0, 1\]"):
        tngraph.Config(calibration_mix=2)
    assert len(calibration_only(tngraph.Config(calibration_mix=0.5, calibration_samples=64))) == 64
    # the library and the backend calibrate on what they are given
    import torch

    from tngraph.backend import parse_options

    with pytest.raises(ConfigError, match="compress\\(\\) calibrates on the `calibration` given"):
        tngraph.compress(torch.nn.Sequential(torch.nn.Linear(4, 4)), calibration=[(torch.randn(2, 4),)], calibration_mix=0.5)
    with pytest.raises(ConfigError, match="the backend calibrates on options\\['calibration'\\] alone"):
        parse_options({"calibration_mix": 0.0})


def test_no_package_is_read_for_healing_texts_that_go_unused(tmp_path, monkeypatch):
    """With a --calibration file (its lines heal) or --heal-data, the built-in healing texts are not
    built: the packages' docstrings are not read for them."""
    import tngraph
    import tngraph.data
    from tngraph.workflow.common import compress_texts

    lines = tmp_path / "c.txt"
    lines.write_text("one calibration sentence about parsing files.\nanother one about sockets and threads.\n", encoding="utf-8")

    def unread(*args, **kwargs):
        raise AssertionError("read for texts nothing uses")

    monkeypatch.setattr(tngraph.data, "healing_pool", unread)
    monkeypatch.setattr(tngraph.data, "healing_passages", unread)
    for causal in (True, False):
        texts = compress_texts(causal, tngraph.Config(heal_steps=5, calibration_samples=64), str(lines), outside=False)
        assert texts.calibration == read_lines(lines) and texts.heal is None
        texts = compress_texts(causal, tngraph.Config(heal_steps=5, calibration_samples=64, calibration_mix=0.0, heal_data=str(lines)),
                               outside=False)
        assert len(texts.calibration) == 64
    with pytest.raises(AssertionError, match="read for texts nothing uses"):  # the check itself bites
        compress_texts(False, tngraph.Config(heal_steps=5, calibration_samples=64), outside=False)
