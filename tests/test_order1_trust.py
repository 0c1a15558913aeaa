"""Order 1 you can trust, and the drop-in promise (issue #11).

Every reference here is written independently of the package: deep copies of the model stepped
by hand, activations taken with our own hooks that hand clones downstream, explicit per-sample
loops, and hand-written double backward.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from captum.testing.attr.helpers.test_config import config
from torch import Tensor, nn

from captum_normgrad import LayerNormGrad, LayerNormGradOrder1

pytestmark = pytest.mark.filterwarnings("ignore:.*is all zero.*:UserWarning")


def ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y.reshape(-1).long(), reduction="none")


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def tv_model(name: str, seed: int = 0) -> nn.Module:
    """A torchvision architecture, random init, float64. VGG keeps its ``features`` (the in-place
    ReLUs under test) but gets a small head: its 100M-parameter classifier would dominate the run."""
    torch.manual_seed(seed)
    m = getattr(torchvision.models, name)(num_classes=7)
    if name.startswith("vgg"):
        m.avgpool = nn.AdaptiveAvgPool2d(1)
        m.classifier = nn.Linear(512, 7)
    return m.double().eval()


# ----------------------------------------------------------------- independent references
def naive_activation_and_grad(model: nn.Module, layer: nn.Module, x: Tensor, y: int) -> Tuple[Tensor, Tensor]:
    """Activation of ``layer``'s output and d(CE)/d(activation), one example, with our own hook
    that hands a clone downstream (so in-place ops after the layer cannot touch our copy)."""
    store: Dict[str, Tensor] = {}

    def hook(mod: nn.Module, inp, out: Tensor) -> Tensor:
        store["a"] = out
        return out.clone()

    h = layer.register_forward_hook(hook)
    try:
        out = model(x.unsqueeze(0))
    finally:
        h.remove()
    loss = F.cross_entropy(out, torch.tensor([y]), reduction="sum")
    (g,) = torch.autograd.grad(loss, store["a"])
    return store["a"].detach()[0], g[0]


def naive_param_grad(model: nn.Module, x: Tensor, y: int) -> List[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x.unsqueeze(0)), torch.tensor([y]), reduction="sum")
    return list(torch.autograd.grad(loss, params))


def stepped(model: nn.Module, direction: List[Tensor], alpha: float) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip([p for p in m.parameters() if p.requires_grad], direction):
            p.add_(d, alpha=alpha)
    return m


def naive_order1(model: nn.Module, layer_name: str, x: Tensor, y: List[int], eps: float, adversarial: bool = False) -> Tensor:
    """The paper's four passes per example on deep copies (finite difference, h = 0.5/||v||)."""
    maps = []
    sign = 1.0 if adversarial else -1.0
    for i in range(x.shape[0]):
        g1 = naive_param_grad(model, x[i], y[i])
        mp = stepped(model, g1, sign * eps)
        lp = dict(mp.named_modules())[layer_name]
        a, gp = naive_activation_and_grad(mp, lp, x[i], y[i])
        v = naive_param_grad(mp, x[i], y[i])
        vn = float(torch.sqrt(sum((t * t).sum() for t in v)))
        hh = 0.5 / vn
        mplus, mminus = stepped(model, v, hh), stepped(model, v, -hh)
        _, gplus = naive_activation_and_grad(mplus, dict(mplus.named_modules())[layer_name], x[i], y[i])
        _, gminus = naive_activation_and_grad(mminus, dict(mminus.named_modules())[layer_name], x[i], y[i])
        comb = gp + sign * eps / (2 * hh) * (gplus - gminus)
        maps.append(a.norm(dim=0, keepdim=True) * comb.norm(dim=0, keepdim=True))
    return torch.stack(maps)


