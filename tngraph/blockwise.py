"""The block-by-block driver: causal LMs larger than memory, compressed one decoder block at a time.

Each block's weights are read from the safetensors shards when its turn comes (tngraph.shards), the
block is captured as a graph on its calibration inputs (the outputs of the already-compressed blocks
before it) and streamed through the same passes as the whole-graph driver (tngraph.api): targets,
calibrate, fisher, sensitivity, allocate, factorize with its guard. Their plans are swapped into the
block, which may then be healed (heal_block), is written to the artifact and freed. The budget is
solved per block. Peak memory is about one block plus the calibration activations, whatever the
model's size; the token embedding is read in row chunks, the LM head not at all.

Every Config option means here what it means for the whole graph, or is refused by name
(UNSUPPORTED). torch.distributed ranks share the per-target work of the passes (tngraph.distributed).
"""
from __future__ import annotations

import collections
import contextlib
import gc
import json
import logging
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import save_file

from . import distributed, memory
from .capture import capture
from .config import Config, flag_of
from .errors import ConfigError, DataError, ModelError, TngraphError
from .heal import peak_rate
from .ownership import atomic_dir, check_output_dir
from .passes import PIPELINE, PassContext
from .passes.targets import is_selected
from .pipeline import run_passes
from .recipe import FACTORIZED, apply_plan, config_record, factor_tensors, file_sha256, header
from .shards import FAMILIES, LAYOUT, Shards, causal_lm_config, meta_model, rotary_embedding

log = logging.getLogger(__name__)

BLOCK_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# the passes a block goes through: the whole-graph pipeline up to the plans (fuse rewrites the graph
# for lowering; the block keeps its plans as modules, as compress() does)
BLOCK_PIPELINE = [p for p in PIPELINE if p.__name__ != "fuse"]
# what block by block does unless told otherwise: the defaults of the block-by-block path before it
# ran the passes (spectral curves without output whitening: no gradient pass per block)
DEFAULTS = {"sensitivity": "spectral", "output_whiten": False, "heal_steps": 0, "calibration_samples": 32, "batch_size": 4}
# Config options block by block cannot honour, with why and what to do instead: the one place they are refused
UNSUPPORTED = {
    "targets": (lambda c: c.targets != ("linear",), "the decoder blocks hold the targets; embeddings and the head stay dense",
                "leave --targets out, or pass --no-blockwise (the whole-graph pipeline) when the model fits in memory"),
    "bits": (lambda c: bool(c.bits), "precision candidates are allocated over the whole graph's byte budget; the sharded "
             "block-by-block layout stores low-rank factors only so far",
             "leave --bits out, or pass --no-blockwise (the whole-graph pipeline) when the model fits in memory"),
    "mlp": (lambda c: c.mlp == "prune", "the sharded block-by-block layout stores low-rank factors of unchanged shapes; a pruned "
            "MLP block changes its layers' shapes", "leave --mlp out, or pass --no-blockwise (the whole-graph pipeline) when the model fits in memory"),
    "heal_scope": (lambda c: c.heal_scope == "model", "each block heals on its own, as it is compressed: the whole model is "
                   "never in memory at once", "leave --heal-scope out, or pass --no-blockwise when the model fits in memory"),
    "heal_device": (lambda c: c.heal_device not in ("auto", "cpu"), "each block heals on the CPU, beside its compression",
                    "leave --heal-device out, or pass --no-blockwise when the model fits in memory"),
    "heal_steps": (lambda c: c.heal_steps == "auto", "each block heals the number of steps given, on the CPU beside its "
                   "compression: auto times the whole model's steps", "pass --heal-steps N (steps per block), leave it out "
                   "(no healing), or pass --no-blockwise when the model fits in memory"),
    "heal_data": (lambda c: c.heal_data is not None, "blocks are healed on their calibration inputs, not on text",
                  "leave --heal-data out (--heal-steps heals each block), or pass --no-blockwise when the model fits in memory"),
}


