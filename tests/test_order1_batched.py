"""Order 1 batched across samples (issue #14): ``strategy="batched"``.

Every sample runs with its own parameters inside whole-batch passes. The references are
independent of that engine: deep copies stepped by hand (``test_order1_trust.naive_order1``),
per-sample ``functional_call`` on explicitly shifted parameter dictionaries, and per-sample
``torch.autograd.grad`` loops.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.func import functional_call

from captum_normgrad import LayerNormGradOrder1
from captum_normgrad._per_sample_grads import NotCovered, SampleGrads, batched_pass

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_order1_trust import naive_order1, rel, tv_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is all zero.*:UserWarning",
    "ignore:.*increased the loss.*",
    "ignore:Using padding='same' with even kernel lengths:UserWarning",  # torch's own note
)


def images(n: int, size: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def order1(model: nn.Module, layer: str, strategy: str, **kw) -> LayerNormGradOrder1:
    return LayerNormGradOrder1(model, dict(model.named_modules())[layer], strategy=strategy, **kw)


# ----------------------------------------------------------------- against the deep-copy reference
@pytest.mark.parametrize("adversarial", [False, True])
def test_batched_equals_deep_copy_reference_resnet18(adversarial: bool) -> None:
    model = tv_model("resnet18")
    x, t = images(2, 32, 4), [2, 6]
    for layer in ("layer1.0.bn1", "layer3"):
        ref = naive_order1(model, layer, x, t, eps=5e-2, adversarial=adversarial)
        attr = order1(model, layer, "batched")
        got = attr.attribute(x, t, epsilon=5e-2, adversarial=adversarial)
        assert attr.last_strategy == "batched"
        assert rel(got, ref) < 1e-10, (layer, rel(got, ref))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, layers",
    [
        ("vgg11", ["features.3", "features.13"]),
        ("densenet121", ["features.transition1.conv", "features.denseblock2"]),
        ("mobilenet_v2", ["features.2", "features.12"]),  # depthwise (grouped) convolutions
    ],
)
def test_batched_equals_deep_copy_reference_torchvision(name: str, layers: List[str]) -> None:
    model = tv_model(name)
    x, t = images(2, 32, 5), [1, 4]
    for layer in layers:
        ref = naive_order1(model, layer, x, t, eps=5e-2)
        attr = order1(model, layer, "batched")
        got = attr.attribute(x, t, epsilon=5e-2)
        assert attr.last_strategy == "batched"
        assert rel(got, ref) < 1e-10, (name, layer, rel(got, ref))


@pytest.mark.parametrize("hessian", ["none", "finite_difference"])
def test_batched_equals_loop_on_every_option(hessian: str) -> None:
    model = tv_model("resnet18")
    x, t = images(3, 32, 6), [0, 3, 5]
    for kw in (
        {"adversarial": True},
        {"attribute_to_layer_input": True},
        {"virtual_layer": "weights"},
        {"aggregation": "sum"},
    ):
        a = order1(model, "layer2.0.conv2", "batched").attribute(x, t, epsilon=5e-2, hessian=hessian, **kw)
        b = order1(model, "layer2.0.conv2", "loop").attribute(x, t, epsilon=5e-2, hessian=hessian, **kw)
        assert rel(a, b) < 1e-10, (kw, rel(a, b))


def test_chunks_do_not_change_the_maps() -> None:
    model = tv_model("resnet18")
    x, t = images(5, 32, 7), [0, 1, 2, 3, 4]
    whole = order1(model, "layer2", "batched").attribute(x, t, epsilon=5e-2)
    for chunk in (1, 2):
        parts = order1(model, "layer2", "batched", chunk_size=chunk).attribute(x, t, epsilon=5e-2)
        assert rel(parts, whole) < 1e-12


def test_float32_error_is_that_of_the_loop() -> None:
    """In float32 the batched maps are as close to the float64 maps as the loop's are."""
    model64 = tv_model("resnet18")
    model32 = copy.deepcopy(model64).float()
    x = images(4, 32, 8)
    t = [0, 1, 2, 3]
    truth = order1(model64, "layer2", "loop").attribute(x, t, epsilon=5e-3)
    errs = {}
    for strategy in ("loop", "batched"):
        got = order1(model32, "layer2", strategy).attribute(x.float(), t, epsilon=5e-3)
        assert got.dtype == torch.float32
        errs[strategy] = rel(got.double(), truth)
    assert errs["batched"] < 1e-3 and errs["batched"] <= 10 * errs["loop"] + 1e-6, errs


