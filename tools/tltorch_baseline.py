#!/usr/bin/env python
"""Baseline: tensorly-torch's ``tltorch.FactorizedLinear`` at a given fraction of the weights kept.

Installing
----------
    .venv/bin/pip install tensorly tensorly-torch      # -> tensorly 0.10.0, tensorly-torch 0.5.0

Neither wheel depends on torch (both declare only numpy and scipy; tensorly-torch does not even
declare tensorly, hence both names), so torch 2.13.0+cpu stays as it is. ``import tltorch`` works
on torch 2.13 unchanged: no compatibility shim is needed. Importing tltorch runs
``tensorly.set_backend("pytorch")`` for the whole process; this module imports it lazily, so
importing this file has no such side effect.

What the baseline does
----------------------
``factorize_model`` deep-copies a model and replaces each matching ``nn.Linear`` by
``FactorizedLinear.from_linear(linear, rank=..., factorization=kind, ...)``:

- Tensorization is tltorch's automatic one (``from_linear(auto_tensorize=True,
  n_tensorized_modes=3)``, i.e. ``tltorch.utils.get_tensorized_shape(in, out, order=3,
  min_dim=2)``); the weight ``(out, in)`` is reshaped to the 6-way tensor ``(*out_t, *in_t)``:

      out x in        out_t          in_t
      384 x 384       (4, 6, 16)     (4, 6, 16)
      1536 x 384      (6, 16, 16)    (4, 6, 16)
      384 x 1536      (4, 6, 16)     (6, 16, 16)
      5120 x 5120     (16, 16, 20)   (16, 16, 20)
      25600 x 5120    (16, 20, 80)   (16, 16, 20)
      5120 x 25600    (16, 16, 20)   (16, 20, 80)

- Rank (``choose_rank``): tltorch reads a float ``rank=f`` as "keep about f of the parameters"
  and resolves it with tensorly's ``validate_{cp,tucker,tt}_rank``, which rounds to nearest
  (Tucker at f=0.5 on 384 x 384 gives 0.535). We bisect on f for the largest setting whose
  weight has ``<= kept * out * in`` parameters, counting every parameter of the factorized
  weight (factor matrices + Tucker core + CP weight vector of length R; never the bias), taken
  from the weight tltorch builds (on the meta device, so the search is free). Two corrections:
  * BlockTT: tensorly's float rank ignores the TT-SVD bounds (1536 x 384 at 0.5 asks r_1 = 31
    where o_1 * i_1 = 24) and ``tensor_train_matrix`` silently returns smaller factors (0.396
    instead of 0.5 of the parameters). The search counts the capped rank and passes it as a tuple.
  * Tucker: a float only scales all ranks together, so it undershoots (384 x 384 at 0.5:
    0.303, next step 0.535). ``fill_tucker`` (default) grows single modes while the budget
    allows and passes the tuple. With kept=0.5 / 0.25, the ranks (parameter ratio) are:

      out x in      Tucker (float only -> filled)                       CP             BlockTT
      384 x 384     0.303 -> (4,6,14,3,5,14) 0.482 | 0.223 -> 0.241      1391 / 695     (1,16,88,1) 0.498 | (1,10,59,1) 0.248
      1536 x 384    0.466 -> (5,15,14,4,5,14) 0.500 | 0.221 -> 0.239     4537 / 2268    (1,24,114,1) 0.496 | (1,21,63,1) 0.244
      5120 x 5120   (14,14,18,14,14,18) 0.475 | 0.203 -> 0.238          124830 / 62415 (1,199,254,1) 0.499 | (1,140,179,1) 0.249
      25600 x 5120  0.488 -> 0.495 | 0.209 -> 0.250                    387786 / 193893 (1,245,818,1) 0.500 | (1,172,575,1) 0.249
  (CP ratios are 0.500 / 0.250; 384 x 1536 and 5120 x 25600 mirror their transposes.)

- Initialization from the dense weight (``init_from_matrix`` -> ``init_from_tensor``): Tucker =
  ``tensorly.decomposition.tucker`` (HOOI, SVD init, n_iter_max=100, tol=1e-4); CP =
  ``tensorly.decomposition.parafac`` (ALS, SVD init, l2_reg=1e-5, n_iter_max=100, tol=1e-8);
  BlockTT = ``tensorly.decomposition.tensor_train_matrix`` (TT-SVD, one pass). Keywords reach the
  decomposition through ``from_linear(decomposition_kwargs=...)``; we pass ``random_state=0`` to
  Tucker and CP.

- CP is slow. The ranks that keep 25-50 % of the parameters are far above every mode size, so
  the SVD init fills at most d_k columns of each factor (the rest is random), and each ALS sweep
  solves an R x R system and forms a (numel / d_k) x R Khatri-Rao matrix per mode. One sweep on
  a 1536 x 384 layer at kept=0.5 (R=4537) takes ~33 s on one CPU thread with tensorly's default
  "core" tenalg backend and ~9 s with its "einsum" backend (same algebra, no explicit Khatri-Rao
  matrix). tensorly's default 100 sweeps would take hours for MiniLM, so ``factorize_model`` has
  ``cp_iters`` (default 1, passed as parafac's ``n_iter_max``; None = tensorly's 100) and
  ``cp_einsum`` (default True: parafac runs under ``tensorly.tenalg.backend_context("einsum")``).
  Even so, all 36 MiniLM encoder linears take 138 s at kept=0.5 (26 s at 0.25; 91 s for 5
  sweeps at 0.25), one thread. More sweeps barely help (mean cos 0.117 -> 0.130 at 0.25).

- ``implementation``: tltorch's ``from_linear`` defaults to "reconstructed" (rebuild the dense
  weight at every forward, then ``F.linear``); we default to "factorized" (contract the input
  with the factors). Outputs agree to ~1e-6.

Measured (one CPU thread, MiniLM, ``^encoder\\.`` = 36 linears, 300 held-out sentences)
-------------------------------------------------------------------------------------
      kind     kept  weight ratio  factorize   mean cos (vs dense MiniLM)
      tucker   0.50  0.494           6 s       0.186
      tucker   0.25  0.240           6 s       0.130
      blocktt  0.50  0.497           1 s       0.206
      blocktt  0.25  0.245           1 s       0.132
      cp       0.50  0.500         138 s       0.128   (1 ALS sweep)
      cp       0.25  0.250          26 s       0.117   (1 sweep; 0.130 with 5)
  For scale: unwhitened truncated SVD of each layer at the same budget gives 0.359 / 0.250;
  unrelated sentences (shuffled reference) give 0.087; full-rank Tucker through this same code
  gives 1.000. tltorch's decompositions are data-free and their per-layer weight errors are
  large (query 0 at 0.5: Tucker 0.70, BlockTT 0.59, CP 0.83 relative, SVD 0.46).

``factorized_linear`` builds one bias-free layer from a weight, for timing at LLM shapes. CP
cannot be decomposed there (R ~ 1.2e5 - 3.9e5), so with ``init="auto"`` CP above
``CP_DECOMPOSE_LIMIT`` (numel * R) gets tltorch's random init at the same rank and
``initialized_from_weight=False`` on the module (timing does not depend on the values).
5120 x 5120, kept=0.5, x of shape (32, 5120), one thread (dense ``F.linear`` 27-31 ms):
  Tucker  factorized 13-17 ms (0.5x dense), reconstructed 707 ms (26x); built by HOOI in 51-58 s
  BlockTT factorized 598 ms (21x), reconstructed 433 ms (15x); built by TT-SVD in 5.5 s
  CP      both implementations fail: out of memory (torch asks 40.9 GB for a 81920 x R
          intermediate; the opt_einsum path of the factorized contraction and the Khatri-Rao
          product of the reconstruction both form it)

  python tools/tltorch_baseline.py                      # rank table + 5120 x 5120 timing
  python tools/tltorch_baseline.py --time-shape "" --shapes 384x384 1536x384
  python tools/tltorch_baseline.py --kinds tucker blocktt --implementations factorized reconstructed
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("tucker", "cp", "blocktt")
N_TENSORIZED_MODES = 3  # from_linear's default
# CP layers with numel * R above this are not decomposed by factorized_linear(init="auto"):
# the MiniLM FFN at kept=0.5 is 589824 * 4608 = 2.7e9 (one ALS sweep ~ 10-30 s on one thread).
CP_DECOMPOSE_LIMIT = 4e9


def available() -> bool:
    """True when tensorly-torch (``tltorch``) and tensorly can be imported."""
    try:
        import tltorch  # noqa: F401
    except Exception as e:  # ImportError, or anything a broken install raises on import
        log.debug("tltorch not importable: %s", e)
        return False
    return True


@dataclass(frozen=True)
class RankChoice:
    """The rank setting chosen for one (out, in) weight and kind."""

    kind: str
    setting: float | tuple[int, ...]  # what is passed to tltorch as rank=
    rank: int | tuple[int, ...]  # the rank the layer ends up with (CP: int; Tucker, BlockTT: tuple)
    params: int  # parameters of the factorized weight
    dense: int  # out * in
    out_tensorized: tuple[int, ...]
    in_tensorized: tuple[int, ...]
    fraction: float  # the largest float setting that fits (before any Tucker fill or BlockTT cap)

    @property
    def ratio(self) -> float:
        return self.params / self.dense


def tensorized_shapes(out_features: int, in_features: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out_tensorized, in_tensorized): the shapes ``FactorizedLinear.from_linear`` picks by default."""
    from tltorch.utils import get_tensorized_shape

    in_t, out_t = get_tensorized_shape(
        in_features=in_features, out_features=out_features, order=N_TENSORIZED_MODES, min_dim=2, verbose=False
    )
    return tuple(int(v) for v in out_t), tuple(int(v) for v in in_t)


