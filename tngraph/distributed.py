"""torch.distributed for the passes and drivers: which rank does which target's work, and sharing
the results so that every rank holds the same ones (and a run on N ranks writes what one rank does).

Per-target work (a spectrum, a decomposition and its guard) is done by rank j % world for the j-th
target, and its result broadcast to the others as an object (pickled tensors travel bit-exact).
Everything is sent over gloo: the work is on the CPU, and NCCL broadcasts only CUDA tensors.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch.distributed as dist

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class Group:
    """This process's place among the ranks: (rank, world), and the gloo group CPU objects travel in."""

    rank: int = 0
    world: int = 1
    gloo: list[Any] = field(default_factory=list)  # the gloo group, made once, when the default group is not gloo

    def owner(self, index: int) -> int:
        return index % self.world

    def cpu_group(self) -> Any:
        """The group CPU objects travel in: the default group when it is gloo, else (a caller's NCCL
        group) a gloo group over the same ranks, made once."""
        if dist.get_backend() == "gloo":
            return None
        if not self.gloo:
            self.gloo.append(dist.new_group(backend="gloo"))
        return self.gloo[0]


SINGLE = Group()
_GROUPS: dict[tuple[int, int], Group] = {}


def current() -> Group:
    """The Group of an initialised torch.distributed process group, else the single-process one."""
    if dist.is_available() and dist.is_initialized():
        key = (dist.get_rank(), dist.get_world_size())
        return _GROUPS.setdefault(key, Group(*key))
    return SINGLE


def init_from_env() -> Group:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo, with or without CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(minutes=30))
        log.info("torch.distributed: rank %d of %d (gloo)", dist.get_rank(), world)
    return current()


class _Failed:
    """An exception raised on the rank that owned a piece of work, sent to the others."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def broadcast(value: Any, src: int, group: Group) -> Any:
    """Rank `src`'s value on every rank (the others pass anything, e.g. None)."""
    if group.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group.cpu_group())
    return box[0]


def share_map(group: Group | None, keys: Sequence[K], fn: Callable[[K], V],
              wrap: Callable[[list], Any] = lambda items: items) -> dict[K, V]:
    """{key: fn(key)} on every rank, fn(keys[j]) computed only by rank j % world. An exception on
    its owner is raised on every rank (none is left waiting). `wrap` wraps the iteration over this
    rank's own work (a progress bar)."""
    group = group or SINGLE
    if group.world == 1:
        return {key: fn(key) for key in wrap(list(keys))}
    mine: dict[int, Any] = {}
    for j, key in wrap([(j, key) for j, key in enumerate(keys) if group.owner(j) == group.rank]):
        try:
            mine[j] = fn(key)
        except Exception as exc:  # sent to the others, then raised everywhere
            mine[j] = _Failed(exc)
    out: dict[K, V] = {}
    failure = None
    for j, key in enumerate(keys):
        value = broadcast(mine.get(j), group.owner(j), group)
        if isinstance(value, _Failed):
            failure = failure or value.exc
        out[key] = value
    if failure is not None:
        raise failure
    return out


def agree(check: Callable[[], Any], group: Group | None) -> None:
    """Run `check` on rank 0; with several ranks every one raises the error rank 0 got."""
    group = group or SINGLE
    share_map(group, [0], lambda _: check())


def barrier(group: Group | None) -> None:
    if group is not None and group.world > 1:
        dist.barrier(group=group.cpu_group())
