"""Deterministic, disjoint calibration and evaluation sentences from text every Python install carries."""
from __future__ import annotations

import ast
import hashlib
import functools
import logging
import pathlib
import random
import re
import sys
import sysconfig
from dataclasses import dataclass

from .errors import DataError

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PARAGRAPH = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class SentenceSets:
    calibration: list[str]
    evaluation: list[str]


def _sentences(text: str) -> list[str]:
    out = []
    for paragraph in _PARAGRAPH.split(text):
        paragraph = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(paragraph):
            if _is_prose(sentence):
                out.append(sentence)
    return out


def _is_prose(s: str) -> bool:
    if not (40 <= len(s) <= 300) or len(s.split()) < 6 or s[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters / len(s) > 0.85


def _stdlib_docstrings() -> list[str]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    docs = []
    for path in files:
        if any(part in ("test", "tests", "idlelib", "site-packages") for part in path.parts[-2:]):
            continue
        docs += _file_docstrings(path)
    return docs


# The out-of-domain text of reports and benches: docstrings of packages tngraph itself requires (so every
# install has them), on other subjects than the standard library's (graph algorithms, plotting, ONNX,
# the model hub, einsum paths, progress bars), and quick to read: about 21,000 sentences in a few seconds.
OUTSIDE_PACKAGES = ("networkx", "matplotlib", "onnx", "onnxscript", "huggingface_hub", "opt_einsum", "tqdm")


@functools.lru_cache(maxsize=8)
def _package_docstrings(name: str) -> tuple[str, ...]:
    """The docstrings of an installed package's modules, classes and functions (its tests skipped),
    in file order; none for a package that is not installed."""
    return tuple(d for path in _package_files(name) for d in _file_docstrings(path))


def package_sentences(packages: tuple[str, ...] = OUTSIDE_PACKAGES) -> list[str]:
    """Prose sentences of the docstrings of installed third-party packages, sorted and unique: text
    from another domain than the standard library's (none of it calibrates or heals by default).
    A package that is not installed is skipped."""
    return list(_package_sentences(tuple(packages)))


@functools.lru_cache(maxsize=8)
def _package_sentences(packages: tuple[str, ...]) -> tuple[str, ...]:
    """package_sentences, split once per process (reports, healing's exclusions and benches ask again)."""
    sentences: set[str] = set()
    for name in packages:
        for doc in _package_docstrings(name):
            sentences.update(_sentences(doc))
    return tuple(sorted(sentences - set(corpus())))


def _in_part(texts, part: str) -> list[str]:
    """The texts of one half of the out-of-domain data, chosen by a hash of each text (the same on
    every run): "report", the half that only scores, or "tune", the half a choice (a step, a
    setting) may read."""
    if part not in ("report", "tune"):
        raise ValueError(f"part is 'report' or 'tune', not {part!r}")
    return [t for t in texts if (int(hashlib.sha1(t.encode()).hexdigest()[:8], 16) % 2 == 0) == (part == "report")]


def set_record(texts, packages: tuple[str, ...] = ()) -> dict:
    """What identifies an evaluation set in a report: its size, a digest of its texts (texts only:
    a str, or a list of them), and the installed versions of the packages it was read from (their
    docstrings change with them, and so would the scores)."""
    from importlib import metadata

    items = [texts] if isinstance(texts, str) else texts
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        return {"items": len(items)} if hasattr(items, "__len__") else {}
    digest = hashlib.sha256("\0".join(items).encode("utf-8")).hexdigest()[:16]
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"items": len(items), "sha256": digest, **({"packages": versions} if packages else {})}


def outside_sentences(count: int, seed: int = 0, *, part: str = "report") -> list[str]:
    """`count` out-of-domain sentences (package_sentences), shuffled with `seed`: from the half set
    aside for reports (`part` "report"), or from the half that may tune ("tune"). Fewer when the
    installed packages hold fewer."""
    pool = _in_part(package_sentences(), part)
    random.Random(seed).shuffle(pool)
    return pool[:count]


