"""Sanity checks: model parameter randomization (cascading / independent) and class sensitivity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerGradientXActivation
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from captum_normgrad import LayerNormGrad
from captum_normgrad.evaluation.sanity import (
    MEASURES,
    class_sensitivity,
    default_randomization_modules,
    map_similarity,
    model_parameter_randomization,
    normalize_abs,
    spearman_rho,
)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.relu1(self.conv1(x)))).flatten(1))


def make_net(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    net = TinyCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics
        net.block[1].running_mean.uniform_(-0.2, 0.2)
        net.block[1].running_var.uniform_(0.5, 1.5)
    return net


def inputs(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(9))


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(p.requires_grad, p.grad) for p in model.parameters()],
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    )


def reference_map(model: nn.Module, method, layer: str, x: torch.Tensor, target, **kw) -> np.ndarray:
    """What the check must compute on a model: channel-summed map upsampled to the input."""
    m = method(model, dict(model.named_modules())[layer]).attribute(x, target=target, **kw)
    m = m.detach().sum(1, keepdim=True).double()
    return F.interpolate(m, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0].numpy()


def randomise(model: nn.Module, name: str, seed: int) -> None:
    """The documented protocol: reset_parameters of every parameter-owning sub-module, seeded."""
    torch.manual_seed(seed)
    for m in dict(model.named_modules())[name].modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()


# --------------------------------------------------------------------------- measures


@given(
    a=hnp.arrays(np.float64, 12, elements=st.integers(-3, 3).map(float)),
    b=hnp.arrays(np.float64, 12, elements=st.floats(-5, 5, allow_nan=False)),
)
def test_spearman_matches_scipy_including_ties(a: np.ndarray, b: np.ndarray) -> None:
    rho = spearman_rho(a, b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        assert np.isnan(rho)
    else:
        assert rho == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    assert isinstance(rho, float)  # rho only, no p-value


def test_normalize_abs_clips_at_the_99th_percentile() -> None:
    a = np.concatenate([np.linspace(-1, 1, 199), [100.0]])
    out = normalize_abs(a)
    hi = np.percentile(np.abs(a), 99)
    np.testing.assert_allclose(out, np.minimum(np.abs(a), hi) / hi)
    assert out.max() == 1.0 and out.min() >= 0
    assert not normalize_abs(np.zeros(5)).any()


def test_map_similarity_of_identical_and_negated_maps() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((32, 32)) + 0.1
    same = map_similarity(a, a)
    assert set(same) == set(MEASURES)
    assert all(v == pytest.approx(1.0) for v in same.values())
    neg = map_similarity(a, -a)
    assert neg["spearman"] == pytest.approx(-1.0)
    assert neg["spearman_abs"] == pytest.approx(1.0) and neg["ssim"] == pytest.approx(1.0)
    other = map_similarity(a, rng.random((32, 32)))
    assert all(abs(v) < 0.5 for v in other.values())
    with pytest.raises(ValueError, match="different shapes"):
        map_similarity(a, a[:8])


# --------------------------------------------------------------------------- randomization


def test_default_modules_are_parameter_owners_top_down() -> None:
    assert default_randomization_modules(make_net()) == ["fc", "block.1", "block.0", "conv1"]


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_randomization_reproduces_the_protocol_by_hand(mode: str) -> None:
    net = make_net()
    before = snapshot(net)
    rng_before = torch.get_rng_state()
    x = inputs()
    modules = ["fc", "block", "conv1"]
    res = model_parameter_randomization(net, LayerNormGrad, "block.0", x, modules=modules, mode=mode, seed=3)
    # the caller's model and RNG are untouched
    after = snapshot(net)
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())
    assert before[1:] == after[1:]
    assert torch.equal(rng_before, torch.get_rng_state())
    # original: the model's own argmax class
    with torch.no_grad():
        t0 = net(x).argmax(1).tolist()
    np.testing.assert_allclose(res.original_maps, reference_map(net, LayerNormGrad, "block.0", x, t0))
    assert res.targets[0].tolist() == t0
    work = copy.deepcopy(net)
    for i, name in enumerate(modules):
        if mode == "independent":
            work = copy.deepcopy(net)
        randomise(work, name, 3 + i)
        with torch.no_grad():
            ti = work(x).argmax(1).tolist()  # the randomised model's own argmax class
        exp = reference_map(work, LayerNormGrad, "block.0", x, ti)
        np.testing.assert_allclose(res.randomized_maps[i], exp, rtol=1e-6, atol=1e-9)
        assert res.targets[i + 1].tolist() == ti
        for s in range(x.shape[0]):
            sp = scipy.stats.spearmanr(res.original_maps[s].ravel(), exp[s].ravel()).statistic
            assert res.similarity["spearman"][i, s] == pytest.approx(sp, abs=1e-9)
    assert res.modules == modules and res.mode == mode and res.layer == "block.0"
    assert res.similarity["ssim"].shape == (3, 2)


@pytest.mark.parametrize(
    "method,kwargs",
    [(LayerGradCam, {"relu_attributions": True}), (LayerGradientXActivation, {}), (LayerNormGrad, {"aggregation": "sum", "virtual_layer": "scaling"})],
)
def test_randomization_works_for_any_captum_layer_method(method, kwargs) -> None:
    net = make_net()
    x = inputs()
    res = model_parameter_randomization(net, method, "block.2", x, modules=["fc", "conv1"], attribute_kwargs=kwargs)
    with torch.no_grad():
        t0 = net(x).argmax(1).tolist()
    np.testing.assert_allclose(res.original_maps, reference_map(net, method, "block.2", x, t0, **kwargs), rtol=1e-6, atol=1e-9)
    for k in MEASURES:
        assert res.similarity[k].shape == (2, 2)
    rows = res.rows()
    assert [r["module"] for r in rows] == ["fc", "conv1"]
    assert "| 1 | fc |" in res.to_markdown()


def test_randomizing_everything_decorrelates_normgrad() -> None:
    net = make_net()
    res = model_parameter_randomization(net, LayerNormGrad, "block.0", inputs(3, 32), mode="cascading")
    assert not np.allclose(res.randomized_maps[-1], res.original_maps)
    means = res.mean()
    assert means["spearman_abs"][-1] < means["spearman_abs"][0]


def test_order1_and_factories_are_accepted() -> None:
    order1 = pytest.importorskip("captum_normgrad.normgrad_order1")
    net = make_net()
    res = model_parameter_randomization(
        net, lambda m, layer: order1.LayerNormGradOrder1(m, layer), "conv1", inputs(1), modules=["fc"], keep_maps=False
    )
    assert res.randomized_maps is None and np.isfinite(res.similarity["spearman"]).all()


def test_mean_ignores_nan_and_constant_maps_give_nan() -> None:
    net = make_net()
    with torch.no_grad():
        net.fc.weight.zero_()  # zero gradients everywhere: the map is constant (all zeros)
    res = model_parameter_randomization(net, LayerNormGrad, "conv1", inputs(), modules=["block"])
    assert np.isnan(res.similarity["spearman"]).all()
    assert np.isnan(res.mean()["spearman"]).all()


def test_randomization_bad_inputs() -> None:
    net, x = make_net(), inputs(1)
    with pytest.raises(ValueError, match="empty"):
        model_parameter_randomization(net, LayerNormGrad, "conv1", x, modules=[])
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*conv1"):
        model_parameter_randomization(net, LayerNormGrad, "conv9", x)
    with pytest.raises(ValueError, match=r"unknown layer 'layer4'.*block\.0"):
        model_parameter_randomization(net, LayerNormGrad, "conv1", x, modules=["fc", "layer4"])
    with pytest.raises(ValueError, match="no parameters"):
        model_parameter_randomization(net, LayerNormGrad, "conv1", x, modules=["relu1"])
    with pytest.raises(ValueError, match="mode"):
        model_parameter_randomization(net, LayerNormGrad, "conv1", x, mode="random")
    with pytest.raises(TypeError, match="single str"):
        model_parameter_randomization(net, LayerNormGrad, "conv1", x, modules="fc")
    with pytest.raises(TypeError, match="attribution class"):
        model_parameter_randomization(net, "LayerNormGrad", "conv1", x)
    with pytest.raises(ValueError, match="list of maps"):
        model_parameter_randomization(
            net, lambda m, layer: LayerNormGrad(m, [layer, m.fc]), "conv1", x, modules=["fc"]
        )


# --------------------------------------------------------------------------- class sensitivity


def test_class_sensitivity_matches_scipy_on_top_and_bottom_class_maps() -> None:
    net = make_net()
    x = inputs(3)
    res = class_sensitivity(net, LayerGradCam, "block.0", x)
    with torch.no_grad():
        p = torch.softmax(net(x), 1)
    top, bottom = p.argmax(1).tolist(), p.argmin(1).tolist()
    assert res.top_class.tolist() == top and res.bottom_class.tolist() == bottom
    gc = LayerGradCam(net, net.block[0])
    a = gc.attribute(x, target=top)[:, 0].detach().numpy()
    b = gc.attribute(x, target=bottom)[:, 0].detach().numpy()
    exp = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    np.testing.assert_allclose(res.rho, exp, atol=1e-9)
    assert res.mean() == pytest.approx(float(np.mean(exp)))


def test_normgrad_at_the_pooled_layer_is_class_insensitive_and_gradcam_is_not() -> None:
    """Where the gradient is uniform over locations, ||g_u|| is a constant: the NormGrad map is
    ||x_u|| times a class-dependent constant, so rho = 1 exactly; Grad-CAM's map is V[c] . x_u."""
    net = make_net()
    x = inputs(3)
    ng = class_sensitivity(net, LayerNormGrad, "block.2", x)
    np.testing.assert_allclose(ng.rho, 1.0, atol=1e-12)
    gc = class_sensitivity(net, LayerGradCam, "block.2", x)
    assert (gc.rho < 0.999).all()


def test_class_sensitivity_bad_inputs_and_model_untouched() -> None:
    net = make_net()
    net.train()
    before = snapshot(net)
    class_sensitivity(net, LayerNormGrad, "conv1", inputs(2))
    after = snapshot(net)
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items()) and before[1:] == after[1:]
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        class_sensitivity(net, LayerNormGrad, "nope", inputs(1))
    single = nn.Sequential(nn.Conv2d(3, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="num_classes >= 2"):
        class_sensitivity(single, LayerNormGrad, "0", inputs(1))
