#!/usr/bin/env python
"""The vision side's quality figure: the tiny digits classifier (tngraph.tinyvision) compressed and
healed, scored by top-1 accuracy on its held-out test images.

  python tools/vision_quality.py [--model DIR | cached] [--budgets 0.5,0.3] [--heal-steps 300]
                                 [--threads 2] [--train-out DIR] [--force]

Without --model the classifier is trained into the cache first (about 20 s on 2 cores: a ResNet of
two stages on scikit-learn's 8x8 digits, resized to 32x32). Each budget runs `tngraph compress
--model DIR --calibration DIR/images/train` (calibration and healing on the training images, the
head kept dense), then scores the dense, compressed-before-healing and healed models on
DIR/images/test, which neither training nor compression saw. Budgets are fractions of the
convolution + linear parameters compressed. Prints one table; writes nothing but the artifacts in
a temporary folder (or --train-out).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cached", help="a tiny vision model folder (tools: tngraph.tinyvision), or 'cached'")
    p.add_argument("--budgets", default="0.5", help="comma-separated budgets (default 0.5)")
    p.add_argument("--heal-steps", type=int, default=300, help="healing steps per budget (default 300)")
    p.add_argument("--formats", default="svd", help="comma-separated formats, each run at every budget (default svd; a "
                   "convolution also takes tucker and cp)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-out", default=None, help="keep the compressed artifacts under this folder (default: a temporary one)")
    p.add_argument("--force", action="store_true", help="replace artifacts tngraph wrote under --train-out")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tngraph.models").setLevel(logging.ERROR)  # "no tokenizer": expected here
    import torch

    from tngraph import tinyvision, workflow
    from tngraph.errors import TngraphError
    from tngraph.samples import read_calibration
    from tngraph.workflow.measure import unhealed

    torch.set_num_threads(args.threads)
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        model_dir = tinyvision.cached() if args.model == "cached" else args.model
        test = read_calibration(os.path.join(model_dir, "images", "test"), model_dir)
        if test.labels is None:
            raise TngraphError(f"{model_dir}/images/test carries no labels", "train the model with tools: tngraph.tinyvision")
        x, y = test.inputs["pixel_values"], test.labels
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            root = args.train_out or tmp
            for fmt, budget in [(f, b) for f in formats for b in budgets]:
                run = workflow.compress(str(model_dir), os.path.join(root, f"{fmt}-budget-{budget:g}"),
                                        calibration=os.path.join(model_dir, "images", "train"), format=fmt,
                                        budget=budget, heal_steps=args.heal_steps, progress=False, force=args.force, baseline=False)
                result = run.result
                with unhealed(result) as before:
                    acc_before = tinyvision.accuracy(before, x, y)
                acc_after = tinyvision.accuracy(result.module, x, y)
                params = run.report["params"]
                rows.append((fmt, budget, params["targets_kept"], params["model_after"] / params["model_before"], acc_before, acc_after))
            from tngraph.models import ModelSource, load_model

            dense, _ = load_model(ModelSource("hf", str(model_dir)))
            acc_dense = tinyvision.accuracy(dense, x, y)
    except TngraphError as exc:
        print(f"vision_quality: error: {exc}", file=sys.stderr)
        return 2
    print(f"tiny digits classifier {model_dir}: top-1 accuracy on {len(y)} held-out test images "
          f"(dense {acc_dense:.4f}; healing {args.heal_steps} steps, {torch.get_num_threads()} threads)")
    print(f"{'format':>8}{'budget':>8}{'targets kept':>14}{'model kept':>12}{'unhealed':>10}{'healed':>10}{'healed - dense':>16}")
    for fmt, budget, kept, model_kept, before, after in rows:
        print(f"{fmt:>8}{budget:>8g}{kept:>14.3f}{model_kept:>12.3f}{before:>10.4f}{after:>10.4f}{(after - acc_dense) * 100:>+15.2f}pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
