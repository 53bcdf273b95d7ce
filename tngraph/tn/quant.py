"""Weight quantizers: the precision half of a plan (issue 25's foundation).

A weight W (out x in) is stored as integer codes of `bits` bits with one scale (and, below 8 bits,
one zero point) per output channel or per group of `group` consecutive input columns:

    W ~= scale * (codes - zero)           codes in [0, 2^bits - 1] (asymmetric, bits < 8)
    W ~= scale * codes                    codes in [-(2^(bits-1) - 1), 2^(bits-1) - 1] (symmetric, 8 bits)

Three ways to choose the codes, each measured in the error the rest of tngraph uses, the output
error over the calibration data ||(W - W') S||^2 with S S^T = X^T X (the calibrate pass's Gram):

- `rtn`: round to nearest (each scale from the group's range);
- `gptq`: error feedback in column order (Frantar et al., 2022, GPTQ): each column is rounded and its
  rounding error pushed onto the columns not yet rounded through the inverse Gram, so later columns
  absorb what earlier ones lost;
- `compensated`: W ~= deq(Q(W - L)) + L with L = A B the whitened rank-r part of the residual
  (LQER / CALDERA style: a small rank absorbs the quantization error), refit in turns: L from the
  residual of Q, then Q of W - L, keeping the best;
- `factored`: W ~= deq(Qa) deq(Qb), the whitened rank-r factors themselves quantized (Dobi-SVD /
  quantized-factor style), with error feedback between them: B is quantized first on X^T X, A is
  refit to the quantized B (least squares in the output error), then quantized on the Gram of
  x B'^T.

Bits 16 is fp16 storage (a cast). Bits offered: 16, 8, 4, 3, 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .lowrank import decompose_lowrank
from .whitening import whitening_from_gram

BITS = (16, 8, 4, 3, 2)


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is stored: `bits` per value, scales per output channel (group None) or per
    `group` consecutive input columns."""

    bits: int
    group: int | None = None

    def check(self, shape: tuple[int, ...]) -> None:
        """A ValueError naming what is wrong and the fix."""
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits {self.bits!r} is not offered; choose one of {', '.join(map(str, BITS))}")
        if len(shape) != 2:
            raise ValueError(f"quantization takes a matrix (out x in), got shape {tuple(shape)}")
        if self.group is not None:
            if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
                raise ValueError(f"group must be a positive integer, got {self.group!r}")
            if shape[1] % self.group:
                raise ValueError(f"group {self.group} does not divide the width {shape[1]}; choose a divisor of it "
                                 f"(e.g. {_divisor_near(shape[1], self.group)}) or per-channel scales (no group)")

    @property
    def symmetric(self) -> bool:
        return self.bits >= 8


def _divisor_near(n: int, want: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - want), d))


