"""Convolutions as targets: conv1d / conv2d with groups 1 (k x k, strided, padded, dilated, 1 x 1)
become the low-rank convolution layer (channel low rank: the whitened SVD of the unfolded weight);
grouped and depthwise convolutions stay dense with the reason counted."""
import pytest
import torch
import torch.nn.functional as F

import tngraph
from tngraph import meta
from tngraph.layers import CONV
from tngraph.calibration import channels_last
from tngraph.passes.calibrate import unfolded_rows


class Net(torch.nn.Module):
    def __init__(self, rank=None):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.down = torch.nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2)
        self.point = torch.nn.Conv2d(24, 24, 1, bias=False)
        self.depth = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.seq = torch.nn.Conv1d(24, 20, 3, padding=1)
        self.head = torch.nn.Linear(20, 10)
        if rank is not None:  # every dense layer's (unfolded) weight of this rank: factorizing at it is exact
            with torch.no_grad():
                for m in (self.stem, self.down, self.point, self.seq, self.head):
                    w = m.weight.view(m.weight.shape[0], -1)
                    w.copy_(torch.randn(w.shape[0], rank) @ torch.randn(rank, w.shape[1]) / rank)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.down(x))
        x = self.point(x) + self.depth(x)
        return self.head(self.seq(x.flatten(2)).mean(-1))


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(3, 3, 12, 12, generator=g),), {}) for _ in range(n)]


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
                                      dict(kernel_size=1)])
def test_unfolded_rows_times_the_unfolded_weight_is_the_convolution(geometry):
    conv = torch.nn.Conv2d(5, 7, bias=False, **geometry)
    x = torch.randn(2, 5, 9, 8)
    g = meta.Conv(5, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))
    rows = unfolded_rows(g, x)
    torch.testing.assert_close(rows @ conv.weight.view(7, -1).T, channels_last(conv(x)), atol=1e-5, rtol=1e-5)


def test_conv1d_unfolded_rows():
    conv = torch.nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 4, 11)
    rows = unfolded_rows(meta.Conv(4, (3,), (2,), (1,), (1,)), x)
    torch.testing.assert_close(rows @ conv.weight.view(6, -1).T, channels_last(conv(x)), atol=1e-5, rtol=1e-5)


