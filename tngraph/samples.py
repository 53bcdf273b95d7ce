"""Calibration data that is not text: named input tensors, image folders, audio folders.

`--calibration PATH` reads, by what PATH is:

- a ``.safetensors`` or ``.npz`` file: named input tensors, samples along the first axis
  (``pixel_values`` [N, 3, H, W], ``input_features`` [N, 80, 3000], ``input_ids`` [N, T], ...); a
  ``labels`` tensor [N] is kept apart and scores accuracy;
- a folder of images (.png .jpg .jpeg .bmp .gif .webp), run through the model folder's image
  processor (``preprocessor_config.json``, transformers' AutoImageProcessor); images in
  sub-folders named after the model's labels (``config.label2id``) carry those labels;
- a folder of .wav files (PCM, stdlib ``wave``), run through the model folder's feature extractor
  at its sampling rate;
- anything else: a UTF-8 text file, one sample per line (tngraph.data.read_lines).

Every reader refuses with one line what it cannot take: unknown input names, mismatched sample
counts, NaN, empty folders, a folder without a processor, a wrong sampling rate.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Sequence

import torch

from .errors import DataError

log = logging.getLogger(__name__)

TENSOR_FILES = (".safetensors", ".npz")
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
AUDIO_FILES = (".wav",)
LABELS = "labels"


@dataclasses.dataclass
class TensorSamples:
    """Named input tensors with one sample per row of their first axis, and optional labels [N]."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    origin: str = "tensors"

    def __post_init__(self):
        if not self.inputs:
            raise DataError(f"{self.origin} holds no input tensors", "store the model's inputs by name (pixel_values, input_ids, ...)")
        counts = {name: t.shape[0] if t.dim() else 0 for name, t in self.inputs.items()}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise DataError(f"{self.origin}: the tensors disagree on the number of samples (first axis): {counts}",
                            "store every input with one row per sample")
        for name, t in self.inputs.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DataError(f"{self.origin}: input {name!r} holds NaN or Inf values", "pass finite calibration inputs")
        if self.labels is not None and (self.labels.dim() != 1 or len(self.labels) != len(self)):
            raise DataError(f"{self.origin}: labels has shape {tuple(self.labels.shape)}, not [{len(self)}]", "store one integer label per sample")

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def rows(self, index: Sequence[int] | torch.Tensor | slice) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long) if not isinstance(index, slice) else index
        return {name: t[index] for name, t in self.inputs.items()}

    def batches(self, batch_size: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
        n = len(self) if limit is None else min(limit, len(self))
        return [self.rows(slice(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]

    def split(self, held: int, seed: int = 0) -> tuple["TensorSamples", "TensorSamples"]:
        """(the rest, `held` samples drawn with `seed`): calibration and evaluation never share a
        sample, and a folder sorted by class holds out every class."""
        keep = len(self) - held
        if keep < 1 or held < 1:
            raise DataError(f"{self.origin} has {len(self)} samples; holding {held} out for evaluation leaves none to calibrate on",
                            "pass more samples, or --no-eval")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        part = lambda i: TensorSamples(self.rows(i), None if self.labels is None else self.labels[i], self.origin)  # noqa: E731
        return part(order[:keep].sort().values), part(order[keep:].sort().values)

    def check_names(self, accepted: set[str] | None) -> None:
        unknown = sorted(set(self.inputs) - accepted) if accepted else []
        if unknown:
            raise DataError(f"{self.origin}: the model's forward takes no input named {', '.join(map(repr, unknown))}",
                            f"name the tensors after the forward's inputs: {', '.join(sorted(accepted))}")


def read_calibration(path: str | pathlib.Path, model_folder: str | pathlib.Path | None = None) -> list[str] | TensorSamples:
    """The calibration data at `path`: a TensorSamples (tensor file, image or audio folder) or text lines."""
    from .data import read_lines

    p = pathlib.Path(path)
    if p.suffix.lower() in TENSOR_FILES:
        return read_tensor_file(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        images = [f for f in files if f.suffix.lower() in IMAGE_FILES]
        audio = [f for f in files if f.suffix.lower() in AUDIO_FILES]
        if images and not audio:
            return read_images(p, images, model_folder)
        if audio and not images:
            return read_audio(p, audio, model_folder)
        what = "both images and .wav files" if images else "no images (.png, .jpg, ...) and no .wav files"
        raise DataError(f"calibration folder {str(p)!r} holds {what}",
                        "pass a folder of images, a folder of .wav files, a .safetensors/.npz file of input tensors, or a text file")
    return read_lines(p)


def read_tensor_file(path: pathlib.Path) -> TensorSamples:
    """Named tensors from a .safetensors or .npz file (no pickles: .npz is read with allow_pickle=False)."""
    fix = "write the inputs with safetensors.torch.save_file({'pixel_values': x, ...}, path) or numpy.savez(path, pixel_values=x)"
    if not path.is_file():
        raise DataError(f"calibration file {str(path)!r} does not exist", fix)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                tensors = {name: torch.from_numpy(archive[name].copy()) for name in archive.files}
    except Exception as exc:  # a corrupt or truncated file: safetensors, zipfile and numpy raise their own kinds
        raise DataError(f"cannot read calibration file {str(path)!r}: {str(exc).splitlines()[0][:160]}", fix) from None
    labels = tensors.pop(LABELS, None)
    return TensorSamples(tensors, None if labels is None else labels.long(), f"calibration file {path.name!r}")


def _processor(kind: str, model_folder: str | pathlib.Path | None, folder: pathlib.Path) -> Any:
    import transformers

    auto = transformers.AutoImageProcessor if kind == "image" else transformers.AutoFeatureExtractor
    fix = (f"add the {kind} processor's preprocessor_config.json to the model folder, or pass the inputs as a "
           f".safetensors/.npz file of tensors")
    if model_folder is None or not (pathlib.Path(model_folder) / "preprocessor_config.json").is_file():
        raise DataError(f"calibration folder {str(folder)!r} holds {kind} files, but the model folder has no preprocessor_config.json", fix)
    try:
        return auto.from_pretrained(str(model_folder), local_files_only=True)
    except Exception as exc:
        raise DataError(f"cannot load the {kind} processor of {str(model_folder)!r}: {str(exc).splitlines()[0][:160]}", fix) from None


def _labels(folder: pathlib.Path, files: list[pathlib.Path], model_folder: str | pathlib.Path | None) -> torch.Tensor | None:
    """Labels from sub-folder names that the model's config.label2id knows (all files, or none labelled)."""
    parents = {f.parent for f in files}
    if parents == {folder} or model_folder is None:
        return None
    import json

    config = json.loads((pathlib.Path(model_folder) / "config.json").read_text())
    label2id = {str(k): int(v) for k, v in (config.get("label2id") or {}).items()}
    names = {f.parent.name for f in files}
    if not names <= set(label2id):
        log.info("calibration: sub-folders %s are not all labels of the model; the images carry no labels", sorted(names)[:5])
        return None
    return torch.tensor([label2id[f.parent.name] for f in files])


def read_images(folder: pathlib.Path, files: list[pathlib.Path], model_folder: str | pathlib.Path | None) -> TensorSamples:
    from PIL import Image

    processor = _processor("image", model_folder, folder)
    images = []
    for f in files:
        try:
            with Image.open(f) as image:
                images.append(image.convert("RGB"))
        except Exception as exc:
            raise DataError(f"cannot read image {str(f)!r}: {str(exc).splitlines()[0][:120]}", "remove or replace the file") from None
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    return TensorSamples({"pixel_values": pixels}, _labels(folder, files, model_folder), f"image folder {folder.name!r}")


def read_wav(path: pathlib.Path) -> tuple[Any, int]:
    """(mono float32 samples in [-1, 1], sampling rate) of a PCM .wav file (8, 16 or 32 bit)."""
    import wave

    import numpy as np

    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate, frames = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(f"cannot read {str(path)!r} as PCM .wav: {exc}", "convert it to 16-bit PCM .wav") from None
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise DataError(f"{str(path)!r} has {8 * width}-bit samples", "convert it to 16-bit PCM .wav")
    data = np.frombuffer(frames, dtype=dtype).astype(np.float32)
    data = (data - 128) / 128 if width == 1 else data / float(2 ** (8 * width - 1))
    return data.reshape(-1, channels).mean(axis=1), rate


def read_audio(folder: pathlib.Path, files: list[pathlib.Path], model_folder: str | pathlib.Path | None) -> TensorSamples:
    extractor = _processor("audio", model_folder, folder)
    rate = getattr(extractor, "sampling_rate", None)
    waves = []
    for f in files:
        data, r = read_wav(f)
        if rate is not None and r != rate:
            raise DataError(f"{str(f)!r} is sampled at {r} Hz; the model's feature extractor takes {rate} Hz",
                            f"resample the files to {rate} Hz")
        waves.append(data)
    features = extractor(waves, sampling_rate=rate, return_tensors="pt", padding=True)
    inputs = {k: v for k, v in features.items() if k in ("input_features", "input_values")}
    return TensorSamples(inputs, _labels(folder, files, model_folder), f"audio folder {folder.name!r}")
