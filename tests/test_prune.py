"""Structured neuron pruning of an MLP with the down projection refitted (tngraph.tn.prune)."""
import pytest
import torch

from tngraph.tn.prune import params_kept, prune_curve, prune_neurons, prune_sweep, refit_damping, refit_kept


def _mlp(hidden=48, width=12, out=10, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64)
    up = torch.randn(hidden, width, generator=g, dtype=torch.float64)
    down = torch.randn(out, hidden, generator=g, dtype=torch.float64)
    return x, up, down


def _outputs(x, up, down, keep=None, weight=None):
    h = torch.nn.functional.gelu(x @ up.T)
    return h @ down.T if keep is None else h[:, keep] @ weight.T


def test_keeping_every_neuron_changes_nothing():
    x, up, down = _mlp()
    h = torch.nn.functional.gelu(x @ up.T)
    sel = prune_neurons(down, h.T @ h, 48)
    assert sel.keep.tolist() == list(range(48))
    torch.testing.assert_close(sel.weight, down, rtol=1e-6, atol=1e-6)
    assert sel.error == pytest.approx(0.0, abs=1e-6)


def test_duplicated_neurons_are_dropped_at_no_cost():
    # the last 16 neurons repeat the first 16: dropping them and moving their weight over is exact
    x, up, down = _mlp(hidden=32)
    up2 = torch.cat([up, up[:16]])
    down2 = torch.cat([down, torch.randn(10, 16, dtype=torch.float64)], 1)
    h = torch.nn.functional.gelu(x @ up2.T)
    sel = prune_neurons(down2, h.T @ h, 32, chunk=1, damping=1e-12)
    reference = _outputs(x, up2, down2)
    pruned = _outputs(x, up2, down2, sel.keep, sel.weight)
    assert (pruned - reference).norm() / reference.norm() < 1e-5
    assert sel.error / (reference**2).sum() < 1e-9


def test_refit_is_the_least_squares_optimum_and_beats_dropping():
    x, up, down = _mlp()
    h = torch.nn.functional.gelu(x @ up.T)
    sel = prune_neurons(down, h.T @ h, 20, damping=1e-12)
    reference = _outputs(x, up, down)
    best = torch.linalg.lstsq(h[:, sel.keep], reference).solution.T
    torch.testing.assert_close(sel.weight, best, rtol=1e-5, atol=1e-7)
    refit_error = ((_outputs(x, up, down, sel.keep, sel.weight) - reference) ** 2).sum()
    dropped_error = ((_outputs(x, up, down, sel.keep, down[:, sel.keep]) - reference) ** 2).sum()
    assert float(refit_error) == pytest.approx(sel.error, rel=1e-6)
    assert refit_error < 0.5 * dropped_error


def test_greedy_beats_random_selections_and_the_curve_falls_with_count():
    x, up, down = _mlp()
    h = torch.nn.functional.gelu(x @ up.T)
    gram = h.T @ h
    curve = prune_curve(down, gram, [40, 24, 12, 32])
    assert [len(s.keep) for s in curve] == [40, 24, 12, 32]
    errors = {len(s.keep): s.error for s in curve}
    assert errors[40] < errors[32] < errors[24] < errors[12]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        keep = torch.randperm(48, generator=g)[:24].sort().values
        w = down @ gram[:, keep] @ torch.linalg.inv(gram[keep][:, keep])
        random_error = float(((_outputs(x, up, down, keep, w) - _outputs(x, up, down)) ** 2).sum())
        assert errors[24] <= random_error


def test_output_gram_keeps_the_neurons_the_objective_reads():
    # output 0 is all the objective reads; neurons 0-7 alone feed it
    x, up, down = _mlp(hidden=24, out=4)
    down = torch.zeros_like(down)
    down[0, :8] = 1.0
    down[1:, 8:] = torch.randn(3, 16, dtype=torch.float64)
    h = torch.nn.functional.gelu(x @ up.T)
    g = torch.diag(torch.tensor([1.0, 1e-6, 1e-6, 1e-6], dtype=torch.float64))
    weighted = prune_neurons(down, h.T @ h, 8, g, chunk=1)
    assert weighted.keep.tolist() == list(range(8))
    plain = prune_neurons(down, h.T @ h, 8, chunk=1)
    assert plain.keep.tolist() != list(range(8))


def test_bad_inputs_are_refused_by_name():
    x, up, down = _mlp()
    h = torch.nn.functional.gelu(x @ up.T)
    gram = h.T @ h
    with pytest.raises(ValueError, match=r"keep must lie in \[1, 48\]"):
        prune_neurons(down, gram, 0)
    with pytest.raises(ValueError, match=r"keep must lie in \[1, 48\]"):
        prune_neurons(down, gram, 49)
    with pytest.raises(ValueError, match="hidden Gram matrix must be 48x48"):
        prune_neurons(down, gram[:10, :10], 8)
    with pytest.raises(ValueError, match="output Gram matrix must be 10x10"):
        prune_neurons(down, gram, 8, torch.eye(3, dtype=torch.float64))
    bad = down.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight holds NaN"):
        prune_neurons(bad, gram, 8)


