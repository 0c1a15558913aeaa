"""Adapters between layer attributions and Captum's metrics / NoiseTunnel.

The references here are hand computations on a tiny model whose maps have closed forms
(``HandNet``: 1x1 conv -> ReLU -> global average pool -> linear), written with plain tensor
algebra; they never call the adapters or Captum's metrics.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerGradientXActivation, NoiseTunnel, Saliency
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor, nn

from captum_normgrad import LayerNormGrad, fuse_maps
from captum_normgrad._layers import module_by_name
from captum_normgrad._maps import reduce_map_channels
from captum_normgrad.wrappers import InputAttribution, LayerNoiseTunnel, as_input_attribution, upsample_to_input

C_IN, C_MID, K, H = 2, 3, 2, 4


class HandNet(nn.Module):
    """out = V relu(W x_u + b) averaged over u + c: every map below has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Conv2d(C_IN, C_MID, 1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(C_MID, K)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.act(self.lin(x))).flatten(1))


def make_net(seed: int = 0) -> HandNet:
    torch.manual_seed(seed)
    net = HandNet().double().eval()
    with torch.no_grad():  # keep pre-activations away from the ReLU kink
        net.lin.bias.add_(0.3)
    return net


def hand_layer(net: HandNet, x: Tensor, target: int):
    """Activation ``a`` of ``lin`` and the gradient ``g`` of logit ``target`` w.r.t. it, by hand."""
    w = net.lin.weight.detach()[:, :, 0, 0]
    a = torch.einsum("oc,nchw->nohw", w, x) + net.lin.bias.detach()[None, :, None, None]
    v = net.fc.weight.detach()[target]
    g = (a > 0).to(a.dtype) * v[None, :, None, None] / (x.shape[2] * x.shape[3])
    return a, g


def hand_map(kind: str, net: HandNet, x: Tensor, target: int) -> Tensor:
    """(N, 1, H, W) map at ``lin`` for NormGrad / Grad-CAM / gradient x activation (channel-summed)."""
    a, g = hand_layer(net, x, target)
    if kind == "normgrad":
        return (a.square().sum(1, keepdim=True) * g.square().sum(1, keepdim=True)).sqrt()
    if kind == "gradcam":
        alpha = g.mean((2, 3), keepdim=True)
        return (alpha * a).sum(1, keepdim=True)
    if kind == "gxa":
        return (g * a).sum(1, keepdim=True)
    raise AssertionError(kind)


METHODS = {
    "normgrad": lambda net: LayerNormGrad(net, net.lin),
    "gradcam": lambda net: LayerGradCam(net, net.lin),
    "gxa": lambda net: LayerGradientXActivation(net, net.lin),
}


def deltas(n: int, seed: int = 5) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(n, C_IN, H, H, generator=g, dtype=torch.float64)


def fixed_perturb(n: int):
    """Deterministic perturbation for sensitivity_max: row j of the expanded batch gets delta[j % n]."""
    d = deltas(n)

    def perturb(inputs: Tensor) -> Tensor:
        return inputs + d[torch.arange(inputs.shape[0]) % n]

    return perturb


def hand_sensitivity(kind: str, net: HandNet, x: Tensor, target: int, n: int) -> Tensor:
    d = deltas(n)
    out = []
    for i in range(x.shape[0]):
        e0 = hand_map(kind, net, x[i : i + 1], target).expand(1, C_IN, H, H)
        best = 0.0
        for k in range(n):
            ek = hand_map(kind, net, x[i : i + 1] + d[k], target).expand(1, C_IN, H, H)
            best = max(best, float((ek - e0).norm() / e0.norm()))
        out.append(best)
    return torch.tensor(out, dtype=torch.float64)


def state_snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    )


def assert_same_state(a, b) -> None:
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert [r for r, _ in a[1]] == [r for r, _ in b[1]]
    assert all((g1 is None and g2 is None) or torch.equal(g1, g2) for (_, g1), (_, g2) in zip(a[1], b[1]))
    assert a[2] == b[2] and a[3] == b[3]


# --------------------------------------------------------------------------- upsampling


