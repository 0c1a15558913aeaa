"""From a layer and its captured tensors to maps: option checking and the choice of formula.

Shared by every NormGrad class (order 0 and order 1). It knows modules only to read a
convolution's geometry; all arithmetic is delegated to :mod:`captum_normgrad._maps`.
"""

from __future__ import annotations

import warnings
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _maps

VIRTUAL_LAYER_CHOICES: Tuple[str, ...] = _maps.VIRTUAL_LAYERS + ("weights",)
WEIGHTS_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def layer_list(layer: Union[nn.Module, Sequence[nn.Module]]) -> Tuple[List[nn.Module], bool]:
    """Normalise ``layer`` to a list; the flag says whether the user gave a list."""
    if isinstance(layer, nn.Module):
        return [layer], False
    if isinstance(layer, (list, tuple)):
        if len(layer) == 0:
            raise ValueError("layer is an empty list; give at least one module")
        return list(layer), True
    raise TypeError(f"layer must be an nn.Module or a list of modules, got {type(layer).__name__}")


def check_options(
    layers: Sequence[nn.Module],
    virtual_layer: str,
    aggregation: str,
    weights_grid: str,
    channel_dim: int,
    attribute_to_layer_input: bool,
    summed: bool = True,
) -> None:
    """Validate the map options before any forward pass, with messages that name the fix."""
    if virtual_layer not in VIRTUAL_LAYER_CHOICES:
        raise ValueError(
            f"unknown virtual_layer {virtual_layer!r}; choose one of {', '.join(map(repr, VIRTUAL_LAYER_CHOICES))}"
        )
    if aggregation not in _maps.AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; choose one of {', '.join(map(repr, _maps.AGGREGATIONS))}"
        )
    if weights_grid not in ("input", "output"):
        raise ValueError(f"unknown weights_grid {weights_grid!r}; choose 'input' or 'output'")
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
        raise TypeError(f"channel_dim must be an int, got {type(channel_dim).__name__}")
    if not summed:
        if virtual_layer not in ("conv1x1", "scaling", "bias") or aggregation not in ("norm", "sum"):
            raise ValueError(
                "attr_dim_summation=False (per-channel attributions) is defined for the 'norm' and 'sum' "
                "aggregations of the 'conv1x1', 'scaling' and 'bias' virtual layers; got "
                f"virtual_layer={virtual_layer!r}, aggregation={aggregation!r}. Use attr_dim_summation=True"
            )
    if virtual_layer == "weights":
        if attribute_to_layer_input:
            raise ValueError(
                "virtual_layer='weights' always pairs the layer's input activations with its output "
                "gradients; attribute_to_layer_input does not apply. Use weights_grid='input' or 'output' "
                "to choose the grid of the map"
            )
        for layer in layers:
            if not isinstance(layer, WEIGHTS_MODULES):
                raise ValueError(
                    f"virtual_layer='weights' needs an nn.Conv1d/Conv2d/Conv3d or nn.Linear layer, got "
                    f"{type(layer).__name__}; use a virtual layer ('conv1x1', the default) at this point, "
                    "or hook the convolution itself"
                )


