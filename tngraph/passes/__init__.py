"""The declared pass pipeline. Order matters and is stated here:

1. targets    (analysis)  marks linear-like nodes with constant weights; everything below reads it.
2. calibrate  (analysis)  needs targets; streams calibration batches to get each target's X^T X.
3. allocate   (analysis)  needs targets; chooses format and rank per target under the budget.
4. factorize  (rewrite)   needs allocate (and calibrate for whitening); replaces targets by factor chains.
"""
from .allocate import allocate
from .base import Pass, PassContext, PassFn, PassResult
from .calibrate import calibrate
from .factorize import factorize
from .targets import targets

PIPELINE: list[PassFn] = [targets, calibrate, allocate, factorize]

__all__ = ["PIPELINE", "Pass", "PassContext", "PassFn", "PassResult", "allocate", "calibrate", "factorize", "targets"]