# ----------------------------------------------------------------- the engine: per-sample parameters
class Zoo(nn.Module):
    """Every layer form the batched engine serves: Conv1d (reflect padding, stride, dilation), Conv2d
    (groups, 'same' padding, few locations: factored), a factored Conv1d with circular padding, Linear
    over tokens, BatchNorm 1d/2d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, stride=2, dilation=2, padding=2, padding_mode="reflect")
        self.bn1 = nn.BatchNorm1d(6)
        self.c1b = nn.Conv1d(6, 64, 5, stride=4, padding=2, padding_mode="circular")  # 4 locations: factored
        self.c2 = nn.Conv2d(6, 8, 3, padding="same", groups=2)
        self.c3 = nn.Conv2d(8, 64, 3, stride=2, padding=1)  # 4 locations: factored
        self.bn2 = nn.BatchNorm2d(64)
        self.tok = nn.Linear(64, 48)  # tokens: factored
        self.head = nn.Linear(48 * 4 + 64, 5)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        h = torch.relu(self.bn1(self.c1(x)))  # (n, 6, 16)
        z = torch.tanh(self.c1b(h)).mean(2)  # (n, 64)
        h = h.reshape(n, 6, 4, 4)
        h = torch.relu(self.bn2(self.c3(torch.tanh(self.c2(h)))))  # (n, 64, 2, 2)
        h = torch.tanh(self.tok(h.flatten(2).transpose(1, 2)))  # (n, 4, 48)
        return self.head(torch.cat([h.flatten(1), z], 1))


def zoo() -> nn.Module:
    torch.manual_seed(0)
    m = Zoo().double()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _per_sample_reference(model: nn.Module, theta: Dict[str, Tensor], x: Tensor, y: Tensor) -> Dict[str, Tensor]:
    bufs = dict(model.named_buffers())
    out: Dict[str, List[Tensor]] = {k: [] for k in theta}
    for i in range(x.shape[0]):
        p = {k: v[i].clone().requires_grad_() for k, v in theta.items()}
        loss = F.cross_entropy(functional_call(model, (p, bufs), (x[i : i + 1],)), y[i : i + 1])
        for k, g in zip(p, torch.autograd.grad(loss, list(p.values()))):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


def test_engine_per_sample_parameters_equal_explicit_shifts() -> None:
    model = zoo()
    x = torch.randn(3, 3, 31, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    theta = {k: v.detach() for k, v in model.named_parameters()}
    bufs = dict(model.named_buffers())

    def run(offsets):
        leaf = x.clone().requires_grad_()
        return batched_pass(
            model, theta, list(theta), lambda: functional_call(model, (theta, bufs), (leaf.clone(),)),
            lambda o: F.cross_entropy(o, y, reduction="none"), leaves=[leaf], offsets=offsets, collect=True,
        )

    _, _, _, g = run(None)
    assert {"c1b.weight", "c3.weight", "tok.weight", "head.weight"} <= set(g.factors), g.factors.keys()
    assert {"c1.weight", "c2.weight", "bn1.weight"} <= set(g.dense)
    same = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in theta.items()}
    ref_g = _per_sample_reference(model, same, x, y)
    for k, p in theta.items():
        assert rel(g.expanded(k, p.shape), ref_g[k]) < 1e-12, k
    # squared norms without expanding the factors
    dense_norm = sum(ref_g[k].reshape(3, -1).square().sum(1) for k in theta)
    assert rel(g.sq_norms(), dense_norm) < 1e-12
    # a pass with per-sample parameters theta + c_i g_i
    c = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    out, _, _, v = run((g, c))
    shifted = {k: theta[k].unsqueeze(0) + c.reshape(-1, *[1] * theta[k].dim()) * ref_g[k] for k in theta}
    for i in range(3):
        alone = functional_call(model, ({k: s[i] for k, s in shifted.items()}, bufs), (x[i : i + 1],))
        assert rel(out[i : i + 1], alone) < 1e-12
    ref_v = _per_sample_reference(model, shifted, x, y)
    for k, p in theta.items():
        assert rel(v.expanded(k, p.shape), ref_v[k]) < 1e-11, k


def test_engine_refuses_a_module_called_twice() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin).double().eval()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotCovered, match="more than once"):
        batched_pass(model, theta, list(theta), lambda: functional_call(model, theta, (x,)),
                     lambda o: o.sum(1), collect=True)


def test_sample_grads_without_entries_are_zero() -> None:
    g = SampleGrads(2, like=torch.zeros(1, dtype=torch.float64))
    assert g.sq_norms().tolist() == [0.0, 0.0] and g.sq_norms().dtype == torch.float64
    assert g.expanded("w", (3,)).abs().sum() == 0 and g.expanded("w", (3,)).dtype == torch.float64


# ----------------------------------------------------------------- when the batched engine steps aside
class LN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(torch.relu(self.conv(x))).mean((2, 3)))


class Mixer(nn.Module):
    """Subtracts the batch mean: the samples interact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return self.fc((h - h.mean(0, keepdim=True)).mean((2, 3)))