def test_convolutions_factorize_exactly_at_their_rank_and_grouped_ones_stay_dense(tmp_path):
    model = Net(rank=3).eval()
    result = tngraph.compress_with_result(model, calibration=_data(), budget=0.6, heal_steps=0, progress=False, allocation="uniform")
    targets = {meta.info(n).target.name: meta.info(n).target for n in result.graph.graph.nodes if meta.info(n).target is not None}
    assert set(result.context.plan) == {"stem", "down", "point", "seq", "head"}  # not the depthwise one
    assert result.context.counters["targets.skipped.grouped_conv"] == 1
    assert targets["down"].conv == meta.Conv(16, (3, 3), (2, 2), (2, 2), (2, 2)) and targets["down"].in_features == 16 * 9
    assert targets["seq"].conv.kernel == (3,)
    planned = {n for n, p in result.context.plan.items() if p.format == "lowrank"}
    assert {"down", "point", "seq"} <= planned and all(result.context.plan[n].rank >= 3 for n in planned)
    convs = [n for n in result.graph.graph.nodes if n.target == CONV.op]
    assert len(convs) == len(planned - {"head"})  # fused into the conv layer's op
    assert not any(n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default) and n.args[1].target.startswith("down")
                   for n in result.graph.graph.nodes)
    down = result.module.down
    assert isinstance(down, tngraph.layers.LayerLinear) and down.layer is CONV and down.statics["stride"] == [2, 2]
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        dense, compressed, graph = model(x), result.module(x), result.graph(x)
    torch.testing.assert_close(compressed, dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(graph, compressed, atol=1e-5, rtol=1e-5)
    # the artifact, and ONNX
    tngraph.save(result.module, tmp_path / "art")
    loaded = tngraph.load(tmp_path / "art", model=Net(rank=3).eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed)
    export = tngraph.export_onnx(loaded, (x,), tmp_path / "net.onnx")
    assert export.max_abs_diff < 1e-4


def test_a_recipe_applied_to_a_convolution_of_another_geometry_is_refused(tmp_path):
    model = Net(rank=3).eval()
    compressed = tngraph.compress(model, calibration=_data(), budget=0.6, heal_steps=0, progress=False, allocation="uniform")
    tngraph.save(compressed, tmp_path / "art")
    other = Net(rank=3).eval()
    other.down.stride = (1, 1)
    with pytest.raises(tngraph.TngraphError, match="not the convolution the recipe describes"):
        tngraph.load(tmp_path / "art", model=other)


def test_a_format_a_convolution_does_not_take_is_refused_by_name():
    with pytest.raises(tngraph.ConfigError, match="stem is a convolution.*lowrank, tucker, cp, not 'tt'") as info:
        tngraph.compress(Net().eval(), calibration=_data(), budget=0.5, heal_steps=0, progress=False, format="tt",
                         allocation="uniform")
    assert "--exclude stem" in info.value.fix


def _patch_grams(model, data):
    """X^T X of the unfolded input patches reaching each nn.Conv1d/Conv2d, by forward hooks (float64)."""
    grams, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and m.groups == 1:
            g = meta.Conv(m.in_channels, tuple(m.kernel_size), tuple(m.stride), tuple(m.padding), tuple(m.dilation))

            def hook(module, args, out, name=name, g=g):
                rows = unfolded_rows(g, args[0]).double()
                grams[name] = grams.get(name, 0) + rows.T @ rows
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for args, _ in data:
            model(*args)
    for h in hooks:
        h.remove()
    return grams


@pytest.mark.parametrize("fmt", ["tucker", "cp"])
def test_tucker2_and_cp_keep_the_kernel_whole_in_graph_module_artifact_and_onnx(fmt, tmp_path):
    """--format tucker / cp on convolutions: the Tucker-2 (1x1, k x k core, 1x1) and CP (1x1,
    depthwise per spatial axis, 1x1) layers, decomposed as tngraph.tn.conv does by hand on the
    hooked patch Grams, within the budget, in the graph, the module, the artifact and ONNX."""
    from tngraph.layers import CONV_LAYERS
    from tngraph.tn import conv as conv_formats

    model, data = Net().eval(), _smooth(6, 0)
    result = tngraph.compress_with_result(model, calibration=data, budget=0.5, heal_steps=0, progress=False, format=fmt,
                                          allocation="uniform", guard_tolerance=10.0, include=("stem", "down", "seq"))
    layer = CONV_LAYERS[fmt]
    plan = result.context.plan
    assert set(plan) == {"stem", "down", "seq"} and all(p.format == fmt and p.conv is not None for p in plan.values())
    assert all(p.params_after <= 0.5 * p.params_before for p in plan.values())
    assert sum(1 for n in result.graph.graph.nodes if n.target == layer.op) == 3
    grams = _patch_grams(model, data)
    for name, p in plan.items():
        weight = model.get_submodule(name).weight
        by_hand = conv_formats.decompose(fmt, weight, p.rank, grams[name], result.context.config.damping,
                                         **tngraph.tn.formats.FORMATS[fmt].options(result.context.config))
        for key in layer.factors:
            torch.testing.assert_close(p.factors[key], by_hand[key], atol=1e-5, rtol=1e-4)
        assert isinstance(result.module.get_submodule(name), tngraph.layers.LayerLinear)
        assert result.module.get_submodule(name).layer is layer
    x = _smooth(1, 99)[0][0][0]
    with torch.no_grad():
        compressed, graph = result.module(x), result.graph(x)
    torch.testing.assert_close(graph, compressed, atol=1e-5, rtol=1e-5)
    tngraph.save(result.module, tmp_path / "art")
    loaded = tngraph.load(tmp_path / "art", model=Net().eval())
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed)
    assert tngraph.export_onnx(loaded, (x,), tmp_path / "net.onnx").max_abs_diff < 1e-4