# ----------------------------------------------------------------- in-place operations
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, layers",
    [
        # bn1/conv outputs followed by ReLU(inplace=True); whole blocks; the stem
        ("resnet18", ["bn1", "layer1.0.bn1", "layer2", "layer3.1.bn2"]),
        ("vgg11", ["features.0", "features.3", "features.13"]),
        ("densenet121", ["features.norm0", "features.denseblock1.denselayer1.norm2", "features.transition1.conv"]),
    ],
)
def test_epsilon_zero_equals_order0_on_inplace_torchvision(name: str, layers: List[str]) -> None:
    model = tv_model(name)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    t = [1, 5]
    mods = dict(model.named_modules())
    for ln in layers:
        o0 = LayerNormGrad(model, mods[ln]).attribute(x, t, loss_fn=ce)
        o1 = LayerNormGradOrder1(model, mods[ln]).attribute(x, t, epsilon=0.0)
        assert rel(o1, o0) < 1e-6, (name, ln, rel(o1, o0))


def test_inplace_and_out_of_place_models_agree() -> None:
    """Identical weights, ReLU in place or not: the same order-1 maps (30-60% apart before)."""
    def build(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(6, 6, 3, padding=1),
            nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
        ).double().eval()

    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    m_in, m_out = build(True), build(False)
    for idx in (0, 2):
        for hessian in ("finite_difference", "exact", "none"):
            ma = LayerNormGradOrder1(m_in, m_in[idx]).attribute(x, [0, 1, 2], epsilon=5e-2, hessian=hessian)
            mb = LayerNormGradOrder1(m_out, m_out[idx]).attribute(x, [0, 1, 2], epsilon=5e-2, hessian=hessian)
            assert rel(ma, mb) < 1e-10, (idx, hessian)


@pytest.mark.slow
@pytest.mark.parametrize("name, layer_name", [("resnet18", "layer1.0.bn1"), ("vgg11", "features.3")])
@pytest.mark.parametrize("adversarial", [False, True])
def test_order1_matches_naive_deep_copy_reference_on_torchvision(name: str, layer_name: str, adversarial: bool) -> None:
    model = tv_model(name)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    t = [2, 6]
    ref = naive_order1(model, layer_name, x, t, eps=5e-2, adversarial=adversarial)
    got = LayerNormGradOrder1(model, dict(model.named_modules())[layer_name]).attribute(
        x, t, epsilon=5e-2, adversarial=adversarial
    )
    assert rel(got, ref) < 1e-8


# ----------------------------------------------------------------- signed aggregations (mutants)
@pytest.mark.parametrize("aggregation", ["sum", "max", "filter_norm"])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_signed_aggregations_at_epsilon_zero(aggregation: str, strategy: str) -> None:
    """A sign error in the per-sample perturbation would flip the signed maps (norm maps hide it)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 5, 3, padding=1), nn.Flatten(),
                      nn.Linear(5 * 36, 4)).double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    for vl in ("conv1x1", "scaling"):
        o0 = LayerNormGrad(m, m[1]).attribute(x, [0, 1, 3], virtual_layer=vl, aggregation=aggregation, loss_fn=ce)
        o1 = LayerNormGradOrder1(m, m[1], strategy=strategy).attribute(
            x, [0, 1, 3], epsilon=0.0, virtual_layer=vl, aggregation=aggregation
        )
        torch.testing.assert_close(o1, o0, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- additional_forward_args
class Gated(nn.Module):
    """A conv model with a shared per-channel gate, an optional per-example bias and a scale."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x: Tensor, gate: Tensor, bias: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
        h = self.conv(x) * gate.view(1, -1, 1, 1) * scale
        if bias is not None:
            h = h + bias.view(-1, 1, 1, 1)
        return self.fc(torch.relu(h).mean((2, 3)))


