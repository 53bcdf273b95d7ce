"""heal: a short distillation fine-tune of a compressed model (student) against the original (teacher).

Only the factors of the replaced layers train (optionally biases and norms too); everything else is
frozen. Loss for encoders: MSE of the last hidden states over real tokens plus 1 - cos of the
pooled sentence embeddings; for causal LMs: KL divergence of the next-token distributions.
AdamW, linear warm-up then cosine decay, gradient-norm clipping, a fixed seed. A held-out split
is evaluated every `eval_every` steps; training stops early when it stops improving, and the
best state seen (the start included) is what comes back: healing never returns a model worse than
its start on that split.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import DataError
from .evaluate import pooled
from .modules import LowRankEmbedding, LowRankLinear, NetworkLinear
from .progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealConfig:
    steps: int = 300
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    clip: float = 1.0
    batch_size: int = 32
    max_length: int = 128
    held_out: float = 0.1  # fraction of the samples kept for early stopping
    eval_every: int = 25
    patience: int = 4  # evaluations without improvement before stopping
    train_norms: bool = True  # biases and LayerNorm weights of the whole model train too
    seed: int = 0


@dataclass
class HealResult:
    steps: int
    start_loss: float
    best_loss: float
    best_step: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)


def _trainable(student: torch.nn.Module, train_norms: bool) -> list[torch.nn.Parameter]:
    params = []
    for module in student.modules():
        if isinstance(module, (LowRankLinear, LowRankEmbedding, NetworkLinear)):
            params += [p for name, p in module.named_parameters(recurse=False) if name != "bias" or train_norms]
            if isinstance(module, NetworkLinear):
                params += list(module.cores)
        elif train_norms and isinstance(module, torch.nn.LayerNorm):
            params += list(module.parameters(recurse=False))
    if train_norms:
        params += [p for name, p in student.named_parameters() if name.endswith(".bias")]
    return list({id(p): p for p in params}.values())


def _encoder_loss(student_out: Any, teacher_out: Any, mask: torch.Tensor) -> torch.Tensor:
    hs, ht = student_out.last_hidden_state, teacher_out.last_hidden_state
    m = mask.unsqueeze(-1).to(hs.dtype)
    mse = (((hs - ht) ** 2) * m).sum() / (m.sum() * hs.shape[-1]).clamp_min(1)
    scale = (ht**2 * m).sum() / (m.sum() * hs.shape[-1]).clamp_min(1)
    cos = (pooled(hs, mask) * pooled(ht, mask)).sum(-1)
    return mse / scale.clamp_min(1e-12) + (1 - cos).mean()


def heal(student: torch.nn.Module, teacher: torch.nn.Module, texts: Sequence[str], tokenizer: Any,
         config: HealConfig | None = None, *, show: bool = True) -> HealResult:
    """Distil `teacher` into `student` (in place) on `texts`; returns what happened."""
    cfg = config or HealConfig()
    if isinstance(texts, (str, bytes)) or not all(isinstance(t, str) for t in texts):
        raise DataError("healing data must be a list of texts", "pass a list of strings (one sample each)")
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2 * cfg.batch_size:
        raise DataError(f"healing needs at least {2 * cfg.batch_size} non-empty texts, got {len(texts)}",
                        "pass more samples, or a smaller batch size")
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(texts), generator=gen).tolist()
    n_held = max(cfg.batch_size, int(len(texts) * cfg.held_out))
    held = [texts[i] for i in order[:n_held]]
    train = [texts[i] for i in order[n_held:]]
    params = _trainable(student, cfg.train_norms)
    if not params:
        raise DataError("the student has no tngraph factorized layers to heal", "heal a model returned by tngraph.compress")
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    teacher.eval()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, cfg.steps - warm))))

    def encode(batch):
        return dict(tokenizer(batch, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"))

    held_batches = [encode(held[i : i + cfg.batch_size]) for i in range(0, len(held), cfg.batch_size)]
    with torch.no_grad():
        held_targets = [teacher(**b) for b in held_batches]

    def evaluate() -> float:
        with torch.no_grad():
            total = sum(float(_encoder_loss(student(**b), t, b["attention_mask"])) for b, t in zip(held_batches, held_targets))
        return total / len(held_batches)

    start = time.perf_counter()
    best = start_loss = evaluate()
    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    best_step, bad, history = 0, 0, [(0, start_loss)]
    # the student stays in eval mode: dropout would train it to match a function the teacher,
    # evaluated without dropout, does not compute
    student.eval()
    perm = torch.randperm(len(train), generator=gen).tolist()
    cursor = 0
    bar = progress(range(1, cfg.steps + 1), desc="heal", enabled=show, unit="step")
    step = 0
    for step in bar:
        if cursor + cfg.batch_size > len(perm):
            perm, cursor = torch.randperm(len(train), generator=gen).tolist(), 0
        batch = encode([train[i] for i in perm[cursor : cursor + cfg.batch_size]])
        cursor += cfg.batch_size
        with torch.no_grad():
            target = teacher(**batch)
        loss = _encoder_loss(student(**batch), target, batch["attention_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            value = evaluate()
            history.append((step, value))
            if value < best:
                best, best_step, bad = value, step, 0
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    log.info("heal: stopped early at step %d (best %.4f at step %d)", step, best, best_step)
                    break
    student.load_state_dict(best_state)
    for p in student.parameters():
        p.requires_grad_(False)
    seconds = time.perf_counter() - start
    log.info("heal: held-out loss %.4f -> %.4f (step %d of %d) in %.1fs", start_loss, best, best_step, step, seconds)
    return HealResult(step, start_loss, best, best_step, seconds, history)