def test_upsample_bilinear_matches_hand_formula_and_broadcasts_channels() -> None:
    # 2 -> 4 with align_corners=False samples the source at -0.25, 0.25, 0.75, 1.25 (edges clamp)
    m = torch.tensor([[[[1.0, 5.0], [3.0, -2.0]]]], dtype=torch.float64)
    wts = [(1.0, 0.0), (0.75, 0.25), (0.25, 0.75), (0.0, 1.0)]
    exp = torch.zeros(4, 4, dtype=torch.float64)
    for i, (a0, a1) in enumerate(wts):
        for j, (b0, b1) in enumerate(wts):
            exp[i, j] = a0 * (b0 * m[0, 0, 0, 0] + b1 * m[0, 0, 0, 1]) + a1 * (b0 * m[0, 0, 1, 0] + b1 * m[0, 0, 1, 1])
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    out = upsample_to_input(m, x)
    assert isinstance(out, Tensor) and out.shape == x.shape and out.is_contiguous()
    for c in range(3):
        torch.testing.assert_close(out[0, c], exp)
    out_t = upsample_to_input(m, (x, torch.zeros(1, 1, 2, 2, dtype=torch.float64)))
    assert isinstance(out_t, tuple) and len(out_t) == 2
    torch.testing.assert_close(out_t[1][0, 0], m[0, 0])  # already the right size: unchanged


def test_reduce_channels_and_input_shaped_maps_pass_through() -> None:
    m = torch.arange(24.0).reshape(1, 2, 3, 4)
    torch.testing.assert_close(reduce_map_channels(m), m[:, :1] + m[:, 1:])
    torch.testing.assert_close(reduce_map_channels(m, "mean"), (m[:, :1] + m[:, 1:]) / 2)
    with pytest.raises(ValueError, match="reduce_channels"):
        reduce_map_channels(m, None)
    x = torch.zeros(1, 2, 3, 4)
    assert upsample_to_input(m, x) is m  # Saliency-like input-shaped attributions are kept


@pytest.mark.parametrize("kind", sorted(METHODS))
@pytest.mark.parametrize("as_tuple", [False, True])
def test_as_input_attribution_equals_hand_maps(kind: str, as_tuple: bool) -> None:
    net = make_net()
    x = torch.randn(3, C_IN, H, H, dtype=torch.float64)
    explain = as_input_attribution(METHODS[kind](net))
    out = explain((x,) if as_tuple else x, target=1)
    assert isinstance(out, tuple) == as_tuple
    got = out[0] if as_tuple else out
    exp = hand_map(kind, net, x, 1).expand(-1, C_IN, -1, -1)
    torch.testing.assert_close(got, exp)
    assert isinstance(explain, InputAttribution)


# --------------------------------------------------------------------------- captum.metrics


@pytest.mark.parametrize("kind", sorted(METHODS))
@pytest.mark.parametrize("n_batch", [1, 3])
@pytest.mark.parametrize("as_tuple", [False, True])
def test_sensitivity_max_with_adapter_matches_hand(kind: str, n_batch: int, as_tuple: bool) -> None:
    net = make_net()
    x = torch.randn(n_batch, C_IN, H, H, dtype=torch.float64)
    n = 4
    explain = as_input_attribution(METHODS[kind](net))
    got = sensitivity_max(explain, (x,) if as_tuple else x, fixed_perturb(n), n_perturb_samples=n, target=1)
    torch.testing.assert_close(got.double(), hand_sensitivity(kind, net, x, 1, n))


def test_sensitivity_max_without_adapter_is_wrong_for_one_sample() -> None:
    """The bug the adapter fixes: a bare layer map is iterated row by row by sensitivity_max.

    For N = 1 each perturbed map is compared with the original ``n`` times over, which multiplies
    the score by sqrt(n) without any error; with the adapter the hand value comes back.
    """
    net = make_net()
    x = torch.randn(1, C_IN, H, H, dtype=torch.float64)
    n = 4
    hand = hand_sensitivity("normgrad", net, x, 1, n)
    raw = sensitivity_max(LayerNormGrad(net, net.lin).attribute, x, fixed_perturb(n), n_perturb_samples=n, target=1)
    assert not torch.allclose(raw.double(), hand)
    torch.testing.assert_close(raw.double(), math.sqrt(n) * hand)
    fixed = sensitivity_max(
        as_input_attribution(LayerNormGrad(net, net.lin)), x, fixed_perturb(n), n_perturb_samples=n, target=1
    )
    torch.testing.assert_close(fixed.double(), hand)