def per_sample_reference(attr: LayerNormGradOrder1, x: Tensor, t: List[int], args_for) -> Tensor:
    """One example at a time: batch-1 calls with that example's arguments."""
    return torch.cat([attr.attribute(x[i : i + 1], t[i], additional_forward_args=args_for(i), epsilon=5e-2) for i in range(len(t))])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_shared_gate_and_per_example_bias(strategy: str) -> None:
    torch.manual_seed(0)
    m = Gated(4).double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    t = [0, 2, 4]
    gate = torch.rand(4, dtype=torch.float64) + 0.5      # shared, first dim 4 != batch 3
    bias = torch.randn(3, dtype=torch.float64)           # per example
    args = (gate, bias, 2.0)
    attr = LayerNormGradOrder1(m, m.conv, strategy=strategy)
    o0 = LayerNormGrad(m, m.conv).attribute(x, t, additional_forward_args=args, loss_fn=ce)
    o1 = attr.attribute(x, t, additional_forward_args=args, epsilon=0.0)
    assert rel(o1, o0) < 1e-10
    batch = attr.attribute(x, t, additional_forward_args=args, epsilon=5e-2)
    ref = per_sample_reference(attr, x, t, lambda i: (gate, bias[i : i + 1], 2.0))
    assert rel(batch, ref) < 1e-10


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_ambiguous_shared_argument_detected_and_overridden(strategy: str) -> None:
    """A shared (C,) gate with C == batch size: the rule takes it per-example, the batched check
    catches it (no silent wrong map), and per_example_args fixes it."""
    torch.manual_seed(0)
    m = Gated(4).double().eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    t = [0, 2, 4, 1]
    gate = torch.rand(4, dtype=torch.float64) + 0.5
    attr = LayerNormGradOrder1(m, m.conv, strategy=strategy)
    with pytest.raises(ValueError, match=r"per-example outputs differ.*per_example_args"):
        attr.attribute(x, t, additional_forward_args=(gate,), epsilon=0.0)
    o1 = attr.attribute(x, t, additional_forward_args=(gate,), epsilon=0.0, per_example_args=[False])
    o0 = LayerNormGrad(m, m.conv).attribute(x, t, additional_forward_args=(gate,), loss_fn=ce)
    assert rel(o1, o0) < 1e-10
    with pytest.raises(ValueError, match=r"per_example_args must hold one bool per additional forward argument \(1\)"):
        attr.attribute(x, t, additional_forward_args=(gate,), per_example_args=[False, True])
    with pytest.raises(ValueError, match=r"per_example_args\[0\] is True but"):
        attr.attribute(x, t, additional_forward_args=(torch.ones(3, dtype=torch.float64),), per_example_args=[True])