def blockwise_config(config: Config | None = None, **options: Any) -> Config:
    """The Config of a block-by-block run: `config` (else DEFAULTS) with `options`, an option the
    driver cannot honour refused by name (UNSUPPORTED)."""
    base = config if config is not None else Config(**DEFAULTS)
    config = base.replace(**options) if options else base
    for name, (refused, why, fix) in UNSUPPORTED.items():
        if refused(config):
            raise ConfigError(f"{flag_of(name)} ({name}) is not available for block-by-block compression: {why}", fix)
    return config.resolve_mlp(text_encoder=False)  # decoder blocks: mlp="auto" is low rank


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
    counters: dict[str, int] = field(default_factory=dict)  # the passes' counters, summed over the blocks

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "blocks": self.blocks, "targets": self.targets, "params_before": self.params_before,
                "params_after": self.params_after, "kept": self.params_after / max(self.params_before, 1), "seconds": self.seconds,
                "calibration_tokens": self.calibration_tokens, "healed": [list(e) for e in self.healed],
                "counters": dict(sorted(self.counters.items()))}


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


class BlockModule(torch.nn.Module):
    """Decoder block `index` where it sits in the model (model.layers.N), with the rotary embedding:
    captured, its targets carry their full names, so include/exclude and the recipe see those."""

    def __init__(self, index: int, block: torch.nn.Module, rotary: torch.nn.Module):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleDict({str(index): block})
        self.index, self.rotary = str(index), rotary

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _block_call(self.model.layers[self.index], hidden, self.rotary)


def heal_block(block: torch.nn.Module, hidden: list[torch.Tensor], teacher: list[torch.Tensor], rotary: torch.nn.Module,
               steps: int, lr: float, seed: int) -> tuple[float, float]:
    """Fine-tune the factors of the block's factorized layers, everything else frozen, so that the
    block's outputs on the calibration inputs `hidden` match `teacher` (the dense model's): Adam on
    the relative squared error, `steps` steps over the batches but the last, which is held out (with
    one batch, nothing is). The factors with the lowest held-out error are kept, so the block never
    ends worse there than as decomposed. Returns that error before and after."""
    factors = [p for m in block.modules() if isinstance(m, FACTORIZED) for n, p in m.named_parameters() if n != "bias"]
    train = list(range(len(hidden) - 1)) or [0]
    check = len(hidden) - 1

    def error() -> float:
        with torch.no_grad():
            return float((_block_call(block, hidden[check], rotary) - teacher[check]).pow(2).sum() / teacher[check].pow(2).sum())

    for p in block.parameters():
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


