"""heal: a short distillation fine-tune of a compressed model (student) against the original (teacher).

Only the factors of the replaced layers train (optionally every bias and LayerNorm too); everything
else is frozen. Losses:
- encoders (outputs with `last_hidden_state`): relative MSE of the last hidden state over real
  tokens, plus the mean of every earlier block's (`layers`), plus 1 - cos of the pooled sentence
  embeddings; the held-out score is 1 - mean cos, what users of the embeddings see;
- causal LMs (outputs with `logits`): KL(teacher || student) of the next-token distributions over
  real tokens (plus the block outputs with `layers`); the held-out score is that KL.
- classifiers (2-D `logits`: images, audio): KL of the class distributions plus the block outputs;
- other tensor models (`last_hidden_state` without an attention mask: vision and audio encoders):
  relative MSE of the last hidden state and of the block outputs.
Texts heal through the tokenizer; named input tensors (tngraph.samples.TensorSamples) row by row.
AdamW, linear warm-up then cosine decay, gradient-norm clipping. Batches are drawn from a fixed seed
and grouped by length (little padding); the whole schedule is a function of the seed, so a run
resumed from a checkpoint takes the same steps as an uninterrupted one and ends bit-identical.
Block by block (HealConfig scope "blocks"), each transformer block instead trains alone on the
teacher block's outputs from its own inputs (the healed blocks' outputs before it), relative MSE over
real tokens, on up to BLOCK_BATCHES batches kept in memory (their teacher targets computed once per
block): about a sixth of a whole-model step's work per step, and no teacher pass per step.
A held-out split is scored every `eval_every` steps; training stops early when it stops improving,
and the best state seen (the start included) is what comes back: healing never returns a model
worse than its start on that split.
Healing runs on HealConfig.device ("auto": a CUDA GPU when torch sees one and the student is on the
CPU and the two fit in its free memory): student and teacher move there for the run and come back
into their own tensors afterwards, trained values copied in, so tied weights stay tied and nothing is
left on the GPU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import lm
from .config import check_device
from .errors import ArtifactError, ConfigError, DataError, ModelError
from .evaluate import pooled
from .models import forward_names, token_lengths
from .layers import QUANT_LAYERS
from .recipe import FACTORIZED
from .progress import progress
from .samples import TensorSamples

log = logging.getLogger(__name__)

CHECKPOINT = "heal-checkpoint.safetensors"
_BUCKET = 16  # batches whose texts are sorted by length together
# peak learning rates by scope (docs/healing.md: one block at a time learns fastest at 3e-4)
RATES = {"model": 1e-4, "blocks": 3e-4}
BLOCK_BATCHES = 256  # batches block-by-block healing keeps (their inputs to the current block) at most
BLOCK_MEMORY = 1 << 30  # bytes of those inputs, the student's and the teacher's, at most


@dataclass(frozen=True)
class HealConfig:
    """steps: optimizer steps (at most; early stopping may end sooner), of every block at once
    (scope "model": matched at the teacher's outputs) or of each block in turn (scope "blocks": on
    the teacher block's outputs, from the outputs of the blocks healed before it; no early stopping
    or checkpoints, the held-out score at the end decides). lr: peak AdamW learning rate (None: the
    scope's, RATES). warmup: fraction of the steps the rate ramps up over. clip: gradient-norm clipping.
    held_out: texts kept out of training and scored every eval_every steps; patience: scores without
    improvement before stopping, in the second half of the steps (the rate's decay: at its peak a long
    run's score wanders for hundreds of steps before the decay brings it down), and no fewer than a
    tenth of the steps hold (a long run's score wanders longer; _exhausted).
    train_norms: every bias and LayerNorm trains too (else only the factors). layers: match every
    block's output, not only the last. pooled_weight, similarity_weight (sentence encoders): weights
    of 1 - cos of the pooled embeddings and of the squared error of the batch's sentence-to-sentence
    cosines, beside the hidden states' relative error (docs/healing.md says what each measured).
    checkpoint_every: steps between checkpoints (when a checkpoint folder is given). device: where the steps run ("auto": the
    student's device when it is not the CPU, else a CUDA GPU when torch sees one and the models fit
    in it, else the CPU: fitting_device; or "cpu", "cuda", "cuda:1", ...: resolve_device)."""

    steps: int = 700
    lr: float | None = None  # None: RATES[scope]
    scope: str = "model"
    weight_decay: float = 0.0
    warmup: float = 0.05
    clip: float = 1.0
    batch_size: int = 32
    max_length: int = 128
    held_out: int = 256  # at most a quarter of the texts
    eval_every: int = 50
    patience: int = 4
    train_norms: bool = True
    layers: bool = True
    pooled_weight: float = 1.0
    similarity_weight: float = 0.0
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "held_out", "eval_every", "patience", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ConfigError(f"heal {name} must be a {'non-negative' if name == 'steps' else 'positive'} integer, got {value!r}")
        if self.scope not in RATES:
            raise ConfigError(f"heal scope must be one of {', '.join(RATES)}, got {self.scope!r}")
        check_device(self.device)
        for name, low, high in (("lr", 0.0, 1.0), ("weight_decay", 0.0, 1.0), ("warmup", 0.0, 1.0), ("clip", 0.0, math.inf),
                                ("pooled_weight", 0.0, math.inf), ("similarity_weight", 0.0, math.inf)):
            value = self.rate if name == "lr" else getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or (name in ("lr", "clip") and value == 0):
                raise ConfigError(f"heal {name} must lie in ({low:g}, {high:g}], got {value!r}" if name in ("lr", "clip") else f"heal {name} must lie in [{low:g}, {high:g}], got {value!r}")


    @property
    def batches(self) -> int:
        """The distinct batches the steps train on: one per step of the whole model; block by block,
        BLOCK_BATCHES at most, every block taking them again."""
        return self.steps if self.scope == "model" else min(self.steps, BLOCK_BATCHES)

    @property
    def texts_used(self) -> int:
        """How many texts the steps can use: the held-out ones and every batch's."""
        return self.batches * self.batch_size + self.held_out

    @property
    def rate(self) -> float:
        """The peak learning rate: lr, or the scope's default (peak_rate)."""
        return peak_rate(self.lr, self.scope)


def resolve_device(spec: str, current: torch.device) -> torch.device:
    """The device a run asked for with `spec` (check_device) takes, for a student now on `current`:
    "auto" keeps a student already off the CPU where it is and otherwise takes the first CUDA GPU when
    torch sees one. A GPU the machine does not have is a ConfigError with the fix."""
    if check_device(spec) == "auto":
        return current if current.type != "cpu" else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        seen = f"torch sees {torch.cuda.device_count()} CUDA GPU(s)" if torch.cuda.is_available() else "torch sees no CUDA GPU here"
        raise ConfigError(f"heal device {spec!r} is not on this machine ({seen})", "pass --heal-device auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"heal device {spec!r}: healing runs on the CPU or a CUDA GPU", "pass --heal-device auto, cpu or cuda")
    return device


GPU_HEADROOM = 0.8  # of a GPU's free memory, what the two models and the optimizer's state may take (the rest: activations)


def device_bytes(modules: Sequence[torch.nn.Module], trained: Sequence[torch.nn.Parameter]) -> int:
    """Bytes a healing run holds on its device: every parameter and buffer of `modules` once, and for
    each trained parameter its gradient and AdamW's two moments."""
    seen: dict[int, int] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values()) + 3 * sum(p.numel() * p.element_size() for p in trained)


def fitting_device(spec: str, current: torch.device, modules: Sequence[torch.nn.Module], trained: Sequence[torch.nn.Parameter]) -> torch.device:
    """resolve_device, then the room on a GPU the models would move to: "auto" stays where it is (with
    a warning) when the models and the optimizer's state (device_bytes) would pass GPU_HEADROOM of its
    free memory; a GPU asked for by name is then a ConfigError with the sizes and the fix."""
    device = resolve_device(spec, current)
    if device.type != "cuda" or device == current:
        return device
    need, free = device_bytes(modules, trained), torch.cuda.mem_get_info(device)[0]
    if need <= GPU_HEADROOM * free:
        return device
    sizes = f"the models and the optimizer's state take {need / 2**30:.1f} GiB, {device} has {free / 2**30:.1f} GiB free"
    if spec != "auto":
        raise ConfigError(f"healing does not fit on {device}: {sizes}", "pass --heal-device cpu, or free the GPU")
    log.warning("heal: on the CPU: %s (--heal-device cpu says so without this warning)", sizes)
    return current


@contextmanager
def on_device(modules: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Every parameter and buffer of `modules` on `device` inside the block, then back in the very
    tensors they had before, holding the values they ended with (what trained, trained): tensors the
    modules share stay shared, the caller's references stay valid, and the device keeps nothing. A
    failure inside still brings everything back."""
    params: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}  # a tied parameter is one object: moved once
    buffers: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    moved: dict[int, torch.Tensor] = {}  # one copy on the device per buffer object, however many modules hold it
    for module in modules:
        for sub in module.modules():
            for p in sub._parameters.values():
                if p is not None and id(p) not in params and p.device != device:
                    params[id(p)] = (p, p.data)
                    p.data = p.data.to(device)
            for name, b in sub._buffers.items():
                if b is not None and b.device != device:
                    buffers.append((sub, name, b))
                    if id(b) not in moved:
                        moved[id(b)] = b.to(device)
                    sub._buffers[name] = moved[id(b)]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, home in params.values():
                home.copy_(p.data)
                p.grad = None  # a gradient on the device would not fit the tensor back home
                p.data = home
            for sub, name, home in buffers:
                home.copy_(sub._buffers[name])
                sub._buffers[name] = home


AUTO_SECONDS = 300.0  # what heal_steps "auto" gives the steps, as the timed probe predicts them (auto_steps)
AUTO_STEPS = (700, 10_000)  # the fewest and the most steps "auto" chooses (docs/healing.md, "How many steps")


def _probe_output(out: Any) -> torch.Tensor | None:
    """The tensor a probe step's loss is taken from: the last hidden state, the logits, or the first tensor."""
    for name in ("last_hidden_state", "logits"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(model: torch.nn.Module, batch: tuple[tuple, dict[str, Any]], device: torch.device, *, repeats: int = 3,
                 enough: float = math.inf) -> float:
    """Seconds a healing step of `model` on `batch` ((args, kwargs) of its forward) takes on `device`,
    timed there: a no-grad forward (the teacher's), then a forward and a backward to every 1-D
    parameter (biases and norms, which heal too: the backward then runs through every layer without a
    weight's gradient held), the median of `repeats` after a warm-up; just the warm-up when it alone
    takes `enough` seconds or more. The model is the dense source, so the estimate errs long for a
    compressed student, short for the factors' own gradients. The model comes back as it was: its
    device, no gradients, its requires_grad flags."""
    flags = {p: p.requires_grad for p in model.parameters()}
    accepted = forward_names(model)
    args, inputs = batch
    inputs = {k: v for k, v in inputs.items() if accepted is None or k in accepted}
    if accepted is not None and "logits_to_keep" in accepted:  # a causal LM: the head's cost is one token's
        inputs["logits_to_keep"] = 1
    times: list[float] = []
    try:
        with on_device((model,), device):
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            for p in model.parameters():
                p.requires_grad_(p.dim() == 1 and p.is_floating_point())
            was = model.training
            model.eval()
            try:
                for _ in range(repeats + 1):
                    _sync(device)
                    start = time.perf_counter()
                    with torch.no_grad():
                        model(*args, **inputs)
                    out = _probe_output(model(*args, **inputs))
                    if out is not None and out.requires_grad:
                        out.float().square().mean().backward()
                    _sync(device)
                    times.append(time.perf_counter() - start)
                    if len(times) == 1 and times[0] >= enough:
                        return times[0]
            finally:
                model.train(was)
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
    return sorted(times[1:])[len(times[1:]) // 2]


def auto_steps(model: torch.nn.Module, batch: tuple[tuple, dict[str, Any]], spec: str = "auto", *, seconds: float | None = None,
               bounds: tuple[int, int] | None = None) -> tuple[int, float, torch.device]:
    """(steps, seconds a step takes, device) of heal_steps "auto": as many whole hundreds of steps as
    `seconds` (default AUTO_SECONDS) hold at the step time step_seconds measures for `model` (the
    dense source) on `batch`, within `bounds` (default AUTO_STEPS), on the device healing with
    device `spec` would take (resolve_device; a GPU that two copies of the model and the optimizer
    state of one would not fit counts as the CPU, where auto then heals). On this project's 2-core
    CPU the MiniLM's probe step takes about a second: the fewest steps. A step that fails (a batch
    the model cannot take, which the capture then names) is a warning and the fewest steps."""
    seconds = AUTO_SECONDS if seconds is None else seconds
    least, most = bounds or AUTO_STEPS
    current = next(iter(model.parameters()), torch.empty(0)).device
    device = resolve_device(spec, current)
    if device.type == "cuda" and device != current:
        need = device_bytes((model,), list(model.parameters())) + sum(p.numel() * p.element_size() for p in model.parameters())
        if need > GPU_HEADROOM * torch.cuda.mem_get_info(device)[0]:
            device = current
    try:
        took = step_seconds(model, batch, device, enough=seconds / least)
    except (RuntimeError, TypeError, ValueError) as exc:  # the capture that follows names a batch the model cannot take
        log.warning("heal: a step could not be timed (%s: %s); auto takes the fewest steps, %d", type(exc).__name__, exc, least)
        return least, math.inf, device
    steps = int(seconds / max(took, 1e-9) // 100 * 100)
    return min(most, max(least, steps)), took, device


def peak_rate(lr: float | None, scope: str = "model") -> float:
    """A healing run's peak learning rate: `lr`, or the scope's default (RATES) when it is None."""
    return RATES[scope] if lr is None else lr


@dataclass
class HealResult:
    steps: int  # steps taken (resumed ones included)
    start_loss: float  # held-out score before healing
    best_loss: float  # held-out score of the returned model
    best_step: int
    seconds: float  # this call's wall time
    metric: str  # what the score is: "1 - cos", "KL" or "relative MSE"
    history: list[tuple[int, float]] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)  # names of the parameters that trained
    resumed_from: int = 0
    scope: str = "model"  # HealConfig.scope: steps of the whole model, or of each block in turn
    device: str = "cpu"  # where the steps ran

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("trained")
        return out


def trainable(student: torch.nn.Module, train_norms: bool = True) -> dict[str, torch.nn.Parameter]:
    """The parameters healing trains, by name: every factor of a tngraph layer (not the fp16 tensors
    of quantized layers), and with `train_norms` every bias and LayerNorm parameter of the model."""
    names: dict[int, str] = {id(p): n for n, p in student.named_parameters()}
    chosen: dict[str, torch.nn.Parameter] = {}
    for module in student.modules():
        if isinstance(module, FACTORIZED):
            for name, p in module.named_parameters():
                # a quantized layer's fp16 scales and correction factors are stored values: an fp16
                # optimizer step underflows (its biases still train)
                if name != "bias" and getattr(module, "layer_name", "") in QUANT_LAYERS and p.dtype == torch.float16:
                    continue
                if name != "bias" or train_norms:
                    chosen[names[id(p)]] = p
        elif train_norms and isinstance(module, torch.nn.LayerNorm):
            for p in module.parameters(recurse=False):
                chosen[names[id(p)]] = p
    if train_norms:
        chosen.update({n: p for n, p in student.named_parameters() if n.endswith(".bias")})
    return chosen


def _relative_mse(hs: torch.Tensor, ht: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (((hs - ht) ** 2) * m).sum() / (ht**2 * m).sum().clamp_min(1e-12)


def _blocks(student_out: Any, teacher_out: Any, m: torch.Tensor) -> torch.Tensor | float:
    """Mean relative MSE of the block outputs between the embeddings and the last one."""
    inner_s, inner_t = getattr(student_out, "hidden_states", None), getattr(teacher_out, "hidden_states", None)
    if inner_s is None or inner_t is None or len(inner_s) <= 2:
        return 0.0
    return sum(_relative_mse(a, b, m) for a, b in zip(inner_s[1:-1], inner_t[1:-1])) / (len(inner_s) - 2)


def _token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || student) of the next-token distributions."""
    logp_t = torch.log_softmax(teacher_logits.float(), -1)
    logp_s = torch.log_softmax(student_logits.float(), -1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


METRICS = {"encoder": "1 - cos", "lm": "KL", "classifier": "KL", "features": "relative MSE"}


def _kind(outputs: Any, batch: dict[str, Any]) -> str:
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return "lm" if logits.dim() == 3 else "classifier"
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is not None:
        return "encoder" if "attention_mask" in batch and hidden.dim() == 3 else "features"
    raise ModelError(f"healing does not know what to match in a {type(outputs).__name__} output",
                     "heal Hugging Face models (outputs with last_hidden_state or logits), or pass heal_steps=0")


def _loss(kind: str, student_out: Any, teacher_out: Any, mask: torch.Tensor | None, pooled_weight: float = 1.0,
          similarity_weight: float = 0.0) -> torch.Tensor:
    if kind == "classifier":
        ones = torch.ones(student_out.logits.shape[:-1], device=student_out.logits.device)
        return _token_kl(student_out.logits, teacher_out.logits, ones) + _blocks(student_out, teacher_out, 1.0)
    if kind == "features":
        return _relative_mse(student_out.last_hidden_state, teacher_out.last_hidden_state, 1.0) + _blocks(student_out, teacher_out, 1.0)
    if kind == "lm":
        hidden = teacher_out.hidden_states[-1] if getattr(teacher_out, "hidden_states", None) else None
        m = mask.unsqueeze(-1).to(hidden.dtype) if hidden is not None else None
        return _token_kl(student_out.logits, teacher_out.logits, mask) + (_blocks(student_out, teacher_out, m) if m is not None else 0.0)
    hs, ht = student_out.last_hidden_state, teacher_out.last_hidden_state
    m = mask.unsqueeze(-1).to(hs.dtype)
    es, et = pooled(hs, mask), pooled(ht, mask)
    loss = _relative_mse(hs, ht, m) + _blocks(student_out, teacher_out, m) + pooled_weight * (1 - (es * et).sum(-1)).mean()
    if similarity_weight:  # the batch's sentence-to-sentence cosines, which decide its neighbours
        loss = loss + similarity_weight * ((es @ es.T - et @ et.T) ** 2).mean()
    return loss


def _vocabulary(model: torch.nn.Module) -> int:
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return int(getattr(head, "out_features", 0) or 0) if isinstance(head, torch.nn.Module) else 0


def _check_texts(texts: Any, need: int, what: str = "healing data") -> list[str] | TensorSamples:
    if isinstance(texts, TensorSamples):
        if len(texts) < need:
            raise DataError(f"{what} needs at least {need} samples (two batches), got {len(texts)} ({texts.origin})",
                            "pass more samples, or a smaller batch size")
        return texts
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{what} must be a list of texts", "pass a list of strings (one sample each), or a text file with one sample per line")
    texts = [t for t in texts if t.strip()]
    if len(texts) < need:
        raise DataError(f"{what} needs at least {need} non-empty texts (two batches), got {len(texts)}",
                        "pass more samples (a few thousand serve best), or a smaller batch size")
    return texts


def schedule(lengths: Sequence[int], steps: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """The batches of every step: epochs of a seeded permutation, each run of _BUCKET batches sorted
    by length (little padding) and taken in a seeded order."""
    n, batches = len(lengths), []
    chunk = batch_size * _BUCKET
    while len(batches) < steps:
        perm = torch.randperm(n, generator=generator).tolist()
        for c in range(0, n, chunk):
            part = sorted(perm[c : c + chunk], key=lambda i: (lengths[i], i))
            group = [part[k : k + batch_size] for k in range(0, len(part) - batch_size + 1, batch_size)]
            batches += [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
    return batches[:steps]


def _fingerprint(cfg: HealConfig, texts: Sequence[str], params: dict[str, torch.nn.Parameter]) -> str:
    """What a checkpoint must match to be resumed: the options, the data and the student's start."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "device")}, sort_keys=True).encode())
    if isinstance(texts, TensorSamples):
        for name, t in sorted(texts.inputs.items()):
            digest.update(name.encode() + str(tuple(t.shape)).encode() + t.detach().to(torch.float64).sum().numpy().tobytes())
    else:
        for t in texts:
            digest.update(t.encode("utf-8") + b"\0")
    for name, p in params.items():
        digest.update(name.encode() + str(tuple(p.shape)).encode())
        digest.update(p.detach().to("cpu", torch.float64).sum().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class _State:
    step: int
    best: float
    best_step: int
    bad: int
    start_loss: float
    history: list[tuple[int, float]]
    best_params: dict[str, torch.Tensor]


def _write_checkpoint(folder: pathlib.Path, fingerprint: str, state: _State, params: dict[str, torch.nn.Parameter],
                      opt: torch.optim.Optimizer, steps: int) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        tensors[f"param.{name}"] = p.detach().cpu().contiguous()
        tensors[f"best.{name}"] = state.best_params[name].cpu().contiguous()
        slot = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in slot:
                tensors[f"opt.{key}.{name}"] = torch.as_tensor(slot[key]).detach().cpu().contiguous()
    meta = {"fingerprint": fingerprint, "state": json.dumps({k: v for k, v in asdict(state).items() if k != "best_params"}),
            "steps": str(steps)}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, folder / CHECKPOINT)  # a crash mid-write leaves the previous checkpoint whole


def checkpoint_steps(folder: str | os.PathLike | None) -> int | None:
    """The steps of the run that wrote the heal checkpoint in `folder` (what heal_steps "auto" resumes
    with: another timing could choose another number, which the checkpoint's fingerprint would refuse);
    None without a readable one (resuming then reports what is wrong with it)."""
    path = pathlib.Path(folder) / CHECKPOINT if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return int(_checkpoint_metadata(path)["steps"])
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def _checkpoint_metadata(path: pathlib.Path) -> dict[str, str]:
    """The metadata of the heal checkpoint at `path` (safetensors' header; its errors raised)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _read_checkpoint(folder: pathlib.Path, fingerprint: str, params: dict[str, torch.nn.Parameter],
                     opt: torch.optim.Optimizer) -> _State | None:
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        meta = _checkpoint_metadata(path)
        tensors = load_file(str(path))
        saved = json.loads(meta["state"])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"heal checkpoint {str(path)!r} is corrupt: {exc}", "delete it to start healing afresh") from None
    if meta.get("fingerprint") != fingerprint:
        raise ArtifactError(f"heal checkpoint {str(path)!r} was written by another run (options, data or model differ)",
                            "resume with the same options and data, or delete the checkpoint to start afresh")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
            if f"opt.exp_avg.{name}" in tensors:
                # the moments where the parameter is (a run may resume on another device); AdamW keeps its step count on the CPU
                opt.state[p] = {key: tensors[f"opt.{key}.{name}"].to(p.device if key != "step" else "cpu", copy=True)
                                for key in ("exp_avg", "exp_avg_sq", "step")}
    saved["history"] = [tuple(h) for h in saved["history"]]
    return _State(best_params={n: tensors[f"best.{n}"].to(p.device, copy=True) for n, p in params.items()}, **saved)


def _split(texts: Sequence[str] | TensorSamples, tokenizer: Any, cfg: HealConfig, gen: torch.Generator) -> tuple[list, list, list[list[int]]]:
    """(held-out texts, shortest first; training texts; the batches of each step: of every step of
    the whole model, or the BLOCK_BATCHES batches every block trains on) from one seeded order; of
    tensor samples, their row numbers (all of one length)."""
    order = torch.randperm(len(texts), generator=gen).tolist()
    n_held = min(cfg.held_out, len(texts) // 4)
    if isinstance(texts, TensorSamples):
        held, train = sorted(order[:n_held]), order[n_held:]
        return held, train, schedule([1] * len(train), cfg.batches, cfg.batch_size, gen)
    held = sorted((texts[i] for i in order[:n_held]), key=len)
    train = [texts[i] for i in order[n_held:]]
    return held, train, schedule(token_lengths(tokenizer, train, cfg.max_length), cfg.batches, cfg.batch_size, gen)


def _learning_rate(cfg: HealConfig, step: int) -> float:
    """Linear warm-up, then cosine decay, at step 1..cfg.steps."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step <= warm:
        return cfg.rate * step / warm
    return cfg.rate * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


class _Distillation:
    """One healing run: the student's trainable factors, the teacher, the held-out score, the state."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any, cfg: HealConfig,
                 params: dict[str, torch.nn.Parameter], held: list, samples: TensorSamples | None = None):
        self.student, self.teacher, self.tokenizer, self.cfg, self.params = student, teacher, tokenizer, cfg, params
        self.samples = samples  # tensor inputs, taken by row number; None: texts, tokenized
        self.accepted = forward_names(teacher)  # a causal LM takes no token_type_ids, nor does DistilBERT
        self.device = params[next(iter(params))].device
        if any(p.device != self.device for p in teacher.parameters()):
            raise ModelError(f"the teacher is not on the student's device ({self.device})", "move both models to one device before healing")
        for p in student.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        teacher.eval()
        # the student stays in eval mode: dropout would train it to match a function the teacher,
        # evaluated without dropout, does not compute
        student.eval()
        self.opt = torch.optim.AdamW(list(params.values()), lr=cfg.rate, weight_decay=cfg.weight_decay)
        self.held = [self.encode(held[i : i + cfg.batch_size]) for i in range(0, len(held), cfg.batch_size)]
        with torch.no_grad():
            self.kind = _kind(teacher(**{k: v[:1] for k, v in self.held[0].items()}), self.held[0])
        if self.kind != "encoder" and (cfg.pooled_weight != 1.0 or cfg.similarity_weight != 0.0):
            outputs = {"lm": "a causal LM's logits", "classifier": "a classifier's logits"}.get(self.kind, "features, not sentence embeddings")
            raise ConfigError(f"heal pooled_weight and similarity_weight weigh sentence embeddings; this model's outputs are {outputs}",
                              "leave them at 1 and 0 for models that are not sentence encoders")
        with torch.no_grad():
            # encoders: the teacher's sentence embeddings, kept; causal LMs: logits are recomputed when
            # scoring (a large vocabulary's logits for every held-out token would not fit)
            self.held_targets = ([pooled(teacher(**b).last_hidden_state, b["attention_mask"]) for b in self.held]
                                 if self.kind == "encoder" else [])
        # a causal LM with a large vocabulary: its logits a chunk of tokens at a time (tngraph.lm)
        self.vocab = None
        if self.kind == "lm" and cfg.batch_size * cfg.max_length * _vocabulary(teacher) > lm.LOGIT_CHUNK:
            pair = (lm.headless(student, self.held[0]), lm.headless(teacher, self.held[0]))
            self.vocab = pair if None not in pair else None

    def encode(self, batch: list) -> dict[str, torch.Tensor]:
        if self.samples is not None:
            return {k: v.to(self.device) for k, v in self.samples.rows(batch).items()}
        enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if self.accepted is None or k in self.accepted}

    def score(self) -> float:
        """The held-out loss: 1 - cos of the sentence embeddings (an encoder), token KL (a causal LM),
        the training loss of the batches (a classifier or another tensor model), sample-weighted."""
        student, teacher = self.student, self.teacher
        with torch.no_grad():
            if self.kind in ("classifier", "features"):
                sizes = [next(iter(b.values())).shape[0] for b in self.held]
                losses = [float(_loss(self.kind, student(**b, output_hidden_states=self.cfg.layers),
                                      teacher(**b, output_hidden_states=self.cfg.layers), None)) for b in self.held]
                return sum(v * n for v, n in zip(losses, sizes)) / sum(sizes)
            if self.kind == "encoder":
                cos = torch.cat([(pooled(student(**b).last_hidden_state, b["attention_mask"]) * t).sum(-1)
                                 for b, t in zip(self.held, self.held_targets)])
                return float(1 - cos.mean())
            tokens = [int(b["attention_mask"].sum()) for b in self.held]
            kl = [float(self.lm_kl(b) if self.vocab else _token_kl(student(**b).logits, teacher(**b).logits, b["attention_mask"])) * n
                  for b, n in zip(self.held, tokens)]
            return sum(kl) / sum(tokens)

    def lm_kl(self, batch: dict[str, torch.Tensor], layers: bool = False) -> torch.Tensor:
        """The causal LM loss from the final hidden states, logits a chunk at a time (lm.chunked_token_kl),
        plus the block outputs with `layers`: the value _loss gives from the full logits."""
        student, teacher = self.vocab
        with torch.no_grad():
            hidden_t, states_t = teacher.hidden(batch)
        hidden_s, states_s = student.hidden(batch)
        mask = batch["attention_mask"]
        loss = lm.chunked_token_kl(hidden_s, hidden_t, student.head, teacher.head, mask)
        if layers:
            m = mask.unsqueeze(-1).to(hidden_t.dtype)
            loss = loss + _blocks(SimpleNamespace(hidden_states=states_s), SimpleNamespace(hidden_states=states_t), m)
        return loss

    def step(self, step: int, texts: list[str]) -> float | None:
        """One optimiser step on `texts`; its loss, or None when the loss is not finite."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = _learning_rate(cfg, step)
        batch = self.encode(texts)
        if self.vocab:
            loss = self.lm_kl(batch, cfg.layers)
        else:
            with torch.no_grad():
                target = self.teacher(**batch, output_hidden_states=cfg.layers)
            loss = _loss(self.kind, self.student(**batch, output_hidden_states=cfg.layers), target, batch.get("attention_mask"),
                         cfg.pooled_weight, cfg.similarity_weight)
        if not torch.isfinite(loss):
            log.warning("heal: the loss is %s at step %d; stopping with the best state so far", float(loss), step)
            return None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.clip)
        self.opt.step()
        return loss.item()

    def evaluate(self, state: _State, step: int) -> bool:
        """Score at `step`, keep the best parameters; False when patience has run out."""
        value = self.score()
        state.history.append((step, value))
        if value < state.best:
            state.best, state.best_step, state.bad = value, step, 0
            state.best_params = {n: p.detach().clone() for n, p in self.params.items()}
            return True
        state.bad += 1
        if _exhausted(state, self.cfg):
            log.info("heal: stopped early at step %d (best %.4g at step %d)", step, state.best, state.best_step)
            return False
        return True

    def finish(self, state: _State) -> None:
        """The best parameters back into the student, frozen."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state.best_params[name])
        for p in self.student.parameters():
            p.requires_grad_(False)


def _start(run: _Distillation, folder: pathlib.Path | None, fingerprint: str, resume: bool) -> _State:
    """The checkpoint's state when resuming from one, else step 0 scored."""
    state = _read_checkpoint(folder, fingerprint, run.params, run.opt) if folder is not None and resume else None
    if state is not None:
        log.info("heal: resuming from step %d of %d (%s)", state.step, run.cfg.steps, folder)
        return state
    if resume:
        log.warning("heal: no checkpoint in %s to resume from; starting from step 0", folder)
    loss0 = run.score()
    return _State(0, loss0, 0, 0, loss0, [(0, loss0)], {n: p.detach().clone() for n, p in run.params.items()})


def patience_scores(cfg: HealConfig) -> int:
    """Scores without improvement that end a run: `patience`, or as many as a tenth of the steps hold
    when that is more. 10,000 MiniLM steps at patience 4 stopped at step 5,450 (best at 5,250, the
    rate still at half its peak: 0.9651 / 0.7752 out of domain, against 0.9678 / 0.7910 for a whole
    6,000-step run): the longer the run, the longer its score wanders."""
    return max(cfg.patience, math.ceil(cfg.steps / (10 * cfg.eval_every)))


def _exhausted(state: _State, cfg: HealConfig) -> bool:
    """Early stopping's test: patience_scores scores without improvement, in the second half of the
    steps. Before it the rate is at or near its peak, where the held-out score of a long run wanders:
    6,000 steps of the MiniLM stopped at step 1,800 (best at 1,600) with the rate still at 84 % of its
    peak."""
    return state.bad >= patience_scores(cfg) and 2 * state.step >= cfg.steps


def _train(run: _Distillation, state: _State, train: list[str], plan: list[list[int]], save: _Checkpointer, show: bool) -> None:
    """Steps state.step + 1 .. cfg.steps (or until the loss diverges or patience runs out), checkpointed."""
    cfg = run.cfg
    bar = progress(range(state.step + 1, cfg.steps + 1), desc="heal", enabled=show, unit="step", initial=state.step, total=cfg.steps)
    try:
        for step in ([] if _exhausted(state, cfg) else bar):
            loss = run.step(step, [train[i] for i in plan[step - 1]])
            if loss is None:
                break
            state.step = step
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss:.4f}", held=f"{state.best:.4f}")
            if (step % cfg.eval_every == 0 or step == cfg.steps) and not run.evaluate(state, step):
                break
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save()
    except KeyboardInterrupt:
        save()
        if save.folder is not None:
            log.warning("heal: interrupted at step %d; resume from %s", state.step, save.folder)
        raise
    finally:
        if hasattr(bar, "close"):
            bar.close()


def repeated_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """(name, modules) of the model's stack of blocks: the ModuleList of two or more modules of one
    class that holds the most parameters (a transformer's layers); None when it has none."""
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[0]):
                best = (size, name, module)
    return None if best is None else (best[1], best[2])


def _is_cache(value: Any) -> bool:
    """A transformers KV cache (transformers.cache_utils.Cache; imported here only when a block was
    given an argument from that module)."""
    if not type(value).__module__.startswith("transformers."):
        return False
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


class _Stop(Exception):
    """Ends a forward pass once the hooks have what they need."""


def _call(block: torch.nn.Module, hidden: torch.Tensor, call: tuple[str | None, tuple, dict]) -> torch.Tensor:
    """A block's hidden output on `hidden`, with the other arguments one forward pass gave it."""
    key, rest, kwargs = call
    out = block(hidden, *rest, **kwargs) if key is None else block(*rest, **{key: hidden}, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _block_calls(run: _Distillation, blocks: torch.nn.ModuleList, teacher_first: torch.nn.Module,
                 batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """(the student's input to its first block, the teacher's, each block's call: where the hidden
    states go and the other arguments) from one no-grad forward pass of each model, cut short."""
    calls: list[tuple] = []
    firsts: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        key = None if args else "hidden_states"
        hidden, rest = (args[0], args[1:]) if args else (kwargs["hidden_states"], ())
        # a KV cache would grow with every replayed call: blocks run without one
        calls.append((key, rest, {k: (None if _is_cache(v) else v) for k, v in kwargs.items() if k != key}))
        if len(calls) == 1:
            firsts.append(hidden.detach())
        if len(calls) == len(blocks):
            raise _Stop

    def first(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        firsts.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    if run.accepted is None or "use_cache" in run.accepted:
        batch = {**batch, "use_cache": False}
    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in blocks]
    handles.append(teacher_first.register_forward_pre_hook(first, with_kwargs=True))
    try:
        with torch.no_grad():
            for model in (run.student, run.teacher):
                try:
                    model(**batch)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(blocks) or len(firsts) != 2:
        raise ModelError(f"healing block by block saw {len(calls)} of the {len(blocks)} blocks called in one forward pass",
                         "heal this model with scope 'model' (--heal-scope model)")
    return firsts[0], firsts[1], calls


def _heal_blocks(run: _Distillation, state: _State, train: list, plan: list[list[int]], show: bool) -> list[str]:
    """cfg.steps AdamW steps of each block in turn (HealConfig scope "blocks"): its trainable
    parameters learn the teacher block's output from the student's input to it (the outputs of the
    blocks before it, already healed), on the plan's batches (as many as BLOCK_MEMORY holds), relative
    squared error over real tokens; then the held-out score decides, as for the whole model.
    Returns the names of the parameters that trained (those outside the blocks do not)."""
    cfg = run.cfg
    found, mine = repeated_blocks(run.student), set(map(id, run.params.values()))
    if found is None:
        raise ModelError(f"healing block by block needs a stack of repeated blocks (a transformer's layers); "
                         f"{type(run.student).__name__} has none", "heal with scope 'model' (--heal-scope model)")
    name, blocks = found
    teacher_blocks = run.teacher.get_submodule(name)
    inputs, targets, calls, masks, size = [], [], [], [], 0
    for rows in plan:
        batch = run.encode([train[i] for i in rows])
        x, t, call = _block_calls(run, blocks, teacher_blocks[0], batch)
        mask = batch.get("attention_mask")
        masks.append(mask.unsqueeze(-1).to(x.dtype) if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2] else 1.0)
        inputs.append(x), targets.append(t), calls.append(call)
        size += x.numel() * x.element_size() * 2
        if size > BLOCK_MEMORY and len(inputs) >= 2:
            break
    bar = progress(range(len(blocks) * cfg.steps), desc="heal blocks", enabled=show, unit="step")
    steps = iter(bar)
    for i, (block, teacher_block) in enumerate(zip(blocks, teacher_blocks)):
        with torch.no_grad():
            targets = [_call(teacher_block, t, c[i]) for t, c in zip(targets, calls)]
        params = [p for p in block.parameters() if id(p) in mine]
        losses = _train_block(block, params, inputs, targets, [c[i] for c in calls], masks, cfg, i, steps) if params else []
        if losses:
            tenth = max(1, len(losses) // 10)
            log.info("heal: block %d of %s: relative error %.4g -> %.4g (first and last tenth of the steps)", i, name,
                     sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth)
        with torch.no_grad():
            inputs = [_call(block, x, c[i]) for x, c in zip(inputs, calls)]
    if hasattr(bar, "close"):
        bar.close()
    state.step = cfg.steps
    run.evaluate(state, cfg.steps)
    inside = {id(p) for p in blocks.parameters()}
    return [n for n, p in run.params.items() if id(p) in inside]


def _train_block(block: torch.nn.Module, params: list[torch.nn.Parameter], inputs: list[torch.Tensor], targets: list[torch.Tensor],
                 calls: list[tuple], masks: list, cfg: HealConfig, index: int, bar: Any) -> list[float]:
    """One block's steps (warm-up then cosine decay, clipping); the losses of the steps taken."""
    opt = torch.optim.AdamW(params, lr=cfg.rate, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    losses: list[float] = []
    for step in range(1, cfg.steps + 1):
        for group in opt.param_groups:
            group["lr"] = _learning_rate(cfg, step)
        j = int(torch.randint(len(inputs), (1,), generator=gen))
        loss = _relative_mse(_call(block, inputs[j], calls[j]), targets[j], masks[j])
        if not torch.isfinite(loss):
            log.warning("heal: the loss of block %d is %s at step %d; the held-out score decides whether its steps are kept",
                        index, float(loss), step)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        losses.append(loss.item())
        next(bar, None)
    return losses


class _Checkpointer:
    """Saves the healing state into a checkpoint folder (a no-op without one)."""

    def __init__(self, folder: pathlib.Path | None, fingerprint: str, run: _Distillation):
        self.folder, self.fingerprint, self.run = folder, fingerprint, run
        self.state: _State | None = None

    def __call__(self) -> None:
        if self.folder is not None:
            _write_checkpoint(self.folder, self.fingerprint, self.state, self.run.params, self.run.opt, self.run.cfg.steps)

    def remove(self) -> None:
        if self.folder is not None:
            (self.folder / CHECKPOINT).unlink(missing_ok=True)
            if self.folder.is_dir() and not any(self.folder.iterdir()):
                self.folder.rmdir()


def heal(student: torch.nn.Module, teacher: torch.nn.Module, texts: Sequence[str] | TensorSamples, tokenizer: Any,
         config: HealConfig | None = None, *, checkpoint: str | os.PathLike | None = None, resume: bool = False,
         show: bool = True) -> HealResult:
    """Distil `teacher` into `student` (in place) on `texts` (or named input tensors, TensorSamples;
    `tokenizer` is then unused); returns what happened.

    `checkpoint`: a folder where the training state is saved every `checkpoint_every` steps and
    when interrupted (Ctrl-C); with `resume`, a checkpoint found there is continued from (it must
    come from the same options, data and student). The checkpoint is removed when healing ends.
    """
    cfg = config or HealConfig()
    if resume and cfg.scope == "blocks":
        raise ConfigError("healing block by block keeps no checkpoint to resume from", "heal again without --resume (resume=False)")
    texts = _check_texts(texts, 2 * cfg.batch_size)
    params = trainable(student, cfg.train_norms)
    if not params:
        raise ModelError("the student has no tngraph factorized layers to heal", "heal a model returned by tngraph.compress")
    held, train, plan = _split(texts, tokenizer, cfg, torch.Generator().manual_seed(cfg.seed))
    device = fitting_device(cfg.device, next(iter(params.values())).device, (student, teacher), list(params.values()))
    start = time.perf_counter()
    with on_device((student, teacher), device):
        run, state, trained, resumed_from = _run(student, teacher, texts, tokenizer, cfg, params, held, train, plan,
                                                 pathlib.Path(checkpoint) if checkpoint is not None else None, resume, show)
    seconds = time.perf_counter() - start
    metric = METRICS[run.kind]
    log.info("heal: held-out %s %.4g -> %.4g (best at step %d, %d steps) in %.1fs", metric, state.start_loss, state.best, state.best_step,
             state.step, seconds)
    return HealResult(state.step, state.start_loss, state.best, state.best_step, seconds, metric, list(state.history), trained,
                      resumed_from, cfg.scope, str(device))


def _run(student: torch.nn.Module, teacher: torch.nn.Module, texts: Sequence[str] | TensorSamples, tokenizer: Any, cfg: HealConfig,
         params: dict[str, torch.nn.Parameter], held: list, train: list, plan: list[list[int]], folder: pathlib.Path | None,
         resume: bool, show: bool) -> tuple[_Distillation, _State, list[str], int]:
    """heal's steps, on the device the student and teacher are on: the run, its final state (the best
    parameters back in the student), the names of the parameters that trained and the step a
    checkpoint resumed it from (0: none)."""
    run = _Distillation(student, teacher, tokenizer, cfg, params, held, texts if isinstance(texts, TensorSamples) else None)
    # block by block writes no checkpoint: nothing to fingerprint (its folder is still cleared at the end)
    save = _Checkpointer(folder, _fingerprint(cfg, texts, params) if folder is not None and cfg.scope == "model" else "", run)
    state = save.state = _start(run, folder, save.fingerprint, resume)
    resumed_from = state.step
    trained = list(params)
    if cfg.scope == "blocks":
        trained = _heal_blocks(run, state, train, plan, show)
    else:
        _train(run, state, train, plan, save, show)
    run.finish(state)
    save.remove()
    return run, state, trained, resumed_from
