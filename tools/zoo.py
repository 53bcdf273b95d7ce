"""The architecture zoo: tiny random-weight Hugging Face models built from their configs, each run
through the five steps a new user takes (tests/test_zoo.py runs the same checks under the `zoo` marker).

1. compress: tngraph.compress (default pipeline, budget 0.5, no healing) on random inputs of the
   model's own modality; at budget 1.0 the output equals the original within fp32 rounding, and at
   0.5 it agrees within the numerical guard (relative output error below 1: better than zeros).
2. load: tngraph.save, then tngraph.load onto a fresh copy: the same outputs, bit for bit.
3. compile: torch.compile(model, backend="tngraph") holds tngraph's layer ops and agrees likewise.
4. onnx: tngraph.export_onnx of the loaded model: onnx.checker and onnxruntime against PyTorch.

    python tools/zoo.py                    # every architecture, a table on stdout
    python tools/zoo.py gpt2 t5            # some
    python tools/zoo.py --readme README.md # rewrite the README's support table from this run

An architecture that is refused says so in one line naming what is unsupported; the table shows it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

VOCAB = 96
STEPS = ("compress", "load", "compile", "onnx")
README_BEGIN = "<!-- zoo table: written by tools/zoo.py --readme; do not edit by hand -->"
README_END = "<!-- end of zoo table -->"


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture: its family (what the table groups by), how to build it and what it reads."""

    name: str
    family: str
    build: Callable[[], torch.nn.Module]
    inputs: str = "ids"  # ids | ids+decoder | pixels:<size> | pixels-clip:<size> | features:<mels>x<frames> | audio:<samples>
    note: str = ""


def _t():
    import transformers

    return transformers


def _lm(config_name: str, model_name: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        t = _t()
        torch.manual_seed(0)
        return getattr(t, model_name)(getattr(t, config_name)(**config)).eval()

    return build


def _encoder_of(config_name: str, model_name: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        t = _t()
        torch.manual_seed(0)
        return getattr(t, model_name)(getattr(t, config_name)(**config)).get_encoder().eval()

    return build


_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)
_ENC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64)
_VIS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)
_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
             decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)

