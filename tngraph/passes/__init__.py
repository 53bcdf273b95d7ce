"""The declared pass pipeline. Order matters and is stated here:

1. targets    (analysis)  marks linear-like nodes with constant weights; everything below reads it.
2. calibrate  (analysis)  needs targets; streams calibration batches to get each target's X^T X.
3. fisher     (analysis)  needs calibrate's batches; output-gradient Gram per target (output whitening,
                          fisher sensitivity), one backward pass per batch; skipped when unused.
4. sensitivity (analysis) needs calibrate (and fisher); loss-versus-parameters curve per target (budgeted allocation only).
5. allocate   (analysis)  needs targets (and sensitivity when budgeted); format and rank per target.
6. factorize  (rewrite)   needs allocate (and calibrate for whitening); replaces targets by factor chains.
7. fuse       (rewrite)   needs factorize; each layer (+ activation) becomes its op (tngraph.layers).
"""
from .allocate import allocate
from .base import PRODUCTS, Pass, PassContext, PassFn, PassResult, declare
from .calibrate import calibrate
from .factorize import factorize
from .fisher import fisher
from .fuse import fuse
from .sensitivity import sensitivity
from .targets import targets

PIPELINE: list[PassFn] = [targets, calibrate, fisher, sensitivity, allocate, factorize, fuse]

__all__ = ["PIPELINE", "PRODUCTS", "Pass", "PassContext", "PassFn", "PassResult", "allocate", "calibrate", "declare", "factorize", "fisher", "fuse", "sensitivity", "targets"]
