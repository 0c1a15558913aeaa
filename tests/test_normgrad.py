"""``LayerNormGrad`` end to end, against autograd and independent hooks.

The oracles never use ``captum_normgrad``'s plumbing:

* a *real* 1x1 convolution with identity weights inserted at the point: its per-sample
  ``weight`` gradient must be ``sum_u g_u x_u^T``;
* a *locally connected* version of each virtual layer (its own identity parameters for every
  sample and location): autograd then gives each location's contribution ``T_u`` separately, and
  its entry-wise aggregation must be the map;
* for ``virtual_layer="weights"``: the layer's own ``weight`` gradient, split per location with
  ``F.unfold`` (``ref.weight_contribution``);
* activations and gradients captured with the test's own hooks (``ref.capture``);
* Captum's ``LayerGradCam`` for the Grad-CAM relation.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, List

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from captum_normgrad import LayerNormGrad, fuse_maps, normalize_maps

AGGS = ("norm", "filter_norm", "sum", "max")
VLS = ("conv1x1", "scaling", "bias", "conv3x3")
DT = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def select(target: List[int]) -> Callable[[Tensor], Tensor]:
    """Per-sample objective ``output[n, target[n]]``."""
    return lambda out: out[torch.arange(out.shape[0]), torch.as_tensor(target)]


# ============================================================================ virtual layers


class LocalVirtual(nn.Module):
    """A virtual layer with its own parameters for every sample and location, set to the identity.

    Autograd of its parameter at ``(n, u)`` is the contribution ``T_u`` of location ``u`` of sample
    ``n`` to the (shared) virtual layer's parameter gradient.
    """

    def __init__(self, kind: str, shape: torch.Size, ref: SimpleNamespace, channel_dim: int = 1, dtype=DT) -> None:
        super().__init__()
        self.kind, self.channel_dim, self.ref = kind, channel_dim, ref
        n, c, *locs = torch.empty(shape).movedim(channel_dim, 1).shape
        self.nd = len(locs)
        if kind == "conv1x1":
            w = torch.eye(c, dtype=dtype).expand(n, *locs, c, c)
        elif kind == "scaling":
            w = torch.ones(n, c, *locs, dtype=dtype)
        elif kind == "bias":
            w = torch.zeros(n, c, *locs, dtype=dtype)
        else:  # conv3x3: identity at the centre tap
            k = 3**self.nd
            w = torch.zeros(n, *locs, c, c, k, dtype=dtype)
            w[..., (k - 1) // 2] = torch.eye(c, dtype=dtype)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: Tensor) -> Tensor:
        x1 = x.movedim(self.channel_dim, 1)
        if self.kind == "conv1x1":
            y = torch.einsum("n...ij,nj...->ni...", self.w, x1)
        elif self.kind == "scaling":
            y = self.w * x1
        elif self.kind == "bias":
            y = x1 + self.w
        else:
            p = self.ref.patches(x1, self.ref.Geom.neighbourhood(self.nd))
            y = torch.einsum("n...ijk,njk...->ni...", self.w, p)
        return y.movedim(1, self.channel_dim)

    def contributions(self, grad: Tensor) -> Tensor:
        """The parameter gradient as ``(N, *L, entries)``."""
        if self.kind in ("scaling", "bias"):
            return grad.movedim(1, -1)
        return grad.reshape(*grad.shape[: 1 + self.nd], -1)


def _x_shape_at_probe(model: nn.Module, x: Tensor) -> torch.Size:
    shape = {}

    def hook(mod: nn.Module, inp: Any, out: Tensor) -> None:
        shape["s"] = out.shape

    h = model.probe.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    h.remove()
    return shape["s"]


class ChannelsLast(nn.Module):
    """Apply a channels-first module to a channels-last (N, T, C) tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, t: Tensor) -> Tensor:
        return self.inner(t.transpose(1, 2)).transpose(1, 2)


