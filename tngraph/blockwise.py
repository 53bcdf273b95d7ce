"""Causal LMs larger than memory, compressed block by block: each decoder block's weights are read
from the safetensors shards when its turn comes, calibrated on the outputs of the already-compressed
blocks before it, factorized (activation-whitened SVD of q/k/v/o and gate/up/down), written to the
artifact and freed. Peak memory is about one block plus the calibration activations, whatever the
model's size; the token embedding is read in row chunks, the LM head not at all. tngraph.shards
reads the weights and loads the artifacts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from safetensors.torch import save_file

from .calibration import GramStats
from .errors import ConfigError, DataError, ModelError, PassError
from .modules import LowRankLinear
from .ownership import atomic_dir, check_output_dir
from .passes.allocate import solve_budget
from .passes.targets import is_selected
from .recipe import file_sha256, header, swap_module
from .shards import FAMILIES, LAYOUT, Shards, causal_lm_config, meta_model, rotary_embedding
from .tn.lowrank import decompose_lowrank, lowrank_params, rank_for_budget
from .tn.whitening import Whitening, whitening_from_gram

log = logging.getLogger(__name__)

BLOCK_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _return_freed_memory(first: bool = False) -> None:
    """Give freed heap memory back to the OS (glibc): without it the blocks' transient buffers
    (weights, Grams, SVD work arrays) stay resident and the peak grows with every block. The first
    call pins glibc's mmap threshold, so that large buffers are mapped and unmapped, not heaped."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        if first:
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, fixed
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        log.debug("malloc_trim is not available; freed memory stays with the allocator")


@dataclass
class BlockwiseResult:
    out: pathlib.Path
    blocks: int
    targets: int
    params_before: int
    params_after: int
    seconds: float
    calibration_tokens: int
    healed: list[tuple[float, float]] = field(default_factory=list)  # per healed block: held-out error before, after

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "blocks": self.blocks, "targets": self.targets, "params_before": self.params_before,
                "params_after": self.params_after, "kept": self.params_after / max(self.params_before, 1), "seconds": self.seconds,
                "calibration_tokens": self.calibration_tokens, "healed": [list(e) for e in self.healed]}


