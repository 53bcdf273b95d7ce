"""A small image classifier trained here: the vision side's measure of quality.

Random weights are near full rank, so compressing them says nothing about trained vision models;
no pretrained one can be downloaded. This trains a small Hugging Face ResNet (convolutions and a
linear head) on scikit-learn's handwritten digits (1,797 8x8 images shipped inside the package),
saved as a model folder with its image processor, and writes the images as PNG files in class
sub-folders: `train/` (calibration and healing) and `test/` (held out, never seen in training),
so `tngraph compress --model DIR --calibration DIR/images/train` runs on it as on any user's
image classifier.

Everything is a function of the spec and the seed (one thread's arithmetic on one machine).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

TRAIN_VERSION = 1  # bump when the recipe changes what a spec trains (cache key)
META = "tngraph_tinyvision.json"
SIZE = 32  # the processor resizes the 8x8 digits to this


@dataclass(frozen=True)
class TinyVisionSpec:
    embedding: int = 32
    hidden: tuple[int, ...] = (32, 64)
    depths: tuple[int, ...] = (1, 1)
    epochs: int = 30
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    test_fraction: float = 0.25
    seed: int = 0


def digits() -> tuple[Any, Any]:
    """(images uint8 [N, 8, 8] in 0..255, labels [N]) of scikit-learn's digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("the tiny vision model trains on scikit-learn's digits, and scikit-learn is not installed",
                          "pip install scikit-learn (it is in tngraph's test extra)") from None
    data = load_digits()
    return (data.images * (255 / 16)).round().clip(0, 255).astype("uint8"), data.target


def split(n: int, spec: TinyVisionSpec) -> tuple[list[int], list[int]]:
    """(train, test) sample numbers: a seeded permutation, the last test_fraction held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed)).tolist()
    cut = n - int(round(n * spec.test_fraction))
    return sorted(order[:cut]), sorted(order[cut:])


def build(spec: TinyVisionSpec) -> tuple[torch.nn.Module, Any]:
    """(the untrained ResNet classifier, its image processor) of `spec`."""
    import transformers

    names = [str(i) for i in range(10)]
    config = transformers.ResNetConfig(num_channels=3, embedding_size=spec.embedding, hidden_sizes=list(spec.hidden), depths=list(spec.depths),
                                       layer_type="basic", downsample_in_first_stage=False, num_labels=10,
                                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(spec.seed)
    model = transformers.ResNetForImageClassification(config)
    processor = transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, processor


def write_images(folder: pathlib.Path, images: Any, labels: Any, index: list[int]) -> None:
    from PIL import Image

    for i in index:
        (folder / str(int(labels[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).convert("RGB").save(folder / str(int(labels[i])) / f"{i:04d}.png")


def accuracy(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    with torch.no_grad():
        predicted = torch.cat([model(pixel_values=pixels[i : i + batch]).logits.argmax(-1) for i in range(0, len(pixels), batch)])
    return float((predicted == labels).float().mean())


def train(spec: TinyVisionSpec, out: str | os.PathLike, *, force: bool = False, show: bool = True) -> dict[str, Any]:
    """Train the classifier of `spec`; save the model folder (config, weights, image processor,
    tngraph_tinyvision.json, images/train and images/test) atomically at `out`."""
    from transformers.utils import logging as hf_logging

    from .ownership import atomic_dir, check_output_dir
    from .progress import progress
    from .samples import read_images

    check_output_dir(out, force)
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    images, labels = digits()
    train_idx, test_idx = split(len(labels), spec)
    model, processor = build(spec)
    with atomic_dir(out, force, kind="tiny-vision") as tmp:
        processor.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        write_images(tmp / "images" / "train", images, labels, train_idx)
        write_images(tmp / "images" / "test", images, labels, test_idx)
        data = {part: read_images(tmp / "images" / part, sorted((tmp / "images" / part).rglob("*.png")), tmp) for part in ("train", "test")}
        x, y = data["train"].inputs["pixel_values"], data["train"].labels
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        steps = spec.epochs * ((len(y) + spec.batch - 1) // spec.batch)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps)
        gen = torch.Generator().manual_seed(spec.seed)
        model.train()
        bar = progress(range(spec.epochs), desc="train tiny vision model", enabled=show, unit="epoch")
        for _ in bar:
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), spec.batch):
                b = order[i : i + spec.batch]
                loss = torch.nn.functional.cross_entropy(model(pixel_values=x[b]).logits, y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
        model.eval()
        meta = {"spec": dataclasses.asdict(spec), "train_version": TRAIN_VERSION, "train_samples": len(train_idx), "test_samples": len(test_idx),
                "train_accuracy": accuracy(model, x, y),
                "test_accuracy": accuracy(model, data["test"].inputs["pixel_values"], data["test"].labels),
                "train_seconds": time.perf_counter() - started, "threads": torch.get_num_threads(), "torch": torch.__version__}
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("trained the tiny vision model: test accuracy %.4f (%d images), %.0f s", meta["test_accuracy"], len(test_idx), meta["train_seconds"])
    return meta


def cached(spec: TinyVisionSpec | None = None, *, show: bool = False) -> pathlib.Path:
    """The folder of `spec`'s trained model in the cache (tngraph.tinylm.cache_root), trained on first use."""
    from .tinylm import cache_root

    spec = spec or TinyVisionSpec()
    key = hashlib.sha256(json.dumps([dataclasses.asdict(spec), TRAIN_VERSION, torch.__version__, torch.get_num_threads()]).encode()).hexdigest()[:12]
    path = cache_root() / f"tiny-vision-{key}"
    if not (path / META).is_file():
        log.info("training the tiny vision model into %s", path)
        train(spec, path, force=path.exists(), show=show)
    return path