class SeqFirst(nn.Module):
    """A layer whose tensor is (T, N, C): not batch-first."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:  # x (N, T, 3)
        return self.fc(torch.tanh(self.proj(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize(
    "cls, layer, shape, why",
    [
        (LN, "conv", (3, 3, 6, 6), "GroupNorm"),
        (Twice, "fc", (3, 3, 6, 6), "more than once"),
        (Mixer, "conv", (3, 3, 6, 6), "mixes the samples"),
        (SeqFirst, "proj", (3, 4, 3), "batch-first|batch is not its first dim"),
    ],
)
def test_auto_falls_back_to_the_loop_and_batched_names_the_cause(cls, layer, shape, why) -> None:
    torch.manual_seed(0)
    model = cls().double().eval()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = [0, 1, 2]
    auto = order1(model, layer, "auto")
    got = auto.attribute(x, t, epsilon=5e-2)
    assert auto.last_strategy == "loop"
    assert rel(got, order1(model, layer, "loop").attribute(x, t, epsilon=5e-2)) == 0.0
    with pytest.raises(ValueError, match=f"strategy='batched' cannot serve this call: .*({why}).*strategy='loop'"):
        order1(model, layer, "batched").attribute(x, t, epsilon=5e-2)


class Overwrites(nn.Module):
    """Overwrites a convolution's input in place after the call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x * 1.0
        y = self.conv(h)
        h.mul_(2.0)
        return self.fc(torch.cat([torch.tanh(y).mean((2, 3)), h.mean((2, 3))], 1))


