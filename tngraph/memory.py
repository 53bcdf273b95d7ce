"""The analysis passes' memory plan: what their statistics will hold, checked against a limit before
they are allocated (Config.max_memory; default: the machine's physical memory).

The statistics that grow with the model are one X^T X per distinct target input (in x in, float64:
calibrate) and one output-gradient Gram per target (out x out, float64: fisher). On a 0.5 B
LM the latter are the larger part (each MLP's gate and up projections: 4,864 x 4,864). The plan:

- the model's weights are brought in first (a safetensors checkpoint is mmapped: its pages count
  only once touched), so what the process holds is known;
- the input Grams are float64 while they take at most half the room left, else the widest are
  summed in float32 until they do; when even float32 ones do not fit, the run is refused before
  the calibration forwards, with the number it needs and what would bring it down;
- output-gradient Grams are kept diagonal, widest outputs first, until the rest take at most half
  the room then left (the output whitening of those targets then weighs each output channel by its
  mean squared gradient, without the correlations between channels), said in the log; when even
  diagonal ones do not fit, the run is refused likewise;
- the fisher forwards and backward passes run in micro-batches that fit in half of what is left.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch

from .calibration import GradStats
from .errors import ConfigError

log = logging.getLogger(__name__)

GB = 1024**3


def resident_bytes() -> int:
    """This process's resident memory now (0 where the system does not say)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS")), 0)
    except OSError:
        return 0


def physical_bytes() -> int:
    """The machine's physical memory (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def size(n: float) -> str:
    """Bytes as a reader wants them: MB below a GB, else GB."""
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 1024**2:.1f} MB"


def limit_bytes(max_memory: float) -> int:
    """The limit the plan keeps to: max_memory GB, or the physical memory when 0 (0: no limit known)."""
    return int(max_memory * GB) if max_memory > 0 else physical_bytes()


def check_fits(need: int, what: str, limit: int, fixes: str) -> None:
    """Refuse, naming the numbers, when what the process holds plus `need` bytes exceeds `limit`."""
    held = resident_bytes()
    if limit and held + need > limit:
        raise ConfigError(f"{what} need {size(need)} beside the {size(held)} this process holds: "
                          f"{size(held + need)}, over the memory limit of {size(limit)} (--max-memory)", fixes)


def load_weights(module: torch.nn.Module) -> None:
    """Bring every parameter and buffer of `module` into memory: a checkpoint read through mmap (as
    safetensors are) comes in only as the forwards touch it, and the plans count what is resident."""
    seen: set[int] = set()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type != "cpu" or not t.numel() or not t.is_contiguous() or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            t.view(-1)[:: max(1, 4096 // t.element_size())].sum()  # one read per page


def widest_first(widths: dict, full: Callable[[int], int], reduced: Callable[[int], int], room: float) -> tuple[set, int]:
    """The keys of `widths` (key -> width) whose statistics take their reduced form, widest first,
    until all of them (full(width) bytes each, reduced(width) once reduced) fit in `room`; and the
    bytes they then take (more than `room` when even all reduced do not fit)."""
    need = sum(full(w) for w in widths.values())
    chosen: set = set()
    for key in sorted(widths, key=lambda k: -widths[k]):
        if need <= room:
            break
        need -= full(widths[key]) - reduced(widths[key])
        chosen.add(key)
    return chosen, need


WHITENING_COPIES = 2  # full Grams whitening makes beside the statistics' own sums, at its peak


def diagonal_plan(widths: dict[str, int], limit: int, held: int = 0) -> set[str]:
    """Which targets (name -> output width) keep diagonal output-gradient statistics so that all of
    them, beside `held` bytes of other gradient statistics, fit within half the room `limit` leaves
    beside what the process holds (the forwards and backward passes take the other half, and
    whitening after them): none when the full ones fit, else the widest first; and any whose
    whitening's copies (WHITENING_COPIES) would not fit in that other half."""
    if not limit:
        return set()
    half = (limit - resident_bytes()) / 2
    # whitening a full Gram makes WHITENING_COPIES more of it (its symmetric copy, the damped one factored in
    # place) once the passes' activations are gone: a Gram whose copies would not fit that half is kept diagonal
    # (a tied LM head's vocabulary x vocabulary Gram: 7.5 GB at 30,522 tokens)
    forced = {name for name, w in widths.items() if WHITENING_COPIES * GradStats.bytes(w, False) > half}
    rest = {name: w for name, w in widths.items() if name not in forced}
    held += sum(GradStats.bytes(widths[n], True) for n in forced)
    room = half - held
    diagonal, need = widest_first(rest, lambda w: GradStats.bytes(w, False), lambda w: GradStats.bytes(w, True), room)
    diagonal |= forced
    if need > room:
        raise ConfigError(f"the output-gradient statistics need {size(need + held)} even kept diagonal, beside the "
                          f"{size(resident_bytes())} this process holds: over the memory limit of {size(limit)} (--max-memory)",
                          "raise --max-memory, pass --no-output-whiten with --sensitivity measured or spectral, or --blockwise for a causal LM")
    if diagonal:
        log.warning("memory plan: %d of %d targets keep diagonal output-gradient statistics (the widest: %s, %d outputs) to stay "
                    "within %s (--max-memory)", len(diagonal), len(widths), max(diagonal, key=lambda n: widths[n]),
                    max(widths[n] for n in diagonal), size(limit))
    return diagonal


def return_freed(first: bool = False, collect: bool = True) -> None:
    """Give freed heap memory back to the OS (glibc): without it the blocks' transient buffers
    (weights, Grams, SVD work arrays) stay resident and the peak grows with every block. The first
    call pins glibc's mmap threshold, so that large buffers are mapped and unmapped, not heaped.
    `collect=False`: no garbage collection first, and nothing done below 1 GB resident (the
    whole-graph passes call it after their large transients)."""
    if not collect and resident_bytes() < GB:
        return
    import gc

    if collect:
        gc.collect()
    libc = _libc()
    if libc is None:
        return
    try:
        if first:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, fixed
        libc.malloc_trim(0)
    except AttributeError:  # not glibc: nothing to trim
        log.debug("malloc_trim is not available; freed memory stays with the allocator")


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library (found once: find_library runs a subprocess), or None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