class MaskedAttention(nn.Module):
    """A tiny token model with a shared causal mask (T, T)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.embed(x)                                            # (N, T, d)
        scores = h @ h.transpose(1, 2) / h.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask, -1e9)
        h = self.mix(torch.softmax(scores, -1) @ h)
        return self.head(h.mean(1))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_shared_causal_mask(strategy: str) -> None:
    torch.manual_seed(0)
    m = MaskedAttention().double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    t = [0, 2]
    o0 = LayerNormGrad(m, m.mix).attribute(x, t, additional_forward_args=(mask,), loss_fn=ce, channel_dim=-1)
    attr = LayerNormGradOrder1(m, m.mix, strategy=strategy)
    o1 = attr.attribute(x, t, additional_forward_args=(mask,), epsilon=0.0, channel_dim=-1)
    assert rel(o1, o0) < 1e-10
    batch = attr.attribute(x, t, additional_forward_args=(mask,), epsilon=5e-2, channel_dim=-1)
    ref = torch.cat([attr.attribute(x[i : i + 1], t[i], additional_forward_args=(mask,), epsilon=5e-2, channel_dim=-1)
                     for i in range(2)])
    assert rel(batch, ref) < 1e-10


# ----------------------------------------------------------------- half precision
class Loud(nn.Module):
    """Activations around 300 with 64 channels: sum of squares ~6e6 overflows float16 (max 65504)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.fc = nn.Linear(64, 4)
        with torch.no_grad():
            self.conv.weight.mul_(40.0)
            self.conv.bias.fill_(300.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean((2, 3)) / 300.0)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_maps_are_float32_and_close(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    m32 = Loud().eval()
    mh = copy.deepcopy(m32).to(dtype)
    x = torch.randn(2, 3, 6, 6)
    ref0 = LayerNormGrad(m32, m32.conv).attribute(x, [0, 3])
    got0 = LayerNormGrad(mh, mh.conv).attribute(x.to(dtype), [0, 3])
    assert got0.dtype == torch.float32 and bool(torch.isfinite(got0).all())
    assert rel(got0, ref0) < tol
    ref1 = LayerNormGradOrder1(m32, m32.conv).attribute(x, [0, 3], hessian="none")
    got1 = LayerNormGradOrder1(mh, mh.conv).attribute(x.to(dtype), [0, 3], hessian="none")
    assert got1.dtype == torch.float32 and bool(torch.isfinite(got1).all())
    assert rel(got1, ref1) < tol


# ----------------------------------------------------------------- create_graph
def test_create_graph_map_is_differentiable_like_hand_double_backward() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(4 * 25, 3)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = m[0].weight
    # by hand: x_u and g_u kept in the graph, m_u = ||x_u|| ||g_u||
    store = {}
    h = m[2].register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    out = m(x)
    h.remove()
    obj = out[:, 1].sum()
    (g,) = torch.autograd.grad(obj, store["a"], create_graph=True)
    hand = (store["a"].norm(dim=1) * g.norm(dim=1)).sum()
    (dw_hand,) = torch.autograd.grad(hand, w)
    maps = LayerNormGrad(m, m[2]).attribute(x, 1, grad_kwargs={"create_graph": True})
    assert maps.requires_grad
    (dw,) = torch.autograd.grad(maps.sum(), w)
    assert float(dw_hand.abs().max()) > 0
    torch.testing.assert_close(dw, dw_hand, rtol=1e-9, atol=1e-12)
    # differentiable also where an activation vanishes (after the ReLU): no NaN
    maps_r = LayerNormGrad(m, m[3]).attribute(x, 1, grad_kwargs={"create_graph": True})
    (dw_r,) = torch.autograd.grad(maps_r.sum(), w)
    assert bool(torch.isfinite(dw_r).all())


def test_grad_kwargs_allow_unused_and_order1_create_graph() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3))
    x = torch.randn(2, 3, 5, 5)
    a = LayerNormGrad(m, m[0]).attribute(x, 1, grad_kwargs={"allow_unused": True})
    torch.testing.assert_close(a, LayerNormGrad(m, m[0]).attribute(x, 1))
    with pytest.raises(ValueError, match=r"create_graph.*not supported by LayerNormGradOrder1.*LayerNormGrad"):
        LayerNormGradOrder1(m, m[0]).attribute(x, 1, grad_kwargs={"create_graph": True})


# ----------------------------------------------------------------- the drop-in promise
def test_signature_extends_layergradcam() -> None:
    ref = list(inspect.signature(LayerGradCam.attribute).parameters.values())
    for cls in (LayerNormGrad, LayerNormGradOrder1):
        ours = list(inspect.signature(cls.attribute).parameters.values())
        assert [(p.name, p.kind, p.default) for p in ours[: len(ref)]] == [(p.name, p.kind, p.default) for p in ref]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(ref):])


def test_layergradcam_arguments_by_position() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 3)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    attr = LayerNormGrad(m, m[1])
    # (inputs, target, additional_forward_args, attribute_to_layer_input, relu, attr_dim_summation, grad_kwargs)
    pos = attr.attribute(x, 1, None, False, True, True, None)
    torch.testing.assert_close(pos, attr.attribute(x, 1))
    # relu_attributions matters for the signed 'sum': relu of the raw map
    raw = attr.attribute(x, 1, aggregation="sum", virtual_layer="scaling")
    assert bool((raw < 0).any())
    torch.testing.assert_close(attr.attribute(x, 1, relu_attributions=True, aggregation="sum", virtual_layer="scaling"),
                               raw.clamp_min(0))
    # attr_dim_summation=False: per-channel terms, checked by hand
    store = {}
    h = m[1].register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    out = m(x)
    h.remove()
    (g,) = torch.autograd.grad(out[:, 1].sum(), store["a"])
    a = store["a"].detach()
    terms = attr.attribute(x, 1, None, False, False, False)
    torch.testing.assert_close(terms, g.abs() * a.norm(dim=1, keepdim=True))
    torch.testing.assert_close(terms.square().sum(1, keepdim=True).sqrt(), attr.attribute(x, 1))
    terms_s = attr.attribute(x, 1, attr_dim_summation=False, virtual_layer="scaling", aggregation="sum")
    torch.testing.assert_close(terms_s, a * g)
    with pytest.raises(ValueError, match="attr_dim_summation=False.*'norm' and 'sum'"):
        attr.attribute(x, 1, attr_dim_summation=False, aggregation="max")
    with pytest.raises(TypeError):
        attr.attribute(x, 1, None, False, False, True, None, "conv1x1")  # NormGrad options are keyword-only
    # order 1 takes the same positions
    o1 = LayerNormGradOrder1(m, m[1])
    torch.testing.assert_close(o1.attribute(x, 1, None, False, False, True, None), o1.attribute(x, 1))