def test_an_input_overwritten_in_place_is_refused_not_misread() -> None:
    """A per-sample weight gradient reads the layer's input when the output gradient arrives: an input
    overwritten in place after the call would give silently wrong gradients. The batched engines
    refuse it with the cause, as plain autograd does."""
    from captum_normgrad import ParameterSaliency

    torch.manual_seed(0)
    model = Overwrites().double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="strategy='batched' cannot serve this call: .*modified in place"):
        order1(model, "conv", "batched").attribute(x, [0, 1, 2], epsilon=5e-2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        order1(model, "conv", "loop").attribute(x, [0, 1, 2], epsilon=5e-2)
    with pytest.raises(ValueError, match="strategy='batched' cannot serve this model .*modified in place"):
        ParameterSaliency(model, mode="naive", strategy="batched").profiles(x, torch.tensor([0, 1, 2]))


class BatchMeanOut(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h - h.mean(0, keepdim=True)


def test_the_probe_runs_once_per_call_signature() -> None:
    """The batch-1 probe (layer shapes, and the reference of the check that the samples do not
    interact) runs on the first batched call of each signature; a change of input shape, module,
    training flag or trainable set runs it again, and a module swapped for a mixing one is caught."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Identity(), nn.Linear(16, 4),
    ).double().eval()
    sizes: List[int] = []
    model.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    x, t = images(3, 8, 1), [0, 1, 2]
    attr = order1(model, "3", "auto")

    def probes(inputs: Tensor) -> int:
        sizes.clear()
        attr.attribute(inputs, t, epsilon=5e-2)
        return sizes.count(1)

    assert probes(x) == 1 and attr.last_strategy == "batched"
    first = attr.attribute(x, t, epsilon=5e-2)
    assert probes(x) == 0 and probes(images(3, 8, 2)) == 0  # same signature, other values
    assert rel(first, order1(model, "3", "loop").attribute(x, t, epsilon=5e-2)) < 1e-10
    assert probes(images(3, 10, 1)) == 1  # another input size
    model[0].weight.requires_grad_(False)
    assert probes(x) == 1  # another trainable set
    model[0].weight.requires_grad_(True)
    model[8] = nn.Linear(16, 4).double()
    assert probes(x) == 1  # another module
    model[7] = BatchMeanOut()  # now the samples interact: checked again, and caught
    got = attr.attribute(x, t, epsilon=5e-2)
    assert attr.last_strategy == "loop"
    assert rel(got, order1(model, "3", "loop").attribute(x, t, epsilon=5e-2)) == 0.0


def test_exact_hessian_runs_per_sample() -> None:
    model = tv_model("resnet18")
    x, t = images(2, 32, 9), [0, 1]
    attr = order1(model, "layer2", "auto")
    attr.attribute(x, t, epsilon=5e-2, hessian="exact")
    assert attr.last_strategy == "loop"
    with pytest.raises(ValueError, match="hessian='exact'"):
        order1(model, "layer2", "batched").attribute(x, t, hessian="exact")


def test_user_backward_hooks_and_the_model_untouched() -> None:
    """Plain autograd: the caller's backward hooks run and the maps equal the loop's; afterwards the
    model's parameters, buffers, flags, .grad fields, mode and hooks are exactly as before."""
    model = tv_model("resnet18")
    model.layer4[0].conv1.weight.requires_grad_(False)  # not part of theta
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    seen: List[int] = []
    handle = model.layer1.register_full_backward_hook(lambda m, gi, go: seen.append(1))
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    x, t = images(2, 32, 10), [3, 4]
    try:
        a = order1(model, "layer2", "batched").attribute(x, t, epsilon=5e-2)
        b = order1(model, "layer2", "loop").attribute(x, t, epsilon=5e-2)
        assert seen and rel(a, b) < 1e-10
        with pytest.raises(ValueError):
            order1(model, "layer2", "batched").attribute(x, [3, 99])
    finally:
        handle.remove()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert not model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_each_pass_frees_its_graph_without_waiting_for_the_garbage_collector() -> None:
    """``chunk_size`` bounds memory only if a pass's activations die with it: no reference cycle
    (hooks -> recorded outputs -> their tensor hooks -> hooks) may keep them until a GC runs."""
    import gc
    import weakref

    model = tv_model("resnet18")
    refs: List[weakref.ref] = []
    handle = model.layer1[0].conv1.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    gc.disable()
    try:
        order1(model, "layer2", "batched", chunk_size=1).attribute(images(2, 32, 11), [0, 1], epsilon=5e-2)
        assert len(refs) >= 8  # probe + 4 passes x 2 chunks
        alive = [r for r in refs if r() is not None]
        assert not alive, f"{len(alive)} of {len(refs)} layer outputs still alive"
    finally:
        gc.enable()
        handle.remove()


# ----------------------------------------------------------------- property: any conv, per-sample parameters
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cin=st.sampled_from([2, 4]),
    cout=st.sampled_from([4, 24]),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1, "same"]),
    dilation=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    mode=st.sampled_from(["zeros", "reflect", "circular"]),
    size=st.integers(5, 9),
    seed=st.integers(0, 2**16),
)
def test_property_conv_with_per_sample_parameters_equals_one_at_a_time(
    cin, cout, kernel, stride, padding, dilation, groups, mode, size, seed
) -> None:
    """For any Conv2d (dense or factored offset, any padding mode), a batched pass with parameters
    theta + c_i D_i gives each sample's output and parameter gradients of a batch-1 pass with
    those parameters (float64)."""
    if padding == "same" and stride != 1:
        padding = 1
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     padding_mode=mode)
    model = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cout, 3)).double().eval()
    n = 3
    x = torch.randn(n, cin, size, size, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    theta = {k: v.detach() for k, v in model.named_parameters()}
    loss = lambda o: F.cross_entropy(o, y, reduction="none")  # noqa: E731

    def run(offsets):
        leaf = x.clone().requires_grad_()
        return batched_pass(model, theta, list(theta), lambda: functional_call(model, theta, (leaf.clone(),)), loss,
                            leaves=[leaf], offsets=offsets, collect=True)

    _, _, _, d = run(None)
    c = torch.randn(n, dtype=torch.float64)
    out, _, _, v = run((d, c))
    shifted = {k: t.unsqueeze(0) + c.reshape(-1, *[1] * t.dim()) * d.expanded(k, t.shape) for k, t in theta.items()}
    ref = _per_sample_reference(model, shifted, x, y)
    for i in range(n):
        alone = functional_call(model, {k: s[i] for k, s in shifted.items()}, (x[i : i + 1],))
        assert rel(out[i : i + 1], alone) < 1e-11
    for k, t in theta.items():
        assert rel(v.expanded(k, t.shape), ref[k]) < 1e-10, (k, "factored" if k in v.factors else "dense")


def test_parameter_saliency_batched_engine_detects_mixing_models_too() -> None:
    """The same independence check guards the profiles' batched engine: a model that mixes the samples
    gets the exact per-sample engine under 'auto', and an explicit 'batched' names the cause."""
    from captum_normgrad import ParameterSaliency

    torch.manual_seed(0)
    model = Mixer().double().eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    auto = ParameterSaliency(model, mode="naive").profiles(x, y)
    loop = ParameterSaliency(model, mode="naive", strategy="loop").profiles(x, y)
    assert rel(auto, loop) < 1e-12
    with pytest.raises(ValueError, match="strategy='batched' cannot serve this model .*mixes the samples"):
        ParameterSaliency(model, mode="naive", strategy="batched").profiles(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fallback_is_the_loop_when_the_model_has_backward_hooks() -> None:
    """On CUDA the fallback is vmap, except for models with backward hooks (torch.func cannot run them)."""
    torch.manual_seed(0)
    model = LN().double().eval().cuda()
    handle = model.conv.register_full_backward_hook(lambda m, gi, go: None)
    try:
        x = torch.randn(3, 3, 6, 6, dtype=torch.float64, device="cuda")
        attr = order1(model, "conv", "auto")
        attr.attribute(x, [0, 1, 2], epsilon=5e-2)
        assert attr.last_strategy == "loop"
    finally:
        handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, layer, expected",
    [
        ("efficientnet_b0", "features.3", "batched"),  # SiLU, squeeze-excitation convs on 1x1 maps
        ("shufflenet_v2_x0_5", "stage3", "batched"),  # channel shuffle, depthwise convs
        ("googlenet", "inception4a", "batched"),  # parallel branches, concatenation
        ("regnet_x_400mf", "trunk_output.block2", "batched"),  # grouped convs
        ("convnext_tiny", "features.3", "loop"),  # LayerNorm: not served, the loop runs
    ],
)
def test_more_torchvision_architectures_equal_the_loop(name: str, layer: str, expected: str) -> None:
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(num_classes=5, **kw).double().eval()
    x, t = images(2, 64, 12), [1, 3]
    auto = order1(model, layer, "auto")
    got = auto.attribute(x, t, epsilon=5e-2)
    assert auto.last_strategy == expected
    ref = order1(model, layer, "loop").attribute(x, t, epsilon=5e-2)
    assert ref.abs().max() > 0
    assert rel(got, ref) < 1e-10


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dim=st.sampled_from([1, 2]),
    cin=st.sampled_from([1, 3]),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2, 3]),
    padding=st.sampled_from([0, 1, 2]),
    dilation=st.sampled_from([1, 2]),
    mode=st.sampled_from(["zeros", "reflect", "circular", "replicate"]),
    size=st.integers(6, 10),
    seed=st.integers(0, 2**16),
)
def test_property_patch_products_from_pixel_grams_equal_unfolded_patches(
    dim, cin, kernel, stride, padding, dilation, mode, size, seed
) -> None:
    """The factored gradients' patch products ``A_i^T unfold(x_i)``, computed from pixel Gram
    matrices per stride phase, equal the products of explicitly unfolded patches (float64), for the
    layer's own input and for a new input, whatever the stride, dilation and padding mode."""
    from captum_normgrad._per_sample_grads import _Patches

    if mode == "reflect" and padding >= size // 2:
        padding = 1
    conv_cls = nn.Conv1d if dim == 1 else nn.Conv2d
    conv = conv_cls(cin, 4, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode).double()
    g = torch.Generator().manual_seed(seed)
    shape = (2, cin, size) if dim == 1 else (2, cin, size, size)
    a, x = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)
    reference_out = conv(a)
    locations = reference_out[0, 0].numel()

    def patches(t: Tensor) -> Tensor:  # (n, cols, L), by hand: pad as the module does, then unfold
        t4 = t.unsqueeze(2) if dim == 1 else t
        pads = [padding] * 2 + ([0, 0] if dim == 1 else [padding] * 2)
        if padding:
            t4 = F.pad(t4, pads, mode="constant" if mode == "zeros" else mode)
        k = (1, kernel) if dim == 1 else (kernel, kernel)
        s = (1, stride) if dim == 1 else (stride, stride)
        d = (1, dilation) if dim == 1 else (dilation, dilation)
        return F.unfold(t4, k, dilation=d, stride=s)

    p = _Patches(conv, a, locations)
    assert rel(p.gram(), patches(a).transpose(1, 2) @ patches(a)) < 1e-12
    assert rel(p.gram(x), patches(a).transpose(1, 2) @ patches(x)) < 1e-12
    # the convolution operation of a non-zeros padding mode receives the input padded by the module
    op_input = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode) if mode != "zeros" and padding else x
    assert rel(p.gram(op_input, op_input=True), patches(a).transpose(1, 2) @ patches(x)) < 1e-12