def _check_kind(kind: str) -> str:
    k = kind.lower()
    if k not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return k


def _as_rank(rank: Any) -> int | tuple[int, ...]:
    return int(rank) if isinstance(rank, int) else tuple(int(r) for r in rank)


def _cap_block_tt(out_t: tuple[int, ...], in_t: tuple[int, ...], rank: tuple[int, ...]) -> tuple[int, ...]:
    """The BlockTT rank TT-SVD actually returns: r_{k+1} <= min(r_k * o_k * i_k, prod of the later o_j * i_j).

    tensorly's float rank for BlockTT ignores these bounds (1536 x 384 at 0.5 asks r_1 = 31 where
    o_1 * i_1 = 24), and ``tensor_train_matrix`` then silently returns smaller factors.
    """
    dims = [o * i for o, i in zip(out_t, in_t, strict=True)]
    capped = [1]
    for k in range(len(dims) - 1):
        capped.append(min(int(rank[k + 1]), capped[k] * dims[k], math.prod(dims[k + 1 :])))
    return (*capped, 1)


def _weight_params(
    kind: str, out_t: tuple[int, ...], in_t: tuple[int, ...], setting: float | tuple[int, ...]
) -> tuple[int, int | tuple[int, ...]]:
    """(parameters, rank) of the weight tltorch ends up with for ``rank=setting``, built on the meta device."""
    from tltorch.factorized_tensors import TensorizedTensor

    def build(s: float | tuple[int, ...]) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TensorizedTensor.new((out_t, in_t), rank=s, factorization=kind, device="meta")

    t = build(setting)
    if kind == "blocktt":
        capped = _cap_block_tt(out_t, in_t, tuple(t.rank))
        if capped != tuple(t.rank):
            t = build(capped)
    return sum(p.numel() for p in t.parameters()), _as_rank(t.rank)


