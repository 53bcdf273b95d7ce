"""Calibration inputs: texts tokenized in batches of similar length, or the user's example inputs, checked."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree

from .capture import normalize_inputs
from .config import Config
from .errors import DataError
from .models import token_lengths, tokenize


def calibration_batches(
    calibration: Sequence[Any] | None, config: Config, tokenizer: Any = None, accepted: set[str] | None = None
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Texts (tokenized in batches of config.batch_size, only the tensors named in `accepted`, the
    model's forward_names) or a list of example inputs, as (args, kwargs)."""
    if calibration is None:
        return []
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Sequence):
        raise DataError(f"calibration must be a list of samples, got {type(calibration).__name__}", "pass a list of texts or of example inputs")
    samples = list(calibration)
    if not samples:
        raise DataError("calibration data is empty", "pass at least one sample, or None for data-free decomposition")
    if all(isinstance(s, str) for s in samples):
        if tokenizer is None:
            raise DataError("calibration texts need a tokenizer", "pass tokenizer= or tokenized example inputs")
        samples = by_token_length(samples[: config.calibration_samples], tokenizer, config.max_length)
        return [
            ((), tokenize(tokenizer, samples[i : i + config.batch_size], config.max_length, accepted))
            for i in range(0, len(samples), config.batch_size)
        ]
    if any(isinstance(s, str) for s in samples):
        raise DataError("calibration mixes texts and tensors", "pass only texts or only example inputs")
    batches = [normalize_inputs(s) for s in samples]
    for i, (args, kwargs) in enumerate(batches):
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
                raise DataError(f"calibration sample {i} holds NaN or Inf values", "pass finite calibration inputs")
    return batches


def by_token_length(texts: list[str], tokenizer: Any, max_length: int) -> list[str]:
    """The texts ordered by token count (ties by position): batches of similar length pad little,
    and padded positions would distort the calibration statistics."""
    lengths = token_lengths(tokenizer, texts, max_length)
    return [texts[i] for i in sorted(range(len(texts)), key=lambda i: (lengths[i], i))]


def batch_shape(batch: tuple[tuple, dict]) -> tuple[int, int]:
    """(rows, tokens per row) of a batch: its first tensor's first two dimensions."""
    first = next((x for x in pytree.tree_leaves(batch) if isinstance(x, torch.Tensor) and x.dim() >= 1), None)
    if first is None:
        return 1, 1
    return int(first.shape[0]), int(first.shape[1]) if first.dim() >= 2 and first.dtype in (torch.long, torch.int) else 1


def split_batch(batch: tuple[tuple, dict], rows: int) -> list[tuple[tuple, dict]]:
    """The batch in parts of at most `rows` rows: every tensor with the batch's row count is cut."""
    total = batch_shape(batch)[0]
    if total <= rows:
        return [batch]
    return [pytree.tree_map(lambda x: x[i : i + rows] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == total else x,
                            batch) for i in range(0, total, rows)]