@contextlib.contextmanager
def _frozen_gc() -> Iterator[None]:
    """The objects alive before the blocks (the libraries, the model) left out of the garbage
    collections after each block (gc.freeze): those then scan only what the block made, a
    fraction of a second less per block."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def compress_causal_lm(folder: str | pathlib.Path, out: str | pathlib.Path, config: Config | None = None, *,
                       texts: Sequence[str] | None = None, tokenizer: Any = None, force: bool = False, **options: Any) -> BlockwiseResult:
    """Compress the causal LM in `folder` block by block into the artifact folder `out`.

    `config` (default: Config(**DEFAULTS)) and keyword `options` are Config's: every one means what
    it means for compress(), applied per block (the budget, the allocation and the guard over the
    block's targets, include/exclude over the full names model.layers.N.mlp.up_proj, the formats,
    the sensitivity kinds, dump_dir with a folder per block); UNSUPPORTED ones are refused by name.
    calibration_samples windows of max_length tokens of `texts` (seeded random ids without a
    tokenizer) are the calibration data, in batches of batch_size.

    heal_steps > 0: each compressed block's factors are then fine-tuned (Adam, heal_lr) so that its
    outputs, on its inputs in the compressed model, match the dense model's hidden states after that
    block (carried beside the compressed ones: the block also makes up for the error of the blocks
    before it), before they are written and the next block calibrates on them (heal_block)."""
    started = time.perf_counter()
    config = blockwise_config(config, **options)
    src = pathlib.Path(folder).resolve()
    if causal_lm_config(src) is None:
        raise ModelError(f"{str(src)!r} is not a {'/'.join(FAMILIES)} causal LM folder", "pass a Hugging Face causal LM folder")
    group = distributed.current()
    distributed.agree(lambda: check_output_dir(out, force, keep=[src]), group)  # every rank stops if the output is refused
    memory.return_freed(first=True)
    run = _Run(src, config, group)
    ids = calibration_ids(tokenizer, texts, config.calibration_samples, config.max_length, run.model.config.vocab_size, config.seed)
    with torch.no_grad():
        embedded = run.shards.rows("model.embed_tokens.weight", ids).float()
    hidden = list(embedded.split(config.batch_size))
    del embedded
    dense_path = [h.clone() for h in hidden] if config.heal_steps else None  # healing's targets, carried beside
    writing = atomic_dir(out, force, keep=[src]) if group.rank == 0 else contextlib.nullcontext(None)  # rank 0 writes
    with writing as tmp, torch.no_grad(), _frozen_gc():
        for i in _blocks(len(run.model.model.layers), config.progress):
            hidden, dense_path = run.block(i, hidden, dense_path, tmp)
        recipe = header({"kind": "hf-causal", "path": str(src)}, run.shards.files_hash(), run.config_record(int(ids.shape[0])),
                        layout=LAYOUT) | {"targets": run.entries, "files": run.files}
        if tmp is not None:
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    distributed.barrier(group)  # the artifact is in place before any rank returns
    result = BlockwiseResult(pathlib.Path(out), len(run.model.model.layers), len(run.entries), run.before, run.after,
                             time.perf_counter() - started, int(ids.numel()), run.healed, dict(run.counters))
    log.info("compressed %d blocks of %s: targets %d -> %d parameters in %.1f s", result.blocks, src, run.before, run.after, result.seconds)
    return result


@dataclass
class BlockPlans:
    """What the recipe keeps of a block's passes: its targets' recipe entries, guard errors and the counters."""

    entries: dict[str, dict[str, Any]]
    errors: dict[str, float]
    counters: dict[str, int]


class _Run:
    """One block-by-block compression: the lazily read model and what the blocks have produced so far."""

    def __init__(self, src: pathlib.Path, config: Config, group: distributed.Group):
        self.config, self.group = config, group
        self.heal_lr = peak_rate(config.heal_lr)  # each block heals at the whole model's rate
        self.shards = Shards(src)
        self.model = meta_model(src)
        self.rotary = rotary_embedding(self.model)
        self.entries: list[dict[str, Any]] = []
        self.files: dict[str, dict[str, str]] = {}
        self.before = self.after = 0
        self.healed: list[tuple[float, float]] = []  # per healed block: held-out relative error before, after
        self.counters: collections.Counter = collections.Counter()
        names = [f"model.layers.{i}.{n}" for i in range(len(self.model.model.layers)) for n in BLOCK_TARGETS]
        if not any(is_selected(n, config.include, config.exclude) for n in names):
            raise ConfigError(f"no layer of the model is a target: include {list(config.include)} / exclude {list(config.exclude)} "
                              f"leave none of its {len(names)} block projections",
                              "loosen include/exclude (they match names like model.layers.0.mlp.up_proj)")

    def config_record(self, windows: int) -> dict[str, Any]:
        record = config_record(self.config) | {"calibration_samples": windows, "allocation": self.config.allocation_kind}
        record["heal"] = {"steps": self.config.heal_steps, "lr": self.heal_lr, "scope": "block"} if self.config.heal_steps else None
        return record

    def load_block(self, i: int) -> torch.nn.Module:
        prefix = f"model.layers.{i}."
        block = self.model.model.layers[i]
        state = {k[len(prefix):]: v.float() for k, v in self.shards.get_many(self.shards.keys(prefix)).items()}
        for key, value in state.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                what = f"the weight of {prefix}{key.removesuffix('.weight')}" if key.endswith(".weight") else f"{prefix}{key}"
                raise ModelError(f"{what} holds NaN or Inf values", "check the model's weights (the shard they come from may be corrupt)")
        block.load_state_dict(state, assign=True, strict=True)
        return block

    def plan_block(self, i: int, block: torch.nn.Module, hidden: list[torch.Tensor]) -> BlockPlans:
        """The block captured on its calibration inputs and run through the passes, their plans
        swapped into it; what the recipe needs of the passes' context (the rest of it is let go here:
        its statistics are the largest thing a block holds)."""
        config = self.config.replace(progress=False)
        if config.dump_dir:
            config = config.replace(dump_dir=str(pathlib.Path(config.dump_dir) / f"block_{i:03d}"))
        holder = BlockModule(i, block, self.rotary)
        ctx = PassContext(config=config, calibration=[((h,), {}) for h in hidden], module_targets_only=True, group=self.group,
                          lean=True)
        try:
            run_passes(capture(holder, ((hidden[0],), {})), ctx, BLOCK_PIPELINE)
        except TngraphError as exc:  # which block, before where in it
            raise type(exc)(f"block {i}: {exc.problem}", exc.fix) from exc
        apply_plan(holder, ctx.plan.values())
        plans = BlockPlans({name: plan.recipe() for name, plan in ctx.plan.items()}, dict(ctx.analysis.get("guard", {})), dict(ctx.counters))
        del ctx
        memory.return_freed()
        return plans

    def block(self, i: int, hidden: list[torch.Tensor], dense_path: list[torch.Tensor] | None,
              tmp: pathlib.Path | None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        block = self.load_block(i)
        if dense_path is not None:  # the dense block on the dense model's inputs: what healing matches
            dense_path = [_block_call(block, h, self.rotary) for h in dense_path]
        plans = self.plan_block(i, block, hidden)
        self.counters.update(plans.counters)
        self.count(block, plans, i)
        if self.config.heal_steps and plans.entries:
            self.heal(i, block, hidden, dense_path)
        self.write(i, block, plans, tmp)
        hidden = [_block_call(block, h, self.rotary) for h in hidden]  # the next block calibrates on the compressed outputs
        self.model.model.layers[i] = block.to("meta")  # freed
        del block
        memory.return_freed()
        return hidden, dense_path

    def count(self, block: torch.nn.Module, plans: BlockPlans, i: int) -> None:
        for name in BLOCK_TARGETS:
            full = f"model.layers.{i}.{name}"
            if not is_selected(full, self.config.include, self.config.exclude):
                continue  # not a target: dense and out of the budget
            module = block.get_submodule(name)
            entry = plans.entries.get(full)
            after = sum(p.numel() for p in module.parameters() if p.is_floating_point())
            self.before += entry["out_features"] * entry["in_features"] + (entry["out_features"] if entry["bias"] else 0) if entry else after
            self.after += after

    def heal(self, i: int, block: torch.nn.Module, hidden: list[torch.Tensor], dense_path: list[torch.Tensor]) -> None:
        errors = heal_block(block, hidden, dense_path, self.rotary, self.config.heal_steps, self.heal_lr, self.config.seed + i)
        self.healed.append(errors)
        log.info("block %d healed: relative output error %.4g -> %.4g (held-out batch)", i, *errors)
        for module in (m for m in block.modules() if isinstance(m, FACTORIZED)):  # every rank keeps rank 0's factors
            for name, p in module.named_parameters():
                if name != "bias":
                    p.data = distributed.broadcast(p.data, 0, self.group)

    def write(self, i: int, block: torch.nn.Module, plans: BlockPlans, tmp: pathlib.Path | None) -> None:
        """The block's factors (as the block holds them now) into factors-NNNNN.safetensors, its entries into the recipe."""
        file = f"factors-{i:05d}.safetensors"
        tensors, prefix = {}, f"model.layers.{i}."
        for full, entry in sorted(plans.entries.items()):
            module = block.get_submodule(full[len(prefix):])
            for key, tensor in factor_tensors(module).items():
                tensors[f"{full}.{key}"] = tensor.contiguous()
            self.entries.append(entry | {"file": file, "error": plans.errors.get(full)})
        if tmp is not None:
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            self.files[file] = {"sha256": file_sha256(tmp / file)}