@given(
    model_kind=st.sampled_from(["small_cnn", "token"]),
    seed=st.integers(0, 2**16),
    targets=st.lists(st.integers(0, 3), min_size=1, max_size=3),
)
def test_real_identity_conv1x1_weight_grad_is_sum_of_outer_products(models, ref, model_kind: str, seed: int, targets) -> None:
    """sum_u g_u x_u^T == autograd weight gradient of a real identity 1x1 conv at the point
    (per sample), and LayerNormGrad at the point is ||g_u|| ||x_u|| of those same g and x."""
    tokens = model_kind == "token"
    channel_dim = -1 if tokens else 1
    model = getattr(models, model_kind)(seed=seed).double()
    n = len(targets)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 5, generator=gen, dtype=DT) if tokens else torch.randn(n, 3, 8, 8, generator=gen, dtype=DT)
    got = LayerNormGrad(model, model.probe).attribute(x, targets, channel_dim=channel_dim)
    xs, gs = ref.capture(model, model.probe, x, select(targets))
    torch.testing.assert_close(got, ref.normgrad(xs, gs, channel_dim), rtol=1e-10, atol=1e-12)
    if tokens:
        xs, gs = xs.movedim(-1, 1), gs.movedim(-1, 1)
    c = xs.shape[1]
    conv = models.identity_conv1x1(c, 1 if tokens else 2, DT)
    model.probe = ChannelsLast(conv) if tokens else conv
    for i in range(n):
        out = model(x[i : i + 1])
        (wgrad,) = torch.autograd.grad(out[0, targets[i]], conv.weight)
        outer_sum = torch.einsum("i...,j...->ij", gs[i], xs[i])
        torch.testing.assert_close(wgrad.reshape(c, c), outer_sum, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("virtual_layer", VLS)
@pytest.mark.parametrize("model_kind", ["small_cnn", "token"])
def test_every_virtual_layer_and_aggregation_against_locally_connected_autograd(
    models, ref, virtual_layer: str, model_kind: str
) -> None:
    channel_dim = 1 if model_kind == "small_cnn" else -1
    model = getattr(models, model_kind)().double()
    x = torch.randn(3, 3, 8, 8, dtype=DT) if model_kind == "small_cnn" else torch.randn(3, 6, 5, dtype=DT)
    target = [1, 0, 3]
    attr = LayerNormGrad(model, model.probe)
    got = {
        a: attr.attribute(x, target, virtual_layer=virtual_layer, aggregation=a, channel_dim=channel_dim)
        for a in AGGS
    }
    # the same model with a locally connected identity virtual layer at the probe
    local = LocalVirtual(virtual_layer, _x_shape_at_probe(model, x), ref, channel_dim)
    model.probe = local
    out = model(x)
    (wgrad,) = torch.autograd.grad(select(target)(out).sum(), local.w)
    t = local.contributions(wgrad)
    for a in AGGS:
        expected = ref.aggregate(t, a)
        assert got[a].shape == expected.shape
        torch.testing.assert_close(got[a], expected, rtol=1e-9, atol=1e-12)


# ============================================================================ "weights" mode


def _weights_checks(ref: SimpleNamespace, model: nn.Module, conv: nn.Module, x: Tensor, target: List[int], aggs) -> None:
    """sum_u T_u == per-sample conv.weight.grad; both grids of the map == explicit aggregation."""
    geom = ref.Geom.of(conv)
    x_in, g_out = ref.capture(model, conv, x, select(target), where="weights")
    t = ref.weight_contribution(g_out, x_in, geom)  # (N, *L_out, C_out, C_in/G, K)
    nloc = g_out.dim() - 2
    for n in range(x.shape[0]):
        (wgrad,) = torch.autograd.grad(model(x[n : n + 1])[0, target[n]], conv.weight)
        per_loc = t[n].reshape(-1, *t.shape[1 + nloc :]).sum(0)
        torch.testing.assert_close(per_loc, wgrad.reshape(per_loc.shape), rtol=1e-9, atol=1e-12)
    attr = LayerNormGrad(model, conv)
    for a in aggs:
        on_output = ref.aggregate(t.reshape(*t.shape[: 1 + nloc], -1), a)
        got_out = attr.attribute(x, target, virtual_layer="weights", aggregation=a, weights_grid="output")
        torch.testing.assert_close(got_out, on_output, rtol=1e-9, atol=1e-12)
        got_in = attr.attribute(x, target, virtual_layer="weights", aggregation=a)  # input grid by default
        torch.testing.assert_close(got_in, ref.accumulate(on_output, geom, x.shape[2:]), rtol=1e-9, atol=1e-12)


def test_weights_mode_named_geometries_against_conv_weight_grad(models, ref, conv_variant: nn.Module) -> None:
    model = models.conv_head(conv_variant).double()
    x = torch.randn(2, conv_variant.in_channels, *([9] * (conv_variant.weight.dim() - 2)), dtype=DT)
    _weights_checks(ref, model, model.conv, x, [2, 0], AGGS)


@given(data=st.data(), aggregation=st.sampled_from(AGGS))
def test_weights_mode_random_geometries_against_conv_weight_grad(models, ref, data, aggregation: str) -> None:
    conv, x = ref.draw_conv_case(data)
    model = models.conv_head(conv).double()
    target = [data.draw(st.integers(0, 2), label="target") for _ in range(x.shape[0])]
    _weights_checks(ref, model, model.conv, x, target, [aggregation])


@pytest.mark.parametrize("tokens", [False, True])
def test_weights_mode_linear_on_vectors_and_tokens(models, ref, tokens: bool) -> None:
    """nn.Linear on (N, C) (one location) and on (N, T, C) (locations = tokens)."""
    if tokens:
        model, x = models.token().double(), torch.randn(3, 6, 5, dtype=DT)
        layer = model.mlp
    else:
        model, x = models.mlp().double(), torch.randn(3, 6, dtype=DT)
        layer = model.fc1
    target = [0, 2, 1]
    x_in, g_out = ref.capture(model, layer, x, select(target), where="weights")
    x_c, g_c = x_in.movedim(-1, 1), g_out.movedim(-1, 1)  # channels on dim 1, tokens after
    t = ref.outer(g_c, x_c)
    for n in range(3):
        (wgrad,) = torch.autograd.grad(model(x[n : n + 1])[0, target[n]], layer.weight)
        torch.testing.assert_close(t[n].reshape(-1, *wgrad.shape).sum(0), wgrad, rtol=1e-10, atol=1e-12)
    for a in AGGS:
        got = LayerNormGrad(model, layer).attribute(x, target, virtual_layer="weights", aggregation=a)
        assert got.shape == ((3, 1, 6) if tokens else (3, 1))
        torch.testing.assert_close(got, ref.aggregate(t, a), rtol=1e-10, atol=1e-12)


# ============================================================================ Grad-CAM relation


def test_gradcam_relation_at_resnet18_layer4() -> None:
    """At the input of global average pooling, Grad-CAM == cos(g, x)+ * NormGrad."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)
    target = [3, 7]
    feats, grads = {}, {}

    def fwd(mod, inp, out):
        feats["x"] = out
        out.register_hook(lambda g: grads.__setitem__("g", g))

    h = model.layer4.register_forward_hook(fwd)
    try:
        out = model(x)
        out[torch.arange(2), torch.tensor(target)].sum().backward()
    finally:
        h.remove()
    model.zero_grad(set_to_none=True)
    xa, g = feats["x"].detach(), grads["g"]
    assert xa.shape == (2, 512, 3, 3)
    # the premise: the gradient is the same at every location (input of the average pooling)
    torch.testing.assert_close(g, g[..., :1, :1].expand_as(g))
    cos = F.cosine_similarity(g, xa, dim=1, eps=1e-30).unsqueeze(1)
    gradcam = LayerGradCam(model, model.layer4).attribute(x, target=target, relu_attributions=True)
    normgrad = LayerNormGrad(model, model.layer4).attribute(x, target=target)
    assert gradcam.shape == normgrad.shape == (2, 1, 3, 3)
    scale = float(gradcam.detach().abs().max())
    assert scale > 0  # not a vacuous comparison
    torch.testing.assert_close(gradcam, cos.clamp(min=0) * normgrad, rtol=1e-4, atol=1e-5 * scale)


# ============================================================================ batch invariance


def _batch_cases(models):
    return [
        ("small_cnn_probe", models.small_cnn, lambda m: m.probe, {}),
        ("small_cnn_selective", models.small_cnn, lambda m: m.conv2, {"virtual_layer": "scaling", "aggregation": "filter_norm"}),
        ("residual_block_out_conv3x3", models.residual, lambda m: m.block_out, {"virtual_layer": "conv3x3", "aggregation": "max"}),
        ("residual_weights_strided", models.residual, lambda m: m.block_conv1, {"virtual_layer": "weights"}),
        ("residual_weights_out_grid", models.residual, lambda m: m.shortcut[0], {"virtual_layer": "weights", "weights_grid": "output"}),
        ("residual_layer_input", models.residual, lambda m: m.block_conv2, {"attribute_to_layer_input": True, "aggregation": "sum"}),
        ("loss_fn_ce", models.small_cnn, lambda m: m.conv2, {"loss_fn": nn.CrossEntropyLoss(reduction="none")}),
    ]


@pytest.mark.parametrize("case", range(7))
def test_batch_invariance(models, case: int) -> None:
    """Each sample's map computed in the batch equals its map computed alone."""
    name, factory, get_layer, kwargs = _batch_cases(models)[case]
    model = factory()
    x = torch.randn(4, 3, 10, 10)
    target = [0, 3, 1, 2]
    attr = LayerNormGrad(model, get_layer(model))
    is_loss = "loss_fn" in kwargs
    batch = attr.attribute(x, torch.tensor(target) if is_loss else target, **kwargs)
    for i in range(4):
        alone = attr.attribute(x[i : i + 1], torch.tensor([target[i]]) if is_loss else target[i], **kwargs)
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-6 * float(batch.abs().max()))


