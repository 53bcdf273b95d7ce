"""One frozen dataclass holds every option; unknown keys raise with the list of valid ones."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import ConfigError
from .tn import formats as format_registry

# "lowrank" (alias "svd"): x @ B.T @ A.T + b as two linears; then every format of the registry
# (tngraph/tn/formats/__init__.py): the tensor-network formats (one einsum each) and the formats of
# defined layers (tngraph.layers)
FORMATS = ("lowrank",) + tuple(name for name in format_registry.FORMATS if name != "svd")
MIXABLE = tuple(name for name, f in format_registry.FORMATS.items() if name != "svd" and f.layer is None)  # mixture's candidates
_ALIASES = {"svd": "lowrank"}
TARGET_KINDS = ("linear", "embedding")
ALLOCATIONS = ("auto", "uniform", "budgeted")
BUDGET_KINDS = ("params", "bytes", "latency")
SENSITIVITIES = ("spectral", "fisher", "predicted", "measured")
MLP_MODES = ("auto", "lowrank", "prune")
HEAL_SCOPES = ("auto", "model", "blocks")


FORMAT_CHOICES = tuple(_ALIASES) + FORMATS  # what --format accepts: the formats and their aliases
FORMAT_GROUP = "format options (defaults: tngraph.Config)"
FORMAT_HELP = ("svd (= lowrank, the whitened truncated SVD, default), " + ", ".join(f"{name} ({f.summary})" for name, f in
               format_registry.FORMATS.items() if name != "svd") + "; docs/formats.md compares them")


@dataclass(frozen=True)
class Flag:
    """The command-line flag of a Config field (its field metadata): the CLI builds its arguments from these.

    kind: "value" (--flag VALUE), "const" (--flag sets `const`), "bool" (--flag / --no-flag) or
    "append" (repeatable, a tuple of the values). default: the parser's value when the flag is not
    given (None: the field is left to Config, or to the driver's own defaults)."""

    name: str
    flag: str
    help: str
    kind: str = "value"
    type: Any = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    const: Any = None
    default: Any = None
    group: str | None = None


def option(default: Any, flag: str, help: str, *, kind: str = "value", type: Any = None, choices: tuple[str, ...] | None = None,
           metavar: str | None = None, const: Any = None, cli_default: Any = None, group: str | None = None, factory: Any = None) -> Any:
    """A Config field with its command-line flag in the field's metadata (see Flag)."""
    cli = {"flag": flag, "help": help, "kind": kind, "type": type, "choices": choices, "metavar": metavar, "const": const,
           "default": cli_default, "group": group}
    if factory is not None:
        return field(default_factory=factory, metadata={"cli": cli})
    return field(default=default, metadata={"cli": cli})


def check_device(spec: Any, what: str = "heal device") -> str:
    """`spec` if it names a device healing can ask for ("auto", or what torch.device parses: "cpu",
    "cuda", "cuda:1"); a ConfigError naming it otherwise. Whether the machine has it is resolve_device's."""
    if spec == "auto":
        return spec
    try:
        torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown {what} {spec!r}", "pass auto, cpu, cuda or cuda:N") from None
    return spec


def parse_budget(text: str) -> float:
    """The --budget flag's value: a number (its range is Config's check)."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"budget must be a number in (0, 1], got {text!r}") from None


def parse_steps(text: str) -> int | str:
    """The --heal-steps (tngraph heal --steps) value: "auto" or a whole number (its range is Config's check)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"heal steps must be auto or a whole number, got {text!r}") from None


@dataclass(frozen=True)
class Config:
    """Options of a tngraph run.

    budget: fraction of the targeted layers' parameters (weights and biases) that is kept, in (0, 1].
    format: factorization of every target (docs/formats.md compares them):
        "lowrank" (or "svd"): truncated SVD, x @ B.T @ A.T + b;
        "tucker": HOSVD (+ tucker_iters HOOI sweeps) of W reshaped to 2*tucker_modes ways;
        "tt": tensor-train matrix (MPO) with tt_cores cores, TT-SVD;
        "tr": tensor ring with tr_cores cores and closing rank tr_ring, TR-SVD (+ tr_als ALS sweeps);
        "cp": CP of W reshaped to 2*cp_modes ways, ALS (cp_max_iter sweeps, cp_tol, cp_time_limit s per layer);
        "kron": sum of Kronecker products A_r ⊗ B_r, A of kron_shape (rows, cols) or balanced;
        "monarch": block-diagonal · permutation · block-diagonal, monarch_blocks input blocks (or balanced);
        and the formats of defined layers (tngraph.layers), each registered in tngraph/tn/formats.
    targets: which layers are targets: ("linear",) or ("linear", "embedding") (embedding tables become
        a low-rank gather + linear; they also need an `include` pattern that admits them).
    allocation: "uniform" (every target keeps `budget` of its parameters), "budgeted" (ranks, or
        keeping a target dense, chosen per target to minimise the summed predicted loss with the
        targets' total within `budget`; low-rank format) or "auto" (the default: budgeted for the
        low-rank format, uniform for the tensor-network formats).
    budget_kind: what `budget` is a fraction of: "params" (parameters), "bytes" (weight bytes; factors
        keep the weight's dtype, so this differs from params when targets differ in dtype) or
        "latency" (the targets' summed time on this machine at latency_rows input rows, dense
        and low-rank chains timed per shape; budgeted allocation only; timings vary run to run).
    dense_rows: patch level for budgeted allocation: candidates that keep a target's most sensitive
        output rows (1, 4, 16 or 64 of them, by their share of the decomposition's Gauss-Newton
        error) dense and factorize the rest; chosen when that serves the budget better.
    mlp: "auto", "lowrank" or "prune": with "prune", every MLP block the graph holds (tngraph.passes.mlp: up
        projections -> elementwise ops -> down projection, nothing else reading the hidden values)
        is shrunk by whole hidden neurons, chosen greedily by their predicted cost with the down
        projection refitted by least squares on the calibration activations (tngraph.tn.prune).
        Budgeted allocation takes each block as one candidate curve (its neuron counts, the whole
        block's parameters, the error measured like the other targets') beside the other targets'
        ranks; uniform allocation keeps `budget` of every block and of every other target. Needs
        calibration data; not combined with bits, a latency budget or refine yet. "auto" (the
        default) is "prune" for a text encoder calibrated on texts with the low-rank format (measured
        better on the MiniLM, docs/formats.md) and "lowrank" otherwise (resolve_mlp; a causal LM
        measured better low rank).
    mixture: tensor-network formats (e.g. ("tucker", "tt", "tr"), as in Minima) whose candidates join
        the low-rank ones in budgeted allocation: each decomposed at 4 ranks per target and its
        error measured, so that a target takes whichever format serves the budget best
        (params and bytes budgets; each format's options apply).
    latency_rows: input rows (batch x sequence positions) a latency budget is timed at.
    sensitivity: the loss the budgeted allocation minimises: "spectral" (whitened singular-value
        tail, the layer's own relative error), "fisher" (the Gauss-Newton prediction of the model's
        output error from input and output-gradient statistics, no extra forward passes),
        "predicted" (the fisher curve corrected by the shipped convolutional predictor from
        patch-level spectra; trained on MiniLM-derived networks) or "measured" (the default: the
        curves rescaled by end-to-end errors measured per target; the best, and the slowest).
    sensitivity_rounds: measurements of "measured": the first around uniform ranks, each further one
        around the allocation the previous gave (and the rounds of `refine`).
    time_budget: seconds "measured" may take. Its forwards are timed on the first (the reference
        outputs) and counted before it starts; when they would take longer, the "fisher" curves
        (the "spectral" ones without output-gradient statistics) are used instead, with a logged
        warning and the prediction in the report's counters. 0: no limit. Block by block: per block.
    max_memory: GB the analysis statistics may bring the process to (tngraph.memory): the input
        Grams must fit beside what it holds, or the run is refused before the calibration forwards
        with the number it needs; output-gradient Grams that do not fit are kept diagonal, widest
        outputs first. 0 (default): the machine's physical memory.
    refine: after the curves (any sensitivity), measure end to end the `refine` candidates on either
        side of each target's allocated one, every other target at its allocation (dense with
        `bits`: quantization errors are small and add up), put the measured
        shares in the curves (the target's other candidates rescaled by the nearest measured ratio)
        and let the allocation solve again: a few forwards per target where the allocation decides,
        instead of "measured"'s dozens. 0 (default): off. Budgeted allocation only.
    refit: after decomposing, refit one core by closed-form least squares on the exact calibration
        Gram matrix (tensor-network formats; low-rank's whitened SVD is already optimal).
    whiten: activation-aware (SVD-LLM style) decomposition when calibration data exists.
    damping: relative diagonal damping of the calibration Gram matrix before its Cholesky factor.
    short_side: calibrate each whitened low-rank target on its short side. A target with fewer
        outputs than inputs (an MLP's down projection) keeps the Gram matrix of its outputs,
        W XᵀX Wᵀ, instead of XᵀX (tngraph.calibration.OutputGramStats); one with more outputs than
        inputs (gate and up projections) keeps its output-gradient statistics projected onto its
        inputs, Wᵀ G W, instead of G (ProjectedGradStats). The same decompositions, guard errors and
        spectra to rounding, for the smaller side's square in work and memory. Used only where
        every candidate is whitened low rank (no tensor-network format, mixture, dense rows,
        precisions or the predictor: see `short_side_used`); False: always XᵀX and G.
    output_whiten: also weight a low-rank target's output channels by the Gram matrix of the gradients
        of the model's end output there (Gauss-Newton / K-FAC: the decomposition minimises the
        predicted error of the model's output, not of the layer's); needs calibration data and one
        backward pass per batch used (fisher_batches).
    output_damping: least relative diagonal damping of that output-gradient Gram matrix (more is
        applied when few calibration samples estimated it: 0.25 x its size / samples).
    fisher_batches: how many calibration batches (spread over the set) the output-gradient
        statistics use.
    fuse: rewrite factor chains (and a following GELU/SiLU/ReLU) of the graph into tngraph ops
        (tngraph.ops: one Triton kernel on the GPU, the same torch ops on the CPU).
    guard_tolerance: the numerical guard (tngraph/passes/guard.py): a substitution whose relative
        output error on the calibration data, sqrt(tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)), exceeds this (or is not
        finite) is reverted and the target kept dense (logged, counted, in the report). 1.0, the
        default, is the error of replacing the layer by zeros; None turns the guard off.
    strict: make a guard failure an error instead of a revert.
    heal_steps: steps of the healing fine-tune that ends compress (distillation of the compressed
        model against the original on text, tngraph.heal, docs/healing.md; 0 turns it off). "auto"
        (the default): as many whole hundreds as about 5 minutes hold on the healing device, timed on
        the source model before the passes, at least 700 and at most 10,000 (tngraph.heal.auto_steps;
        the MiniLM on 2 CPU cores: 700, about 6 minutes); the number chosen is what the recipe and the
        report record. It needs texts: heal_data, else the text calibration data; without either it
        is skipped with a warning.
    heal_lr: peak AdamW learning rate of healing (None: 1e-4 for the whole model, 3e-4 block by block;
        tngraph.heal.HealConfig.rate).
    heal_scope: "model" (every block trains at once against the original's outputs) or "blocks"
        (each block trains on its own, in order, on the original block's outputs from the healed
        blocks' outputs; heal_steps steps per block); "auto": model in the whole-graph pipeline,
        blocks block by block (where only that is possible).
    heal_data: a UTF-8 text file, one sample per line, to heal on (default: the calibration texts;
        the CLI's built-in set heals on built-in texts outside the evaluation set mixed with other
        packages' docstrings, tngraph.data.healing_pool / healing_passages).
    heal_device: where the healing steps run (tngraph.heal.HealConfig.device): "auto" (a CUDA GPU
        when torch sees one and both models fit in its free memory, else the CPU), "cpu", "cuda",
        "cuda:N". Student and teacher go there for the steps and come back; the passes, evaluation
        and latency stay where the model is.
    include / exclude: regular expressions on target module paths (e.g. "encoder.layer.3.output.dense");
        a target must match one `include` pattern (when any are given) and no `exclude` pattern.
    calibration_samples / eval_samples: sizes of the built-in sentence sets (bundled MiniLM).
    calibration_mix: the share of the built-in calibration texts drawn from other packages' docstrings:
        a sentence encoder's sentences (tngraph.data.sentence_sets), a causal LM's passages
        (tngraph.data.healing_passages); with a calibration file, only its lines.
    batch_size / max_length: calibration batching and tokenisation.
    seed: seed of every random choice (data sets, latency inputs).
    dump_dir: write the readable graph after each pass that changed it (also TNGRAPH_DUMP=dir).
    check_graph: run graph.lint() after every pass.
    progress: show progress bars.
    """

    budget: float = option(0.5, "--budget", "fraction of the targets' parameters kept, in (0, 1] (default 0.5)",
                           type=parse_budget, cli_default=0.5)
    format: str = option("lowrank", "--format", FORMAT_HELP,
                         choices=FORMAT_CHOICES, metavar="FORMAT", cli_default="lowrank")
    tt_cores: int = option(2, "--tt-cores", "cores of the tt format (default 2)", type=int, group=FORMAT_GROUP)
    tucker_modes: int = option(2, "--tucker-modes", "modes per side of the tucker format (default 2)", type=int, group=FORMAT_GROUP)
    tucker_iters: int = option(0, "--tucker-iters", "HOOI sweeps after the HOSVD (default 0)", type=int, group=FORMAT_GROUP)
    tr_cores: int = option(3, "--tr-cores", "cores of the tr format (default 3)", type=int, group=FORMAT_GROUP)
    tr_ring: int = option(2, "--tr-ring", "closing rank of the tr format (default 2)", type=int, group=FORMAT_GROUP)
    tr_als: int = option(0, "--tr-als", "ALS sweeps refining the tensor ring (default 0)", type=int, group=FORMAT_GROUP)
    cp_modes: int = option(2, "--cp-modes", "modes per side of the cp format (default 2)", type=int, group=FORMAT_GROUP)
    cp_max_iter: int = option(200, "--cp-max-iter", "most ALS sweeps per layer (default 200)", type=int, group=FORMAT_GROUP)
    cp_tol: float = option(1e-2, "--cp-tol", "stop when a sweep improves the error by less than this fraction (default 0.01)",
                           type=float, group=FORMAT_GROUP)
    cp_time_limit: float = option(120.0, "--cp-time-limit", "seconds of ALS per layer (default 120)", type=float, group=FORMAT_GROUP)
    kron_shape: tuple[int, int] | None = option(None, "--kron-shape", "shape of the first Kronecker factor, e.g. 16x16 (default balanced)",
                                                metavar="RxC", group=FORMAT_GROUP)
    monarch_blocks: int | None = option(None, "--monarch-blocks", "input blocks of the monarch format (default balanced)", type=int,
                                        group=FORMAT_GROUP)
    targets: tuple[str, ...] = option(("linear",), "--targets", "linear (default) or linear,embedding (embedding tables too)",
                                      metavar="KINDS")
    allocation: str = option("auto", "--allocation", "budgeted: ranks per target from sensitivity curves, total within --budget; "
                             "uniform: the same fraction per target; auto (default): budgeted for svd, uniform for the tensor-network "
                             "formats; block by block, budgeted ranks come from each block's whitened spectra", choices=ALLOCATIONS)
    budget_kind: str = option("auto", "--budget-kind", "what --budget is a fraction of: params, bytes (weight bytes) or "
                              "latency (budgeted only); auto (default): bytes with --bits, else params", choices=("auto",) + BUDGET_KINDS)
    dense_rows: bool = option(False, "--dense-rows", "patch level (budgeted): let a target keep its most sensitive output rows dense",
                              kind="bool")
    mixture: tuple[str, ...] = option((), "--mixture", "tensor-network formats whose candidates join budgeted allocation, "
                                      "e.g. tucker,tt,tr", metavar="FMT[,FMT]")
    bits: tuple[int, ...] = option((), "--bits", "precisions a target may be stored in (of 16, 8, 4, 2), e.g. 16,8,4: quantized "
                                   "candidates (error-feedback codes, with or without a low-rank correction) join budgeted "
                                   "allocation under a byte budget", metavar="B[,B]")
    act_bits: int = option(0, "--act-bits", "8: 8-bit per-channel targets run int8 x int8 on the CPU, each input row quantized on the "
                           "fly; 0 (default): weight-only (dequantize, float GEMM)", type=int, choices=(0, 8))
    latency_rows: int = option(4096, "--latency-rows", "input rows a latency budget is timed at (default 4096)", type=int)
    sensitivity: str = option("measured", "--sensitivity", "loss the budgeted allocation minimises (default measured)",
                              choices=SENSITIVITIES)
    sensitivity_rounds: int = option(1, "--sensitivity-rounds", "measurements: around uniform ranks, then around each allocation found "
                                     "(default 1)", type=int)
    time_budget: float = option(1800.0, "--time-budget", "seconds the measured sensitivity may take: when the forwards it needs, "
                                "timed on the first, would take longer, the fisher sensitivity is used instead, said in the log "
                                "(default 1800; 0: no limit)", type=float, metavar="SECONDS")
    max_memory: float = option(0.0, "--max-memory", "GB the analysis statistics may bring the process to: wide output-gradient "
                               "statistics are kept diagonal to stay within it, or the run is refused before the long work with the "
                               "number it needs (default 0: the machine's physical memory)", type=float, metavar="GB")
    refine: int = option(0, "--refine", "measure end to end the N candidates on either side of each target's allocation (the others "
                         "at theirs, or dense with --bits) and allocate again; e.g. --sensitivity fisher --refine 2 (default 0: off)",
                         type=int, metavar="N")
    refit: bool = option(True, "--no-refit", "skip the least-squares refit of one core on the calibration data", kind="const", const=False)
    whiten: bool = option(True, "--no-whiten", "plain (data-free) SVD instead of activation-whitened SVD", kind="const", const=False)
    damping: float = 1e-4
    short_side: bool = True
    output_whiten: bool = option(True, "--no-output-whiten", "whiten inputs only: skip the output-gradient (fisher) weighting of "
                                 "low-rank decompositions", kind="const", const=False)
    output_damping: float = 0.1
    fisher_batches: int = option(64, "--fisher-batches", "calibration batches of the output-gradient statistics (default 64)", type=int)
    fuse: bool = True
    guard_tolerance: float | None = option(1.0, "--guard-tolerance", "keep a target dense when its relative output error on the "
                                           "calibration data exceeds E (default 1.0)", type=float, metavar="E")
    strict: bool = option(False, "--strict", "make a target failing the numerical guard an error instead of keeping it dense",
                          kind="const", const=True)
    heal_steps: int | str = option("auto", "--heal-steps", "steps of the healing fine-tune (distillation against the original; 0 "
                                   "turns it off in compress); auto (default): as many hundreds as about 5 minutes hold on the healing device, "
                                   "timed on the source model, 700 to 10,000 (700 for the MiniLM on 2 CPU cores; docs/healing.md)",
                                   type=parse_steps, metavar="N|auto")
    heal_lr: float | None = option(None, "--heal-lr", "peak learning rate of healing (default 1e-4 for the whole model, 3e-4 "
                                   "block by block)", type=float, metavar="LR")
    heal_scope: str = option("auto", "--heal-scope", "what each healing step trains against the original: the whole model "
                             "(model: --heal-steps steps of every block at once, matched at every block's output and the "
                             "embedding) or one block at a time (blocks: --heal-steps steps per block, from the healed blocks' "
                             "outputs, on the teacher's block outputs); auto (default): model, and blocks in the block-by-block "
                             "path (docs/healing.md)", choices=HEAL_SCOPES)
    heal_data: str | None = option(None, "--heal-data", "text to heal on, one sample per line (default: built-in texts outside "
                                   "the evaluation set mixed with other packages' docstrings, or the --calibration file)", metavar="FILE")
    heal_device: str = option("auto", "--heal-device", "where the healing steps run: auto (default: a CUDA GPU when torch sees one "
                              "and the models fit in its free memory, else the CPU), cpu, cuda or cuda:N; the passes and the "
                              "report's timings stay on the CPU", metavar="DEVICE")
    include: tuple[str, ...] = option((), "--include", "target only module paths matching REGEX (repeatable)", kind="append",
                                      metavar="REGEX")
    exclude: tuple[str, ...] = option((), "--exclude", "never target module paths matching REGEX (repeatable)", kind="append",
                                      metavar="REGEX")
    calibration_samples: int = option(2048, "--calibration-samples", "calibration samples used (default 2048)", type=int)
    calibration_mix: float = option(0.5, "--calibration-mix", "share of the built-in calibration texts (an encoder's sentences, a "
                                    "causal LM's passages) taken from other packages' docstrings, spread among the standard "
                                    "library's (default 0.5; 0: the standard library's alone; docs/healing.md)", type=float, metavar="SHARE")
    mlp: str = option("auto", "--mlp", "how MLP blocks (up -> activation -> down, gated ones too) are compressed: lowrank "
                      "(each linear a target of its own), prune (whole hidden neurons dropped, the down projection refitted; "
                      "budgeted allocation chooses each block's neuron count beside the other targets' ranks, uniform keeps "
                      "--budget of every block) or auto (default: prune for a text encoder calibrated on texts with the low-rank "
                      "format, lowrank otherwise; docs/formats.md)", choices=MLP_MODES)
    eval_samples: int = option(2000, "--eval-samples", "held-out sentences for the agreement report (default 2000)", type=int,
                               cli_default=2000)
    batch_size: int = 32
    max_length: int = 128
    seed: int = option(0, "--seed", "seed of data sets and latency inputs (default 0)", type=int, cli_default=0)
    dump_dir: str | None = option(None, "--dump", "write the graph after each pass to DIR (as TNGRAPH_DUMP=DIR)", metavar="DIR",
                                  factory=lambda: os.environ.get("TNGRAPH_DUMP") or None)
    check_graph: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check_number("budget", self.budget, low=0.0, high=1.0, low_open=True)
        _check_number("time_budget", self.time_budget, low=0.0, high=float("inf"))
        _check_number("max_memory", self.max_memory, low=0.0, high=float("inf"))
        object.__setattr__(self, "format", _ALIASES.get(self.format, self.format))
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}", f"choose one of {', '.join(FORMATS)}")
        _check_number("damping", self.damping, low=0.0, high=1.0)
        _check_number("output_damping", self.output_damping, low=0.0, high=100.0)
        for name, low, high in (("tt_cores", 2, 6), ("tucker_modes", 1, 6), ("tr_cores", 2, 6), ("cp_modes", 1, 6),
                                ("tucker_iters", 0, 100), ("tr_ring", 1, 64), ("tr_als", 0, 100), ("cp_max_iter", 1, 10_000), ("sensitivity_rounds", 1, 10), ("refine", 0, 64), ("fisher_batches", 1, 1 << 20)):
            _check_int(name, getattr(self, name), low, high)
        _check_number("cp_tol", self.cp_tol, low=0.0, high=1.0)
        if self.guard_tolerance is not None:
            _check_number("guard_tolerance", self.guard_tolerance, low=0.0, high=1e6, low_open=True)
        if not isinstance(self.strict, bool):
            raise ConfigError(f"strict must be True or False, got {self.strict!r}")
        _check_number("calibration_mix", self.calibration_mix, low=0.0, high=1.0)
        self._check_healing()
        self._check_precision()
        for name, allowed in (("allocation", ALLOCATIONS), ("sensitivity", SENSITIVITIES), ("budget_kind", BUDGET_KINDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}", f"choose one of {', '.join(allowed)}")
        if self.refine and self.allocation_kind != "budgeted":
            raise ConfigError(f"refine={self.refine} measures around a budgeted allocation; allocation {self.allocation!r} has none",
                              "pass allocation='budgeted' (or auto with format='svd'), or refine=0")
        if self.budget_kind == "latency" and self.allocation_kind != "budgeted":
            raise ConfigError("budget_kind='latency' needs allocation='budgeted' (uniform keeps a fraction of each target's parameters)",
                              "pass allocation='budgeted', or budget_kind='params'")
        _check_number("cp_time_limit", self.cp_time_limit, low=0.0, high=1e6, low_open=True)
        if self.kron_shape is not None:
            shape = self.kron_shape
            if isinstance(shape, str):  # "16x16"
                parts = shape.lower().split("x")
                shape = tuple(int(v) for v in parts) if all(v.isdigit() for v in parts) else ()
            if not isinstance(shape, (tuple, list)) or len(shape) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
                raise ConfigError(f"kron_shape must be two positive integers (rows, cols of A), got {self.kron_shape!r}", "e.g. kron_shape=(16, 16) or \"16x16\"")
            object.__setattr__(self, "kron_shape", tuple(shape))
        if self.monarch_blocks is not None:
            _check_int("monarch_blocks", self.monarch_blocks, 1, 1 << 20)
        mixture = _names(self.mixture, "mixture")
        bad = [f for f in mixture if f not in MIXABLE]
        if bad:
            raise ConfigError(f"unknown mixture format {bad[0]!r}", f"mixture lists tensor-network formats: {', '.join(MIXABLE)}")
        if self.mlp not in MLP_MODES:
            raise ConfigError(f"unknown mlp mode {self.mlp!r}", f"choose one of {', '.join(MLP_MODES)}")
        what = self.prune_excluded_by
        if self.mlp == "prune" and what:
            raise ConfigError(f"mlp='prune' does not combine with {what} yet (pruned blocks have no quantized, timed, data-free "
                              "or refined candidates)", f"pass mlp='lowrank', or drop {what}")
        if mixture and self.allocation_kind != "budgeted":
            raise ConfigError("mixture formats are chosen by the budgeted allocation", "pass allocation='budgeted' (and format='svd') with mixture")
        if mixture and self.budget_kind == "latency":
            raise ConfigError("mixture formats have no latency model yet", "use budget_kind='params' or 'bytes' with mixture")
        object.__setattr__(self, "mixture", mixture)
        kinds = _names(self.targets, "targets")
        bad = [k for k in kinds if k not in TARGET_KINDS]
        if bad or not kinds:
            raise ConfigError(f"unknown target kind {bad[0] if bad else ''!r}", f"targets is a list drawn from {', '.join(TARGET_KINDS)}")
        object.__setattr__(self, "targets", kinds)
        for name in ("calibration_samples", "eval_samples", "batch_size", "max_length", "latency_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            patterns = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (tuple, list)) else None
            if patterns is None or not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"{name} must be a tuple of regular expressions, got {value!r}")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{name} pattern {pattern!r} is not a regular expression: {exc}",
                                      "escape special characters, e.g. encoder\\.layer\\.0") from None
            object.__setattr__(self, name, patterns)

    def _check_precision(self) -> None:
        """bits as a sorted tuple of offered widths; budget_kind auto resolved (bytes with bits); the
        combinations that cannot hold refused by name."""
        from .tn.quant import LAYER_BITS

        raw = self.bits
        items = tuple(p for item in ((raw,) if isinstance(raw, (str, int)) else tuple(raw) if isinstance(raw, (tuple, list)) else (None,))
                      for p in (str(item).split(",") if isinstance(item, str) else (item,)) if str(p).strip())
        try:
            bits = tuple(sorted({int(str(b).strip()) for b in items if not isinstance(b, bool)}, reverse=True))
        except ValueError:
            bits = (None,)
        if None in bits or any(b not in LAYER_BITS for b in bits):
            raise ConfigError(f"bits must list precisions of {', '.join(map(str, LAYER_BITS))}, got {raw!r}", 'e.g. bits=(16, 8, 4) or --bits 16,8,4')
        object.__setattr__(self, "bits", bits)
        if self.budget_kind == "auto":
            object.__setattr__(self, "budget_kind", "bytes" if bits else "params")
        if self.act_bits not in (0, 8):
            raise ConfigError(f"act_bits must be 0 (weight-only) or 8, got {self.act_bits!r}")
        if not bits:
            return
        if self.budget_kind != "bytes":
            raise ConfigError(f"bits are allocated under a byte budget, not budget_kind={self.budget_kind!r}",
                              "pass budget_kind='bytes' (or leave it auto) with bits")
        if self.format != "lowrank" or self.allocation == "uniform":
            raise ConfigError("bits are chosen per target by the budgeted allocation of the low-rank format",
                              "use format='svd' with allocation='budgeted' (or auto) when passing bits")

    @property
    def short_side_used(self) -> bool:
        """Whether this config calibrates targets on their short side (`short_side`): only where every
        candidate is whitened low rank; the tensor-network formats, mixtures, dense rows, precisions
        and the predictor read XᵀX, G or the whitened weight itself."""
        return (self.short_side and self.whiten and self.format == "lowrank" and not self.mixture and not self.dense_rows
                and not self.bits and self.sensitivity != "predicted")

    def _check_healing(self) -> None:
        steps = self.heal_steps
        if steps != "auto" and (isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 1 << 30):
            raise ConfigError(f"heal_steps must be auto or a whole number in [0, {1 << 30}], got {steps!r}")
        if self.heal_lr is not None:
            _check_number("heal_lr", self.heal_lr, low=0.0, high=1.0, low_open=True)
        if self.heal_scope not in HEAL_SCOPES:
            raise ConfigError(f"unknown heal_scope {self.heal_scope!r}", f"choose one of {', '.join(HEAL_SCOPES)}")
        check_device(self.heal_device, "heal_device")
        if self.heal_data is not None and not isinstance(self.heal_data, str):
            raise ConfigError(f"heal_data must be the path of a text file, got {type(self.heal_data).__name__}",
                              "pass a path, or the texts themselves to compress(..., heal_texts=[...])")

    @property
    def prune_excluded_by(self) -> str | None:
        """The option that rules out pruned MLP blocks (they have no quantized, timed, data-free or
        refined candidates yet), or None."""
        return ("bits" if self.bits else "budget_kind='latency'" if self.budget_kind == "latency" else "whiten=False" if not self.whiten
                else "refine" if self.refine else None)

    def resolve_mlp(self, text_encoder: bool) -> "Config":
        """This config with mlp='auto' made concrete: "prune" for a text encoder (a sentence encoder or
        classifier, not a causal LM) calibrated on texts, when the format is the low-rank one without
        a mixture and no other option rules pruning out (prune_excluded_by); "lowrank" otherwise
        (causal LMs, where pruning measured worse; models of tensor inputs, not measured yet)."""
        if self.mlp != "auto":
            return self
        prune = text_encoder and self.format == "lowrank" and not self.mixture and self.prune_excluded_by is None
        return self.replace(mlp="prune" if prune else "lowrank")

    @property
    def allocation_kind(self) -> str:
        """The allocation this config runs: "auto" is "budgeted" for the low-rank format (the only
        one with sensitivity curves so far) and "uniform" for the tensor-network formats."""
        if self.allocation != "auto":
            return self.allocation
        return "budgeted" if self.format == "lowrank" else "uniform"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **overrides: Any) -> "Config":
        """Build a Config from a mapping (a recipe file, torch.compile options) plus keyword overrides."""
        merged = {**(options or {}), **overrides}
        return cls(**merged)

    def replace(self, **changes: Any) -> "Config":
        _reject_unknown(changes)
        if "bits" in changes and "budget_kind" not in changes and self.budget_kind == ("bytes" if self.bits else "params"):
            changes["budget_kind"] = "auto"  # what auto resolved to before: resolved again for the new bits
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flags() -> list[Flag]:
    """The command-line flags of Config's fields, in field order."""
    return [Flag(name=f.name, **f.metadata["cli"]) for f in dataclasses.fields(Config) if "cli" in f.metadata]


