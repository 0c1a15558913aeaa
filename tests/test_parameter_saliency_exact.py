"""Profiles of torchvision models equal a per-sample autograd loop (issue 14), whatever the engine.

Two independent references, written here with plain autograd:

* float64, a loop of batch-1 forward/backward passes: every engine agrees to 1e-10.
* float32, batch 32: one forward pass of the batch, then one ``autograd.grad`` of each sample's
  loss (retain_graph). The forward activations are those of a batched pass, so the comparison
  measures the per-sample gradient computation alone: 1e-5 relative to each layer's scale.

Why not a float32 loop of batch-1 *forward* passes: a batch-1 convolution rounds differently from a
batched one (1e-6 relative), and a ReLU whose input is within that rounding of zero (-1.9e-7 in
float64 in the case behind issue 14's "1.2% off") switches on in one and off in the other, routing
the gradient through a different path. Such a sample's float32 batch-1 profile is 0.5% away from the
float64 profile while the batched engines agree with float64 to 1e-7: the discrepancy is float32
conditioning of the batch-1 loop, not an error of the batched computation
(``benchmarks/bench_parameter_saliency.py`` reports both distances).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from captum_normgrad.parameter_saliency import ParameterSaliency

torchvision = pytest.importorskip("torchvision")

torch.set_num_threads(1)

MODELS = ["resnet18", "mobilenet_v3_small"]  # plain convs; grouped/depthwise convs, SE blocks, hardswish


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def data(n: int, size: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, size, size, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def filter_profile(grads):
    return torch.cat([g.abs().flatten(1).mean(1) for g in grads])


def assert_layerwise_close(ps: ParameterSaliency, got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Per sample and per parameter: max |got - want| <= rel * max |want| (the layer's scale)."""
    worst = 0.0
    for name, sl in ps.feature_slices():
        scale = want[:, sl].abs().amax(1).clamp_min(1e-30)
        err = (got[:, sl] - want[:, sl]).abs().amax(1) / scale
        worst = max(worst, float(err.max()))
        assert float(err.max()) <= rel, f"{name}: relative error {float(err.max()):.2e} > {rel:g}"
    assert worst <= rel


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_float32_batch_of_32_equals_per_sample_autograd(name):
    model = build(name)
    x, y = data(32, 32)
    weights = [p for p in model.parameters() if p.dim() == 4]
    out = model(x)
    losses = F.cross_entropy(out, y, reduction="none")
    want = torch.stack(
        [filter_profile(torch.autograd.grad(losses[i], weights, retain_graph=True)) for i in range(32)]
    )
    for engine in ("auto", "vmap"):
        ps = ParameterSaliency(model, mode="naive", strategy=engine)
        if engine == "auto":
            assert ps.resolve_strategy() == "batched"
        assert_layerwise_close(ps, ps.profiles(x, y), want, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_float64_equals_batch1_loop(name):
    model = copy.deepcopy(build(name)).double()
    x, y = data(32, 32, torch.float64)
    weights = [p for p in model.parameters() if p.dim() == 4]
    want = torch.stack(
        [filter_profile(torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), weights)) for i in range(32)]
    )
    ps = ParameterSaliency(model, mode="naive")
    assert ps.resolve_strategy() == "batched"
    assert_layerwise_close(ps, ps.profiles(x, y), want, 1e-10)