def test_negative_and_one_tuple_targets_match_captum() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 5)).double()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    attr = LayerNormGrad(m, m[1])
    ref = attr.attribute(x, 4)
    for t in (-1, (4,), (-1,), torch.tensor(-1), [-1, 4, -1], torch.tensor([-1, -1, 4]), [(4,), (-1,), (4,)]):
        torch.testing.assert_close(attr.attribute(x, t), ref)
    # the same targets select the same class in Captum's LayerGradCam
    torch.testing.assert_close(LayerGradCam(m, m[1]).attribute(x, (4,)), LayerGradCam(m, m[1]).attribute(x, 4))
    for bad in (torch.tensor([True, False, True]), -6, 5):
        with pytest.raises((TypeError, ValueError)):
            attr.attribute(x, bad)
        with pytest.raises((TypeError, ValueError)):
            LayerNormGradOrder1(m, m[1]).attribute(x, bad)


# ----------------------------------------------------------------- order-1 parity with order 0
class Split(nn.Module):
    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        c = x.shape[1] // 2
        return x[:, :c], x[:, c:]


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.split = Split()
        self.mix = Mix()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.split(torch.tanh(self.conv(x)))
        return self.fc(self.mix(a, b).mean((2, 3)))


class Mix(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a * torch.sigmoid(b) + b


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_tuple_outputs_and_several_inputs(strategy: str) -> None:
    torch.manual_seed(0)
    m = TwoHeads().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    t = [0, 3]
    o0 = LayerNormGrad(m, m.split).attribute(x, t, loss_fn=ce)
    o1 = LayerNormGradOrder1(m, m.split, strategy=strategy).attribute(x, t, epsilon=0.0)
    assert isinstance(o1, tuple) and len(o1) == 2
    for a, b in zip(o1, o0):
        assert rel(a, b) < 1e-10
    i0 = LayerNormGrad(m, m.mix).attribute(x, t, loss_fn=ce, attribute_to_layer_input=True)
    i1 = LayerNormGradOrder1(m, m.mix, strategy=strategy).attribute(x, t, epsilon=0.0, attribute_to_layer_input=True)
    assert isinstance(i1, tuple) and len(i1) == 2  # both inputs, none dropped
    for a, b in zip(i1, i0):
        assert rel(a, b) < 1e-10
    # at eps > 0, the batch equals one example at a time
    full = LayerNormGradOrder1(m, m.split, strategy=strategy).attribute(x, t, epsilon=5e-2)
    for k in range(2):
        one = torch.cat([LayerNormGradOrder1(m, m.split).attribute(x[i : i + 1], t[i], epsilon=5e-2)[k] for i in range(2)])
        assert rel(full[k], one) < 1e-10


def test_user_full_backward_hook() -> None:
    model = tv_model("resnet18")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plain = LayerNormGradOrder1(model, model.layer2).attribute(x, [1, 2], epsilon=5e-2)
    # exact without hooks: torch.func forward-over-reverse; with hooks: the double-vjp trick
    plain_exact = LayerNormGradOrder1(model, model.layer2).attribute(x, [1, 2], epsilon=5e-2, hessian="exact")
    calls = []
    handle = model.layer1.register_full_backward_hook(lambda mod, gi, go: calls.append(1))
    try:
        hooked = LayerNormGradOrder1(model, model.layer2, strategy="loop").attribute(x, [1, 2], epsilon=5e-2)
        assert rel(hooked, plain) < 1e-12
        exact = LayerNormGradOrder1(model, model.layer2, strategy="loop").attribute(x, [1, 2], epsilon=5e-2, hessian="exact")
        assert rel(exact, plain_exact) < 1e-10
        assert rel(exact, hooked) > 1e-6  # the Hessian term is there
        assert calls  # the user's hook ran
        with pytest.raises(ValueError, match=r"backward hooks \(on layer1\).*strategy='loop'"):
            LayerNormGradOrder1(model, model.layer2, strategy="vmap").attribute(x, [1, 2])
    finally:
        handle.remove()


def test_exact_loop_equals_exact_vmap() -> None:
    torch.manual_seed(0)
    m = TwoHeads().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    a = LayerNormGradOrder1(m, m.conv, strategy="loop").attribute(x, [0, 3], epsilon=5e-2, hessian="exact")
    b = LayerNormGradOrder1(m, m.conv, strategy="vmap").attribute(x, [0, 3], epsilon=5e-2, hessian="exact")
    assert rel(a, b) < 1e-10


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return {"logits": self.fc(torch.relu(self.conv(x)).mean((2, 3))), "aux": x.mean()}


class Logits(nn.Module):
    """The documented wrapper for dict-returning models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["logits"]


def test_dict_model_with_wrapper_and_data_parallel() -> None:
    torch.manual_seed(0)
    inner = DictModel().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="must return a tensor"):
        LayerNormGradOrder1(inner, inner.conv).attribute(x, [0, 1])
    w = Logits(inner)
    o1 = LayerNormGradOrder1(w, inner.conv).attribute(x, [0, 1], epsilon=0.0)
    o0 = LayerNormGrad(w, inner.conv).attribute(x, [0, 1], loss_fn=ce)
    assert rel(o1, o0) < 1e-10
    with pytest.raises(ValueError, match="DataParallel over several devices"):
        LayerNormGradOrder1(w, inner.conv, device_ids=[0, 1])


@pytest.mark.parametrize("name", ["basic_layer_multi_output", "basic_layer_multiple_tuple_target"])
def test_captum_shipped_configs(name: str) -> None:
    """Captum's own LayerGradCam test cases, for order 1 (epsilon=0 against order 0 on the same
    per-example objective: minus the selected output)."""
    from captum._utils.common import _select_targets

    case = next(c for c in config if c["name"] == name)
    model = case["model"]
    layer = dict(model.named_modules())[case["layer"]]
    args = dict(case["attribute_args"])

    def neg_selected(out: Tensor, t) -> Tensor:
        if isinstance(t, Tensor) and t.dim() == 2:        # order 1: (1, k) index rows
            t = [tuple(int(v) for v in row) for row in t]
        return -_select_targets(out, t).reshape(out.shape[0])

    o0 = LayerNormGrad(model, layer).attribute(**args, loss_fn=neg_selected)
    o1 = LayerNormGradOrder1(model, layer, loss_fn=neg_selected).attribute(**args, epsilon=0.0)
    o0 = o0 if isinstance(o0, tuple) else (o0,)
    o1 = o1 if isinstance(o1, tuple) else (o1,)
    assert len(o0) == len(o1)
    for a, b in zip(o1, o0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shared_module_layer_call_on_basicblock() -> None:
    model = tv_model("resnet18")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    relu = model.layer1[0].relu  # called twice per BasicBlock: after bn1 and after the residual add
    with pytest.raises(ValueError, match=r"layer1.0.relu was called 2 times.*layer_call"):
        LayerNormGrad(model, relu).attribute(x, 1)
    with pytest.raises(ValueError, match=r"layer1.0.relu was called 2 times.*layer_call"):
        LayerNormGradOrder1(model, relu).attribute(x, 1)
    last = LayerNormGrad(model, relu).attribute(x, 1, layer_call=-1)
    block = LayerNormGrad(model, model.layer1[0]).attribute(x, 1)   # the block's output is relu's last call
    torch.testing.assert_close(last, block)
    first = LayerNormGrad(model, relu).attribute(x, 1, layer_call=0, loss_fn=ce)
    assert rel(first, LayerNormGrad(model, relu).attribute(x, 1, layer_call=1, loss_fn=ce)) > 1e-3
    for call in (0, -1):
        o0 = LayerNormGrad(model, relu).attribute(x, [1, 2], layer_call=call, loss_fn=ce)
        o1 = LayerNormGradOrder1(model, relu).attribute(x, [1, 2], layer_call=call, epsilon=0.0)
        assert rel(o1, o0) < 1e-8


# ----------------------------------------------------------------- honest warnings
def test_warnings_for_degenerate_order1() -> None:
    torch.manual_seed(0)
    single = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 1))
    x = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        maps = LayerNormGradOrder1(single, single[0]).attribute(x, 0)
    msgs = [str(w.message) for w in rec]
    assert any("one value per example" in s and "constant" in s and "loss_fn" in s for s in msgs)
    assert any("is all zero" in s for s in msgs)
    assert float(maps.abs().max()) == 0.0
    # a quadratic loss: a step beyond 2/curvature overshoots and raises the loss
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 3))
    quad = lambda out, y: ((out - 1.0) ** 2).sum(1)  # noqa: E731
    with pytest.warns(UserWarning, match=r"increased the loss.*smaller epsilon"):
        LayerNormGradOrder1(m, m[0], loss_fn=quad).attribute(x, [0, 1], epsilon=10.0, hessian="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerNormGradOrder1(m, m[0], loss_fn=quad).attribute(x, [0, 1], epsilon=1e-4, hessian="none")


def test_nonfinite_map_warns() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 3))
    x = torch.full((1, 3, 5, 5), 1e30)
    with pytest.warns(UserWarning, match=r"NaN/Inf"):
        LayerNormGrad(m, m[0]).attribute(x, 0)


# ----------------------------------------------------------------- bad inputs (issue #15)
def test_bad_inputs_order0_and_order1() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3))
    x = torch.randn(2, 3, 5, 5)
    for attr in (LayerNormGrad(m, m[0]), LayerNormGradOrder1(m, m[0])):
        with pytest.raises(ValueError, match="empty batch"):
            attr.attribute(x[:0], 0)
        with pytest.raises(ValueError, match="'meta' device"):
            attr.attribute(torch.empty(2, 3, 5, 5, device="meta"), 0)
        with pytest.raises(TypeError, match="complex"):
            attr.attribute(torch.randn(2, 3, 5, 5, dtype=torch.complex64), 0)
        with pytest.raises(TypeError, match="torch.bool"):
            attr.attribute(x, torch.tensor([True, False]))
        with pytest.raises(ValueError, match=r"channel_dim=5 is out of range .*4 dims"):
            attr.attribute(x, 0, channel_dim=5)


def test_batchnorm_buffers_restored_with_a_lambda_forward() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3))
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    LayerNormGrad(lambda z: m(z), m[0]).attribute(torch.randn(4, 3, 5, 5), 1)
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert m.training


def test_parameter_saliency_targets_follow_the_package_rule() -> None:
    """One target rule: 1-tuples and lists of 1-tuples are labels; bool masks are refused."""
    from captum_normgrad._targets import class_index_vector

    torch.testing.assert_close(class_index_vector([(2,), 1], 2), torch.tensor([2, 1]))
    torch.testing.assert_close(class_index_vector((3,), 2), torch.tensor([3, 3]))
    torch.testing.assert_close(class_index_vector(torch.tensor(4), 3), torch.tensor([4, 4, 4]))
    with pytest.raises(TypeError, match="torch.bool"):
        class_index_vector(torch.tensor([True, False]), 2)
    with pytest.raises(ValueError, match="negative class indices"):
        class_index_vector([0, -1], 2)
    with pytest.raises(ValueError, match="2 entries but the batch has 3"):
        class_index_vector([0, 1], 3)
