"""The declared pass pipeline. Order matters and is stated here:

1. targets    (analysis)  marks linear-like nodes with constant weights; everything below reads it.
2. calibrate  (analysis)  needs targets; streams calibration batches to get each target's X^T X.
3. sensitivity (analysis) needs calibrate; loss-versus-parameters curve per target (budgeted allocation only).
4. allocate   (analysis)  needs targets (and sensitivity when budgeted); format and rank per target.
5. factorize  (rewrite)   needs allocate (and calibrate for whitening); replaces targets by factor chains.
"""
from .allocate import allocate
from .base import Pass, PassContext, PassFn, PassResult
from .calibrate import calibrate
from .factorize import factorize
from .sensitivity import sensitivity
from .targets import targets

PIPELINE: list[PassFn] = [targets, calibrate, sensitivity, allocate, factorize]

__all__ = ["PIPELINE", "Pass", "PassContext", "PassFn", "PassResult", "allocate", "calibrate", "factorize", "sensitivity", "targets"]
