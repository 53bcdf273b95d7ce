"""Calibration beyond text: tensor files, image folders and audio folders, through the command line's workflow."""
import json
import wave

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import tngraph
from tngraph import workflow
from tngraph.samples import TensorSamples, read_calibration


def _vit_classifier(folder, labels=("cat", "dog")):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                                    patch_size=4, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                    label2id={name: i for i, name in enumerate(labels)})
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def _images(folder, classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


def test_tensor_files_read_as_named_samples_and_bad_ones_are_refused(tmp_path):
    x, labels = torch.randn(10, 3, 8, 8), torch.arange(10) % 2
    save_file({"pixel_values": x, "labels": labels}, tmp_path / "a.safetensors")
    np.savez(tmp_path / "b.npz", pixel_values=x.numpy())
    a, b = read_calibration(tmp_path / "a.safetensors"), read_calibration(tmp_path / "b.npz")
    assert isinstance(a, TensorSamples) and torch.equal(a.inputs["pixel_values"], x) and torch.equal(a.labels, labels)
    assert torch.equal(b.inputs["pixel_values"], x) and b.labels is None
    rest, held = a.split(3, seed=0)
    assert len(rest) == 7 and len(held) == 3
    assert sorted(torch.cat([rest.inputs["pixel_values"], held.inputs["pixel_values"]]).sum((1, 2, 3)).tolist()) == \
        sorted(x.sum((1, 2, 3)).tolist())  # a partition of the samples
    assert [len(batch["pixel_values"]) for batch in a.batches(4)] == [4, 4, 2]
    with pytest.raises(tngraph.DataError, match="disagree on the number of samples"):
        TensorSamples({"input_ids": torch.zeros(4, 5), "attention_mask": torch.zeros(3, 5)})
    with pytest.raises(tngraph.DataError, match="NaN"):
        TensorSamples({"pixel_values": torch.full((2, 3), float("nan"))})
    with pytest.raises(tngraph.DataError, match="forward takes no input named 'pixels'") as info:
        TensorSamples({"pixels": x}).check_names({"pixel_values", "labels"})
    assert "pixel_values" in info.value.fix
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(tngraph.DataError, match="cannot read calibration file"):
        read_calibration(tmp_path / "bad.safetensors")
    with pytest.raises(tngraph.DataError, match="does not exist"):
        read_calibration(tmp_path / "missing.npz")


def test_an_image_classifier_compresses_from_a_folder_of_images_on_the_command_line(tmp_path, capsys):
    """A ViT classifier folder with its image processor, calibrated, healed and scored on labelled
    images in class sub-folders: the head is kept, the report scores held-out images, the artifact loads."""
    model_dir = _vit_classifier(tmp_path / "vit")
    images = _images(tmp_path / "images", ("cat", "dog"), 40)
    from tngraph.cli import main

    assert main(["compress", "--model", str(model_dir), "--calibration", str(images), "--out", str(tmp_path / "out"),
                 "--budget", "0.5", "--heal-steps", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held-out samples of image folder 'images'" in printed and "accuracy" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    outputs = report["outputs"]
    assert outputs["compressed"]["samples"] == 16 and report["calibration"]["samples"] == 64  # a fifth held out
    assert set(outputs) == {"dense", "compressed", "unhealed", "plain_svd"} and report["heal"]["metric"] == "KL"
    assert 0 < outputs["compressed"]["relative_error"] < outputs["plain_svd"]["relative_error"]
    assert 0 <= outputs["dense"]["accuracy"] <= 1 and outputs["dense"]["top1_agreement"] == 1.0
    loaded = tngraph.load(tmp_path / "out")
    dense = transformers.ViTForImageClassification.from_pretrained(model_dir).eval()
    pixels = read_calibration(images, model_dir).inputs["pixel_values"][:4]
    with torch.no_grad():
        ref, out = dense(pixel_values=pixels).logits, loaded(pixel_values=pixels).logits
    assert out.shape == ref.shape == (4, 2)  # the classification head survived
    assert float((out - ref).norm() / ref.norm()) < 0.5


def test_image_folders_need_the_model_folders_processor(tmp_path):
    images = _images(tmp_path / "images", ("a",), 3)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(tngraph.DataError, match="no preprocessor_config.json") as info:
        read_calibration(images, bare)
    assert ".safetensors" in info.value.fix
    (images / "a" / "note.wav").write_bytes(b"RIFF")
    with pytest.raises(tngraph.DataError, match="both images and .wav files"):
        read_calibration(images, bare)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tngraph.DataError, match="no images"):
        read_calibration(empty, bare)


def _wav(path, rate, seconds, seed):
    samples = (np.random.default_rng(seed).standard_normal(int(rate * seconds)) * 3000).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def test_an_audio_model_calibrates_on_a_folder_of_wav_files(tmp_path):
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8,
                                         num_conv_pos_embedding_groups=2)
    folder = tmp_path / "w2v"
    transformers.Wav2Vec2Model(config).eval().save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(folder)
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(10):
        _wav(audio / f"{i}.wav", 16000, 0.05, i)
    samples = read_calibration(audio, folder)
    assert list(samples.inputs) == ["input_values"] and samples.inputs["input_values"].shape == (10, 800)
    run = workflow.compress(str(folder), tmp_path / "out", calibration=str(audio), budget=0.5, heal_steps=0, progress=False)
    assert run.report["outputs"]["compressed"]["relative_error"] < 1 and "accuracy" not in run.report["outputs"]["compressed"]
    _wav(audio / "fast.wav", 8000, 0.05, 99)
    with pytest.raises(tngraph.DataError, match="8000 Hz.*16000 Hz"):
        read_calibration(audio, folder)