def calibration_ids(tokenizer: Any, texts: Sequence[str] | None, samples: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """(samples, length) token ids: the texts joined and cut into windows, or seeded random ids without a tokenizer."""
    if tokenizer is None or not texts:
        log.warning("calibrating on random token ids (no tokenizer or no text): fine for speed and memory, not for quality")
        return torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(seed))
    eos = getattr(tokenizer, "eos_token", None) or "\n"
    ids = tokenizer(eos.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = ids.numel() // length
    if windows < 1:
        raise DataError(f"calibration text holds {ids.numel()} tokens, fewer than one window of {length}", "give more text or a shorter --max-length")
    return ids[: min(windows, samples) * length].reshape(-1, length)


def _block_call(block: torch.nn.Module, hidden: torch.Tensor, rotary: torch.nn.Module) -> torch.Tensor:
    positions = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
    cos_sin = rotary(hidden, positions)
    out = block(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin, use_cache=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def heal_block(block: torch.nn.Module, hidden: list[torch.Tensor], teacher: list[torch.Tensor], rotary: torch.nn.Module,
               steps: int, lr: float, seed: int) -> tuple[float, float]:
    """Fine-tune the factors (a, b) of the block's LowRankLinear layers, everything else frozen, so
    that the block's outputs on the calibration inputs `hidden` match `teacher` (the dense model's):
    Adam on the relative squared error, `steps` steps over the batches but the last, which is held
    out (with one batch, nothing is). The factors with the lowest held-out error are kept, so the
    block never ends worse there than as decomposed. Returns that error before and after."""
    factors = [p for m in block.modules() if isinstance(m, LowRankLinear) for p in (m.a, m.b)]
    train = list(range(len(hidden) - 1)) or [0]
    check = len(hidden) - 1

    def error() -> float:
        with torch.no_grad():
            return float((_block_call(block, hidden[check], rotary) - teacher[check]).pow(2).sum() / teacher[check].pow(2).sum())

    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    start = best = error()
    kept = [p.detach().clone() for p in factors]
    order = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for p in factors:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(factors, lr=lr)
        every = max(1, steps // 10)
        for step in range(steps):
            k = train[int(torch.randint(len(train), (1,), generator=order))]
            loss = (_block_call(block, hidden[k], rotary) - teacher[k]).pow(2).sum() / teacher[k].pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % every == 0 or step + 1 == steps:
                now = error()
                if now < best:
                    best, kept = now, [p.detach().clone() for p in factors]
        del optimizer
    with torch.no_grad():
        for p, value in zip(factors, kept):
            p.copy_(value)
            p.requires_grad_(False)
    return start, best


def _blocks(n: int, show: bool) -> Iterator[int]:
    if not show:
        yield from range(n)
        return
    from tqdm.auto import tqdm

    yield from tqdm(range(n), desc="blocks", unit="block")


def compress_causal_lm(folder: str | os.PathLike, out: str | os.PathLike, *, budget: float = 0.5, texts: Sequence[str] | None = None,
                       tokenizer: Any = None, samples: int = 32, length: int = 128, batch_size: int = 4, damping: float = 1e-4,
                       seed: int = 0, force: bool = False, progress: bool = True, allocation: str = "budgeted",
                       heal_steps: int = 0, heal_lr: float = 1e-4, guard_tolerance: float | None = 1.0, strict: bool = False,
                       include: Sequence[str] = (), exclude: Sequence[str] = (), whiten: bool = True) -> BlockwiseResult:
    """Compress the causal LM in `folder` block by block into the artifact folder `out`.

    allocation "uniform": every projection at the budget's rank. "budgeted": per block, the ranks
    (or dense) that minimise the sum of the projections' relative output errors on the calibration
    inputs (the whitened spectra's discarded energy) with the block's parameters within the budget
    (the solver of the whole-graph pipeline's budgeted allocation).

    heal_steps > 0: each compressed block's factors are then fine-tuned (Adam, `heal_lr`) so that
    its outputs, on its inputs in the compressed model, match the dense model's hidden states after
    that block (carried beside the compressed ones: the block also makes up for the error of the
    blocks before it), before they are written and the next block calibrates on them (heal_block).
    Peak memory grows by the block's factors' gradients and Adam state and a second copy of the
    calibration activations.

    The numerical guard (guard_tolerance, as in the whole-graph pipeline): a target's relative output
    error on the calibration inputs, sqrt(tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)), is what its whitened spectrum
    leaves out past its rank. Budgeted allocation plans around it (a rank whose error exceeds the
    tolerance is no candidate, so the budget holds); with uniform ranks a target over it is an error
    naming it (keeping it dense would break the budget), as is any failure with `strict`. Truncated
    SVD never errs by more than 1 (the error of zeros), so the default tolerance 1.0 never fires.

    include / exclude: regular expressions over the projections' full names (model.layers.N.mlp.up_proj):
    only matching ones are targets, and never excluded ones; the others stay dense and out of the budget.
    whiten=False: plain truncated SVD (and plain spectra for the allocation)."""
    started = time.perf_counter()
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ConfigError(f"budget must be in (0, 1], got {budget!r}", "e.g. --budget 0.5")
    if allocation not in ("uniform", "budgeted"):
        raise ConfigError(f"allocation {allocation!r} is not available block by block", "use 'budgeted' or 'uniform'")
    if not (isinstance(heal_steps, int) and heal_steps >= 0) or not (heal_lr > 0):
        raise ConfigError(f"heal_steps must be an integer >= 0 and heal_lr positive, got {heal_steps!r}, {heal_lr!r}", "e.g. --heal-steps 100")
    if samples < 1 or length < 2 or batch_size < 1:
        raise ConfigError("calibration needs samples >= 1, length >= 2, batch size >= 1", "e.g. --calibration-samples 32")
    if guard_tolerance is not None and not (isinstance(guard_tolerance, (int, float)) and guard_tolerance > 0):
        raise ConfigError(f"guard_tolerance must be a positive number or None, got {guard_tolerance!r}", "e.g. --guard-tolerance 0.5")
    selected = _selector(include, exclude)
    src = pathlib.Path(folder).resolve()
    if causal_lm_config(src) is None:
        raise ModelError(f"{str(src)!r} is not a {'/'.join(FAMILIES)} causal LM folder", "pass a Hugging Face causal LM folder")
    rank, world = _dist()
    _agree(lambda: check_output_dir(out, force, keep=[src]), rank, world)  # every rank stops if the output is refused
    _return_freed_memory(first=True)
    shards = Shards(src)
    model = meta_model(src)
    rotary = rotary_embedding(model)
    if not any(selected(f"model.layers.{i}.{name}") for i in range(len(model.model.layers)) for name in BLOCK_TARGETS):
        raise ConfigError(f"no layer of the model is a target: --include/--exclude leave none of its {len(model.model.layers) * len(BLOCK_TARGETS)} "
                          "block projections", "loosen --include or --exclude (they match names like model.layers.0.mlp.up_proj)")
    ids = calibration_ids(tokenizer, texts, samples, length, model.config.vocab_size, seed)
    with torch.no_grad():
        embedded = shards.rows("model.embed_tokens.weight", ids).float()
    hidden = list(embedded.split(batch_size))
    # healing's targets: the dense model's hidden states, carried block by block beside the compressed ones
    dense_path = [h.clone() for h in hidden] if heal_steps else None
    del embedded
    entries, files, before, after = [], {}, 0, 0
    healed: list[tuple[float, float]] = []  # per healed block: held-out relative error before, after
    guard: dict[str, float] = {}  # per target: its relative output error on the calibration inputs (from its spectrum)
    writing = atomic_dir(out, force, keep=[src]) if rank == 0 else contextlib.nullcontext(None)  # rank 0 writes the artifact
    with writing as tmp, torch.no_grad():
        for i in _blocks(len(model.model.layers), progress):
            prefix = f"model.layers.{i}."
            block = model.model.layers[i]
            state = {k[len(prefix):]: v.float() for k, v in shards.get_many(shards.keys(prefix)).items()}
            block.load_state_dict(state, assign=True, strict=True)
            del state
            grams: dict[str, GramStats] = {}
            shared: dict[str, str] = {}  # target -> the target whose Gram it shares
            hooks = []
            for name in BLOCK_TARGETS:
                linear = block.get_submodule(name)

                def hook(module, args, name=name):
                    x = args[0]
                    if id(x) in seen:  # targets reading one input share one Gram (q/k/v, gate/up)
                        shared[name] = seen[id(x)][1]
                        return
                    seen[id(x)] = (x, name)  # the entry holds x, so no other tensor gets its id this batch
                    if name not in grams:
                        grams[name] = GramStats(x.shape[-1])
                    grams[name].update(x)

                hooks.append(linear.register_forward_pre_hook(hook))
            for h in hidden:
                seen: dict[int, tuple[torch.Tensor, str]] = {}
                _block_call(block, h, rotary)
            for h in hooks:
                h.remove()
            if dense_path is not None:  # the dense block on the dense model's inputs: what healing matches
                dense_path = [_block_call(block, h, rotary) for h in dense_path]
            del seen  # the last batch's inputs and products
            tensors = {}
            shapes = [(name, *block.get_submodule(name).weight.shape, block.get_submodule(name).bias is not None) for name in BLOCK_TARGETS]
            # torch.distributed: target j of the block (BLOCK_TARGETS order) is measured and decomposed by
            # rank j % world, its spectrum and factors broadcast
            owner = {name: j % world for j, name in enumerate(BLOCK_TARGETS)}
            whitenings: dict[str, Any] = {}

            def whitening(name: str) -> Any:  # of the input `name` reads, made once on this rank
                read = shared.get(name, name)
                if read not in whitenings:
                    gram = grams.pop(read).gram
                    whitenings[read] = whitening_from_gram(gram, damping) if whiten else Whitening(torch.eye(gram.shape[0], dtype=torch.float64), lower=True)
                return whitenings[read]

            shapes = [shape for shape in shapes if selected(prefix + shape[0])]  # the others stay dense, out of the budget
            spectra = {}
            if allocation == "budgeted" or (guard_tolerance is not None and guard_tolerance < 1):
                spectra = {name: _share(_spectrum(block.get_submodule(name).weight, whitening(name), prefix + name) if owner[name] == rank else None,
                                        (min(out_f, in_f),), src=owner[name], world=world, dtype=torch.float64)
                           for name, out_f, in_f, _ in shapes}
            if allocation == "budgeted":
                ranks = allocate_block(shapes, spectra, budget, guard_tolerance)
            else:
                ranks = {name: rank_for_budget(out_f, in_f, budget, has_bias) for name, out_f, in_f, has_bias in shapes}
            for name, out_f, in_f, has_bias in shapes:  # the guard: every substitution's error on the calibration inputs
                if ranks[name] is not None and name in spectra:
                    guard[prefix + name] = error = truncation_error(spectra[name], ranks[name])
                    if guard_tolerance is not None and error > guard_tolerance:
                        what = (f"{prefix}{name}: relative output error {error:.3g} on the calibration data at rank {ranks[name]} "
                                f"exceeds guard_tolerance {guard_tolerance:g}")
                        if strict:
                            raise PassError(what, "raise the budget or --guard-tolerance, --exclude the layer, or drop --strict")
                        raise ConfigError(f"{what}; with uniform ranks keeping it dense would break the budget",
                                          "use --allocation budgeted (the default block by block), which plans around the guard, "
                                          "or raise --guard-tolerance, or --exclude the layer")
            plans = []  # (name, out, in, bias, rank) of the targets factorized, the same on every rank
            for name, out_f, in_f, has_bias in shapes:
                dense = out_f * in_f + (out_f if has_bias else 0)
                rank_ = ranks[name]
                before += dense
                if rank_ is None or lowrank_params(out_f, in_f, rank_) + (out_f if has_bias else 0) >= dense:
                    after += dense
                else:
                    plans.append((name, out_f, in_f, has_bias, rank_))
                    after += lowrank_params(out_f, in_f, rank_) + (out_f if has_bias else 0)
            factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for k, (name, out_f, in_f, has_bias, rank_) in enumerate(plans):
                if owner[name] == rank:
                    factors[name] = _decompose(block.get_submodule(name).weight, rank_, whitening(name), prefix + name)
                    read = shared.get(name, name)
                    if not any(shared.get(p[0], p[0]) == read and owner[p[0]] == rank for p in plans[k + 1:]):
                        del whitenings[read]  # no later target of this rank reads this input
                _drop_weight(block.get_submodule(name))  # its factors replace it; the dense copy goes now, not at the block's end
            whitenings.clear()
            for name, out_f, in_f, has_bias, rank_ in plans:
                a, b = _broadcast(factors.get(name), (out_f, rank_), (rank_, in_f), src=owner[name], world=world)
                linear = block.get_submodule(name)
                swap_module(block, name, LowRankLinear(a, b, linear.bias.detach().clone() if has_bias else None))
            del factors
            if heal_steps and plans:
                errors = heal_block(block, hidden, dense_path, rotary, heal_steps, heal_lr, seed + i)
                healed.append(errors)
                log.info("block %d healed: relative output error %.4g -> %.4g (held-out batch)", i, *errors)
                for name, out_f, in_f, _, rank_ in plans:  # every rank keeps rank 0's factors (GPU reductions may differ)
                    module = block.get_submodule(name)
                    a, b = _broadcast((module.a.data, module.b.data), (out_f, rank_), (rank_, in_f), src=0, world=world)
                    module.a.data, module.b.data = a, b
            for name, out_f, in_f, has_bias, rank_ in plans:
                module = block.get_submodule(name)
                full = f"{prefix}{name}"
                tensors[f"{full}.a"], tensors[f"{full}.b"] = module.a.detach().contiguous(), module.b.detach().contiguous()
                entries.append({"name": full, "format": "lowrank", "rank": rank_, "in_features": in_f, "out_features": out_f,
                                "bias": has_bias, "factors": {"a": [out_f, rank_], "b": [rank_, in_f]}, "file": f"factors-{i:05d}.safetensors",
                                "error": guard.get(full)})
            hidden = [_block_call(block, h, rotary) for h in hidden]  # the next block calibrates on the compressed outputs
            file = f"factors-{i:05d}.safetensors"
            if tmp is not None:
                save_file(tensors, str(tmp / file), metadata={"format": "pt"})
                files[file] = {"sha256": file_sha256(tmp / file)}
            model.model.layers[i] = block.to("meta")  # freed
            del grams, tensors, block
            _return_freed_memory()
        recipe = header({"kind": "hf-causal", "path": str(src)}, shards.files_hash(), {"budget": budget, "allocation": allocation, "format": "lowrank", "whiten": whiten, "damping": damping,
                       "calibration_samples": int(ids.shape[0]), "guard_tolerance": guard_tolerance, "strict": strict,
                       "include": list(include), "exclude": list(exclude),
                       "max_length": length, "batch_size": batch_size, "seed": seed,
                       "heal": {"steps": heal_steps, "lr": heal_lr, "scope": "block"} if heal_steps else None},
            layout=LAYOUT) | {"targets": entries, "files": files}
        if tmp is not None:
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if world > 1:
        import torch.distributed as dist

        dist.barrier(group=_cpu_group())  # the artifact is in place before any rank returns
    result = BlockwiseResult(pathlib.Path(out), len(model.model.layers), len(entries), before, after, time.perf_counter() - started, int(ids.numel()),
                             healed)
    log.info("compressed %d blocks of %s: targets %d -> %d parameters in %.1f s", result.blocks, src, before, after, result.seconds)
    return result


def _drop_weight(linear: torch.nn.Module) -> None:
    with torch.device("meta"):
        linear.weight = torch.nn.Parameter(torch.empty(linear.weight.shape), requires_grad=False)


def _dist() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(check: Any, rank: int, world: int) -> None:
    """Run `check` on rank 0; with several ranks every one raises the error rank 0 got (no rank is left waiting)."""
    error = None
    if rank == 0:
        try:
            check()
        except Exception as exc:  # sent to the other ranks, then raised everywhere
            error = exc
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0, group=_cpu_group())
        error = box[0]
    if error is not None:
        raise error


def _broadcast(factors: tuple[torch.Tensor, torch.Tensor] | None, a_shape: tuple[int, int], b_shape: tuple[int, int], *,
               src: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = factors if factors is not None else (None, None)
    return _share(a, a_shape, src=src, world=world), _share(b, b_shape, src=src, world=world)


def init_distributed() -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group. Gloo, with or without CUDA: block by
    block works on the CPU, and NCCL broadcasts only CUDA tensors (a CPU tensor fails or hangs there)."""
    import datetime

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(minutes=30))
        log.info("torch.distributed: rank %d of %d (gloo)", dist.get_rank(), world)
    return _dist()


_GLOO: list[Any] = []  # the gloo group of a process group set up by the caller with another backend


def _cpu_group() -> Any:
    """The group the CPU tensors travel in: the default group when it is gloo, else (a caller's NCCL
    group) a gloo group over the same ranks, made once."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if not _GLOO:
        _GLOO.append(dist.new_group(backend="gloo"))
    return _GLOO[0]


def _check_finite(weight: torch.Tensor, name: str) -> None:
    if not torch.isfinite(weight).all():
        raise ModelError(f"the weight of {name} holds NaN or Inf values", "check the model's weights (the shard they come from may be corrupt)")


def _spectrum(weight: torch.Tensor, whitening: Any, name: str) -> torch.Tensor:
    """Squared singular values of W S (S the input whitening), descending, float64: what the
    whitened truncation at each rank leaves out is the sum of the rest."""
    _check_finite(weight, name)
    target = whitening.apply(weight.detach())
    m = target if target.shape[0] <= target.shape[1] else target.T
    gram = m @ m.T
    del target, m
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def _share(values: torch.Tensor | None, shape: Sequence[int], *, src: int, world: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rank `src`'s tensor on every rank (the others pass None and get one of `shape` and `dtype`)."""
    if world == 1:
        assert values is not None
        return values
    import torch.distributed as dist

    values = values.contiguous() if values is not None else torch.empty(tuple(shape), dtype=dtype)
    dist.broadcast(values, src=src, group=_cpu_group())
    return values


RANK_STEPS = 64  # candidate ranks per projection in budgeted allocation (and the budget's uniform rank)


def allocate_block(shapes: Sequence[tuple[str, int, int, bool]], spectra: dict[str, torch.Tensor], budget: float,
                   guard_tolerance: float | None = None) -> dict[str, int | None]:
    """Ranks (None: kept dense) for one block's projections (name, out, in, bias) with their
    parameters within `budget` of the block's, minimising the summed relative output error on the
    calibration inputs, err(r) = sum of the squared whitened singular values past r / their total.
    Candidates: RANK_STEPS ranks up to the largest that still saves parameters, the uniform rank,
    and dense (error 0). The uniform ranks are one feasible choice, so the result is never worse
    than them by this measure."""
    costs, losses, options = [], [], []
    for name, out_f, in_f, has_bias in shapes:
        bias = out_f if has_bias else 0
        dense = out_f * in_f + bias
        top = min(min(out_f, in_f), (dense - bias - 1) // (out_f + in_f))  # the largest rank with fewer parameters than dense
        ranks = sorted({max(1, round(top * i / RANK_STEPS)) for i in range(1, RANK_STEPS + 1)} | {rank_for_budget(out_f, in_f, budget, has_bias)}) \
            if top >= 1 else []
        ranks = [r for r in ranks if r <= top]
        energy = spectra[name].to(torch.float64)
        total = float(energy.sum())
        left = (total - torch.cumsum(energy, 0)).clamp_min(0)  # left[r - 1]: what rank r leaves out
        if guard_tolerance is not None:  # ranks the guard would refuse are no candidates
            ranks = [r for r in ranks if truncation_error(energy, r) <= guard_tolerance]
        costs.append([r * (out_f + in_f) + bias for r in ranks] + [dense])
        losses.append([float(left[r - 1]) / total if total > 0 else 0.0 for r in ranks] + [0.0])
        options.append([*ranks, None])
    if not shapes:
        return {}
    limit = budget * sum(c[-1] for c in costs)
    if sum(min(c) for c in costs) > limit:
        floor = {name: rank_for_budget(out_f, in_f, budget, has_bias) for name, out_f, in_f, has_bias in shapes}
        if guard_tolerance is not None and any(truncation_error(spectra[n], r) > guard_tolerance for n, r in floor.items()):
            raise ConfigError(f"budget {budget:g} cannot be met within guard_tolerance {guard_tolerance:g} in this block: "
                              "its projections need more parameters to keep their errors within the tolerance",
                              "raise the budget or --guard-tolerance, or --exclude some projections")
        return floor  # below rank 1 everywhere: the uniform path's rank-1 floor
    chosen = solve_budget(costs, losses, limit)
    return {shape[0]: opts[i] for shape, opts, i in zip(shapes, options, chosen)}


def truncation_error(energy: torch.Tensor, rank: int) -> float:
    """The relative output error of truncating to `rank` a layer whose whitened spectrum (squared
    singular values, descending) is `energy`: sqrt(what is left out / the total)."""
    energy = energy.to(torch.float64)
    total = float(energy.sum())
    return math.sqrt(max(float(energy[rank:].sum()), 0.0) / total) if total > 0 else 0.0


def _selector(include: Sequence[str], exclude: Sequence[str]) -> Any:
    """Whether a projection's full name is a target (passes.targets.is_selected), the patterns checked first."""
    import re

    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{flag} {pattern!r} is not a regular expression: {exc}", "fix the pattern") from None
    include, exclude = tuple(include), tuple(exclude)
    return lambda name: is_selected(name, include, exclude)


def _decompose(weight: torch.Tensor, rank: int, whitening: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_finite(weight, name)
    return decompose_lowrank(weight.detach().float(), rank, whitening, lean=True)