def flag_of(name: str) -> str:
    """The command-line flag of Config field `name` (its --name spelling when it has none)."""
    return next((f.flag for f in flags() if f.name == name), "--" + name.replace("_", "-"))


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _reject_unknown(options: Mapping[str, Any]) -> None:
    valid = valid_keys()
    unknown = [key for key in options if key not in valid]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown option {key!r}", f"{hint}valid options: {', '.join(valid)}")


def _names(value: Any, field: str = "option") -> tuple[str, ...]:
    """A name list given as a string ("a,b"), or a sequence of such strings, as unique stripped names in order."""
    items = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (tuple, list)) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{field} must be a name or a list of names, got {value!r}", 'e.g. "linear,embedding" or ("tucker", "tt")')
    return tuple(dict.fromkeys(name.strip() for item in items for name in item.split(",") if name.strip()))


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_number(name: str, value: Any, *, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    bad_low = value <= low if low_open else value < low
    if bad_low or value > high or value != value:
        interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ConfigError(f"{name} must lie in {interval}, got {value!r}")


_dataclass_init = Config.__init__


def _checked_init(self: Config, *args: Any, **kwargs: Any) -> None:
    _reject_unknown(kwargs)
    _dataclass_init(self, *args, **kwargs)


Config.__init__ = _checked_init  # type: ignore[method-assign]