def test_batch_invariance_tokens(models, token_batch: Tensor) -> None:
    model = models.token()
    attr = LayerNormGrad(model, model.mlp)
    batch = attr.attribute(token_batch, [0, 1, 2], channel_dim=-1)
    assert batch.shape == (3, 1, 6)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], attr.attribute(token_batch[i : i + 1], [i], channel_dim=-1))


# ============================================================================ targets and objectives


@pytest.mark.parametrize(
    "target, per_sample",
    [
        (2, [2, 2, 2]),
        (torch.tensor(2), [2, 2, 2]),
        (torch.tensor([2]), [2, 2, 2]),
        ([0, 4, 1], [0, 4, 1]),
        (torch.tensor([0, 4, 1]), [0, 4, 1]),
        ((3,), [3, 3, 3]),
    ],
    ids=["int", "0d_tensor", "1elem_tensor", "list", "1d_tensor", "1tuple"],
)
def test_target_forms_2d_output(models, ref, image_batch: Tensor, target: Any, per_sample: List[int]) -> None:
    model = models.small_cnn()
    x, g = ref.capture(model, model.conv2, image_batch, select(per_sample))
    got = LayerNormGrad(model, model.conv2).attribute(image_batch, target=target)
    torch.testing.assert_close(got, ref.normgrad(x, g))


