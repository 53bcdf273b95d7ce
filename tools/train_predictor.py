#!/usr/bin/env python
"""Train the learned sensitivity predictor (tngraph/predictor.py) on measured labels.

1. Collect: run the analysis passes (targets, calibrate, fisher, measured sensitivity) on the
   bundled MiniLM at several budgets and on synthetic variants of it (each linear's whitened
   spectrum warped by a random power, a different network with the same structure), and record
   per target the predictor's features and labels: log(measured share / fisher prediction) at the
   grid of kept fractions, and the patch map of the truncation error at the budget's rank.
2. Report accuracy on held-out layers: three folds, each training the small CNN (AdamW, fixed
   seed) on every run's targets outside two encoder layers and predicting the real MiniLM's
   targets in them at budget 0.5: Spearman correlation of the predicted and of the fisher loss
   with the measured loss at the uniform rank, the error of the predicted ratios, and the time of
   predicting against measuring.
3. Train the shipped predictor on every target and write its weights (safetensors, atomically).

  python tools/train_predictor.py [--calibration-samples 512] [--cache DIR] [--out tngraph/weights/predictor.safetensors]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import tngraph  # noqa: E402
from tngraph import meta, predictor  # noqa: E402
from tngraph.batches import calibration_batches  # noqa: E402
from tngraph.capture import capture  # noqa: E402
from tngraph.data import sentence_sets  # noqa: E402
from tngraph.evaluate import sentence_objective  # noqa: E402
from tngraph.models import MINILM_INCLUDE, ModelSource, load_model  # noqa: E402
from tngraph.passes import PassContext, calibrate, fisher, sensitivity, targets  # noqa: E402
from tngraph.passes.sensitivity import _grid_ranks, whitened_weight  # noqa: E402
from tngraph.pipeline import run_passes  # noqa: E402
from tngraph.tn.formats import FORMATS, rank_for_params  # noqa: E402

# (name, budget, spectrum warp seed or None for the real weights)
RUNS = [("minilm", 0.5, None), ("minilm", 0.3, None), ("minilm", 0.7, None), ("warp1", 0.5, 1), ("warp2", 0.5, 2), ("warp3", 0.4, 3)]


def warped(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of `model` whose linears' singular values are raised to a random power in [0.6, 1.4]
    (Frobenius norm kept): other spectra, other sensitivities, the same structure."""
    import copy

    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("encoder."):
                w = module.weight.double()
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                power = 0.6 + 0.8 * torch.rand((), generator=gen, dtype=torch.float64)
                t = s**power
                t = t * s.norm() / t.norm()
                module.weight.copy_(((u * t) @ vh).to(module.weight.dtype))
    return model