@dataclass
class Quantized:
    """Codes, scales and zero points of one matrix; `dequantize()` gives W' back."""

    spec: QuantSpec
    shape: tuple[int, int]
    codes: torch.Tensor  # int8 (out x in), or the fp16 values at 16 bits
    scales: torch.Tensor | None = None  # (out x groups), float32
    zeros: torch.Tensor | None = None  # (out x groups), codes' zero points (asymmetric)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.spec.bits == 16:
            return self.codes.to(dtype)
        out, width = self.shape
        group = self.spec.group or width
        codes = self.codes.to(torch.float32).view(out, width // group, group)
        if self.zeros is not None:
            codes = codes - self.zeros.to(torch.float32)[..., None]
        return (codes * self.scales.to(torch.float32)[..., None]).view(out, width).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is stored, by name: codes packed `bits` to a value (uint8; fp16 values at 16 bits),
        fp16 scales, zero points packed like the codes. sum(t.nbytes) == nbytes()."""
        if self.spec.bits == 16:
            return {"codes": self.codes.to(torch.float16)}
        offset = 0 if self.zeros is not None else 2 ** (self.spec.bits - 1) - 1  # symmetric codes stored unsigned
        out = {"codes": pack(self.codes.to(torch.int64) + offset, self.spec.bits), "scales": self.scales.to(torch.float16)}
        if self.zeros is not None:
            out["zeros"] = pack(self.zeros.to(torch.int64), self.spec.bits)
        return out

    @classmethod
    def from_tensors(cls, spec: QuantSpec, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> "Quantized":
        """The inverse of `tensors()`; a tensor of the wrong size is a ValueError naming it."""
        spec.check(tuple(shape))
        out, width = shape
        if spec.bits == 16:
            return cls(spec, (out, width), tensors["codes"].reshape(out, width))
        groups = width // (spec.group or width)
        expected = {"codes": math.ceil(out * width * spec.bits / 8), "scales": out * groups}
        if not spec.symmetric:
            expected["zeros"] = math.ceil(out * groups * spec.bits / 8)
        for name, size in expected.items():
            if name not in tensors or tensors[name].numel() != size:
                got = tuple(tensors[name].shape) if name in tensors else "none"
                raise ValueError(f"stored {name} of a {spec.bits}-bit {out}x{width} matrix should hold {size} values, got {got}")
        codes = unpack(tensors["codes"], spec.bits, out * width).view(out, width)
        if spec.symmetric:
            codes = (codes.to(torch.int16) - (2 ** (spec.bits - 1) - 1)).to(torch.int8)
        zeros = unpack(tensors["zeros"], spec.bits, out * groups).view(out, groups).to(torch.float32) if not spec.symmetric else None
        return cls(spec, (out, width), codes, tensors["scales"].reshape(out, groups).to(torch.float32), zeros)

    def nbytes(self) -> int:
        """Bytes stored: codes packed at `bits` per value, fp16 scales and zero points as `bits`-bit codes."""
        out, width = self.shape
        if self.spec.bits == 16:
            return 2 * out * width
        groups = width // (self.spec.group or width)
        code_bytes = math.ceil(out * width * self.spec.bits / 8)
        zero_bytes = math.ceil(out * groups * self.spec.bits / 8) if self.zeros is not None else 0
        return code_bytes + 2 * out * groups + zero_bytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (each below 2^bits) packed `bits` to a value into a flat uint8 tensor, most
    significant bit first (the last byte zero-filled)."""
    values = codes.reshape(-1).to(torch.int64).numpy().astype(np.uint8)
    planes = np.unpackbits(values[:, None], axis=1)[:, 8 - bits:]  # each value's low `bits` bits
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The `count` codes `pack` stored, as uint8."""
    planes = np.unpackbits(packed.numpy())[: count * bits].reshape(count, bits)
    full = np.concatenate([np.zeros((count, 8 - bits), dtype=np.uint8), planes], axis=1)
    return torch.from_numpy(np.packbits(full, axis=1).reshape(-1))


SHRINK = tuple(1.0 - 0.05 * k for k in range(10))  # range fractions the grid search tries (1.0 .. 0.55)


def _grid_at(w: torch.Tensor, spec: QuantSpec, shrink: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) of each group of w with its range shrunk by `shrink`."""
    if spec.symmetric:
        top = 2 ** (spec.bits - 1) - 1
        return (w.abs().amax(-1) * shrink).clamp_min(1e-12) / top, None
    top = 2**spec.bits - 1
    lo, hi = w.amin(-1).clamp_max(0) * shrink, w.amax(-1).clamp_min(0) * shrink
    scale = ((hi - lo) / top).clamp_min(1e-12)
    return scale, torch.round(-lo / scale).clamp(0, top)


def _grid(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) of each group of w (viewed (out, groups, group)): per group, the range
    fraction of SHRINK whose rounding leaves the least squared error (clipping a few outliers buys
    a finer step for all the others; GPTQ's and AWQ's grid search)."""
    best_scale, best_zero, best_err = None, None, None
    for shrink in SHRINK:
        scale, zero = _grid_at(w, spec, shrink)
        scale = scale.to(torch.float16).to(w.dtype)  # judged as stored
        q = _round(w, scale[..., None], zero[..., None] if zero is not None else None, spec)
        err = ((w - _deq(q, scale[..., None], zero[..., None] if zero is not None else None)) ** 2).sum(-1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero) if zero is not None else None
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    if zero is None:
        top = 2 ** (spec.bits - 1) - 1
        return torch.round(w / scale).clamp(-top, top)
    return torch.round(w / scale + zero).clamp(0, 2**spec.bits - 1)


def _deq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (codes - zero if zero is not None else codes) * scale


def rtn(weight: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Round to nearest, scales from each group's range."""
    spec.check(tuple(weight.shape))
    if spec.bits == 16:
        return Quantized(spec, tuple(weight.shape), weight.detach().to(torch.float16))
    out, width = weight.shape
    group = spec.group or width
    w = weight.detach().to(torch.float32).view(out, width // group, group)
    scale, zero = _grid(w, spec)
    scale = scale.to(torch.float16).to(torch.float32)  # rounded with the scale as stored
    codes = _round(w, scale[..., None], zero[..., None] if zero is not None else None, spec)
    return Quantized(spec, (out, width), codes.view(out, width).to(torch.int8 if spec.symmetric else torch.uint8), scale, zero)


def gptq(weight: torch.Tensor, spec: QuantSpec, gram: torch.Tensor, damping: float = 0.01, block: int = 128) -> Quantized:
    """Error-feedback quantization on the Gram X^T X (GPTQ): the columns of largest input energy
    first (act order), each rounded on its group's grid and its rounding error pushed onto the
    columns not yet rounded through the inverse Gram; the grids are taken from the weights before
    any feedback (static groups: a column's group does not follow its place in the order)."""
    spec.check(tuple(weight.shape))
    if spec.bits == 16:
        return rtn(weight, spec)
    out, width = weight.shape
    if tuple(gram.shape) != (width, width):
        raise ValueError(f"the Gram is {tuple(gram.shape)}, the weight's width is {width}")
    group = spec.group or width
    w = weight.detach().to(torch.float64)
    scale, zero = _grid(w.view(out, width // group, group), spec)
    order = torch.argsort(torch.diagonal(gram), descending=True, stable=True)
    grids = (scale.repeat_interleave(group, 1)[:, order], zero.repeat_interleave(group, 1)[:, order] if zero is not None else None)
    codes = _feedback(w[:, order], gram.detach().to(torch.float64)[order][:, order], spec, grids, damping, block)
    return Quantized(spec, (out, width), codes[:, torch.argsort(order)].contiguous().to(torch.int8 if spec.symmetric else torch.uint8),
                     scale.to(torch.float32), zero.to(torch.float32) if zero is not None else None)


def _feedback(w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, grids: tuple[torch.Tensor, torch.Tensor | None], damping: float,
              block: int) -> torch.Tensor:
    """GPTQ's column loop on fixed grids (per column: its scale and zero point, (out x in) each): the
    codes, each column's rounding error pushed onto the later columns through the inverse Gram."""
    out, width = w.shape
    w, h = w.clone(), gram.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damping * float(h.diagonal().mean()))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scales, zeros = grids
    codes = torch.zeros(out, width, dtype=torch.float64)
    for start in range(0, width, block):
        stop = min(start + block, width)
        w_blk, err_blk, h_blk = w[:, start:stop].clone(), torch.zeros(out, stop - start, dtype=torch.float64), hinv[start:stop, start:stop]
        for j in range(stop - start):
            col = start + j
            zero = zeros[:, col] if zeros is not None else None
            q = _round(w_blk[:, j], scales[:, col], zero, spec)
            codes[:, col] = q
            err = (w_blk[:, j] - _deq(q, scales[:, col], zero)) / h_blk[j, j]
            w_blk[:, j:] -= err[:, None] * h_blk[j, j:][None, :]
            err_blk[:, j] = err
        w[:, stop:] -= err_blk @ hinv[start:stop, stop:]
    return codes


def fit_scales(weight: torch.Tensor, q: Quantized, gram: torch.Tensor, rows: int = 512) -> Quantized:
    """`q` with its scales refit to its codes: per output row, the scales s of its groups that
    minimise the output error (w - D s)^T G (w - D s), where D holds the row's codes minus their
    zero points, one column per group (codes and zero points unchanged, so the bytes are too). A
    (groups x groups) least-squares system per row; a row keeps its old scales where the refit, as
    stored in fp16, does not lower its error. Costs one (out x in x in) product, like GPTQ itself."""
    if q.spec.bits == 16:
        return q
    out, width = q.shape
    group = q.spec.group or width
    groups = width // group
    g = gram.detach().to(torch.float64)
    scales = q.scales.to(torch.float64).clone()
    for start in range(0, out, rows):
        stop = min(start + rows, out)
        w = weight.detach()[start:stop].to(torch.float64)
        c = q.codes[start:stop].to(torch.float64).view(stop - start, groups, group)
        if q.zeros is not None:
            c = c - q.zeros[start:stop].to(torch.float64)[..., None]
        c = c.reshape(stop - start, width)
        # system[r, a, b] = sum_{i in a, j in b} c_ri G_ij c_rj; rhs[r, a] = sum_{i in a} c_ri (G w_r)_i
        system = _grouped_system(c, g, groups, group)
        rhs = torch.einsum("rai,rai->ra", c.view(stop - start, groups, group), (w @ g).view(stop - start, groups, group))
        old = scales[start:stop]
        ridge = 1e-12 * system.diagonal(dim1=1, dim2=2).abs().amax(-1).clamp_min(1e-300)[:, None, None]
        eye = torch.eye(groups, dtype=torch.float64)
        new = torch.linalg.solve(system + ridge * eye, (rhs + (ridge[..., 0] * old)).unsqueeze(-1)).squeeze(-1)
        new = new.to(torch.float16).to(torch.float64)  # judged as stored
        new = torch.where(torch.isfinite(new), new, old)

        def error(s: torch.Tensor) -> torch.Tensor:  # the row's error less w^T G w, which both share
            return torch.einsum("ra,rab,rb->r", s, system, s) - 2 * (s * rhs).sum(-1)

        scales[start:stop] = torch.where((error(new) < error(old))[:, None], new, old)
    return Quantized(q.spec, q.shape, q.codes, scales.to(torch.float32), q.zeros)


def _grouped_system(c: torch.Tensor, g: torch.Tensor, groups: int, group: int) -> torch.Tensor:
    """system[r, a, b] = sum_{i in group a, j in group b} c_ri G_ij c_rj, one group b at a time."""
    n = c.shape[0]
    cv = c.view(n, groups, group)
    system = torch.empty(n, groups, groups, dtype=torch.float64)
    for b in range(groups):
        part = cv[:, b] @ g[b * group:(b + 1) * group]  # (n x width): sum_{j in b} c_rj G_ji
        system[:, :, b] = torch.einsum("rai,rai->ra", cv, part.view(n, groups, group))
    return system


def quantize(weight: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None = None, method: str = "gptq") -> Quantized:
    """`method` gptq (error feedback, then the scales refit to the codes: fit_scales; round to
    nearest without a Gram) or rtn."""
    if method not in ("gptq", "rtn"):
        raise ValueError(f"unknown quantizer {method!r}; choose gptq or rtn")
    if method == "gptq" and gram is not None:
        return fit_scales(weight, gptq(weight, spec, gram), gram)
    return rtn(weight, spec)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None) -> float:
    """||(W - W') S||^2 / ||W S||^2 with S S^T = gram (the plain Frobenius ratio without one)."""
    w, d = weight.detach().to(torch.float64), (weight.detach().to(torch.float64) - approx.detach().to(torch.float64))
    if gram is None:
        return float((d**2).sum() / (w**2).sum().clamp_min(1e-300))
    g = gram.to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", d, g, d) / torch.einsum("oi,ij,oj->", w, g, w).clamp_min(1e-300))


@dataclass
class Compensated:
    """W ~= deq(q) + a @ b: a quantized residual plus a low-rank part (a, b kept in `factor_bits`)."""

    q: Quantized
    a: torch.Tensor
    b: torch.Tensor
    error: float  # output_error of the whole
    rounds: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.dequantize(torch.float64) + self.a.double() @ self.b.double()).to(dtype)

    def nbytes(self, factor_bytes: int = 2) -> int:
        return self.q.nbytes() + factor_bytes * (self.a.numel() + self.b.numel())


def compensated(weight: torch.Tensor, spec: QuantSpec, rank: int, gram: torch.Tensor | None = None, *, rounds: int = 3,
                method: str = "gptq", damping: float = 1e-4) -> Compensated:
    """Low-rank-compensated quantization: L = whitened rank-`rank` part of W, Q = quantize(W - L), then
    in turns L refit to the residual W - deq(Q) and Q of W - L; the best of the rounds by output error.
    The factors are rounded to fp16, as stored."""
    spec.check(tuple(weight.shape))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be an integer in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight, got {rank!r}")
    w = weight.detach().to(torch.float64)
    white = whitening_from_gram(gram, damping) if gram is not None else None
    best: Compensated | None = None
    residual = w
    for k in range(max(1, rounds)):
        a, b = decompose_lowrank(residual, rank, white)
        a, b = a.to(torch.float16).to(torch.float64), b.to(torch.float16).to(torch.float64)
        q = quantize((w - a @ b).to(torch.float32), spec, gram, method)
        approx = q.dequantize(torch.float64) + a @ b
        err = output_error(w, approx, gram)
        if best is None or err < best.error:
            best = Compensated(q, a.to(torch.float32), b.to(torch.float32), err, k + 1)
        residual = w - q.dequantize(torch.float64)
    return best


@dataclass
class Factored:
    """W ~= deq(a) @ deq(b): low-rank factors (a: out x r, b: r x in) stored quantized."""

    a: Quantized
    b: Quantized
    error: float  # output error ||(W - W') S||^2 / ||W S||^2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.a.dequantize(torch.float64) @ self.b.dequantize(torch.float64)).to(dtype)

    def nbytes(self) -> int:
        return self.a.nbytes() + self.b.nbytes()


def factor_spec(spec: QuantSpec, width: int) -> QuantSpec:
    """The spec of one factor of `width` columns: `spec`'s group where it divides the width (and is
    smaller), per channel otherwise."""
    return spec if spec.group is not None and width % spec.group == 0 and spec.group < width else QuantSpec(spec.bits)


def factored(weight: torch.Tensor, spec: QuantSpec, rank: int, gram: torch.Tensor | None = None, *, method: str = "gptq",
             damping: float = 1e-4, refit: bool = True) -> Factored:
    """Quantized low-rank factors with error feedback between them: (A, B) the whitened rank-`rank`
    factors of W; B quantized (error feedback on the Gram X^T X); A refit to the quantized B', the
    least-squares A of ||(W - A B') S||^2, A = W G B'^T (B' G B'^T)^-1 (`refit`); A quantized with
    error feedback on B' G B'^T, the Gram of the rank-r activations x B'^T. Without a Gram, G = I and
    both factors are rounded to nearest."""
    spec.check(tuple(weight.shape))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be an integer in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight, got {rank!r}")
    w = weight.detach().to(torch.float64)
    g = gram.detach().to(torch.float64) if gram is not None else torch.eye(w.shape[1], dtype=torch.float64)
    a, b = decompose_lowrank(w, rank, whitening_from_gram(g, damping) if gram is not None else None)
    qb = quantize(b.to(torch.float32), factor_spec(spec, w.shape[1]), gram, method)
    bq = qb.dequantize(torch.float64)
    inner = bq @ g @ bq.T  # the Gram of x B'^T
    if refit:
        damped = inner + damping * float(inner.diagonal().mean().clamp_min(1e-300)) * torch.eye(rank, dtype=torch.float64)
        a = torch.linalg.solve(damped, (w @ g @ bq.T).T).T
    qa = quantize(a.to(torch.float32), factor_spec(spec, rank), inner.to(torch.float32) if gram is not None else None, method)
    made = Factored(qa, qb, 0.0)
    made.error = output_error(w, made.dequantize(torch.float64), gram)
    return made


LAYER_BITS = (16, 8, 4, 2)  # what a quantized layer runs: codes packed 8 / bits to a byte along the input


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (out x in, each below 2^bits) packed 8 / bits to a byte along each row, the
    first value in the low bits (onnxruntime's MatMulNBits and ONNX's uint4 layout): (out x in*bits/8) uint8."""
    per = 8 // bits
    if bits not in (2, 4, 8) or codes.shape[-1] % per:
        raise ValueError(f"{bits}-bit codes pack along rows of a width divisible by {per}; got width {codes.shape[-1]}")
    values = codes.to(torch.int32).unflatten(-1, (-1, per))
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (values << shifts).sum(-1).to(torch.uint8)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes `pack_rows` stored (out x in, uint8); torch ops only, so that graphs trace through it."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


def layer_tensors(q: Quantized) -> dict[str, torch.Tensor]:
    """The tensors a quantized layer (tngraph.layers.quant) runs on: codes (int8 at 8 bits, packed
    uint8 at 4 and 2, fp16 values at 16), fp16 scales (out x groups) and zero points (out x groups,
    the codes' integer type; zero at 8 bits, which are symmetric). Their bytes are what is stored."""
    out, width = q.shape
    if q.spec.bits not in LAYER_BITS:
        raise ValueError(f"a quantized layer runs {', '.join(map(str, LAYER_BITS))}-bit codes, not {q.spec.bits}")
    if q.spec.bits == 16:
        return {"codes": q.codes.to(torch.float16), "scales": torch.ones(out, 1, dtype=torch.float16),
                "zeros": torch.zeros(out, 1, dtype=torch.uint8)}
    scales = q.scales.to(torch.float16).reshape(out, -1)
    if q.spec.bits == 8:
        return {"codes": q.codes.to(torch.int8), "scales": scales, "zeros": torch.zeros(scales.shape, dtype=torch.int8)}
    return {"codes": pack_rows(q.codes, q.spec.bits), "scales": scales, "zeros": q.zeros.to(torch.uint8).reshape(out, -1)}


def dequantize_layer(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """W' (out x in) from a quantized layer's tensors, in `dtype`; torch ops only (traced into graphs)."""
    if bits == 16:
        return codes.to(dtype)
    work = torch.float64 if scales.dtype == torch.float64 else torch.float32  # float64 scales (gradcheck) keep float64; no op traced
    q = unpack_rows(codes, bits).to(work)
    out, groups = scales.shape
    w = (q.unflatten(-1, (groups, -1)) - zeros.to(work).unsqueeze(-1)) * scales.to(work).unsqueeze(-1)
    return w.flatten(-2).to(dtype)


@dataclass(frozen=True)
class Choice:
    """One precision candidate of a target: `bits` codes, scales per `group` input columns (0: per
    output channel), plus a compensating low-rank part of `rank` (0: none) kept in fp16; or, with
    `factored`, a rank-`rank` factorization whose two factors are the quantized tensors."""

    bits: int
    group: int = 0
    rank: int = 0
    factored: bool = False

    @property
    def format(self) -> str:
        return "qfactors" if self.factored else "qlowrank" if self.rank else "quant"

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group or None)

    @classmethod
    def of_plan(cls, format_name: str, quant: dict, rank: int | None) -> "Choice":
        """The choice a plan records (its format, its `quant` record, its rank)."""
        return cls(quant["bits"], quant["group"], rank or 0, format_name == "qfactors")

    def params(self, out_features: int, in_features: int) -> int:
        """The weight values it stands for (codes count one each), without the bias."""
        low = self.rank * (out_features + in_features)
        return low if self.factored else out_features * in_features + low

    def label(self) -> str:
        if self.bits == 16:
            return "fp16"
        scales = f"g{self.group}" if self.group else "per channel"
        if self.factored:
            return f"rank {self.rank}, int{self.bits} factors ({scales})"
        return f"int{self.bits} {scales}" + (f" + rank {self.rank}" if self.rank else "")

    def record(self, act_bits: int = 0) -> dict:
        """The plan's and recipe's record of it (act_bits applies to 8-bit per-channel codes only)."""
        return {"bits": self.bits, "group": self.group, "act_bits": act_bits if self.bits == 8 and not self.group else 0}


GROUPS = {4: (32, 64, 128, 0), 2: (32, 64, 128)}  # group sizes offered below 8 bits (0: per output channel)
RANKS = {4: (8, 16), 2: (16, 32)}  # compensating ranks offered at the coarsest group
FACTOR_BITS = {8: 0, 4: 32}  # quantized-factor candidates: bits -> group (0: per channel; a factor too narrow for the group: per channel)
FACTOR_KEEP = (1 / 8, 1 / 4, 1 / 2)  # ... at ranks keeping these fractions of the weight's values


def candidates(bits: tuple[int, ...], out_features: int, in_features: int) -> list[Choice]:
    """The precision candidates of an (out x in) target at these widths: fp16; int8 per channel;
    int4 / int2 in the groups of GROUPS that divide the width (and per channel), and at the
    coarsest group with each compensating rank of RANKS up to a quarter of the smaller side; and
    low-rank factors quantized at 8 and 4 bits (FACTOR_BITS) at the ranks keeping FACTOR_KEEP of
    the values (multiples of 8, at least 8)."""
    found = []
    for b in bits:
        if b in (16, 8):
            found.append(Choice(b))
        else:
            groups = [g for g in GROUPS[b] if g == 0 or (in_features % g == 0 and g < in_features)] or [0]
            found += [Choice(b, g) for g in groups]
            coarsest = max(groups)
            found += [Choice(b, coarsest, r) for r in RANKS[b] if r <= min(out_features, in_features) // 4]
        if b in FACTOR_BITS:
            ranks = sorted({8 * int(keep * out_features * in_features / (out_features + in_features) // 8) for keep in FACTOR_KEEP})
            found += [Choice(b, FACTOR_BITS[b], r, True) for r in ranks if 8 <= r < min(out_features, in_features)]
    return found


def factored_tensors(made: Factored) -> dict[str, torch.Tensor]:
    """The quantized-factor layer's tensors: each factor's layer_tensors, suffixed _a and _b."""
    return {f"{k}_{side}": v for side, q in (("a", made.a), ("b", made.b)) for k, v in layer_tensors(q).items()}


def quantize_choice(weight: torch.Tensor, choice: Choice, gram: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A quantized layer's tensors (layer_tensors, plus fp16 `a` and `b` with a rank; the two factors'
    with `factored`) for `choice`: error feedback on the Gram where there is one (round to nearest
    without), low-rank-compensated with a rank."""
    if choice.factored:
        return factored_tensors(factored(weight, choice.spec, choice.rank, gram))
    if choice.rank:
        made = compensated(weight, choice.spec, choice.rank, gram)
        return {**layer_tensors(made.q), "a": made.a.to(torch.float16), "b": made.b.to(torch.float16)}
    return layer_tensors(quantize(weight, choice.spec, gram))


def layer_weight(factors: list[torch.Tensor], bits: int) -> torch.Tensor:
    """W' (out x in) of a quantized layer's tensors in key order (codes, scales, zeros[, a, b]; or
    the two factors' codes, scales, zeros, A's first), in float32 (float64 when the scales are)."""
    dtype = torch.float64 if factors[1].dtype == torch.float64 else torch.float32
    w = dequantize_layer(*factors[:3], bits, dtype)
    if len(factors) == 6:
        return w @ dequantize_layer(*factors[3:], bits, dtype)
    if len(factors) == 5:
        w = w + factors[3].to(dtype) @ factors[4].to(dtype)
    return w


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = ["BITS", "Choice", "Compensated", "FACTOR_BITS", "FACTOR_KEEP", "Factored", "factor_spec", "factored", "factored_tensors", "fit_scales", "GROUPS", "RANKS", "candidates", "layer_weight", "quantize_choice", "LAYER_BITS", "dequantize_layer", "layer_tensors", "pack_rows", "tensor_bytes", "unpack_rows", "QuantSpec", "Quantized", "compensated", "gptq", "output_error", "pack", "quantize", "rtn", "unpack"]