@pytest.mark.parametrize(
    "target, per_sample",
    [((1, 2), [(1, 2)] * 3), ([(0, 1), (2, 3), (1, 0)], [(0, 1), (2, 3), (1, 0)])],
    ids=["tuple", "list_of_tuples"],
)
def test_target_forms_3d_output(models, ref, target: Any, per_sample) -> None:
    model = models.multi_output()
    inp = torch.randn(3, 2, 6, 6)
    rows = torch.tensor([p[0] for p in per_sample])
    cols = torch.tensor([p[1] for p in per_sample])
    x, g = ref.capture(model, model.conv, inp, lambda out: out[torch.arange(3), rows, cols])
    got = LayerNormGrad(model, model.conv).attribute(inp, target=target)
    torch.testing.assert_close(got, ref.normgrad(x, g))


def test_target_none_for_one_output_per_example(models, ref, image_batch: Tensor) -> None:
    model = models.small_cnn()
    fn = lambda inp: model(inp)[:, 1]  # noqa: E731  (a plain function as forward_func)
    x, g = ref.capture(model, model.conv2, image_batch, lambda out: out[:, 1])
    got = LayerNormGrad(fn, model.conv2).attribute(image_batch)
    torch.testing.assert_close(got, ref.normgrad(x, g))


def test_loss_fn_uses_gradient_of_per_sample_loss(models, ref, image_batch: Tensor) -> None:
    model = models.small_cnn()
    labels = torch.tensor([4, 0, 2])
    ce = nn.CrossEntropyLoss(reduction="none")
    x, g = ref.capture(model, model.conv2, image_batch, lambda out: F.cross_entropy(out, labels, reduction="none"))
    attr = LayerNormGrad(model, model.conv2)
    torch.testing.assert_close(attr.attribute(image_batch, labels, loss_fn=ce), ref.normgrad(x, g))
    # the signed reading: bias + sum is sum_c g_u,c, which flips sign between loss and logit
    torch.testing.assert_close(
        attr.attribute(image_batch, labels, loss_fn=ce, virtual_layer="bias", aggregation="sum"), g.sum(1, keepdim=True)
    )
    # and it differs from the logit objective (not silently ignored)
    assert not torch.allclose(attr.attribute(image_batch, labels.tolist()), ref.normgrad(x, g))