def test_float32_weights_come_back_float32():
    x, up, down = _mlp()
    h = torch.nn.functional.gelu(x @ up.T)
    sel = prune_neurons(down.float(), (h.T @ h).float(), 16)
    assert sel.weight.dtype == torch.float32 and sel.weight.shape == (10, 16) and sel.keep.dtype == torch.int64


def test_params_kept_counts_up_rows_biases_and_down_columns():
    assert params_kept(384, 384, 768) == 768 * (385 + 384)
    assert params_kept(5120, 5120, 100, up_bias=False, projections=2) == 100 * (2 * 5120 + 5120)


def test_fewer_calibration_rows_than_neurons_damp_the_refit_and_it_generalizes():
    """With fewer rows than hidden neurons the Gram is singular: the refit of refit_damping's damping
    keeps its error on rows it never saw near the calibration's, an undamped one does not."""
    x, up, down = _mlp(hidden=64, width=24, tokens=2000, seed=3)
    seen, unseen = x[:40], x[40:]
    h = torch.nn.functional.gelu(seen @ up.T)
    damping = refit_damping(len(seen), 64)
    assert damping == pytest.approx(0.01 * 1.6**3) and refit_damping(400, 1536) == 0.1 and refit_damping(48_000, 1536) == 1e-6 and refit_damping(5_500, 1536) < 1e-3
    errors = {}
    for d in (1e-9, damping):
        sel = prune_neurons(down, h.T @ h, 32, damping=d)
        errors[d] = float((_outputs(unseen, up, down) - _outputs(unseen, up, down, sel.keep, sel.weight)).square().mean())
    assert errors[damping] < 0.5 * errors[1e-9]
    with pytest.raises(ValueError, match="positive rows"):
        refit_damping(0, 64)


def test_the_downdated_sweep_chooses_what_fresh_inverses_choose():
    """The sweep keeps C_KK^-1 up to date by downdating; every round's choice and the refit it
    returns match a greedy that inverts C_KK afresh each round."""
    x, up, down = _mlp(hidden=96, width=40, tokens=3000, seed=5)
    h = torch.nn.functional.gelu(x @ up.T)
    c, g = h.T @ h, torch.eye(10, dtype=torch.float64) + 0.1
    ridge = 1e-6 * float(c.diagonal().mean())
    keep = torch.arange(96)
    while len(keep) > 30:  # the reference: chunks of 96 // 48 = 2, a fresh inverse every round
        inverse = torch.linalg.inv(c[keep][:, keep] + ridge * torch.eye(len(keep), dtype=torch.float64))
        refit = down @ c[:, keep] @ inverse
        cost = ((g @ refit) * refit).sum(0) / inverse.diagonal()
        mask = torch.ones(len(keep), dtype=torch.bool)
        mask[torch.topk(cost, min(2, len(keep) - 30), largest=False).indices] = False
        keep = keep[mask]
    sel = prune_neurons(down, c, 30, g)
    assert sel.keep.tolist() == keep.tolist()
    reference = down @ c[:, keep] @ torch.linalg.inv(c[keep][:, keep] + ridge * torch.eye(30, dtype=torch.float64))
    torch.testing.assert_close(sel.weight, reference, rtol=1e-7, atol=1e-9)


def test_a_sweep_gives_back_each_counts_neurons_and_refit_without_sweeping_again():
    """Factorize reads a pruned block's neurons back from the allocation's sweep (Sweep.kept) and
    refits them (refit_kept): the same selection, weight and error the sweep returned at that count."""
    x, up, down = _mlp(hidden=96, width=40, tokens=3000, seed=3)
    h = torch.nn.functional.gelu(x @ up.T)
    c, g = h.T @ h, torch.eye(10, dtype=torch.float64) + 0.1
    counts = [90, 72, 48, 30, 9, 96]
    sweep = prune_sweep(down, c, counts, g, damping=1e-4)
    assert sorted(sweep.removal.tolist()) == list(range(96)) and sweep.counts == (96, 90, 72, 48, 30, 9)
    for n, sel in zip(counts, sweep.selections):
        kept = sweep.kept(n)
        assert kept.tolist() == sel.keep.tolist()
        again = refit_kept(down, c, kept, g, damping=1e-4)
        torch.testing.assert_close(again.weight, sel.weight, rtol=1e-9, atol=1e-12)
        assert again.error == pytest.approx(sel.error, rel=1e-9, abs=1e-12)
    # nested: a smaller count keeps a subset of a larger one's neurons
    assert set(sweep.kept(30).tolist()) <= set(sweep.kept(48).tolist())
    with pytest.raises(ValueError, match="the sweep stopped at .* neurons, not 50"):
        sweep.kept(50)
    with pytest.raises(ValueError, match="sorted, unique indices in \\[0, 96\\)"):
        refit_kept(down, c, torch.tensor([3, 1, 200]))