def collect(model, tokenizer, texts, budget: float, samples: int) -> tuple[list[dict], float]:
    config = tngraph.Config(budget=budget, include=MINILM_INCLUDE, allocation="budgeted", sensitivity="measured", heal_steps=0,
                            sensitivity_rounds=1, calibration_samples=samples, progress=False,
                            short_side=False, mlp="lowrank")  # the features read every target's whitened weight
    batches = calibration_batches(texts, config, tokenizer)
    gm = capture(model, batches[0])
    ctx = PassContext(config=config, calibration=batches, objective=sentence_objective)
    gm = run_passes(gm, ctx, [targets, calibrate, fisher])
    start = time.perf_counter()
    gm = run_passes(gm, ctx, [sensitivity])
    measuring = time.perf_counter() - start
    nodes = [n for n in meta.targets(gm) if meta.info(n).target.kind == "linear"]
    fmt = FORMATS["svd"]
    rows = []
    for node in nodes:
        t = meta.info(node).target
        w, _, _ = whitened_weight(gm, ctx, t)
        energy = ctx.analysis["fisher_energy"][t.name]
        points = dict(ctx.analysis["measured_points"][t.name])
        ranks = _grid_ranks(t)
        image, scalars = predictor.features(w, energy)
        uniform = rank_for_params(fmt, t.out_features, t.in_features, budget * t.dense_params - (t.out_features if t.bias else 0))
        s2 = torch.linalg.svdvals(w) ** 2
        tail = float(1 - s2[:uniform].sum() / s2.sum())
        curve = ctx.curves[t.name]
        rows.append({
            "name": t.name, "image": image, "scalars": scalars,
            "labels": torch.tensor([math.log(max(points[r], 1e-12)) - math.log(energy) for r in ranks], dtype=torch.float32),
            "patch": predictor.patch_error_shares(w, uniform),
            "ranks": ranks, "uniform": uniform, "tail": tail, "energy": energy,
            "measured": curve.at_rank(uniform) if uniform in curve.ranks else tail * points[ranks[-1]],
        })
    return rows, measuring


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return torch.tensor(r)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def predicted_loss(row: dict, ratios: list[float]) -> float:
    """The predicted curve at the uniform rank: tail x energy x interpolated ratio."""
    from tngraph.passes.sensitivity import _interpolator

    interp = _interpolator([(r, math.exp(v)) for r, v in zip(row["ranks"], ratios)])
    return row["tail"] * row["energy"] * interp(row["uniform"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration-samples", type=int, default=512)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/tngraph/predictor"), help="folder of collected labels")
    p.add_argument("--out", default=str(predictor.WEIGHTS))
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(ModelSource("minilm"))
    texts = sentence_sets(args.calibration_samples, 1).calibration
    data, measure_seconds = {}, {}
    for name, budget, seed in RUNS:
        file = cache / f"{name}-{budget}-{args.calibration_samples}.pt"
        if file.is_file():
            data[(name, budget)], measure_seconds[(name, budget)] = torch.load(file, weights_only=False)
            continue
        start = time.perf_counter()
        rows, seconds = collect(model if seed is None else warped(model, seed), tokenizer, texts, budget, args.calibration_samples)
        torch.save((rows, seconds), file)
        data[(name, budget)], measure_seconds[(name, budget)] = rows, seconds
        print(f"collected {name} at budget {budget}: {len(rows)} targets in {time.perf_counter() - start:.0f} s", flush=True)

    def batch(rows):
        # [:SCALARS]: caches written before the depth feature was dropped held one scalar more, last
        return (torch.stack([r["image"] for r in rows]), torch.stack([r["scalars"][: predictor.SCALARS] for r in rows]),
                torch.stack([r["labels"] for r in rows]), torch.stack([r["patch"] for r in rows]))

    def fit(rows, epochs):
        torch.manual_seed(0)
        net = predictor.SensitivityPredictor()
        images, scalars, labels, patches = batch(rows)
        net.scalar_mean.copy_(scalars.mean(0))
        net.scalar_std.copy_(scalars.std(0).clamp_min(1e-3))
        valid = labels > -20  # a share measured as zero (within the noise) says nothing of the ratio
        masked = labels.masked_fill(~valid, float("nan"))
        net.label_min.copy_(masked.nan_to_num(nan=float("inf")).min(0).values)
        net.label_max.copy_(masked.nan_to_num(nan=float("-inf")).max(0).values)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for _ in range(epochs):
            layer, patch = net(images, scalars)
            loss = ((layer - labels)[valid] ** 2).mean() + 0.1 * ((patch - patches) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return net.eval()

    def infer(net, rows):
        images, scalars, _, _ = batch(rows)
        with torch.no_grad():
            return net(images, scalars)[0]

    real = data[("minilm", 0.5)]
    # accuracy on held-out layers: 3 folds of two encoder layers; each fold trains on every run's
    # targets outside its layers (the warped variants' too: they share the real layers' singular
    # vectors) and predicts the real MiniLM's targets in them
    predicted, measured, fisher_only, sq = [], [], [], []
    for fold in range(0, 6, 2):
        held = tuple(f"encoder.layer.{k}." for k in (fold, fold + 1))
        net = fit([r for rows in data.values() for r in rows if not r["name"].startswith(held)], args.epochs)
        test = [r for r in real if r["name"].startswith(held)]
        ratios = infer(net, test)
        predicted += [predicted_loss(r, ratios[i].tolist()) for i, r in enumerate(test)]
        measured += [r["measured"] for r in test]
        fisher_only += [r["tail"] * r["energy"] for r in test]
        labels = torch.stack([r["labels"] for r in test])
        ok = labels > -20
        sq += [(float(a), float(b)) for a, b in zip((ratios - labels)[ok] ** 2, labels[ok] ** 2)]
    start = time.perf_counter()
    net = fit([r for rows in data.values() for r in rows], args.epochs)
    train_seconds = time.perf_counter() - start
    # the predictor's cost per target: the features (SVDs of the whitened weight and of its patches)
    # and the network, against the measurement's forward passes
    shapes = {"intermediate.dense": (1536, 384), "attention": (384, 384), "output.dense": (384, 1536)}
    start = time.perf_counter()
    for r in real:
        shape = next(v for k, v in shapes.items() if k in r["name"])
        image, scalars = predictor.features(torch.randn(*shape, dtype=torch.float64), r["energy"])
        with torch.no_grad():
            net(image[None], scalars[None])
    per_target = (time.perf_counter() - start) / len(real)
    measure_per_target = measure_seconds[("minilm", 0.5)] / len(real)
    print(f"held-out layers (3 folds of 2 encoder layers; {len(measured)} targets of the real MiniLM at budget 0.5):")
    print(f"  Spearman with the measured loss at the uniform rank: predicted {spearman(predicted, measured):.3f}, "
          f"fisher alone {spearman(fisher_only, measured):.3f}")
    print(f"  RMSE of log(measured / fisher) at the grid ranks: predicted {math.sqrt(sum(a for a, _ in sq) / len(sq)):.3f}, "
          f"fisher alone (ratio 1) {math.sqrt(sum(b for _, b in sq) / len(sq)):.3f}")
    print(f"  time per target: predicting {per_target * 1000:.1f} ms (features + network), measuring {measure_per_target * 1000:.0f} ms "
          f"({per_target / measure_per_target:.1%})")
    print(f"final predictor: trained on all {sum(len(v) for v in data.values())} targets of {len(RUNS)} runs in {train_seconds:.1f} s")
    from safetensors.torch import save_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata={"trained_on": f"{sum(len(v) for v in data.values())} targets", "format": "tngraph-predictor-1"})
    os.replace(tmp, out)
    print(f"wrote {out} ({out.stat().st_size} bytes, {sum(p.numel() for p in net.parameters())} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
