"""One frozen dataclass holds every option; unknown keys raise with the list of valid ones."""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

# "lowrank" (alias "svd"): x @ B.T @ A.T + b as two linears; "tt" / "tucker": one einsum each
FORMATS = ("lowrank", "tt", "tucker")
_ALIASES = {"svd": "lowrank"}


@dataclass(frozen=True)
class Config:
    """Options of a tngraph run.

    budget: fraction of the targeted layers' parameters (weights and biases) that is kept, in (0, 1].
    format: factorization of every target: "lowrank" (or "svd"; truncated SVD, x @ B.T @ A.T + b) or
        "tt" (tensor-train matrix with tt_cores cores, TT-SVD) or "tucker" (HOSVD of the reshaped weight).
    tt_cores: number of cores of the "tt" format (in and out are split into balanced factors).
    tucker_modes: modes per side of the "tucker" format (W becomes a 2*tucker_modes-way tensor).
    refit: after decomposing, refit the last core by closed-form least squares on the calibration
        statistics ("tt"; low-rank's whitened SVD is already optimal, so it is unaffected).
    whiten: activation-aware (SVD-LLM style) decomposition when calibration data exists.
    damping: relative diagonal damping of the calibration Gram matrix before its Cholesky factor.
    include / exclude: regular expressions on target module paths (e.g. "encoder.layer.3.output.dense");
        a target must match one `include` pattern (when any are given) and no `exclude` pattern.
    calibration_samples / eval_samples: sizes of the built-in sentence sets (bundled MiniLM).
    batch_size / max_length: calibration batching and tokenisation.
    seed: seed of every random choice (data sets, latency inputs).
    dump_dir: write the readable graph after each pass that changed it (also TNGRAPH_DUMP=dir).
    check_graph: run graph.lint() after every pass.
    progress: show progress bars.
    """

    budget: float = 0.5
    format: str = "lowrank"
    tt_cores: int = 2
    tucker_modes: int = 2
    refit: bool = True
    whiten: bool = True
    damping: float = 1e-4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    calibration_samples: int = 512
    eval_samples: int = 2000
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    dump_dir: str | None = field(default_factory=lambda: os.environ.get("TNGRAPH_DUMP") or None)
    check_graph: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check_number("budget", self.budget, low=0.0, high=1.0, low_open=True)
        object.__setattr__(self, "format", _ALIASES.get(self.format, self.format))
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}", f"choose one of {', '.join(FORMATS)}")
        _check_number("damping", self.damping, low=0.0, high=1.0)
        for name, low in (("tt_cores", 2), ("tucker_modes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 6:
                raise ConfigError(f"{name} must be an integer in [{low}, 6], got {value!r}")
        for name in ("calibration_samples", "eval_samples", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not all(isinstance(p, str) for p in value):
                raise ConfigError(f"{name} must be a tuple of regular expressions, got {value!r}")
            else:
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **overrides: Any) -> "Config":
        """Build a Config from a mapping (a recipe file, torch.compile options) plus keyword overrides."""
        merged = {**(options or {}), **overrides}
        return cls(**merged)

    def replace(self, **changes: Any) -> "Config":
        _reject_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _reject_unknown(options: Mapping[str, Any]) -> None:
    valid = valid_keys()
    unknown = [key for key in options if key not in valid]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown option {key!r}", f"{hint}valid options: {', '.join(valid)}")


def _check_number(name: str, value: Any, *, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    bad_low = value <= low if low_open else value < low
    if bad_low or value > high or value != value:
        interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ConfigError(f"{name} must lie in {interval}, got {value!r}")


_dataclass_init = Config.__init__


def _checked_init(self: Config, *args: Any, **kwargs: Any) -> None:
    _reject_unknown(kwargs)
    _dataclass_init(self, *args, **kwargs)


Config.__init__ = _checked_init  # type: ignore[method-assign]
