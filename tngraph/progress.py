"""Progress bars (tqdm): shown on a terminal, off when stderr is not one or Config.progress is False."""
from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, enabled: bool, total: int | None = None, unit: str = "it",
             initial: int = 0) -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, unit=unit, initial=initial, disable=None if enabled else True, leave=False, dynamic_ncols=True)