def _fill_tucker(out_t: tuple[int, ...], in_t: tuple[int, ...], rank: tuple[int, ...], budget: float) -> tuple[int, ...]:
    """Grow a Tucker rank one mode at a time (lowest rank/size first) while the weight stays within budget."""
    dims = (*out_t, *in_t)
    while True:
        for mode in sorted(range(len(dims)), key=lambda k: (rank[k] / dims[k], k)):
            if rank[mode] >= dims[mode]:
                continue
            trial = rank[:mode] + (rank[mode] + 1,) + rank[mode + 1 :]
            if _weight_params("tucker", out_t, in_t, trial)[0] <= budget:
                rank = trial
                break
        else:
            return rank


def choose_rank(
    out_features: int, in_features: int, kind: str, kept: float, *, fill_tucker: bool = True, steps: int = 50
) -> RankChoice:
    """Largest tltorch ``rank`` setting whose factorized weight has ``<= kept * out * in`` parameters.

    Bisection on the float fraction in (0, 1]: the parameter count is non-decreasing in it for all
    three kinds (tensorly scales every rank with one constant and rounds). BlockTT ranks are
    counted as TT-SVD caps them (``_cap_block_tt``) and then passed as that explicit tuple. A float
    gives Tucker only uniformly scaled ranks, which can undershoot badly (0.303 of 384 x 384 at
    kept=0.5, the next step being 0.535), so with ``fill_tucker`` the bisected Tucker rank is grown
    one mode at a time while it fits and passed as an explicit tuple; ``fill_tucker=False`` keeps
    tltorch's own float setting.
    """
    kind = _check_kind(kind)
    if not 0.0 < kept <= 1.0:
        raise ValueError(f"kept must be in (0, 1], got {kept}")
    out_t, in_t = tensorized_shapes(out_features, in_features)
    dense = out_features * in_features
    budget = kept * dense

    def fits(f: float) -> bool:
        return _weight_params(kind, out_t, in_t, f)[0] <= budget

    lo, hi = 1e-9, 1.0
    if fits(hi):
        lo = hi
    else:
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            if fits(mid):
                lo = mid
            else:
                hi = mid
    params, rank = _weight_params(kind, out_t, in_t, lo)
    if params > budget or min((rank,) if isinstance(rank, int) else rank) < 1:
        raise ValueError(f"no {kind} rank of tltorch fits {kept:.3g} of a {out_features}x{in_features} weight")
    setting: float | tuple[int, ...] = lo
    if kind == "blocktt" and isinstance(rank, tuple):
        setting = rank  # explicit: from the float, tltorch would ask TT-SVD for the uncapped rank
    elif kind == "tucker" and fill_tucker and isinstance(rank, tuple):
        setting = _fill_tucker(out_t, in_t, rank, budget)
        params, rank = _weight_params(kind, out_t, in_t, setting)
    return RankChoice(kind, setting, rank, params, dense, out_t, in_t, lo)