@pytest.mark.parametrize("fmt", ["tucker", "cp"])
def test_conv_decompositions_are_exact_at_full_rank_and_improve_with_rank(fmt):
    from tngraph.tn import conv as conv_formats
    from tngraph.layers import CONV_LAYERS

    torch.manual_seed(0)
    weight, layer = torch.randn(10, 6, 3, 3, dtype=torch.float64), CONV_LAYERS[fmt]
    rows = unfolded_rows(meta.Conv(6, (3, 3), (1, 1), (1, 1), (1, 1)), F.interpolate(torch.randn(4, 6, 5, 5), size=10).double())
    gram, top = rows.T @ rows, conv_formats.max_rank(fmt, 10, 6, (3, 3))

    def error(rank):
        f = conv_formats.decompose(fmt, weight, rank, gram, 1e-4, tol=1e-4, max_iter=500)
        delta = weight.flatten(1) - layer.weight(f, 54, {"kernel": [3, 3]})
        return float(torch.einsum("oi,ij,oj->", delta, gram, delta) / torch.einsum("oi,ij,oj->", weight.flatten(1), gram, weight.flatten(1)))

    assert error(top) < 1e-10
    errors = [error(r) for r in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0
    with pytest.raises(ValueError, match=f"rank must be an integer in \\[1, {top}\\]"):
        conv_formats.decompose(fmt, weight, top + 1)


def test_the_tucker2_core_is_the_least_squares_optimum_on_the_patch_gram():
    from tngraph.tn import conv as conv_formats
    from tngraph.layers import CONV_TUCKER

    torch.manual_seed(1)
    weight = torch.randn(8, 5, 3, 3, dtype=torch.float64)
    rows = unfolded_rows(meta.Conv(5, (3, 3), (1, 1), (1, 1), (1, 1)), F.interpolate(torch.randn(3, 5, 4, 4), size=9).double())
    gram = rows.T @ rows
    f = conv_formats.tucker2(weight, 3, gram, 0.0)

    def error(core):
        delta = weight.flatten(1) - CONV_TUCKER.weight({**f, "core": core}, 45)
        return float(torch.einsum("oi,ij,oj->", delta, gram, delta))

    base = error(f["core"])
    for _ in range(5):
        assert error(f["core"] + 1e-3 * torch.randn_like(f["core"])) > base


def _smooth(n, seed):
    """Images whose neighbouring pixels are correlated (upsampled noise), as real images are."""
    g = torch.Generator().manual_seed(seed)
    return [((F.interpolate(torch.randn(3, 3, 4, 4, generator=g), size=12, mode="bilinear"),), {}) for _ in range(n)]


def test_whitening_by_the_unfolded_inputs_lowers_the_output_error():
    model = Net().eval()
    x = _smooth(1, 99)[0][0][0]
    errors = {}
    for whiten in (False, True):
        compressed = tngraph.compress(model, calibration=_smooth(8, 0), budget=0.4, heal_steps=0, progress=False, allocation="uniform",
                                      whiten=whiten, include=("stem",))
        with torch.no_grad():
            ref, out = F.relu(model.stem(x)), F.relu(compressed.stem(x))
        errors[whiten] = float((out - ref).norm() / ref.norm())
    assert errors[True] < errors[False]


def test_the_backend_compiles_convolutions_into_the_conv_layer():
    from tests.conftest import backend_spy

    model = Net(rank=3).eval()
    spy = backend_spy()
    compiled = torch.compile(model, backend=spy, options={"budget": 0.6, "calibration": [a for a, _ in _data()], "allocation": "uniform",
                                                          "fallback": "eager"})
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert sum(1 for g in spy.graphs for n in g.graph.nodes if n.target == CONV.op) >= 2
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