def outside_text(chars: int, seed: int = 0, *, part: str = "report") -> str:
    """About `chars` characters of out-of-domain running text for a causal LM: whole documents of
    outside_documents(part), shuffled with `seed`, joined by blank lines until `chars` is reached."""
    docs = outside_documents(part=part)
    random.Random(seed).shuffle(docs)
    taken, total = [], 0
    for doc in docs:
        if total >= chars:
            break
        taken.append(doc)
        total += len(doc) + 2
    return "\n\n".join(taken)


def lm_heldout_texts(seed: int = 0, *, outside: bool = True) -> tuple[str, str | None]:
    """A causal LM's two evaluation texts: the held-out documents of the built-in text (lm_documents,
    joined), and as many characters of out-of-domain documents (outside_text, the reported half;
    None without `outside`, the packages then not read)."""
    heldout = "\n\n".join(lm_documents().heldout)
    return heldout, outside_text(len(heldout), seed) if outside else None


def outside_documents(*, part: str = "report", min_chars: int = 200) -> list[str]:
    """Out-of-domain documents for a causal LM: the packages' docstrings of at least `min_chars`
    characters, unique, sorted, from the half set aside for reports or the half that may tune."""
    docs = {d.strip() for name in OUTSIDE_PACKAGES for d in _package_docstrings(name) if len(d.strip()) >= min_chars}
    return _in_part(sorted(docs), part)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """All unique prose sentences of pydoc's topics and the stdlib's docstrings, sorted."""
    from pydoc_data.topics import topics

    sentences: set[str] = set()
    for key in sorted(topics):
        sentences.update(_sentences(topics[key]))
    for doc in _stdlib_docstrings():
        sentences.update(_sentences(doc))
    log.debug("built a corpus of %d sentences", len(sentences))
    return tuple(sorted(sentences))


def sentence_sets(calibration: int = 512, evaluation: int = 2000, seed: int = 0, *, mix: float = 0.0) -> SentenceSets:
    """Disjoint calibration and evaluation sets, the same for the same seed on the same Python.

    `mix`: the share of the calibration sentences taken from other packages' docstrings
    (healing_sentences: HEALING_PACKAGES, none of the out-of-domain set's), spread evenly among the
    standard library's; the rest, and all of the evaluation set, are the built-in corpus. Statistics
    from one source fit the decompositions to it; from several they hold better outside it
    (docs/healing.md). Fewer when the packages hold fewer (the corpus gives the rest)."""
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix is a share in [0, 1], got {mix!r}")
    other = healing_sentences(round(calibration * mix), seed) if mix and calibration else []
    pool = list(corpus())
    own = calibration - len(other)
    if own + evaluation > len(pool):
        raise DataError(
            f"asked for {own} calibration + {evaluation} evaluation sentences, "
            f"but the built-in corpus has only {len(pool)}",
            "ask for fewer or pass your own with --calibration FILE",
        )
    random.Random(seed).shuffle(pool)
    return SentenceSets(calibration=spread(pool[evaluation : evaluation + own], other), evaluation=pool[:evaluation])


def spread(mine: list[str], other: list[str]) -> list[str]:
    """The texts of two sources spread evenly through one list (each at its fractional place in its
    own list), so every batch of the result holds both in their proportion."""
    placed = sorted([((i + 0.5) / len(mine), 0, i) for i in range(len(mine))] + [((j + 0.5) / len(other), 1, j) for j in range(len(other))])
    return [mine[i] if source == 0 else other[i] for _, source, i in placed]


def healing_pool(evaluation: list[str], *, share: float | None = None, seed: int = 0, most: int | None = None) -> list[str]:
    """The default healing data of a sentence encoder: built-in sentences outside `evaluation` (none
    of the sentences the report scores) mixed with sentences of HEALING_PACKAGES' docstrings
    (healing_sentences), `share` of the texts from the packages (default HEALING_SHARE; 0: the
    built-in sentences alone; mixed_pool says how `most` bounds them). Healing on one source fits
    the model to that source: text from several raises the out-of-domain agreement (docs/healing.md)."""
    held = set(evaluation)
    own = [s for s in corpus() if s not in held]
    return mixed_pool(own, healing_sentences, HEALING_SHARE if share is None else share, seed=seed, most=most)


