"""The pure mathematics of ``captum_normgrad._maps`` against straightforward references.

The references (``ref`` fixture, defined in ``conftest.py``) build what the implementation
avoids building: the explicit per-location contribution ``T_u`` (``C x C`` outer products,
``C_out x C_in/G x k`` patch outer products taken from ``F.unfold``), aggregate it entry by entry,
and accumulate patch values onto input pixels with an explicit loop over output locations and
kernel taps. The end-to-end link to autograd (``sum_u T_u == conv.weight.grad``) is in
``test_normgrad.py``.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from captum_normgrad import _maps
from captum_normgrad._maps import ConvGeometry

AGGS = ("norm", "filter_norm", "sum", "max")
VLS = ("conv1x1", "scaling", "bias", "conv3x3")
DT = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@st.composite
def activation_pairs(draw, max_loc_dims: int = 2) -> Tuple[Tensor, Tensor]:
    """Random (x, g) of shape (N, C, *L) with a mix of signs (including one-signed tensors)."""
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 5))
    locs = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(0, max_loc_dims)))]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, c, *locs, generator=gen, dtype=DT)
    g = torch.randn(n, c, *locs, generator=gen, dtype=DT)
    sign = draw(st.sampled_from(["mixed", "x_pos", "g_neg", "x_relu"]))
    if sign == "x_pos":
        x = x.abs()
    elif sign == "g_neg":
        g = -g.abs()
    elif sign == "x_relu":
        x = x.clamp(min=0)
    return x, g


# ============================================================================ identities


@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_frobenius_identity_of_outer_product(cg: int, cx: int, seed: int) -> None:
    """||g x^T||_F = ||g|| ||x|| for vectors of any sizes, and the package's form agrees."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(cg, generator=gen, dtype=DT)
    x = torch.randn(cx, generator=gen, dtype=DT)
    fro = torch.linalg.matrix_norm(torch.outer(g, x), "fro")
    torch.testing.assert_close(fro, g.norm() * x.norm(), rtol=1e-12, atol=1e-12)
    m = _maps.outer_aggregate(g.reshape(1, cg, 1), x.reshape(1, cx, 1), "norm")
    torch.testing.assert_close(m.reshape(()), fro, rtol=1e-12, atol=1e-12)


@given(pair=activation_pairs())
def test_location_norms_product_is_outer_norm(ref: SimpleNamespace, pair: Tuple[Tensor, Tensor]) -> None:
    x, g = pair
    explicit = ref.aggregate(ref.outer(g, x), "norm")
    via_norms = _maps.location_norms(g) * _maps.location_norms(x)
    assert via_norms.shape == (x.shape[0], 1, *x.shape[2:])
    torch.testing.assert_close(via_norms, explicit, rtol=1e-10, atol=1e-12)


@given(pair=activation_pairs())
def test_filter_norm_closed_form(ref: SimpleNamespace, pair: Tuple[Tensor, Tensor]) -> None:
    """||max(g x^T, 0)||^2 = ||g+||^2 ||x+||^2 + ||g-||^2 ||x-||^2 (explicit C x C reference)."""
    x, g = pair
    explicit_sq = ref.outer(g, x).clamp(min=0).square().sum(-1).unsqueeze(1)
    gp, gm = g.clamp(min=0), (-g).clamp(min=0)
    xp, xm = x.clamp(min=0), (-x).clamp(min=0)
    closed = (gp.square().sum(1) * xp.square().sum(1) + gm.square().sum(1) * xm.square().sum(1)).unsqueeze(1)
    torch.testing.assert_close(closed, explicit_sq, rtol=1e-10, atol=1e-12)
    got = _maps.outer_aggregate(g, x, "filter_norm")
    torch.testing.assert_close(got.square(), explicit_sq, rtol=1e-10, atol=1e-12)