def weight_params(layer: nn.Module) -> int:
    """Parameters of a FactorizedLinear's weight (all factors, Tucker core, CP weights), or of a Linear's weight."""
    if isinstance(layer, nn.Linear):
        return layer.weight.numel()
    weight = layer.weight
    if not isinstance(weight, nn.Module):
        raise TypeError(f"expected a tltorch FactorizedLinear, got {type(layer).__name__}")
    return sum(int(p.numel()) for p in weight.parameters())


@contextlib.contextmanager
def _tenalg_backend(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    import tensorly as tl

    with tl.tenalg.backend_context(name):
        yield


def _decomposition_kwargs(kind: str, cp_iters: int | None) -> dict[str, Any]:
    if kind == "cp":
        kwargs: dict[str, Any] = {"random_state": 0}
        if cp_iters is not None:
            kwargs["n_iter_max"] = int(cp_iters)
        return kwargs
    if kind == "tucker":
        return {"random_state": 0}
    return {}  # tensor_train_matrix takes no random_state


def _from_linear(
    linear: nn.Linear, choice: RankChoice, implementation: str, cp_iters: int | None, cp_einsum: bool
) -> nn.Module:
    import tltorch

    with warnings.catch_warnings(), torch.no_grad():
        # tensorly warns for every CP mode that R exceeds the mode size when it truncates the SVD init.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        with _tenalg_backend("einsum" if choice.kind == "cp" and cp_einsum else None):
            layer = tltorch.FactorizedLinear.from_linear(
                linear,
                rank=choice.setting,
                factorization=choice.kind,
                implementation=implementation,
                bias=linear.bias is not None,  # bias=True with no source bias would leave torch.empty garbage
                decomposition_kwargs=_decomposition_kwargs(choice.kind, cp_iters),
                verbose=False,
            )
    layer.initialized_from_weight = True
    return layer


def factorize_model(
    model: nn.Module,
    include_regex: str,
    kind: str,
    kept: float,
    *,
    cp_iters: int | None = 1,
    cp_einsum: bool = True,
    implementation: str = "factorized",
    fill_tucker: bool = True,
) -> tuple[nn.Module, int, int]:
    """Deep copy of ``model`` with every matching ``nn.Linear`` replaced by a tltorch FactorizedLinear.

    A Linear is replaced when ``re.search(include_regex, module_path)`` matches. Each gets the
    largest tltorch rank with at most ``kept`` of its weight parameters (``choose_rank``) and is
    initialized by decomposing its weight. ``cp_iters`` caps parafac's ALS sweeps (None: tensorly's
    100, hours on MiniLM); ``cp_einsum`` runs parafac on tensorly's einsum tenalg backend (~3x faster).

    Returns (model copy, weight parameters of the replaced Linears, weight parameters of their
    replacements). Biases are kept as they are and counted in neither.
    """
    kind = _check_kind(kind)
    pattern = re.compile(include_regex)
    new = copy.deepcopy(model)
    targets = [(name, m) for name, m in new.named_modules() if isinstance(m, nn.Linear) and pattern.search(name)]
    if not targets:
        log.warning("no nn.Linear matches %r", include_regex)
    before = after = 0
    choices: dict[tuple[int, int], RankChoice] = {}
    start = time.perf_counter()
    for name, linear in targets:
        shape = (linear.out_features, linear.in_features)
        if shape not in choices:
            choices[shape] = choose_rank(*shape, kind, kept, fill_tucker=fill_tucker)
        choice = choices[shape]
        t0 = time.perf_counter()
        layer = _from_linear(linear, choice, implementation, cp_iters, cp_einsum)
        parent_name, _, child = name.rpartition(".")
        setattr(new.get_submodule(parent_name) if parent_name else new, child, layer)
        n_after = weight_params(layer)
        if n_after != choice.params:
            log.warning("%s: expected %d factorized parameters, tltorch built %d", name, choice.params, n_after)
        before += linear.weight.numel()
        after += n_after
        log.info(
            "%s %dx%d -> %s rank=%s %d/%d = %.3f in %.1fs",
            name, *shape, kind, choice.rank, n_after, linear.weight.numel(),
            n_after / linear.weight.numel(), time.perf_counter() - t0,
        )
    log.info(
        "%s kept=%.2f: %d linears, %d -> %d weight params (%.3f) in %.1fs",
        kind, kept, len(targets), before, after, after / max(before, 1), time.perf_counter() - start,
    )
    return new, before, after


def factorized_linear(
    weight: torch.Tensor,
    kind: str,
    kept: float,
    *,
    init: str = "auto",
    implementation: str = "factorized",
    cp_iters: int | None = 1,
    cp_einsum: bool = True,
    fill_tucker: bool = True,
) -> nn.Module:
    """One bias-free tltorch FactorizedLinear for ``weight`` (out x in), same rank rule as ``factorize_model``.

    ``init``: "decompose" (from the weight, as in ``factorize_model``), "random" (tltorch's own
    random init at the same rank; the values do not matter for timing), or "auto": decompose,
    except CP when ``numel * R > CP_DECOMPOSE_LIMIT`` (every LLM-sized shape), which is random.
    The returned module's ``initialized_from_weight`` says which was done.
    """
    kind = _check_kind(kind)
    if init not in ("auto", "decompose", "random"):
        raise ValueError(f"init must be auto, decompose or random, got {init!r}")
    out_f, in_f = weight.shape
    choice = choose_rank(out_f, in_f, kind, kept, fill_tucker=fill_tucker)
    too_slow = isinstance(choice.rank, int) and weight.numel() * choice.rank > CP_DECOMPOSE_LIMIT  # CP only
    decompose = init == "decompose" or (init == "auto" and not too_slow)
    if decompose:
        linear = nn.Linear(in_f, out_f, bias=False, device="meta")
        linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return _from_linear(linear, choice, implementation, cp_iters, cp_einsum)

    import tltorch

    log.info("%s %dx%d rank=%s: random init, not decomposed from the weight", kind, out_f, in_f, choice.rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = tltorch.FactorizedLinear(
            choice.in_tensorized, choice.out_tensorized, bias=False, factorization=kind, rank=choice.setting,
            implementation=implementation, device=weight.device, dtype=weight.dtype,
        )
    layer.initialized_from_weight = False
    return layer


def _main() -> int:
    import argparse

    from torch.utils import benchmark

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["384x384", "1536x384", "384x1536", "5120x5120", "25600x5120", "5120x25600"],
                   help="OUT x IN")
    p.add_argument("--kept", nargs="+", type=float, default=[0.5, 0.25])
    p.add_argument("--time-shape", default="5120x5120", help="OUT x IN timed against dense (empty: skip)")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--implementations", nargs="+", choices=["factorized", "reconstructed"], default=["factorized"],
                   help="tltorch forward implementations to time (the first is used to build)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not available():
        print("tltorch is not importable: pip install tensorly tensorly-torch")
        return 1
    torch.set_num_threads(args.threads)
    print(f"{'out x in':>12} {'out_t':>14} {'in_t':>14} {'kind':>8} {'kept':>5} {'float':>8} {'ratio':>6}  rank"
          "   (Tucker: float-only ratio/rank, then filled)")
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        for kind in KINDS:
            for kept in args.kept:
                c = choose_rank(out_f, in_f, kind, kept)
                head = f"{shape:>12} {str(c.out_tensorized):>14} {str(c.in_tensorized):>14} {kind:>8} {kept:5.2f}"
                if kind == "tucker":
                    u = choose_rank(out_f, in_f, kind, kept, fill_tucker=False)
                    print(f"{head} {u.fraction:8.5f} {u.ratio:6.3f}  {u.rank} -> {c.ratio:.3f} {c.rank}")
                else:
                    print(f"{head} {c.fraction:8.5f} {c.ratio:6.3f}  {c.rank}")
    if args.time_shape:
        out_f, in_f = (int(v) for v in args.time_shape.lower().split("x"))
        w = torch.randn(out_f, in_f) / math.sqrt(in_f)
        x = torch.randn(args.rows, in_f)
        dense = benchmark.Timer("F.linear(x, w)", globals={"x": x, "w": w, "F": torch.nn.functional}).blocked_autorange(
            min_run_time=0.5).median
        print(f"{args.time_shape} m={args.rows} dense {dense * 1e3:.2f} ms")
        for kind in args.kinds:
            for kept in args.kept:
                t0 = time.perf_counter()
                layer = factorized_linear(w, kind, kept, implementation=args.implementations[0])
                build = time.perf_counter() - t0
                print(f"{kind:>8} kept={kept:.2f} build {build:6.1f}s (from weight: {layer.initialized_from_weight})")
                for impl in args.implementations:
                    layer.implementation = impl
                    try:
                        with torch.no_grad():
                            t = benchmark.Timer("layer(x)", globals={"x": x, "layer": layer}).blocked_autorange(
                                min_run_time=0.5).median
                    except (RuntimeError, MemoryError) as e:  # CP at LLM shapes: opt_einsum path / Khatri-Rao OOM
                        print(f"{'':>8} {impl:>13} forward failed: {str(e).splitlines()[0][:160]}")
                        continue
                    print(f"{'':>8} {impl:>13} forward {t * 1e3:9.2f} ms = {t / dense:7.2f}x dense")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
