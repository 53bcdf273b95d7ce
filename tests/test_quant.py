"""Weight quantizers (tngraph.tn.quant): round to nearest, GPTQ-style error feedback on the
calibration Gram, and low-rank-compensated quantization, measured in the output error
||(W - W') S||^2 / ||W S||^2 the rest of tngraph minimises."""
import pytest
import torch

from tngraph.tn.quant import QuantSpec, compensated, fit_scales, gptq, output_error, quantize, rtn


def _problem(seed=0, out=48, width=64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=g) / 8
    x = torch.randn(1024, width, generator=g) @ (torch.randn(width, width, generator=g) / 8 + torch.eye(width))
    return weight, x.T.double() @ x.double()


def test_weights_on_the_grid_come_back_exactly():
    g = torch.Generator().manual_seed(0)
    scale = (torch.rand(16, 1, generator=g) + 0.1).half().float()  # scales are stored in fp16
    codes = torch.randint(-127, 128, (16, 32), generator=g).float()
    codes[:, 0] = 127  # each row's largest magnitude sets its scale
    weight = scale * codes
    spec = QuantSpec(8)
    for q in (rtn(weight, spec), gptq(weight, spec, torch.eye(32, dtype=torch.float64))):
        assert torch.equal(q.dequantize(), weight)
    half = torch.randn(8, 16).half().float()
    assert torch.equal(rtn(half, QuantSpec(16)).dequantize(), half)


@pytest.mark.parametrize("group", [None, 16])
def test_error_falls_with_bits_and_error_feedback_beats_rounding(group):
    weight, gram = _problem()
    errors = {}
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits, group)
        errors[bits] = (output_error(weight, rtn(weight, spec).dequantize(), gram), output_error(weight, gptq(weight, spec, gram).dequantize(), gram))
        assert errors[bits][1] < errors[bits][0]  # GPTQ below RTN on correlated inputs
    for lo, hi in ((2, 3), (3, 4), (4, 8)):
        assert errors[hi][0] < errors[lo][0] and errors[hi][1] < errors[lo][1]


def test_without_correlation_error_feedback_is_rounding():
    """With a diagonal Gram no column's error moves onto another: GPTQ's codes are RTN's."""
    weight, _ = _problem()
    spec = QuantSpec(4)
    assert torch.equal(gptq(weight, spec, torch.eye(64, dtype=torch.float64) * 3.0).codes, rtn(weight, spec).codes)
    assert torch.equal(quantize(weight, spec, None).codes, rtn(weight, spec).codes)  # no Gram: round to nearest


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 16), (3, 32), (2, 16)])
def test_scales_refit_to_the_codes_lower_the_error_at_the_same_bytes(bits, group):
    """fit_scales keeps the codes and zero points (so the bytes) and solves each row's scales in the
    output error: never worse than GPTQ's grid, better on correlated inputs; quantize() applies it."""
    weight, gram = _problem(2)
    spec = QuantSpec(bits, group)
    q = gptq(weight, spec, gram)
    refit = fit_scales(weight, q, gram)
    assert torch.equal(refit.codes, q.codes) and refit.nbytes() == q.nbytes()
    assert (q.zeros is None) == (refit.zeros is None) and (q.zeros is None or torch.equal(refit.zeros, q.zeros))
    assert torch.equal(refit.scales, refit.scales.half().float())  # as stored
    before, after = output_error(weight, q.dequantize(), gram), output_error(weight, refit.dequantize(), gram)
    assert after < 0.995 * before
    assert torch.equal(quantize(weight, spec, gram).dequantize(), refit.dequantize())
    # per row the refit is a least-squares optimum: nudging any scale makes the error grow
    nudged = fit_scales(weight, q, gram)
    nudged.scales[0] *= 1.01
    assert output_error(weight, nudged.dequantize(), gram) > after
    # scales already optimal stay: refitting twice changes nothing
    assert torch.equal(fit_scales(weight, refit, gram).scales, refit.scales)


def test_a_low_rank_part_absorbs_quantization_error():
    weight, gram = _problem(1)
    spec = QuantSpec(3, 16)
    alone = output_error(weight, gptq(weight, spec, gram).dequantize(), gram)
    errors = [compensated(weight, spec, rank, gram).error for rank in (2, 8, 16)]
    assert errors[0] < alone and errors[2] < errors[1] < errors[0]
    c = compensated(weight, spec, 8, gram)
    assert output_error(weight, c.dequantize(), gram) == pytest.approx(c.error, rel=1e-6)
    # the refit rounds never make it worse than the first
    assert c.error <= compensated(weight, spec, 8, gram, rounds=1).error


def test_stored_bytes():
    weight, _ = _problem()  # 48 x 64
    assert rtn(weight, QuantSpec(8)).nbytes() == 48 * 64 + 2 * 48
    assert rtn(weight, QuantSpec(4, 32)).nbytes() == 48 * 64 // 2 + 2 * 48 * 2 + 48 * 2 // 2
    assert rtn(weight, QuantSpec(16)).nbytes() == 2 * 48 * 64


def test_bad_specs_are_refused_with_the_fix():
    weight, gram = _problem()
    with pytest.raises(ValueError, match="bits 5 is not offered; choose one of 16, 8, 4, 3, 2"):
        rtn(weight, QuantSpec(5))
    with pytest.raises(ValueError, match="group 48 does not divide the width 64; choose a divisor"):
        gptq(weight, QuantSpec(4, 48), gram)
    with pytest.raises(ValueError, match="rank must be an integer in \\[1, 48\\]"):
        compensated(weight, QuantSpec(4), 0, gram)
    with pytest.raises(ValueError, match="unknown quantizer 'hqq'"):
        quantize(weight, QuantSpec(4), gram, method="hqq")


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16), (3, 16), (2, 32), (16, None)])
def test_stored_tensors_are_packed_to_the_bit_and_round_trip_through_safetensors(bits, group, tmp_path):
    from safetensors.torch import load_file, save_file

    from tngraph.tn.quant import Quantized, pack, unpack

    weight, gram = _problem()
    q = gptq(weight, QuantSpec(bits, group), gram)
    stored = q.tensors()
    assert sum(t.numel() * t.element_size() for t in stored.values()) == q.nbytes()
    save_file(stored, tmp_path / "q.safetensors")
    back = Quantized.from_tensors(q.spec, q.shape, load_file(tmp_path / "q.safetensors"))
    assert torch.equal(back.dequantize(), q.dequantize())
    codes = torch.randint(0, 2**3, (37,))
    assert torch.equal(unpack(pack(codes, 3), 3, 37).long(), codes) and pack(codes, 3).numel() == 14  # 111 bits


def test_stored_tensors_of_the_wrong_size_are_refused():
    from tngraph.tn.quant import Quantized

    weight, _ = _problem()
    stored = rtn(weight, QuantSpec(4, 16)).tensors()
    stored["scales"] = stored["scales"][:-1]
    with pytest.raises(ValueError, match="stored scales of a 4-bit 48x64 matrix should hold 192 values"):
        Quantized.from_tensors(QuantSpec(4, 16), (48, 64), stored)