MAP_DTYPES = (torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype maps are computed and returned in: float32 for half precision, else ``dtype``.

    Map statistics are squares and sums over channels: in float16 they overflow to ``inf`` (or
    underflow to 0) long before the activations and gradients themselves do.
    """
    return dtype if dtype in MAP_DTYPES or not dtype.is_floating_point else torch.float32


def _upcast(t: Tensor) -> Tensor:
    d = accumulation_dtype(t.dtype)
    return t if t.dtype == d else t.to(d)


def channels_to_dim1(t: Tensor, channel_dim: int) -> Tensor:
    """Move the channel axis to dim 1 (a no-op for the default ``channel_dim=1``)."""
    if t.dim() < 2:
        raise ValueError(f"layer tensor of shape {tuple(t.shape)} has no channel dim; expected (N, C, ...)")
    if not -t.dim() <= channel_dim < t.dim():
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for a layer tensor of shape {tuple(t.shape)} "
            f"({t.dim()} dims); use 1..{t.dim() - 1} or -{t.dim() - 1}..-1 (1 for (N, C, ...), -1 for "
            "channels-last / token layers (N, T, C))"
        )
    cd = channel_dim % t.dim()
    if cd == 0:
        raise ValueError("channel_dim cannot be the batch dim 0")
    return t if cd == 1 else t.movedim(cd, 1)


def warn_degenerate(maps: Sequence[Tensor], method: str, fix: str) -> None:
    """Warn (``UserWarning``) when a map has non-finite values or a sample's map is all zero.

    A map with a single location (a layer shaped ``(N, C)``) is not checked for zeros: there a
    zero is an ordinary value (an inactive unit), not a degenerate map.

    Args:
        maps (sequence of Tensor): maps with the batch on dim 0.
        method (str): the method's name, for the message.
        fix (str): what the caller can do about it (cause-specific advice).
    """
    for m in maps:
        if m.numel() == 0:
            continue
        flat = m.detach().reshape(m.shape[0], -1)
        bad = (~torch.isfinite(flat)).any(1)
        if bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()
            warnings.warn(
                f"{method}: the map of example(s) {idx[:8]}{' ...' if len(idx) > 8 else ''} has NaN/Inf values "
                f"(overflow or a non-finite objective). {fix}",
                UserWarning,
                stacklevel=4,
            )
        zero = (flat == 0).all(1) & ~bad
        if flat.shape[1] > 1 and bool(zero.any()):  # one location: a zero is just a value
            idx = zero.nonzero().flatten().tolist()
            warnings.warn(
                f"{method}: the map of example(s) {idx[:8]}{' ...' if len(idx) > 8 else ''} is all zero: the "
                "gradient of the objective (or the activation) vanishes at every location of this layer. "
                f"{fix}",
                UserWarning,
                stacklevel=4,
            )


def finalize(maps: Tuple[Tensor, ...], relu_attributions: bool) -> Tuple[Tensor, ...]:
    """Captum's ``relu_attributions``: keep the positive part (a no-op for the non-negative
    ``norm``/``filter_norm`` aggregations)."""
    return tuple(F.relu(m) for m in maps) if relu_attributions else maps


def layer_map(
    layer: nn.Module,
    activation: Tensor,
    gradient: Tensor,
    virtual_layer: str,
    aggregation: str,
    weights_grid: str,
    channel_dim: int,
    summed: bool = True,
) -> Tensor:
    """The map of one layer tensor: ``(N, 1, *locations)`` (``(N, C, *locations)`` per-channel
    terms with ``summed=False``), in float32 for half-precision tensors."""
    activation, gradient = _upcast(activation), _upcast(gradient)
    if not summed:
        return _maps.channel_terms(
            channels_to_dim1(activation, channel_dim),
            channels_to_dim1(gradient, channel_dim),
            virtual_layer,
            aggregation,  # type: ignore[arg-type]
        )
    if virtual_layer == "weights":
        if isinstance(layer, nn.Linear):
            return _maps.weights_map(
                channels_to_dim1(activation, -1),
                channels_to_dim1(gradient, -1),
                None,
                aggregation,  # type: ignore[arg-type]
            )
        geom = _maps.ConvGeometry.from_module(layer)  # type: ignore[arg-type]
        return _maps.weights_map(activation, gradient, geom, aggregation, weights_grid)  # type: ignore[arg-type]
    x = channels_to_dim1(activation, channel_dim)
    g = channels_to_dim1(gradient, channel_dim)
    return _maps.virtual_layer_map(x, g, virtual_layer, aggregation)  # type: ignore[arg-type]


def maps_for_layer(
    layer: nn.Module,
    activations: Tuple[Tensor, ...],
    gradients: Tuple[Tensor, ...],
    virtual_layer: str,
    aggregation: str,
    weights_grid: str,
    channel_dim: int,
    summed: bool = True,
) -> Tuple[Tensor, ...]:
    """Maps for every tensor of a layer (layers may return tuples)."""
    if virtual_layer == "weights":
        return (
            layer_map(
                layer, activations[0], gradients[0], virtual_layer, aggregation, weights_grid, channel_dim, summed
            ),
        )
    return tuple(
        layer_map(layer, a, g, virtual_layer, aggregation, weights_grid, channel_dim, summed)
        for a, g in zip(activations, gradients)
    )