@pytest.mark.parametrize(
    "target",
    [2, torch.tensor(2), torch.tensor([2]), (2,), [2, 2, 2], torch.tensor([2, 2, 2])],
    ids=["int", "0d_tensor", "1elem_tensor", "1tuple", "list", "1d_tensor"],
)
def test_loss_fn_accepts_every_captum_index_target_form(models, ref, image_batch: Tensor, target: Any) -> None:
    """Class-index targets reach the loss as an (N,) long tensor, whatever Captum form they had."""
    model = models.small_cnn()
    labels = torch.tensor([2, 2, 2])
    x, g = ref.capture(model, model.conv2, image_batch, lambda out: F.cross_entropy(out, labels, reduction="none"))
    got = LayerNormGrad(model, model.conv2).attribute(
        image_batch, target, loss_fn=nn.CrossEntropyLoss(reduction="none")
    )
    torch.testing.assert_close(got, ref.normgrad(x, g))


def test_loss_fn_soft_labels_are_passed_unchanged(models, ref, image_batch: Tensor) -> None:
    model = models.small_cnn()
    soft = torch.softmax(torch.randn(3, 5), 1)

    def soft_ce(out: Tensor, t: Tensor) -> Tensor:
        return -(t * out.log_softmax(1)).sum(1)

    x, g = ref.capture(model, model.conv2, image_batch, lambda out: soft_ce(out, soft))
    got = LayerNormGrad(model, model.conv2).attribute(image_batch, soft, loss_fn=soft_ce)
    torch.testing.assert_close(got, ref.normgrad(x, g))


# ============================================================================ execution contexts


def test_float64(models, ref, image_batch: Tensor) -> None:
    model = models.residual().double()
    xb = image_batch.double()
    x, g = ref.capture(model, model.block_out, xb, select([0, 1, 2]))
    got = LayerNormGrad(model, model.block_out).attribute(xb, [0, 1, 2])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref.normgrad(x, g), rtol=1e-12, atol=1e-14)


def test_under_no_grad(models, image_batch: Tensor) -> None:
    model = models.small_cnn()
    attr = LayerNormGrad(model, model.conv2)
    expected = attr.attribute(image_batch, 1, virtual_layer="conv3x3")
    with torch.no_grad():
        got = attr.attribute(image_batch, 1, virtual_layer="conv3x3")
        assert not torch.is_grad_enabled()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, expected)


def test_inference_mode_inputs_are_accepted(models, image_batch: Tensor) -> None:
    model = models.small_cnn()
    with torch.inference_mode():
        x = image_batch.clone()
    assert x.is_inference()
    got = LayerNormGrad(model, model.probe).attribute(x, 1)
    torch.testing.assert_close(got, LayerNormGrad(model, model.probe).attribute(image_batch, 1))
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"outside inference mode \(torch.no_grad\(\) is fine\)"):
        LayerNormGrad(model, model.probe).attribute(x, 1)


def test_list_of_layers_single_forward_and_backward(models, image_batch: Tensor, monkeypatch) -> None:
    model = models.small_cnn()
    layers = [model.probe, model.conv2, model.relu2, model.pool]
    calls = {"forward": 0, "grad": 0}
    h = model.register_forward_pre_hook(lambda m, i: calls.__setitem__("forward", calls["forward"] + 1))
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    try:
        maps = LayerNormGrad(model, layers).attribute(image_batch, [0, 1, 2])
    finally:
        h.remove()
        monkeypatch.undo()
    assert calls == {"forward": 1, "grad": 1}
    assert isinstance(maps, list) and len(maps) == 4
    for layer, m in zip(layers, maps):
        torch.testing.assert_close(m, LayerNormGrad(model, layer).attribute(image_batch, [0, 1, 2]))
    assert maps[3].shape == (3, 1, 1, 1)
    fused = fuse_maps(maps)  # includes the constant 1x1 map of the pooled layer
    assert fused.shape == (3, 1, 10, 10) and torch.isfinite(fused).all()
    assert torch.isfinite(normalize_maps(maps[3])).all()


