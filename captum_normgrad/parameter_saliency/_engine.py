"""Functional plumbing of parameter saliency: the model as a function of its parameters (the vmap
and loop fallbacks of the batched engine), input and target checks."""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch import Tensor

from .._layers import unwrap_model
from .._targets import class_index_vector

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- functional plumbing


_unwrap = unwrap_model  # the one DataParallel/DDP unwrapping (captum_normgrad._layers)


def _check_target(target: Any, n: int, device: torch.device) -> Tensor:
    """The true labels as an ``(n,)`` long tensor (the package's one target rule, :mod:`captum_normgrad._targets`)."""
    if target is None:
        raise ValueError(
            "target is required: parameter saliency differentiates the loss of the true label "
            "(pass one class index per sample, e.g. the dataset labels)"
        )
    return class_index_vector(target, n, device)


def _check_inputs(inputs: Any) -> Tensor:
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"inputs must be a torch.Tensor with the batch on dim 0, got {type(inputs).__name__} "
            "(parameter saliency supports models that take a single tensor)"
        )
    if inputs.dim() < 1:
        raise ValueError("inputs must have a batch dimension (dim 0)")
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs contain NaN or Inf values; clean them (e.g. torch.nan_to_num) first")
    return inputs


def _unpack_batch(batch: Any) -> Tuple[Tensor, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for xk, yk in (
            ("inputs", "targets"),
            ("input", "target"),
            ("image", "label"),
            ("images", "labels"),
            ("x", "y"),
        ):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
    raise TypeError(
        "each batch of the dataloader must be (inputs, targets, ...) or a dict with 'inputs'/'targets' "
        f"(or 'image'/'label'), got {type(batch).__name__}"
    )