def mixed_pool(own: list[str], draw, share: float, *, seed: int = 0, most: int | None = None) -> list[str]:
    """`own` texts and texts of other packages (`draw(count, seed)`: healing_sentences or
    healing_passages), `share` of them the latter, spread evenly (every batch draws from both).
    `most`: the texts a healing run can use (steps x batch + held out); a seeded sample of `own`
    gives their share of it, the packages the rest, so that little is read; when `own` runs out the
    packages give no more than the share asks for (fewer texts, taken again in later epochs).
    Without it, every one of `own` and as many of the packages' as the share asks for."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"share is a share in [0, 1], got {share!r}")
    total = most if most is not None else len(own) if share in (0.0, 1.0) else round(len(own) / (1 - share))
    keep = min(len(own), round(total * (1 - share)))
    if keep < len(own):
        own = random.Random(seed).sample(own, keep)
    count = total - len(own) if share == 1.0 else min(total - len(own), round(len(own) * share / (1 - share)))
    return spread(own, draw(count, seed) if share else [])


# Healing text from other sources than the calibration's: docstrings of packages every tngraph install has
# (its requirements and theirs: sympy comes with torch; pip and setuptools with every environment), none of
# them read by the out-of-domain set. A missing one is skipped.
HEALING_PACKAGES = ("setuptools", "pip", "numpy", "sympy", "transformers", "torch")  # the smaller first
# The share of a sentence encoder's default healing texts taken from them (healing_pool), chosen on the
# tuning half of the out-of-domain set (docs/healing.md, "How much of the healing text comes from other
# packages"): 0.75 kept nearly all of the out-of-domain gain of 1.0 and half of the in-domain loss.
HEALING_SHARE = 0.75
# A causal LM's: every training passage beside as many of theirs (docs/healing.md, "Causal LMs").
LM_HEALING_SHARE = 0.5


def healing_sentences(count: int, seed: int = 0, packages: tuple[str, ...] = HEALING_PACKAGES) -> list[str]:
    """`count` prose sentences of `packages`' docstrings (fewer if they hold fewer), an equal share
    from each (the files of a package read in an order drawn from `seed` until its share is met, so
    a large package is not read whole; what one cannot give, the later ones do), shuffled; none of
    the out-of-domain set's sentences (package_sentences) nor of the built-in corpus."""
    return list(_package_texts(count, seed, tuple(packages), "sentences"))


def healing_passages(count: int, seed: int = 0, packages: tuple[str, ...] = HEALING_PACKAGES) -> list[str]:
    """`count` passages (tngraph.data.passages) of `packages`' docstrings of at least 200 characters,
    drawn as healing_sentences draws sentences: a causal LM's text from other sources than the
    built-in documents; none from a docstring the built-in documents or the out-of-domain
    documents (both halves) hold."""
    return list(_package_texts(count, seed, tuple(packages), "passages"))