def test_list_of_layers_with_weights_mode(models, image_batch: Tensor) -> None:
    model = models.residual()
    layers = [model.block_conv1, model.shortcut[0], model.fc]
    maps = LayerNormGrad(model, layers).attribute(image_batch, 1, virtual_layer="weights")
    for layer, m in zip(layers, maps):
        torch.testing.assert_close(m, LayerNormGrad(model, layer).attribute(image_batch, 1, virtual_layer="weights"))
    assert maps[0].shape == maps[1].shape == (3, 1, 10, 10)  # input grid of both convs
    assert maps[2].shape == (3, 1)


def test_tuple_inputs_and_additional_forward_args(models, ref) -> None:
    model = models.two_input()
    a, b = torch.randn(2, 2, 6, 6), torch.randn(2, 2, 6, 6)
    bias = torch.randn(2, 3)
    extra = (0.5, bias)
    x, g = ref.capture(model, model.mix, (a, b), select([2, 0]), extra=extra)
    attr = LayerNormGrad(model, model.mix)
    got = attr.attribute((a, b), [2, 0], additional_forward_args=extra)
    torch.testing.assert_close(got, ref.normgrad(x, g))
    # the extra arguments matter (they are not dropped)
    assert not torch.allclose(got, attr.attribute((a, b), [2, 0], additional_forward_args=(2.0,)))
    # input side of conv_b is the second model input itself
    xb, gb = ref.capture(model, model.conv_b, (a, b), select([2, 0]), where="input", extra=extra)
    torch.testing.assert_close(xb, b)
    got_b = LayerNormGrad(model, model.conv_b).attribute((a, b), [2, 0], extra, attribute_to_layer_input=True)
    torch.testing.assert_close(got_b, ref.normgrad(xb, gb))


def test_attribute_to_layer_input(models, ref, image_batch: Tensor) -> None:
    model = models.small_cnn()
    x, g = ref.capture(model, model.conv2, image_batch, select([0, 1, 2]), where="input")
    got = LayerNormGrad(model, model.conv2).attribute(image_batch, [0, 1, 2], attribute_to_layer_input=True)
    torch.testing.assert_close(got, ref.normgrad(x, g))
    # conv2's input is the probe's output
    torch.testing.assert_close(got, LayerNormGrad(model, model.probe).attribute(image_batch, [0, 1, 2]))


@pytest.mark.parametrize("virtual_layer", VLS)
def test_token_layers_channel_dim_last(models, ref, token_batch: Tensor, virtual_layer: str) -> None:
    model = models.token()
    x, g = ref.capture(model, model.mlp, token_batch, select([3, 0, 1]))
    got = LayerNormGrad(model, model.mlp).attribute(token_batch, [3, 0, 1], virtual_layer=virtual_layer, channel_dim=-1)
    assert got.shape == (3, 1, 6)
    if virtual_layer == "conv1x1":
        torch.testing.assert_close(got, ref.normgrad(x, g, channel_dim=-1))
    elif virtual_layer == "scaling":
        torch.testing.assert_close(got, (x * g).norm(dim=-1).unsqueeze(1))
    elif virtual_layer == "bias":
        torch.testing.assert_close(got, g.norm(dim=-1).unsqueeze(1))
    else:  # tokens x 3-token neighbourhood patch (zero padded at the ends)
        xp = F.pad(x.transpose(1, 2), (1, 1))
        patch_sq = sum(xp[:, :, k : k + 6].square().sum(1) for k in range(3))
        torch.testing.assert_close(got, (g.square().sum(-1) * patch_sq).sqrt().unsqueeze(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(models, image_batch: Tensor) -> None:
    model = models.residual()
    cpu = LayerNormGrad(model, model.block_conv1).attribute(image_batch, [0, 1, 2], virtual_layer="weights")
    model_c = model.cuda()
    gpu = LayerNormGrad(model_c, model_c.block_conv1).attribute(image_batch.cuda(), [0, 1, 2], virtual_layer="weights")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_data_parallel_matches_single_device(models, image_batch: Tensor) -> None:
    model = models.residual().cuda()
    dp = nn.DataParallel(model)
    x = torch.cat([image_batch, image_batch]).cuda()
    single = LayerNormGrad(model, model.block_out).attribute(x, 1)
    parallel = LayerNormGrad(dp, dp.module.block_out).attribute(x, 1)
    torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-6)
