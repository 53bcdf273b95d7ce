"""The learned sensitivity predictor: a small convolutional network over patch-level spectra.

Measuring sensitivity end to end ("measured") costs forward passes per target and rank; the
Gauss-Newton estimate ("fisher") is free but misses how errors interact and travel through the
network. The predictor learns the correction from measured labels:

- input: the target's weight in the whitened coordinates of the fisher estimate, L^T·W·S, cut into
  an 8 x 8 grid of patches; per patch its log energy share and the relative singular-value tail
  of the patch at 1/8, 1/4 and 1/2 of its rank (4 channels), plus layer scalars (the log of the
  fisher energy, the log tails of the whole weight at the grid ranks, aspect, width; not the
  depth, which does not carry over between models);
- output, layer level: log(measured share / fisher prediction) at each kept fraction of
  sensitivity.GRID, so that the predicted curve is the fisher curve times the interpolated ratio;
- output, patch level: an 8 x 8 map of log shares of the layer's truncation error per patch
  (where the error of the rank at the budget lands; the map the patch-level report shows).

tools/train_predictor.py collects labels and trains it; the weights ship as
tngraph/weights/predictor.safetensors (a few thousand parameters).
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PATCHES = 8
PATCH_KEPT = (0.125, 0.25, 0.5)  # fractions of a patch's rank whose tails are features
CHANNELS = 1 + len(PATCH_KEPT)
GRID = (0.125, 0.25, 0.5, 0.75)  # must match sensitivity.GRID
SCALARS = 1 + len(GRID) + 2
WEIGHTS = Path(__file__).parent / "weights" / "predictor.safetensors"


class SensitivityPredictor(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(CHANNELS, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU())
        self.patch = nn.Conv2d(hidden, 1, 1)
        self.head = nn.Sequential(nn.Linear(hidden + SCALARS, 32), nn.GELU(), nn.Linear(32, len(GRID)))
        # input normalisation, fitted on the training set
        self.register_buffer("scalar_mean", torch.zeros(SCALARS))
        self.register_buffer("scalar_std", torch.ones(SCALARS))
        # the range of the training labels: predictions are clamped to it (no extrapolation)
        self.register_buffer("label_min", torch.full((len(GRID),), -1e9))
        self.register_buffer("label_max", torch.full((len(GRID),), 1e9))

    def forward(self, image: torch.Tensor, scalars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(image)
        patch = self.patch(h).squeeze(1)
        z = (scalars - self.scalar_mean) / self.scalar_std
        layer = self.head(torch.cat([h.mean((2, 3)), z], -1))
        return torch.maximum(torch.minimum(layer, self.label_max), self.label_min), patch


def features(whitened: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [CHANNELS, 8, 8], scalars [SCALARS]) of one target from its whitened weight L^T W S and
    its fisher energy (predicted relative error with the target removed)."""
    w = whitened.detach().to(torch.float64)
    rows, cols = w.shape
    pr, pc = min(PATCHES, rows), min(PATCHES, cols)
    h, v = rows // pr, cols // pc
    patches = w[: pr * h, : pc * v].reshape(pr, h, pc, v).permute(0, 2, 1, 3)
    s2 = torch.linalg.svdvals(patches) ** 2  # [pr, pc, k]
    total = s2.sum(-1)
    share = total / total.sum().clamp_min(1e-300) * (pr * pc)
    k = s2.shape[-1]
    cum = torch.cumsum(s2, -1)
    tails = [1 - cum[..., max(1, round(f * k)) - 1] / total.clamp_min(1e-300) for f in PATCH_KEPT]
    image = torch.stack([torch.log(share.clamp_min(1e-12)), *[t.clamp(0, 1) for t in tails]])
    if (pr, pc) != (PATCHES, PATCHES):
        image = nn.functional.interpolate(image[None], size=(PATCHES, PATCHES), mode="nearest")[0]
    sv2 = torch.linalg.svdvals(w) ** 2
    n = sv2.numel()
    layer_tail = 1 - torch.cumsum(sv2, 0) / sv2.sum().clamp_min(1e-300)
    grid_tails = [math.log(max(float(layer_tail[max(1, round(f * n)) - 1]), 1e-12)) for f in GRID]
    scalars = [math.log(max(energy, 1e-30)), *grid_tails, math.log(rows / cols), math.log(cols) / 8]
    return image.to(torch.float32), torch.tensor(scalars, dtype=torch.float32)


def patch_error_shares(whitened: torch.Tensor, rank: int) -> torch.Tensor:
    """Label of the patch head: log of each patch's share (times the patch count) of the error the
    rank-`rank` truncation of `whitened` leaves."""
    w = whitened.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    residual = w - (u[:, :rank] * s[:rank]) @ vh[:rank]
    rows, cols = w.shape
    pr, pc = min(PATCHES, rows), min(PATCHES, cols)
    h, v = rows // pr, cols // pc
    e = (residual[: pr * h, : pc * v].reshape(pr, h, pc, v) ** 2).sum((1, 3))
    e = torch.log((e / e.sum().clamp_min(1e-300) * (pr * pc)).clamp_min(1e-12))
    if (pr, pc) != (PATCHES, PATCHES):
        e = nn.functional.interpolate(e[None, None], size=(PATCHES, PATCHES), mode="nearest")[0, 0]
    return e.to(torch.float32)


@lru_cache(maxsize=1)
def load(path: str | None = None) -> SensitivityPredictor:
    """The shipped predictor (or the one at `path`), in eval mode."""
    from safetensors.torch import load_file

    from .errors import ModelError

    file = Path(path) if path else WEIGHTS
    if not file.is_file():
        raise ModelError(f"the sensitivity predictor's weights are missing: {file}",
                         "reinstall tngraph, or train them with `python tools/train_predictor.py`")
    model = SensitivityPredictor()
    try:
        state = load_file(str(file))
        model.load_state_dict(state)
    except Exception as exc:
        raise ModelError(f"the sensitivity predictor's weights at {file} cannot be read: {type(exc).__name__}: {exc}",
                         "reinstall tngraph, or retrain them with `python tools/train_predictor.py`") from exc
    return model.eval()


@torch.no_grad()
def predict(image: torch.Tensor, scalars: torch.Tensor, path: str | None = None) -> tuple[list[float], torch.Tensor]:
    """(log ratios at GRID, patch map [8, 8]) for one target."""
    layer, patch = load(path)(image[None], scalars[None])
    return layer[0].tolist(), patch[0]