@functools.lru_cache(maxsize=8)
def _package_texts(count: int, seed: int, packages: tuple[str, ...], unit: str) -> tuple[str, ...]:
    files = {name: _package_files(name, seed) for name in packages}  # each package's tree walked once
    present = [name for name in packages if files[name]]
    if not present or count <= 0:
        return ()
    if unit == "sentences":
        skip, split = set(package_sentences()) | set(corpus()), _sentences
    else:
        known = [*_documents(), *outside_documents(part="report"), *outside_documents(part="tune")]
        skip = set(known) | set(passages(known))  # whole documents, and passages they share (vendored text)
        split = lambda doc: passages([doc]) if len(doc.strip()) >= 200 and doc.strip() not in skip else []  # noqa: E731
    taken: list[str] = []
    for i, name in enumerate(present):
        share = -(-(count - len(taken)) // (len(present) - i))  # what a package before it could not give passes on
        found: dict[str, None] = {}  # insertion-ordered and unique
        for path in files[name]:
            for doc in _file_docstrings(path):
                found.update((x, None) for x in split(doc) if x not in skip)
            if len(found) >= share:
                break
        kept = list(found)[:share]
        taken += kept
        skip.update(kept)  # a text two packages share is taken once
    random.Random(seed).shuffle(taken)
    return tuple(taken[:count])


def _package_files(name: str, seed: int | None = None) -> list[pathlib.Path]:
    """An installed package's .py files outside its tests: sorted, or in an order drawn from `seed`
    (a hash of each relative path, so the same on every machine with the same version)."""
    roots = _package_roots(name)
    files = [(root, path) for root in roots for path in sorted(root.rglob("*.py"))
             if not any(part in ("test", "tests", "testing") for part in path.relative_to(root).parts)]
    if seed is not None:
        files.sort(key=lambda item: hashlib.sha1(f"{seed}:{item[1].relative_to(item[0]).as_posix()}".encode()).hexdigest())
    return [path for _, path in files]


def _package_roots(name: str) -> list[pathlib.Path]:
    """The folder of an installed package on sys.path, found by looking, not through the import
    system: the finders some packages install have side effects on a lookup (setuptools' distutils
    hack drops the loaded distutils modules when asked for pip, which then breaks torch.compile)."""
    for entry in sys.path:
        folder = pathlib.Path(entry or ".") / name
        if (folder / "__init__.py").is_file():
            return [folder]
    return []


def _file_docstrings(path: pathlib.Path) -> list[str]:
    """The docstrings of a file's module, classes and functions; none when it does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    return [d for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and (d := ast.get_docstring(node))]


def read_lines(path: str | pathlib.Path, *, what: str = "calibration data") -> list[str]:
    """One sample per non-empty line of a UTF-8 text file."""
    text = read_text(path, what=what, fix="pass a UTF-8 text file, one sample per line", allow_empty=True)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{what} file {str(path)!r} holds no samples", "write one sample per line")
    return lines


def read_text(path: str | pathlib.Path, *, what: str = "text", fix: str = "pass a UTF-8 text file", allow_empty: bool = False) -> str:
    """The whole of a UTF-8 text file; missing, unreadable, binary and empty files are refused."""
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} file {str(p)!r} does not exist", fix) from None
    except IsADirectoryError:
        raise DataError(f"{what} file {str(p)!r} is a directory", fix) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what} file {str(p)!r}: {exc}", fix) from None
    if "\0" in text:
        raise DataError(f"{what} file {str(p)!r} holds binary data, not text", fix)
    if not allow_empty and not text.strip():
        raise DataError(f"{what} file {str(p)!r} is empty", fix)
    return text


@dataclass(frozen=True)
class LMText:
    """Running text for causal LMs: whole documents, split into training and held-out ones."""

    train: list[str]
    heldout: list[str]


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs = {topics[key].strip() for key in topics}
    docs.update(doc.strip() for doc in _stdlib_docstrings() if len(doc) >= 200)
    return tuple(sorted(d for d in docs if d))


def lm_documents(heldout_every: int = 20) -> LMText:
    """pydoc's topics and the stdlib's longer docstrings as documents; one in `heldout_every`
    (chosen by a hash of its text, so the split is the same on every run) is held out."""
    train, heldout = [], []
    for doc in _documents():
        bucket = int(hashlib.sha1(doc.encode()).hexdigest()[:8], 16) % heldout_every
        (heldout if bucket == 0 else train).append(doc)
    return LMText(train=train, heldout=heldout)


def passages(documents: list[str], min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """Documents cut at paragraph breaks into passages of about min_chars..max_chars characters:
    the calibration and healing samples of causal LMs (one text each, as --calibration lines are)."""
    out = []
    for doc in documents:
        piece = ""
        for paragraph in _PARAGRAPH.split(doc):
            paragraph = " ".join(paragraph.split())
            piece = f"{piece}\n{paragraph}" if piece else paragraph
            if len(piece) >= min_chars:
                out.append(piece[:max_chars])
                piece = ""
        if len(piece) >= min_chars // 4:
            out.append(piece[:max_chars])
    return out
