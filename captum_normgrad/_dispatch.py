"""From a layer and its captured tensors to maps: option checking and the choice of formula.

Shared by every NormGrad class (order 0 and order 1). It knows modules only to read a
convolution's geometry; all arithmetic is delegated to :mod:`captum_normgrad._maps`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
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


def channels_to_dim1(t: Tensor, channel_dim: int) -> Tensor:
    """Move the channel axis to dim 1 (a no-op for the default ``channel_dim=1``)."""
    if t.dim() < 2:
        raise ValueError(f"layer tensor of shape {tuple(t.shape)} has no channel dim; expected (N, C, ...)")
    cd = channel_dim % t.dim()
    if cd == 0:
        raise ValueError("channel_dim cannot be the batch dim 0")
    return t if cd == 1 else t.movedim(cd, 1)


def layer_map(
    layer: nn.Module,
    activation: Tensor,
    gradient: Tensor,
    virtual_layer: str,
    aggregation: str,
    weights_grid: str,
    channel_dim: int,
) -> Tensor:
    """The map of one layer tensor: ``(N, 1, *locations)``."""
    if virtual_layer == "weights":
        if isinstance(layer, nn.Linear):
            return _maps.weights_map(channels_to_dim1(activation, -1), channels_to_dim1(gradient, -1), None, aggregation)  # type: ignore[arg-type]
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
) -> Tuple[Tensor, ...]:
    """Maps for every tensor of a layer (layers may return tuples)."""
    if virtual_layer == "weights":
        return (layer_map(layer, activations[0], gradients[0], virtual_layer, aggregation, weights_grid, channel_dim),)
    return tuple(
        layer_map(layer, a, g, virtual_layer, aggregation, weights_grid, channel_dim)
        for a, g in zip(activations, gradients)
    )