ARCHS: dict[str, Arch] = {a.name: a for a in [
    # decoders
    Arch("gpt2", "GPT-2", _lm("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)),
    Arch("gptj", "GPT-J", _lm("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, rotary_dim=8,
                              n_positions=64)),
    Arch("gpt_neox", "GPT-NeoX", _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", **{**_DEC, "num_key_value_heads": 2})),
    Arch("opt", "OPT", _lm("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)),
    Arch("bloom", "Bloom", _lm("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2)),
    Arch("falcon", "Falcon", _lm("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2)),
    Arch("phi3", "Phi-3", _lm("Phi3Config", "Phi3ForCausalLM", **_DEC, pad_token_id=0)),
    Arch("qwen2", "Qwen2", _lm("Qwen2Config", "Qwen2ForCausalLM", **_DEC)),
    Arch("qwen3", "Qwen3", _lm("Qwen3Config", "Qwen3ForCausalLM", **_DEC, head_dim=16)),
    Arch("mistral", "Mistral", _lm("MistralConfig", "MistralForCausalLM", **_DEC)),
    Arch("gemma", "Gemma", _lm("GemmaConfig", "GemmaForCausalLM", **_DEC, head_dim=16)),
    Arch("llama", "Llama", _lm("LlamaConfig", "LlamaForCausalLM", **_DEC)),
    # encoders
    Arch("bert", "BERT", _lm("BertConfig", "BertModel", **_ENC)),
    Arch("distilbert", "DistilBERT", _lm("DistilBertConfig", "DistilBertModel", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                                         hidden_dim=64, max_position_embeddings=64)),
    Arch("roberta", "RoBERTa", _lm("RobertaConfig", "RobertaModel", **_ENC, pad_token_id=1)),
    Arch("albert", "ALBERT", _lm("AlbertConfig", "AlbertModel", **_ENC, embedding_size=16),
         note="one layer's weights shared by every layer"),
    Arch("deberta_v2", "DeBERTa-v2", _lm("DebertaV2Config", "DebertaV2Model", **_ENC)),
    Arch("electra", "ELECTRA", _lm("ElectraConfig", "ElectraModel", **_ENC, embedding_size=16)),
    Arch("mpnet", "MPNet", _lm("MPNetConfig", "MPNetModel", **_ENC)),
    Arch("t5_encoder", "T5 (encoder)", _lm("T5Config", "T5EncoderModel", **_T5)),
    Arch("t5", "T5", _lm("T5Config", "T5ForConditionalGeneration", **_T5), inputs="ids+decoder"),
    Arch("bart", "BART", _lm("BartConfig", "BartForConditionalGeneration", **_BART), inputs="ids+decoder"),
    Arch("clip_text", "CLIP (text)", _lm("CLIPTextConfig", "CLIPTextModel", **{**_ENC, "max_position_embeddings": 64})),
    # vision
    Arch("vit", "ViT", _lm("ViTConfig", "ViTModel", **_VIS), inputs="pixels:32"),
    Arch("clip_vision", "CLIP (vision)", _lm("CLIPVisionConfig", "CLIPVisionModel", **_VIS), inputs="pixels:32"),
    Arch("swin", "Swin", _lm("SwinConfig", "SwinModel", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                             window_size=4), inputs="pixels:32"),
    Arch("convnext", "ConvNeXt", _lm("ConvNextConfig", "ConvNextModel", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
         inputs="pixels:32"),
    Arch("resnet", "ResNet", _lm("ResNetConfig", "ResNetForImageClassification", embedding_size=16, hidden_sizes=[16, 32],
                                 depths=[1, 1], num_labels=10), inputs="pixels:32"),
    # audio
    Arch("whisper_encoder", "Whisper (encoder)", _encoder_of("WhisperConfig", "WhisperModel", vocab_size=VOCAB, d_model=32,
                                                            encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                            num_mel_bins=16, max_source_positions=32, max_target_positions=32,
                                                            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
         inputs="features:16x64"),
    Arch("wav2vec2", "Wav2Vec2", _lm("Wav2Vec2Config", "Wav2Vec2Model", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                     conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                     do_stable_layer_norm=True), inputs="audio:800"),
]}


def batch(arch: Arch, seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    """One batch of random inputs of `arch`'s modality (sequence lengths vary with the seed)."""
    g = torch.Generator().manual_seed(seed)
    kind, _, size = arch.inputs.partition(":")
    if kind.startswith("ids"):
        length = 8 + seed % 5
        out = {"input_ids": torch.randint(2, VOCAB, (rows, length), generator=g)}
        if kind == "ids+decoder":
            out["decoder_input_ids"] = torch.randint(2, VOCAB, (rows, 3 + seed % 3), generator=g)
        return out
    if kind == "pixels":
        return {"pixel_values": torch.randn(rows, 3, int(size), int(size), generator=g)}
    if kind == "features":
        mels, frames = (int(v) for v in size.split("x"))
        return {"input_features": torch.randn(rows, mels, frames, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(rows, int(size), generator=g)}
    raise ValueError(f"unknown input kind {arch.inputs!r}")


def first_output(out: Any) -> torch.Tensor:
    """The model's main output: logits or last hidden state (a ModelOutput's first field)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return first_output(out[0])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@dataclasses.dataclass
class Row:
    name: str
    family: str
    steps: dict[str, str] = dataclasses.field(default_factory=dict)  # step -> "ok" | "refused: ..." | "failed: ..."
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # step -> seconds

    @property
    def passed(self) -> bool:
        return all(self.steps.get(s) == "ok" for s in STEPS)


class StepFailed(AssertionError):
    pass


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise StepFailed(what)


def check(name: str, workdir: str | os.PathLike, *, steps: tuple[str, ...] = STEPS, options: dict[str, Any] | None = None) -> Row:
    """Run `name` through the steps; a step that raises records the error and skips those after it.
    `options`: Config options every step passes on (e.g. {"mlp": "prune"})."""
    import tngraph

    arch = ARCHS[name]
    row = Row(name, arch.family)
    started = time.perf_counter()
    workdir = pathlib.Path(workdir)
    calibration = [batch(arch, seed) for seed in range(4)]
    probe = batch(arch, 11)
    try:
        model = arch.build()
        with torch.no_grad():
            dense = first_output(model(**probe))
    except Exception as e:  # noqa: BLE001 - the zoo's own configuration is wrong: say so in the row
        row.steps = {s: f"failed: building the model: {type(e).__name__}: {e}" for s in STEPS}
        return row
    state: dict[str, Any] = {}
    extra = dict(options or {})

    def compress() -> None:
        full = tngraph.compress_with_result(model, calibration=calibration, budget=1.0, heal_steps=0, progress=False, **extra)
        with torch.no_grad():
            err = _relative(first_output(full.module(**probe)), dense)
        _expect(err < 1e-5, f"at budget 1.0 the output differs from the original by {err:.2e} (relative)")
        result = tngraph.compress_with_result(model, calibration=calibration, budget=0.5, heal_steps=0, progress=False, **extra)
        factorized = [p for p in result.context.plan.values() if p.format != "dense"]
        _expect(bool(factorized), "nothing was factorized at budget 0.5")
        with torch.no_grad():
            err = _relative(first_output(result.module(**probe)), dense)
        _expect(err < 1.0, f"at budget 0.5 the relative output error is {err:.3g} (guard: below 1)")
        state["module"] = result.module
        row.notes.append(f"{len(factorized)}/{len(result.context.plan)} targets factorized, error {err:.2f} at 0.5")

    def load() -> None:
        folder = workdir / f"{name}-artifact"
        tngraph.save(state["module"], folder)
        loaded = tngraph.load(folder, model=arch.build())
        with torch.no_grad():
            _expect(torch.equal(first_output(loaded(**probe)), first_output(state["module"](**probe))),
                    "the loaded artifact's outputs differ from the compressed module's")
        state["loaded"] = loaded

    def compile() -> None:
        from tngraph import backend, layers

        graphs = []

        def spy(gm, example_inputs, **kw):
            run = backend.tngraph_backend(gm, example_inputs, **kw)
            graphs.append(run.tngraph_graph)
            return run

        torch._dynamo.reset()
        compiled = torch.compile(arch.build(), backend=spy, options={"budget": 0.5, "calibration": calibration, "fallback": "eager", **extra})
        with torch.no_grad():
            out = first_output(compiled(**probe))
        ops = set(layers.OPS)
        held = sum(1 for g in graphs for n in g.graph.nodes if n.target in ops)
        _expect(held > 0, "the compiled graphs hold no tngraph layer op")
        err = _relative(out, dense)
        _expect(err < 1.0, f"the compiled model's relative output error is {err:.3g} (guard: below 1)")
        torch._dynamo.reset()

    def onnx() -> None:
        result = tngraph.export_onnx(state["loaded"], probe, workdir / f"{name}.onnx")
        _expect(result.max_abs_diff <= 1e-4, f"onnxruntime differs from PyTorch by {result.max_abs_diff:.2e}")

    actions = {"compress": compress, "load": load, "compile": compile, "onnx": onnx}
    failed = False
    for step in STEPS:
        if step not in steps:
            continue
        if failed:
            row.steps[step] = "skipped"
            continue
        begun = time.perf_counter()
        try:
            actions[step]()
            row.steps[step] = "ok"
        except tngraph.TngraphError as e:
            row.steps[step] = f"refused: {str(e).splitlines()[0]}"
            failed = True
        except Exception as e:  # noqa: BLE001 - the zoo records what broke, it does not stop at it
            logging.getLogger("zoo").debug("%s %s", name, traceback.format_exc())
            row.steps[step] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            failed = True
        row.timings[step] = time.perf_counter() - begun
    row.seconds = time.perf_counter() - started
    return row


def table(rows: list[Row]) -> str:
    """The README's support table (markdown)."""
    def cell(status: str) -> str:
        return "yes" if status == "ok" else ("—" if status == "skipped" else "no")

    lines = ["| architecture | compress | load | compile | ONNX | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        problems = [f"{s}: {v}" for s, v in r.steps.items() if v not in ("ok", "skipped")]
        note = "; ".join(problems + r.notes + ([ARCHS[r.name].note] if ARCHS[r.name].note else []))
        lines.append(f"| {r.family} | " + " | ".join(cell(r.steps.get(s, "skipped")) for s in STEPS) + f" | {note.replace('|', '/')} |")
    return "\n".join(lines)


def write_readme(path: pathlib.Path, rows: list[Row], command: str) -> None:
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path} has no zoo table markers ({README_BEGIN!r} ... {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    body = f"{README_BEGIN}\n\nWritten by `{command}` on {time.strftime('%Y-%m-%d')} (torch {torch.__version__}).\n\n{table(rows)}\n\n"
    path.write_text(head + body + README_END + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"architectures (default: all): {', '.join(ARCHS)}")
    parser.add_argument("--readme", type=pathlib.Path, help="rewrite this README's zoo table from the run (all architectures only)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each failure's traceback")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    unknown = [n for n in args.names if n not in ARCHS]
    if unknown:
        parser.error(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    if args.readme and args.names:
        parser.error("--readme writes the table of every architecture: give no names with it")
    names = args.names or list(ARCHS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tngraph-zoo-") as tmp:
        for name in names:
            row = check(name, tmp)
            rows.append(row)
            print(f"{name:16s} {row.seconds:6.1f}s  " + "  ".join(f"{s}={row.steps.get(s, '-')} ({row.timings.get(s, 0):.1f}s)"
                                                               for s in STEPS), flush=True)
    print()
    print(table(rows))
    if args.readme:
        write_readme(args.readme, rows, "python tools/zoo.py --readme README.md")
        print(f"\nwrote the table into {args.readme}")
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
