"""What tngraph may replace: output folders and files are replaced only when tngraph wrote them.

Every folder tngraph writes (an artifact, a dump, a trained tiny LM) holds a small marker file,
`.tngraph.json`, naming its kind and the entries tngraph put there. `--force` (force=True) replaces
a folder only when it is empty or marked (or an artifact written before markers existed, recognised
by its recipe) and holds nothing but tngraph's entries; the source model's folder, a folder that
contains it, the current directory, the home directory and `/` are never replaced. A refusal names
the folder and what to do, and happens before anything is touched.

Replacement is atomic: the new folder is built in a staging sibling `.NAME.tmp-*` and swapped in
with one rename. Staging folders that a killed run left behind are removed by the next run into
the same place (each holds a marker with the pid of its writer, so a live run's are left alone).
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Iterable, Iterator

from .errors import ArtifactError

log = logging.getLogger(__name__)

MARKER = ".tngraph.json"
STAGING = "staging"
# artifacts written before markers existed: a tngraph recipe and only these entries
_LEGACY_ARTIFACT = re.compile(r"(recipe\.json|factors(-\d{5})?\.safetensors|report\.json|heal\.json)")


def _version() -> str:
    from . import __version__

    return __version__


def mark(folder: str | os.PathLike, kind: str, entries: Iterable[str] = (), *, add: bool = False) -> None:
    """Record in `folder` that tngraph wrote it (as `kind`) and which of its entries are tngraph's;
    add=True adds `entries` to those already recorded."""
    folder = pathlib.Path(folder)
    names = set(entries)
    if add:
        names |= set((read_marker(folder) or {}).get("entries", []))
    names.discard(MARKER)
    data = {"kind": kind, "tngraph_version": _version(), "entries": sorted(names)}
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def read_marker(folder: pathlib.Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def _legacy_artifact(folder: pathlib.Path, names: list[str]) -> bool:
    try:
        recipe = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(recipe, dict) and "recipe_version" in recipe and "tngraph_version" in recipe
            and all(_LEGACY_ARTIFACT.fullmatch(n) for n in names))


def strangers(folder: pathlib.Path) -> list[str] | None:
    """The entries of `folder` tngraph did not write ([] for a folder entirely tngraph's or empty);
    None when the folder is not tngraph's at all."""
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return []
    marker = read_marker(folder)
    if marker is not None and marker["kind"] != STAGING:
        ours = set(marker.get("entries", [])) | {MARKER}
        return [n for n in names if n not in ours]
    if _legacy_artifact(folder, names):
        return []
    return None


def _protected(keep: Iterable[str | os.PathLike | None]) -> list[tuple[pathlib.Path, str]]:
    places = [(pathlib.Path("/"), "the root directory"), (pathlib.Path.cwd(), "the current directory")]
    with contextlib.suppress(RuntimeError, KeyError):  # no home directory known
        places.append((pathlib.Path.home(), "your home directory"))
    places += [(pathlib.Path(p), f"an input of this run ({str(p)!r})") for p in keep if p]
    return [(p.resolve(), what) for p, what in places]


def check_output_dir(path: str | os.PathLike, force: bool, *, keep: Iterable[str | os.PathLike | None] = ()) -> pathlib.Path:
    """Refuse an output folder that may not be written; call before any long work (and again at the write).

    A missing folder is fine. An existing one needs `force`, and then must be empty or tngraph's own
    (see the module doc) and must not be, or contain, one of the places in `keep` (the source model's
    folder), the current directory, the home directory or `/`."""
    out = pathlib.Path(path)
    if not (out.exists() or out.is_symlink()):
        return out
    if not force:
        raise ArtifactError(f"output directory {str(out)!r} already exists", "pass --force (force=True) to replace it, or choose another --out")
    if out.is_symlink():
        raise ArtifactError(f"output path {str(out)!r} is a symbolic link; tngraph replaces only folders it wrote",
                            "choose another --out, or remove the link yourself")
    if not out.is_dir():
        raise ArtifactError(f"output path {str(out)!r} exists and is not a directory", "choose another --out")
    resolved = out.resolve()
    for place, what in _protected(keep):
        if resolved == place or place.is_relative_to(resolved):
            where = "is" if resolved == place else "contains"
            raise ArtifactError(f"--force refused: {str(out)!r} {where} {what}, which tngraph never replaces",
                                "choose a new folder for --out, e.g. a subfolder that does not exist yet")
    others = strangers(resolved)
    if others is None:
        raise ArtifactError(f"--force refused: {str(out)!r} was not written by tngraph (no {MARKER}, no tngraph recipe)",
                            "choose a new folder for --out; tngraph replaces only its own output folders or empty ones")
    if others:
        listed = ", ".join(repr(n) for n in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ArtifactError(f"--force refused: {str(out)!r} holds files tngraph did not write ({listed})",
                            "move them out of the folder, or choose another --out")
    return out


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: pathlib.Path) -> list[pathlib.Path]:
    """Remove the staging siblings `.NAME.tmp-*` / `.NAME.old-*` of `out` that a killed run left
    (tngraph's marker inside, its writer gone); return what was removed."""
    removed = []
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if not parent.is_dir():
        return removed
    for entry in parent.glob(f".{glob.escape(out.name)}.*-*"):
        if not re.fullmatch(rf"\.{re.escape(out.name)}\.(tmp|old)-[A-Za-z0-9_]+", entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        marker = read_marker(entry)
        if marker is None:
            continue
        if marker["kind"] == STAGING and _alive(marker.get("pid")):
            continue  # another run is writing there now
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed %s, left by an interrupted tngraph run", entry)
        removed.append(entry)
    return removed


def staging_dir(out: pathlib.Path, tag: str = "tmp") -> pathlib.Path:
    """A fresh staging sibling of `out`, marked as this process's."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    (tmp / MARKER).write_text(json.dumps({"kind": STAGING, "pid": os.getpid(), "tngraph_version": _version()}) + "\n", encoding="utf-8")
    return tmp


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False, *, kind: str = "artifact",
               keep: Iterable[str | os.PathLike | None] = ()) -> Iterator[pathlib.Path]:
    """Yield a staging sibling folder; on success it is marked as tngraph's `kind` (with the entries
    written into it) and replaces `path` in one rename; on failure it vanishes and `path` is untouched."""
    keep = list(keep)
    out = check_output_dir(path, force, keep=keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = staging_dir(out)
    try:
        yield tmp
        mark(tmp, kind, (p.name for p in tmp.iterdir()))
        check_output_dir(out, force, keep=keep)  # again: the folder may have changed during the work
        if out.exists():
            if _exchange(tmp, out):  # one atomic swap: `path` is the old folder or the new one, never missing
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = staging_dir(out, "old")
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def fresh_dir(path: str | os.PathLike, force: bool, *, kind: str,
                                  keep: Iterable[str | os.PathLike | None] = ()) -> pathlib.Path:
    """For a folder written in place as work goes on (a dump): refuse as check_output_dir does, then
    empty a folder that may be replaced and mark the (new or emptied) folder as tngraph's `kind`."""
    out = check_output_dir(path, force, keep=keep)
    if out.exists():
        for entry in out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    mark(out, kind)
    return out


def check_output_file(path: str | os.PathLike, force: bool, *, ours: Any, what: str,
                      keep: Iterable[str | os.PathLike | None] = ()) -> pathlib.Path:
    """Refuse an output file that may not be written: an existing one needs `force`, and then must
    be a file tngraph wrote (`ours(path)` says so) and none of `keep` (this run's inputs)."""
    out = pathlib.Path(path)
    for p in keep:
        if p and (out.exists() or out.is_symlink()) and pathlib.Path(p).exists() and out.resolve() == pathlib.Path(p).resolve():
            raise ArtifactError(f"--out {str(out)!r} is an input of this run", "choose another --out")
    if not (out.exists() or out.is_symlink()):
        return out
    if out.is_dir():
        raise ArtifactError(f"{str(out)!r} is a directory", f"pass the path of the {what} file to write")
    if not force:
        raise ArtifactError(f"{str(out)!r} already exists", "pass --force (force=True) to replace it, or choose another path")
    if out.is_symlink() or not ours(out):
        raise ArtifactError(f"--force refused: {str(out)!r} is not {what} that tngraph wrote",
                            "choose another --out; tngraph replaces only files it wrote")
    return out
