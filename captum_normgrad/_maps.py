r"""Pure tensor mathematics of NormGrad and its CVPR-2020 variant grid.

Nothing in this module knows about hooks, models or Captum: every function maps tensors to
tensors and is tested directly against straightforward reference implementations
(explicit outer products, ``unfold``) in ``tests/test_maps.py``.

Conventions
-----------
Activations ``x`` and gradients ``g`` have the batch on dim 0, channels on dim 1 and
*locations* on the remaining dims (``H x W`` for images, ``T`` for tokens). Maps are returned
with shape ``(N, 1, *locations)``.

The per-location contribution of a virtual layer to its own parameter gradient is an outer
product ``T_u = a_u b_u^T`` (or an element-wise vector for ``"scaling"`` / ``"bias"``). The
aggregations are evaluated in closed form from a handful of per-vector statistics, so no
``C x C`` (or ``C x C k^2``) tensor is ever built:

=============  =====================================================================
aggregation    closed form for the outer product ``a b^T``
=============  =====================================================================
norm           ``||a|| * ||b||``
filter_norm    ``sqrt(||a+||^2 ||b+||^2 + ||a-||^2 ||b-||^2)``  (``a- = max(-a, 0)``)
sum            ``(sum a) * (sum b)``
max            ``max(max a * max b, max a * min b, min a * max b, min a * min b)``
=============  =====================================================================

For grouped convolutions the contribution is block diagonal; squared norms and sums add over
the groups and maxima are taken over the groups.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "VIRTUAL_LAYERS",
    "AGGREGATIONS",
    "ConvGeometry",
    "outer_aggregate",
    "vector_aggregate",
    "location_norms",
    "virtual_layer_map",
    "patch_statistics",
    "weights_map",
    "accumulate_to_input",
    "normalize_maps",
    "fuse_maps",
    "channel_terms",
    "reduce_map_channels",
    "resize_maps",
]

VIRTUAL_LAYERS: Tuple[str, ...] = ("conv1x1", "scaling", "bias", "conv3x3")
AGGREGATIONS: Tuple[str, ...] = ("norm", "filter_norm", "sum", "max")

Aggregation = Literal["norm", "filter_norm", "sum", "max"]

# Statistics of a vector (over its channel axis) needed by each aggregation.
_STATS_FOR: Dict[str, Tuple[str, ...]] = {
    "norm": ("sq",),
    "filter_norm": ("pos_sq", "neg_sq"),
    "sum": ("sum",),
    "max": ("max", "min"),
}


def _sqrt0(t: Tensor) -> Tensor:
    """``sqrt`` of a non-negative tensor with gradient 0 (not inf) at 0, so that maps stay
    differentiable (``create_graph=True``) where an activation or a gradient vanishes."""
    if not t.requires_grad:
        return t.sqrt()
    tiny = torch.finfo(t.dtype).tiny
    return torch.where(t > 0, t.clamp_min(tiny).sqrt(), torch.zeros((), dtype=t.dtype, device=t.device))


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; choose one of {', '.join(map(repr, AGGREGATIONS))}"
        )


def _channel_stats(t: Tensor, groups: int, aggregation: str) -> Dict[str, Tensor]:
    """Per-group statistics over the channel axis (dim 1) of ``t``: (N, C, *L) -> (N, G, *L)."""
    n, c = t.shape[0], t.shape[1]
    tg = t.reshape(n, groups, c // groups, *t.shape[2:])
    out: Dict[str, Tensor] = {}
    for name in _STATS_FOR[aggregation]:
        if name == "sq":
            out[name] = tg.square().sum(2)
        elif name == "pos_sq":
            out[name] = tg.clamp(min=0).square().sum(2)
        elif name == "neg_sq":
            out[name] = tg.clamp(max=0).square().sum(2)
        elif name == "sum":
            out[name] = tg.sum(2)
        elif name == "max":
            out[name] = tg.amax(2)
        else:  # "min"
            out[name] = tg.amin(2)
    return out


def _combine(a: Dict[str, Tensor], b: Dict[str, Tensor], aggregation: str) -> Tensor:
    """Closed-form aggregation of the (block-diagonal) outer product from per-group stats.

    ``a`` and ``b`` hold tensors of shape (N, G, *L); the result has shape (N, 1, *L).
    """
    if aggregation == "norm":
        return _sqrt0((a["sq"] * b["sq"]).sum(1, keepdim=True))
    if aggregation == "filter_norm":
        sq = a["pos_sq"] * b["pos_sq"] + a["neg_sq"] * b["neg_sq"]
        return _sqrt0(sq.sum(1, keepdim=True))
    if aggregation == "sum":
        return (a["sum"] * b["sum"]).sum(1, keepdim=True)
    # max over every entry a_i b_j of every diagonal block
    cands = torch.stack(
        [a["max"] * b["max"], a["max"] * b["min"], a["min"] * b["max"], a["min"] * b["min"]]
    )
    return cands.amax(0).amax(1, keepdim=True)


def outer_aggregate(a: Tensor, b: Tensor, aggregation: Aggregation = "norm", groups: int = 1) -> Tensor:
    r"""Aggregate the per-location outer products ``a_u b_u^T`` without building them.

    Args:
        a (Tensor): shape ``(N, Ca, *L)``, e.g. the gradient ``g``.
        b (Tensor): shape ``(N, Cb, *L)``, e.g. the activation ``x``.
        aggregation (str, optional): ``"norm"``, ``"filter_norm"``, ``"sum"`` or ``"max"``.
                    Default: ``"norm"``
        groups (int, optional): number of diagonal blocks (grouped convolution): ``a`` and ``b``
                    are split into ``groups`` channel groups and only matching groups interact.
                    Default: 1

    Returns:
        Tensor: shape ``(N, 1, *L)``.

    Examples::

        >>> g, x = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
        >>> m = outer_aggregate(g, x)            # ||g_u|| * ||x_u||
        >>> torch.allclose(m, g.norm(dim=1, keepdim=True) * x.norm(dim=1, keepdim=True))
        True
    """
    _check_aggregation(aggregation)
    return _combine(_channel_stats(a, groups, aggregation), _channel_stats(b, groups, aggregation), aggregation)


def vector_aggregate(t: Tensor, aggregation: Aggregation = "norm") -> Tensor:
    r"""Aggregate a per-location vector ``t_u`` over channels: ``(N, C, *L) -> (N, 1, *L)``.

    ``norm`` is ``||t_u||``, ``filter_norm`` is ``||max(t_u, 0)||``, ``sum`` is ``sum t_u`` and
    ``max`` is ``max t_u``.

    Examples::

        >>> vector_aggregate(torch.tensor([[[3.0], [-4.0]]]), "norm")
        tensor([[[5.]]])
    """
    _check_aggregation(aggregation)
    if aggregation == "norm":
        return _sqrt0(t.square().sum(1, keepdim=True))
    if aggregation == "filter_norm":
        return _sqrt0(t.clamp(min=0).square().sum(1, keepdim=True))
    if aggregation == "sum":
        return t.sum(1, keepdim=True)
    return t.amax(1, keepdim=True)


def location_norms(t: Tensor) -> Tensor:
    """Euclidean norm over channels (dim 1) at every location: ``(N, C, *L) -> (N, 1, *L)``."""
    return _sqrt0(t.square().sum(1, keepdim=True))


@dataclass(frozen=True)
class ConvGeometry:
    r"""Geometry of an N-d convolution, enough to enumerate the input patch of each output location.

    Args:
        kernel_size (tuple[int, ...]): kernel extent per location dim.
        stride (tuple[int, ...]): stride per location dim.
        dilation (tuple[int, ...]): dilation per location dim.
        pad (tuple[int, ...]): explicit padding in ``F.pad`` order (last dim first, ``(left, right)``
                    pairs), as ``nn.Conv*d._reversed_padding_repeated_twice``.
        padding_mode (str): ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        groups (int): number of groups.
    """

    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    pad: Tuple[int, ...]
    padding_mode: str = "zeros"
    groups: int = 1

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    @classmethod
    def from_module(cls, conv: torch.nn.modules.conv._ConvNd) -> "ConvGeometry":
        """The geometry of an ``nn.Conv1d``/``Conv2d``/``Conv3d`` module."""
        return cls(
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            dilation=tuple(conv.dilation),
            pad=tuple(conv._reversed_padding_repeated_twice),
            padding_mode=conv.padding_mode,
            groups=conv.groups,
        )

    @classmethod
    def neighbourhood(cls, ndim: int, size: int = 3) -> "ConvGeometry":
        """A stride-1, zero-padded, ``size``-wide 'same' neighbourhood (the conv3x3 virtual layer)."""
        p = size // 2
        return cls((size,) * ndim, (1,) * ndim, (1,) * ndim, (p, p) * ndim, "zeros", 1)


_CONV: Dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T: Dict[int, Callable[..., Tensor]] = {
    1: F.conv_transpose1d,
    2: F.conv_transpose2d,
    3: F.conv_transpose3d,
}
_MAXPOOL: Dict[int, Callable[..., Tensor]] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _pad(t: Tensor, geom: ConvGeometry) -> Tensor:
    if not any(geom.pad):
        return t
    mode = "constant" if geom.padding_mode == "zeros" else geom.padding_mode
    return F.pad(t, list(geom.pad), mode=mode)


def _box_sum(t: Tensor, geom: ConvGeometry) -> Tensor:
    """Sum of ``t`` (N, G, *Lpad) over each patch window, per group: -> (N, G, *Lout)."""
    g = t.shape[1]
    ones = torch.ones((g, 1, *geom.kernel_size), dtype=t.dtype, device=t.device)
    return _CONV[geom.ndim](t, ones, stride=geom.stride, dilation=geom.dilation, groups=g)


def _window_max(t: Tensor, geom: ConvGeometry) -> Tensor:
    return _MAXPOOL[geom.ndim](t, geom.kernel_size, stride=geom.stride, dilation=geom.dilation)


def patch_statistics(x: Tensor, geom: ConvGeometry, aggregation: Aggregation = "norm") -> Dict[str, Tensor]:
    r"""Per-group statistics of the input patch ``iota(x)_u`` seen by every output location.

    Uses the convolution identity ``||iota(x)_u||^2 = conv(sum_c x_c^2, ones(k))`` (and max pooling
    for extrema), honouring stride, padding (every ``padding_mode``), dilation and groups.

    Args:
        x (Tensor): layer input, shape ``(N, C_in, *L_in)``.
        geom (ConvGeometry): the convolution's geometry.
        aggregation (str, optional): which statistics to compute. Default: ``"norm"``

    Returns:
        dict[str, Tensor]: statistics of shape ``(N, groups, *L_out)``.
    """
    _check_aggregation(aggregation)
    xp = _pad(x, geom)
    per_pixel = _channel_stats(xp, geom.groups, aggregation)
    out: Dict[str, Tensor] = {}
    for name, t in per_pixel.items():
        if name == "max":
            out[name] = _window_max(t, geom)
        elif name == "min":
            out[name] = -_window_max(-t, geom)
        else:
            out[name] = _box_sum(t, geom)
    return out


def _pad_adjoint(t: Tensor, geom: ConvGeometry, in_shape: Sequence[int]) -> Tensor:
    """Adjoint of the padding: fold values that landed on padded pixels back where they came from."""
    if not any(geom.pad):
        return t
    if geom.padding_mode == "zeros":
        slices = [slice(None), slice(None)]
        # F.pad order is last dim first
        for d in range(geom.ndim):
            lo = geom.pad[2 * (geom.ndim - 1 - d)]
            size = in_shape[2 + d]
            slices.append(slice(lo, lo + size))
        return t[tuple(slices)]
    zeros = torch.zeros(tuple(in_shape), dtype=t.dtype, device=t.device)
    with torch.enable_grad():
        _, vjp_fn = torch.func.vjp(lambda z: F.pad(z, list(geom.pad), mode=geom.padding_mode), zeros)
        return vjp_fn(t)[0]


def accumulate_to_input(m: Tensor, geom: ConvGeometry, in_shape: Sequence[int]) -> Tensor:
    r"""Add each output location's value onto every input pixel its patch covers.

    This is the transpose of the patch-sum operator: a ``conv_transpose`` of the map with a
    kernel of ones and the layer's stride and dilation, followed by the adjoint of the padding.

    Args:
        m (Tensor): map on the output grid, shape ``(N, 1, *L_out)``.
        geom (ConvGeometry): the convolution's geometry.
        in_shape (sequence of int): the layer input's shape ``(N, C_in, *L_in)``.

    Returns:
        Tensor: map on the input grid, shape ``(N, 1, *L_in)``.
    """
    padded = [in_shape[2 + d] + geom.pad[2 * (geom.ndim - 1 - d)] + geom.pad[2 * (geom.ndim - 1 - d) + 1]
              for d in range(geom.ndim)]
    out_pad = []
    for d in range(geom.ndim):
        covered = (m.shape[2 + d] - 1) * geom.stride[d] + geom.dilation[d] * (geom.kernel_size[d] - 1) + 1
        out_pad.append(padded[d] - covered)
    ones = torch.ones((1, 1, *geom.kernel_size), dtype=m.dtype, device=m.device)
    if all(p < s or p < dl for p, s, dl in zip(out_pad, geom.stride, geom.dilation)):
        acc = _CONV_T[geom.ndim](m, ones, stride=geom.stride, dilation=geom.dilation, output_padding=tuple(out_pad))
    else:  # cannot happen for a map produced by the same geometry; keep exact anyway
        acc = _CONV_T[geom.ndim](m, ones, stride=geom.stride, dilation=geom.dilation)
        acc = F.pad(acc, [v for d in reversed(range(geom.ndim)) for v in (0, out_pad[d])])
    return _pad_adjoint(acc, geom, (m.shape[0], 1, *in_shape[2:]))


def weights_map(
    x_in: Tensor,
    g_out: Tensor,
    geom: Optional[ConvGeometry],
    aggregation: Aggregation = "norm",
    grid: Literal["input", "output"] = "input",
) -> Tensor:
    r"""NormGrad for a layer's own weights (general filter shapes).

    For a convolution with input ``x'`` and output gradient ``g``, each output location ``u``
    contributes ``g_u iota(x')_u^T`` to the weight gradient (block diagonal for groups). Its
    aggregation (closed form) is computed on the output grid and, for ``grid="input"``,
    accumulated onto every input pixel that the patch covers.

    For a linear layer (``geom=None``) the patch is the location itself (the 1x1 case): ``x_in``
    and ``g_out`` must already have channels on dim 1.

    Args:
        x_in (Tensor): the layer's input, ``(N, C_in, *L_in)``.
        g_out (Tensor): gradient w.r.t. the layer's output, ``(N, C_out, *L_out)``.
        geom (ConvGeometry or None): the convolution's geometry, or None for a linear layer.
        aggregation (str, optional): see :func:`outer_aggregate`. Default: ``"norm"``
        grid (str, optional): ``"input"`` (accumulate onto the layer-input grid, the paper's
                    formulation) or ``"output"`` (keep one value per output location).
                    Default: ``"input"``

    Returns:
        Tensor: ``(N, 1, *L_in)`` for ``grid="input"``, ``(N, 1, *L_out)`` otherwise.
    """
    _check_aggregation(aggregation)
    if grid not in ("input", "output"):
        raise ValueError(f"unknown weights_grid {grid!r}; choose 'input' or 'output'")
    if geom is None:
        return outer_aggregate(g_out, x_in, aggregation)
    a = _channel_stats(g_out, geom.groups, aggregation)
    b = patch_statistics(x_in, geom, aggregation)
    m = _combine(a, b, aggregation)
    if grid == "output":
        return m
    return accumulate_to_input(m, geom, x_in.shape)


def virtual_layer_map(
    x: Tensor,
    g: Tensor,
    virtual_layer: str = "conv1x1",
    aggregation: Aggregation = "norm",
) -> Tensor:
    r"""The CVPR-2020 grid: a virtual layer at the target point times an aggregation.

    ============  ===================================  ==========================================
    virtual layer per-location contribution ``T_u``      parameter of the virtual layer
    ============  ===================================  ==========================================
    conv1x1       ``g_u x_u^T``  (C x C)                 1x1 identity convolution (NormGrad)
    scaling       ``x_u * g_u``  (C)                     per-channel scale
    bias          ``g_u``        (C)                     per-channel bias
    conv3x3       ``g_u (3x3 patch of x around u)^T``    3x3 identity-centred convolution
    ============  ===================================  ==========================================

    Args:
        x (Tensor): activations, ``(N, C, *L)``.
        g (Tensor): gradients of the objective w.r.t. ``x``, same shape.
        virtual_layer (str, optional): one of ``"conv1x1"``, ``"scaling"``, ``"bias"``,
                    ``"conv3x3"``. Default: ``"conv1x1"``
        aggregation (str, optional): one of ``"norm"``, ``"filter_norm"``, ``"sum"``, ``"max"``.
                    Default: ``"norm"``

    Returns:
        Tensor: ``(N, 1, *L)``.

    Examples::

        >>> x, g = torch.randn(1, 8, 5, 5), torch.randn(1, 8, 5, 5)
        >>> virtual_layer_map(x, g).shape                 # NormGrad
        torch.Size([1, 1, 5, 5])
        >>> sel = virtual_layer_map(x, g, "scaling", "filter_norm")   # NormGrad selective
    """
    _check_aggregation(aggregation)
    if x.shape != g.shape:
        raise ValueError(f"activation shape {tuple(x.shape)} and gradient shape {tuple(g.shape)} differ")
    if virtual_layer == "conv1x1":
        return outer_aggregate(g, x, aggregation)
    if virtual_layer == "scaling":
        return vector_aggregate(x * g, aggregation)
    if virtual_layer == "bias":
        return vector_aggregate(g, aggregation)
    if virtual_layer == "conv3x3":
        nd = x.dim() - 2
        if nd not in _CONV:
            raise ValueError(
                f"virtual_layer='conv3x3' needs 1 to 3 location dims, got a tensor of shape {tuple(x.shape)}"
            )
        return weights_map(x, g, ConvGeometry.neighbourhood(nd), aggregation, grid="output")
    raise ValueError(
        f"unknown virtual_layer {virtual_layer!r}; choose one of {', '.join(map(repr, VIRTUAL_LAYERS + ('weights',)))}"
    )


def channel_terms(x: Tensor, g: Tensor, virtual_layer: str = "conv1x1", aggregation: Aggregation = "norm") -> Tensor:
    r"""Per-channel terms of a virtual-layer map (Captum's ``attr_dim_summation=False``).

    For ``aggregation="sum"`` the terms add up over channels to :func:`virtual_layer_map`; for
    ``"norm"`` their root-sum-of-squares over channels is the map (the rows of ``T_u``):

    ============  =========================  =========================
    virtual layer ``"sum"`` term of channel c ``"norm"`` term of channel c
    ============  =========================  =========================
    conv1x1       ``g_uc * sum_j x_uj``       ``|g_uc| * ||x_u||``
    scaling       ``x_uc * g_uc``             ``|x_uc * g_uc|``
    bias          ``g_uc``                    ``|g_uc|``
    ============  =========================  =========================

    Args:
        x (Tensor): activations, ``(N, C, *L)``.
        g (Tensor): gradients, same shape.
        virtual_layer (str, optional): ``"conv1x1"``, ``"scaling"`` or ``"bias"``.
                    Default: ``"conv1x1"``
        aggregation (str, optional): ``"norm"`` or ``"sum"``. Default: ``"norm"``

    Returns:
        Tensor: ``(N, C, *L)``.
    """
    if aggregation not in ("norm", "sum") or virtual_layer not in ("conv1x1", "scaling", "bias"):
        raise ValueError(
            f"per-channel attributions (attr_dim_summation=False) are defined for the 'norm' and 'sum' "
            f"aggregations of the 'conv1x1', 'scaling' and 'bias' virtual layers, not for "
            f"virtual_layer={virtual_layer!r}, aggregation={aggregation!r}; use attr_dim_summation=True"
        )
    if x.shape != g.shape:
        raise ValueError(f"activation shape {tuple(x.shape)} and gradient shape {tuple(g.shape)} differ")
    if virtual_layer == "conv1x1":
        other = location_norms(x) if aggregation == "norm" else x.sum(1, keepdim=True)
        t = g * other
    elif virtual_layer == "scaling":
        t = x * g
    else:
        t = g
    return t.abs() if aggregation == "norm" else t


# --------------------------------------------------------------------------- normalisation / fusion


def _check_finite_maps(maps: Tensor, where: str, what: str = "maps") -> None:
    """Refuse NaN/Inf: min-max normalisation would spread them silently (a NaN min makes every value NaN)."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"{where}: {what} must be a Tensor, got {type(maps).__name__}")
    if maps.dim() == 0:
        raise ValueError(f"{where}: {what} must have shape (N, ...) (one map per sample), got a 0-dim tensor")
    if maps.is_floating_point() or maps.is_complex():
        if maps.is_complex():
            raise TypeError(f"{where}: {what} are complex ({maps.dtype}); give real maps (e.g. .abs() or .real)")
        bad = ~torch.isfinite(maps)
        if bool(bad.any()):
            rows = bad.reshape(maps.shape[0], -1).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"{where}: {what} contain NaN or Inf values (samples {rows[:10]}); clean them first "
                "(e.g. torch.nan_to_num) or find the degenerate input that produced them"
            )


def normalize_maps(maps: Tensor, eps: float = 1e-12, constant_value: float = 1.0) -> Tensor:
    r"""Min-max normalise each sample's map to ``[0, 1]``.

    A constant map (``max - min <= eps * max(1, |max|)``) carries no spatial information; it becomes
    ``constant_value`` everywhere (1 by default: neutral for products), never NaN.

    Args:
        maps (Tensor): ``(N, ...)``.
        eps (float, optional): relative tolerance that decides a map is constant. Default: 1e-12
        constant_value (float, optional): value given to constant maps. Default: 1.0

    Returns:
        Tensor: same shape, values in ``[0, 1]``.

    Examples::

        >>> normalize_maps(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
        tensor([[0., 1.],
                [1., 1.]])
    """
    _check_finite_maps(maps, "normalize_maps")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"normalize_maps: eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(constant_value, (int, float)) and not isinstance(constant_value, bool) and math.isfinite(constant_value)):
        raise ValueError(f"normalize_maps: constant_value must be a finite number, got {constant_value!r}")
    if maps.numel() == 0:  # an empty batch (or empty maps): nothing to normalise
        return maps.clone()
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.amin(1, keepdim=True)
    hi = flat.amax(1, keepdim=True)
    span = hi - lo
    const = span <= eps * hi.abs().clamp(min=1.0)
    safe = torch.where(const, torch.ones_like(span), span)
    out = torch.where(const, torch.full_like(flat, constant_value), (flat - lo) / safe)
    return out.reshape(maps.shape)


def fuse_maps(
    maps: Sequence[Tensor],
    size: Optional[Tuple[int, ...]] = None,
    mode: Literal["product", "mean", "power"] = "product",
    weights: Optional[Sequence[float]] = None,
    interpolate_mode: str = "bilinear",
) -> Tensor:
    r"""Combine maps from several depths into one map.

    Every map is upsampled to a common size, min-max normalised per sample (constant maps become
    all ones, see :func:`normalize_maps`) and then combined:

    * ``"product"``: product of the normalised maps (the authors' demo);
    * ``"mean"``: weighted mean ``sum_l w_l m_l / sum_l w_l``;
    * ``"power"``: product of powers ``prod_l m_l ** w_l``.

    Args:
        maps (sequence of Tensor): maps of shape ``(N, 1, *L_l)`` (e.g. ``LayerNormGrad`` with a list
                    of layers).
        size (tuple of int, optional): common size; the largest map's size when None.
                    Default: None
        mode (str, optional): ``"product"``, ``"mean"`` or ``"power"``. Default: ``"product"``
        weights (sequence of float, optional): per-layer weights for ``"mean"`` / ``"power"``;
                    all ones when None. Default: None
        interpolate_mode (str, optional): ``F.interpolate`` mode used for upsampling.
                    Default: ``"bilinear"``

    Returns:
        Tensor: ``(N, 1, *size)`` with values in ``[0, 1]``.

    Examples::

        >>> a, b = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 8, 8)
        >>> fuse_maps([a, b]).shape
        torch.Size([2, 1, 8, 8])
    """
    if len(maps) == 0:
        raise ValueError("fuse_maps needs at least one map")
    if mode not in ("product", "mean", "power"):
        raise ValueError(f"unknown fusion mode {mode!r}; choose 'product', 'mean' or 'power'")
    w: List[float] = [1.0] * len(maps) if weights is None else [float(v) for v in weights]
    if len(w) != len(maps):
        raise ValueError(f"got {len(w)} weights for {len(maps)} maps")
    if not all(math.isfinite(v) for v in w):
        raise ValueError(f"fuse_maps weights must be finite numbers, got {w}")
    if mode == "mean" and sum(w) <= 0:
        raise ValueError("weights for mode='mean' must have a positive sum")
    n = maps[0].shape[0]
    for i, m in enumerate(maps):
        _check_finite_maps(m, "fuse_maps", f"map {i}")
        if m.dim() < 3 or m.shape[1] != 1 or m.shape[0] != n:
            raise ValueError(f"every map must have shape (N={n}, 1, *locations), got {tuple(m.shape)}")
    if size is None:
        size = tuple(max(m.shape[2 + d] for m in maps) for d in range(maps[0].dim() - 2))
    mode_i = interpolate_mode
    ups = []
    for m in maps:
        mm = m.to(torch.promote_types(m.dtype, torch.float32))
        if tuple(mm.shape[2:]) != tuple(size):
            kw = {"align_corners": False} if mode_i in ("linear", "bilinear", "bicubic", "trilinear") else {}
            mm = F.interpolate(mm, size=size, mode=mode_i, **kw)
        ups.append(normalize_maps(mm))
    if mode == "mean":
        out = sum(wi * u for wi, u in zip(w, ups)) / sum(w)
    else:
        out = torch.ones_like(ups[0])
        for wi, u in zip(w, ups):
            out = out * (u.clamp(min=0) ** wi if mode == "power" else u)
    return out


# --------------------------------------------------------------------------- channels and sizes

_LINEAR_MODES = ("linear", "bilinear", "trilinear")


def reduce_map_channels(maps: Tensor, reduce_channels: Optional[str] = "sum") -> Tensor:
    r"""Reduce a layer map ``(N, C, *L)`` to one channel ``(N, 1, *L)``.

    Maps that already have one channel are returned unchanged.

    Args:
        maps (Tensor): ``(N, C, *L)``.
        reduce_channels (str or None, optional): ``"sum"`` (what Grad-CAM does with its weighted
                    activations; for ``LayerGradientXActivation`` it gives gradient x activation
                    summed over channels), ``"mean"``, or ``None`` to raise when ``C > 1``.
                    Default: ``"sum"``

    Returns:
        Tensor: ``(N, 1, *L)``.

    Examples::

        >>> reduce_map_channels(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a Tensor, got {type(maps).__name__}")
    if maps.dim() < 2:
        raise ValueError(f"maps of shape {tuple(maps.shape)} have no channel dim; expected (N, C, *locations)")
    if maps.shape[1] == 1:
        return maps
    if reduce_channels == "sum":
        return maps.sum(1, keepdim=True)
    if reduce_channels == "mean":
        return maps.mean(1, keepdim=True)
    if reduce_channels is None:
        raise ValueError(
            f"maps have {maps.shape[1]} channels; pass reduce_channels='sum' or 'mean' to reduce them to one"
        )
    raise ValueError(f"unknown reduce_channels {reduce_channels!r}; choose 'sum', 'mean' or None")


def _interp_mode(mode: str, n_spatial: int) -> str:
    if mode in _LINEAR_MODES:
        return _LINEAR_MODES[n_spatial - 1] if 1 <= n_spatial <= 3 else mode
    return mode


def resize_maps(maps: Tensor, size: Sequence[int], interpolate_mode: str = "bilinear") -> Tensor:
    r"""Interpolate ``(N, C, *L)`` maps to ``size`` (returned unchanged when already that size).

    Linear-family modes are adapted to the number of location dims and use
    ``align_corners=False`` (the TorchRay and Captum convention).

    Args:
        maps (Tensor): ``(N, C, *L)`` maps.
        size (sequence of int): target locations ``*S``.
        interpolate_mode (str, optional): ``F.interpolate`` mode. Default: ``"bilinear"``

    Returns:
        Tensor: ``(N, C, *S)``.

    Examples::

        >>> resize_maps(torch.ones(2, 1, 4, 4), (16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    mode = _interp_mode(interpolate_mode, len(size))
    kw: Dict[str, Any] = {"align_corners": False} if mode in _LINEAR_MODES + ("bicubic",) else {}
    src = maps if maps.is_floating_point() else maps.float()
    return F.interpolate(src, size=size, mode=mode, **kw)