def test_sensitivity_max_without_adapter_crashes_for_several_samples() -> None:
    net = make_net()
    x = torch.randn(3, C_IN, H, H, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        sensitivity_max(LayerGradCam(net, net.lin).attribute, x, fixed_perturb(2), n_perturb_samples=2, target=1)


@pytest.mark.parametrize("kind", sorted(METHODS))
@pytest.mark.parametrize("n_batch", [1, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_with_adapter_matches_hand(kind: str, n_batch: int, normalize: bool) -> None:
    net = make_net()
    x = torch.randn(n_batch, C_IN, H, H, dtype=torch.float64)
    n = 5
    d = deltas(n, seed=7)

    def perturb(inputs: Tensor):
        noise = d[torch.arange(inputs.shape[0]) % n]
        return noise, inputs - noise

    attr = as_input_attribution(METHODS[kind](net))(x, target=0)
    got = infidelity(net, perturb, x, attr, target=0, n_perturb_samples=n, normalize=normalize)
    exp = []
    with torch.no_grad():
        for i in range(n_batch):
            m = hand_map(kind, net, x[i : i + 1], 0)[0, 0]
            dots = torch.stack([(m[None] * d[k]).sum() for k in range(n)])  # map broadcast over channels
            diffs = torch.stack([net(x[i : i + 1])[0, 0] - net(x[i : i + 1] - d[k])[0, 0] for k in range(n)])
            if normalize:
                beta = (dots * diffs).mean() / (dots * dots).mean()
                dots = beta * dots
            exp.append(((dots - diffs) ** 2).mean())
    torch.testing.assert_close(got.double(), torch.stack(exp))


def test_infidelity_rejects_raw_layer_maps() -> None:
    net = make_net()
    x = torch.randn(2, C_IN, H, H, dtype=torch.float64)
    raw = LayerNormGrad(net, net.lin).attribute(x, target=0)
    with pytest.raises(AssertionError):
        infidelity(net, lambda t: (t * 0 + 0.01, t - 0.01), x, raw, target=0)


def test_adapter_on_order1_for_any_batch() -> None:
    order1 = pytest.importorskip("captum_normgrad.normgrad_order1")
    net = make_net()
    x = torch.randn(2, C_IN, H, H, dtype=torch.float64)
    method = order1.LayerNormGradOrder1(net, net.lin)
    explain = as_input_attribution(method)
    n = 3
    got = sensitivity_max(explain, x, fixed_perturb(n), n_perturb_samples=n, target=1)
    d = deltas(n)
    exp = []
    for i in range(2):  # explicit loop over the method's own maps
        e0 = method.attribute(x[i : i + 1], target=1)
        exp.append(max(float((method.attribute(x[i : i + 1] + d[k], target=1) - e0).norm() / e0.norm()) for k in range(n)))
    torch.testing.assert_close(got.double(), torch.tensor(exp, dtype=torch.float64))
    assert explain((x,), target=1)[0].shape == x.shape


def test_caller_model_untouched_by_metrics() -> None:
    net = make_net()
    net.train()  # also the mode must survive
    before = state_snapshot(net)
    x = torch.randn(2, C_IN, H, H, dtype=torch.float64)
    sensitivity_max(as_input_attribution(LayerNormGrad(net, net.lin)), x, fixed_perturb(2), n_perturb_samples=2, target=0)
    LayerNoiseTunnel(LayerNormGrad(net, [net.lin, net.act])).attribute(x, nt_samples=2, stdevs=0.1, target=0)
    assert_same_state(before, state_snapshot(net))


# --------------------------------------------------------------------------- NoiseTunnel


def _noisy_inputs(x: Tensor, nt: int, std: float, seed: int) -> Tensor:
    """The noisy copies NoiseTunnel draws after ``torch.manual_seed(seed)`` (one draw per input)."""
    torch.manual_seed(seed)
    noise = torch.normal(0, torch.tensor(std).repeat((x.shape[0] * nt,) + tuple(x.shape[1:])))
    return x.repeat_interleave(nt, dim=0) + noise


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_captum_noise_tunnel_around_layer_normgrad_matches_manual_smoothing(nt_type: str) -> None:
    net = make_net()
    x = torch.randn(2, C_IN, H, H, dtype=torch.float64)
    nt, std = 6, 0.2
    torch.manual_seed(11)
    got = NoiseTunnel(LayerNormGrad(net, net.lin)).attribute(x, nt_type=nt_type, nt_samples=nt, stdevs=std, target=1)
    xs = _noisy_inputs(x, nt, std, 11)
    maps = hand_map("normgrad", net, xs, 1).reshape(2, nt, 1, H, H)
    mean, mean_sq = maps.mean(1), (maps**2).mean(1)
    exp = {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": mean_sq - mean**2}[nt_type]
    assert got.shape == (2, 1, H, H)
    torch.testing.assert_close(got, exp)


def test_layer_noise_tunnel_gives_one_smoothed_map_per_layer() -> None:
    net = make_net()
    x = torch.randn(3, C_IN, H, H, dtype=torch.float64)
    nt, std = 5, 0.1
    torch.manual_seed(3)
    got = LayerNoiseTunnel(LayerNormGrad(net, [net.lin, net.act])).attribute(
        x, nt_type="smoothgrad", nt_samples=nt, stdevs=std, target=0
    )
    assert isinstance(got, list) and len(got) == 2
    xs = _noisy_inputs(x, nt, std, 3)
    a, g = hand_layer(net, xs, 0)
    lin_maps = (a.square().sum(1, keepdim=True) * g.square().sum(1, keepdim=True)).sqrt()
    r = a.clamp(min=0)  # output of the ReLU; its gradient is V[0] / HW everywhere
    g_r = net.fc.weight.detach()[0].norm() / (H * H)
    act_maps = r.square().sum(1, keepdim=True).sqrt() * g_r
    torch.testing.assert_close(got[0], lin_maps.reshape(3, nt, 1, H, H).mean(1))
    torch.testing.assert_close(got[1], act_maps.reshape(3, nt, 1, H, H).mean(1))
    with pytest.raises(AssertionError):  # what the wrapper is for
        NoiseTunnel(LayerNormGrad(net, [net.lin, net.act])).attribute(x, nt_samples=2, stdevs=0.1, target=0)


class _SplitPair(torch.nn.Module):
    """A layer that returns a tuple of two tensors."""

    def forward(self, t: Tensor):
        c = t.shape[1] // 2
        return t[:, :c], t[:, c:] * 2.0


def test_layer_noise_tunnel_keeps_every_tensor_of_tuple_layers_in_a_list() -> None:
    """A list of layers where one returns a tuple: every tensor of the tuple comes back, smoothed
    exactly like the method's own maps on the noisy copies (checked with a hand loop)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    split = _SplitPair()
    head = torch.nn.Linear(4, 3)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.split, self.head = conv, split, head

        def forward(self, t: Tensor) -> Tensor:
            a, b = self.split(torch.tanh(self.conv(t)))
            return self.head(torch.cat([a, b], 1).mean((2, 3)))

    net = Net().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    nt, std = 3, 0.2
    torch.manual_seed(9)
    got = LayerNoiseTunnel(LayerNormGrad(net, [net.conv, net.split])).attribute(
        x, nt_type="smoothgrad", nt_samples=nt, stdevs=std, target=1
    )
    assert isinstance(got, list) and len(got) == 2
    assert isinstance(got[1], tuple) and len(got[1]) == 2
    xs = _noisy_inputs(x, nt, std, 9)
    ref = LayerNormGrad(net, [net.conv, net.split]).attribute(xs, target=1)
    torch.testing.assert_close(got[0], ref[0].reshape(2, nt, 1, 5, 5).mean(1))
    for k in range(2):
        torch.testing.assert_close(got[1][k], ref[1][k].reshape(2, nt, 1, 5, 5).mean(1))


def test_layer_noise_tunnel_single_layer_equals_captum_noise_tunnel() -> None:
    net = make_net()
    x = torch.randn(2, C_IN, H, H, dtype=torch.float64)
    torch.manual_seed(4)
    a = LayerNoiseTunnel(LayerGradCam(net, net.lin)).attribute(x, nt_samples=4, stdevs=0.1, target=1)
    torch.manual_seed(4)
    b = NoiseTunnel(LayerGradCam(net, net.lin)).attribute(x, nt_samples=4, stdevs=0.1, target=1)
    assert isinstance(a, Tensor)
    torch.testing.assert_close(a, b)


def test_noise_tunnel_around_adapter_gives_input_shaped_smoothed_maps() -> None:
    net = make_net()
    x = torch.randn(2, C_IN, H, H, dtype=torch.float64)
    torch.manual_seed(8)
    got = NoiseTunnel(as_input_attribution(LayerNormGrad(net, net.lin))).attribute(
        x, nt_samples=4, stdevs=0.1, target=0
    )
    xs = _noisy_inputs(x, 4, 0.1, 8)
    exp = hand_map("normgrad", net, xs, 0).reshape(2, 4, 1, H, H).mean(1).expand(-1, C_IN, -1, -1)
    torch.testing.assert_close(got, exp)


# --------------------------------------------------------------------------- bad input


def test_mismatched_batch_sizes_raise() -> None:
    with pytest.raises(ValueError, match="batch sizes differ"):
        upsample_to_input(torch.rand(2, 1, 2, 2), torch.rand(3, 3, 8, 8))


def test_list_of_maps_needs_combine() -> None:
    net = make_net()
    x = torch.randn(2, C_IN, H, H, dtype=torch.float64)
    ng = LayerNormGrad(net, [net.lin, net.act])
    with pytest.raises(ValueError, match="combine"):
        as_input_attribution(ng)(x, target=0)
    with pytest.raises(ValueError, match="fuse_maps"):
        upsample_to_input(ng.attribute(x, target=0), x)
    fused = as_input_attribution(ng, combine=fuse_maps)(x, target=0)
    exp = fuse_maps(ng.attribute(x, target=0)).expand(-1, C_IN, -1, -1)
    torch.testing.assert_close(fused, exp.to(fused.dtype))


def test_maps_without_locations_and_mismatched_ranks_raise() -> None:
    with pytest.raises(ValueError, match="no spatial locations"):
        upsample_to_input(torch.rand(2, 5), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="numbers of dims"):
        upsample_to_input(torch.rand(2, 1, 4), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="2 maps for 3 input tensors"):
        upsample_to_input((torch.rand(1, 1, 2, 2),) * 2, (torch.rand(1, 1, 4, 4),) * 3)


def test_unknown_layer_name_lists_valid_names() -> None:
    net = make_net()
    assert module_by_name(net, "fc") is net.fc
    assert module_by_name(net, "") is net
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*valid names: lin, act, pool, fc"):
        module_by_name(net, "conv9")
    with pytest.raises(TypeError, match="str"):
        module_by_name(net, net.fc)  # type: ignore[arg-type]


def test_wrapping_a_non_attribution_raises() -> None:
    with pytest.raises(TypeError, match="attribute"):
        as_input_attribution(make_net())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduce_channels"):
        as_input_attribution(Saliency(make_net()), reduce_channels="max")
    with pytest.raises(TypeError, match="Captum attribution"):
        LayerNoiseTunnel(object())  # type: ignore[arg-type]


def test_noise_tunnel_around_order1_averages_its_maps_over_the_noisy_copies() -> None:
    order1 = pytest.importorskip("captum_normgrad.normgrad_order1")
    net = make_net()
    x = torch.randn(2, C_IN, H, H, dtype=torch.float64)
    method = order1.LayerNormGradOrder1(net, net.lin)
    torch.manual_seed(6)
    got = NoiseTunnel(method).attribute(x, nt_samples=3, stdevs=0.1, target=[0, 1])
    xs = _noisy_inputs(x, 3, 0.1, 6)
    per_copy = [method.attribute(xs[j : j + 1], target=[0, 1][j // 3]) for j in range(6)]  # one at a time
    exp = torch.cat(per_copy).reshape(2, 3, 1, H, H).mean(1)
    torch.testing.assert_close(got, exp)
    torch.manual_seed(6)
    listed = LayerNoiseTunnel(order1.LayerNormGradOrder1(net, [net.lin])).attribute(
        x, nt_samples=3, stdevs=0.1, target=[0, 1]
    )
    torch.testing.assert_close(listed[0], exp)