@given(pair=activation_pairs(), aggregation=st.sampled_from(AGGS), pick=st.integers(0, 3))
def test_outer_aggregate_grouped_is_block_diagonal(
    ref: SimpleNamespace, pair: Tuple[Tensor, Tensor], aggregation: str, pick: int
) -> None:
    """Grouped outer products: only matching channel groups interact."""
    x, g = pair
    n, c = x.shape[:2]
    divisors = [d for d in range(1, c + 1) if c % d == 0]
    groups = divisors[pick % len(divisors)]
    xg = x.reshape(n, groups, c // groups, *x.shape[2:])
    gg = g.reshape(n, groups, c // groups, *g.shape[2:])
    t = torch.einsum("ngi...,ngj...->n...gij", gg, xg)
    expected = ref.aggregate(t.reshape(*t.shape[:-3], -1), aggregation)
    got = _maps.outer_aggregate(g, x, aggregation, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ============================================================================ virtual-layer grid


def explicit_virtual_contribution(ref: SimpleNamespace, x: Tensor, g: Tensor, virtual_layer: str) -> Tensor:
    """``T_u`` of each virtual layer, flattened on the last dim: ``(N, *L, E)``."""
    if virtual_layer == "conv1x1":
        return ref.outer(g, x)
    if virtual_layer == "scaling":
        return (x * g).movedim(1, -1)
    if virtual_layer == "bias":
        return g.movedim(1, -1)
    if virtual_layer == "conv3x3":
        t = ref.weight_contribution(g, x, ref.Geom.neighbourhood(x.dim() - 2))
        return t.reshape(*t.shape[: x.dim() - 1], -1)
    raise AssertionError(virtual_layer)


@pytest.mark.parametrize("virtual_layer", VLS)
@pytest.mark.parametrize("aggregation", AGGS)
@given(pair=activation_pairs())
def test_virtual_layer_grid_against_explicit(
    ref: SimpleNamespace, virtual_layer: str, aggregation: str, pair: Tuple[Tensor, Tensor]
) -> None:
    x, g = pair
    if virtual_layer == "conv3x3" and x.dim() == 2:  # no location dims: no 3x3 neighbourhood
        with pytest.raises(ValueError, match="conv3x3"):
            _maps.virtual_layer_map(x, g, virtual_layer, aggregation)
        return
    expected = ref.aggregate(explicit_virtual_contribution(ref, x, g, virtual_layer), aggregation)
    got = _maps.virtual_layer_map(x, g, virtual_layer, aggregation)
    assert got.shape == (x.shape[0], 1, *x.shape[2:])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_named_cells_of_the_grid_in_float32() -> None:
    """NormGrad selective and gradient x activation, in float32."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 4, 5, generator=gen)
    g = torch.randn(2, 6, 4, 5, generator=gen)
    sel = _maps.virtual_layer_map(x, g, "scaling", "filter_norm")
    assert sel.dtype == torch.float32
    torch.testing.assert_close(sel, (x * g).clamp(min=0).norm(dim=1, keepdim=True))
    torch.testing.assert_close(_maps.virtual_layer_map(x, g, "scaling", "sum"), (x * g).sum(1, keepdim=True))
    torch.testing.assert_close(
        _maps.virtual_layer_map(x, g), x.norm(dim=1, keepdim=True) * g.norm(dim=1, keepdim=True)
    )


def test_virtual_layer_map_rejects_bad_arguments() -> None:
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="unknown virtual_layer 'conv5x5'"):
        _maps.virtual_layer_map(x, x, "conv5x5")
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        _maps.virtual_layer_map(x, x, "conv1x1", "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        _maps.virtual_layer_map(x, x[:, :2], "conv1x1")


# ============================================================================ "weights" mode


def _random_grad(conv: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.randn(conv(x).shape, dtype=x.dtype)


@given(data=st.data(), aggregation=st.sampled_from(AGGS))
def test_weights_map_output_grid_against_unfold(ref: SimpleNamespace, data: st.DataObject, aggregation: str) -> None:
    conv, x = ref.draw_conv_case(data)
    g = _random_grad(conv, x)
    t = ref.weight_contribution(g, x, ref.Geom.of(conv))
    expected = ref.aggregate(t.reshape(*t.shape[: g.dim() - 1], -1), aggregation)
    got = _maps.weights_map(x, g, ConvGeometry.from_module(conv), aggregation, grid="output")
    assert got.shape == (x.shape[0], 1, *g.shape[2:])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@given(data=st.data(), aggregation=st.sampled_from(AGGS))
def test_weights_map_input_grid_against_explicit_loop(
    ref: SimpleNamespace, data: st.DataObject, aggregation: str
) -> None:
    conv, x = ref.draw_conv_case(data)
    g = _random_grad(conv, x)
    geom = ref.Geom.of(conv)
    t = ref.weight_contribution(g, x, geom)
    on_output = ref.aggregate(t.reshape(*t.shape[: g.dim() - 1], -1), aggregation)
    expected = ref.accumulate(on_output, geom, x.shape[2:])
    got = _maps.weights_map(x, g, ConvGeometry.from_module(conv), aggregation, grid="input")
    assert got.shape == (x.shape[0], 1, *x.shape[2:])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_weights_map_named_geometries(ref: SimpleNamespace, conv_variant: nn.Module) -> None:
    """Every named geometry of the conftest (groups/stride/dilation/all paddings), both grids."""
    conv = conv_variant.double()
    x = torch.randn(2, conv.in_channels, *([9] * (conv.weight.dim() - 2)), dtype=DT)
    g = _random_grad(conv, x)
    geom = ref.Geom.of(conv)
    t = ref.weight_contribution(g, x, geom)
    for aggregation in AGGS:
        on_output = ref.aggregate(t.reshape(*t.shape[: g.dim() - 1], -1), aggregation)
        got_out = _maps.weights_map(x, g, ConvGeometry.from_module(conv), aggregation, "output")
        torch.testing.assert_close(got_out, on_output)
        got_in = _maps.weights_map(x, g, ConvGeometry.from_module(conv), aggregation, "input")
        torch.testing.assert_close(got_in, ref.accumulate(on_output, geom, x.shape[2:]))


def test_zero_padding_drops_padded_pixels_and_leaves_uncovered_pixels_at_zero() -> None:
    """A 2x2 stride-3 conv with zero padding 1 on a 7x7 image, x = g = 1, aggregation "sum"."""
    conv = nn.Conv2d(1, 1, 2, stride=3, padding=1).double()
    x = torch.ones(1, 1, 7, 7, dtype=DT)
    g = torch.ones(1, 1, *conv(x).shape[2:], dtype=DT)
    got = _maps.weights_map(x, g, ConvGeometry.from_module(conv), "sum", "input")[0, 0]
    # rows/cols read by no patch: padded coordinate i + 1 with (i + 1) % 3 == 2
    uncovered = torch.tensor([(i + 1) % 3 == 2 for i in range(7)])
    assert torch.all(got[uncovered] == 0) and torch.all(got[:, uncovered] == 0)
    # a patch's "sum" is the number of its taps inside the image, and it lands on each of
    # those pixels: the total mass is the sum over patches of the squared count
    counts = [
        sum(1 for a, b in itertools.product(range(2), range(2)) if 0 <= 3 * i - 1 + a < 7 and 0 <= 3 * j - 1 + b < 7)
        for i, j in itertools.product(range(3), range(3))
    ]
    assert got.sum().item() == pytest.approx(sum(c * c for c in counts))


def test_weights_map_linear_is_the_1x1_case(ref: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 4, generator=gen, dtype=DT)  # (N, C_in, T)
    g = torch.randn(3, 6, 4, generator=gen, dtype=DT)  # (N, C_out, T)
    for aggregation in AGGS:
        expected = ref.aggregate(ref.outer(g, x), aggregation)
        torch.testing.assert_close(_maps.weights_map(x, g, None, aggregation), expected)


def test_weights_map_rejects_unknown_grid() -> None:
    conv = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="unknown weights_grid 'pixels'"):
        _maps.weights_map(torch.randn(1, 2, 5, 5), torch.randn(1, 2, 3, 3), ConvGeometry.from_module(conv), "norm", "pixels")  # type: ignore[arg-type]


# ============================================================================ normalisation / fusion


def _ref_normalize(m: Tensor) -> Tensor:
    out = torch.empty_like(m)
    for i in range(m.shape[0]):
        lo, hi = m[i].min(), m[i].max()
        out[i] = torch.ones_like(m[i]) if hi == lo else (m[i] - lo) / (hi - lo)
    return out


def test_normalize_maps_against_reference_and_constant_maps() -> None:
    m = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(11))
    m[1] = 0.0
    m[2] = -3.5
    got = _maps.normalize_maps(m)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _ref_normalize(m))
    assert got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("mode", ["product", "mean", "power"])
def test_fuse_maps_against_reference(mode: str) -> None:
    gen = torch.Generator().manual_seed(12)
    a = torch.rand(2, 1, 4, 4, generator=gen)
    b = torch.rand(2, 1, 8, 8, generator=gen)
    c = torch.full((2, 1, 2, 2), 3.0)  # constant: no NaN, neutral (all ones) after normalisation
    w = [0.5, 2.0, 1.0]
    got = _maps.fuse_maps([a, b, c], mode=mode, weights=w)
    ups = [
        _ref_normalize(t if t.shape[-1] == 8 else F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False))
        for t in (a, b, c)
    ]
    if mode == "product":
        expected = ups[0] * ups[1] * ups[2]
    elif mode == "mean":
        expected = sum(wi * u for wi, u in zip(w, ups)) / sum(w)
    else:
        expected = ups[0] ** w[0] * ups[1] ** w[1] * ups[2] ** w[2]
    assert got.shape == (2, 1, 8, 8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)


def test_fuse_maps_all_constant_and_bad_arguments() -> None:
    const = [torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 6, 6)]
    fused = _maps.fuse_maps(const)
    assert torch.isfinite(fused).all() and torch.all(fused == 1)
    with pytest.raises(ValueError, match="at least one map"):
        _maps.fuse_maps([])
    with pytest.raises(ValueError, match="unknown fusion mode 'max'"):
        _maps.fuse_maps(const, mode="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 1 weights for 2 maps"):
        _maps.fuse_maps(const, mode="mean", weights=[1.0])
    with pytest.raises(ValueError, match=r"shape \(N=1, 1, \*locations\)"):
        _maps.fuse_maps([torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3)])
