"""Functional plumbing of parameter saliency: the model as a function of its parameters (the vmap
and loop fallbacks of the batched engine), input and target checks."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .._per_sample_grads import training_mode_offenders
from .._targets import class_index_vector

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- functional plumbing


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def _check_target(target: Any, n: int, device: torch.device) -> Tensor:
    """The true labels as an ``(n,)`` long tensor (the package's one target rule, :mod:`captum_normgrad._targets`)."""
    if target is None:
        raise ValueError(
            "target is required: parameter saliency differentiates the loss of the true label "
            "(pass one class index per sample, e.g. the dataset labels)"
        )
    return class_index_vector(target, n, device)


def _default_loss(outputs: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(outputs, target)


class _FunctionalModel:
    """The caller's model, **as it is at call time**, as a pure function of tensor dictionaries.

    Nothing is copied at construction: every evaluation reads the model's current modules,
    parameters and buffers (a submodule swapped after the :class:`ParameterSaliency` was built is
    used). ``functional_call`` swaps tensors on the caller's model for the duration of one call and
    restores them.
    """

    def __init__(self, model: nn.Module, selected: Sequence[str], loss_fn: Optional[LossFn]) -> None:
        self.model = model
        self.selected = list(selected)
        self.custom_loss = loss_fn is not None
        self.loss_fn = loss_fn or _default_loss

    def check_mode(self) -> None:
        """The package's one policy for models in training mode: refuse BatchNorm/Dropout in training mode."""
        bad = training_mode_offenders(self.model)
        if bad:
            raise ValueError(
                f"the model is in training mode with BatchNorm/Dropout ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): batch statistics would mix the samples (and update the "
                "running statistics) and dropout would make the saliency random. Call model.eval() first "
                "(parameter saliency is defined in eval mode)"
            )

    def tensors(self) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        self.check_mode()
        params = dict(self.model.named_parameters())
        missing = [k for k in self.selected if k not in params]
        if missing:
            raise ValueError(
                f"parameter {missing[0]} no longer exists in the model (it was changed after this "
                "ParameterSaliency was built); build a new ParameterSaliency for the modified model"
            )
        sel = {k: params[k].detach() for k in self.selected}
        fixed = {k: v.detach() for k, v in params.items() if k not in sel}
        fixed.update({k: b.detach() for k, b in self.model.named_buffers()})
        return sel, fixed

    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def outputs(self, sel: Dict[str, Tensor], fixed: Dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, {**fixed, **sel}, (x,))

    def check_outputs(self, out: Any, y: Tensor, values: bool = True) -> None:
        """Logits of the right form for the loss; with ``values``, ``y`` within the classes (not under vmap)."""
        if not isinstance(out, Tensor):
            raise TypeError(f"the model must return a tensor of logits, got {type(out).__name__}")
        if not self.custom_loss:
            if out.dim() != 2:
                raise ValueError(
                    f"the model must return logits of shape (N, num_classes) for the cross-entropy loss, got shape "
                    f"{tuple(out.shape)}; pass a loss_fn for other outputs"
                )
            if values and y.numel() and int(y.max()) >= out.shape[1]:
                raise ValueError(f"target holds class index {int(y.max())} but the model has {out.shape[1]} outputs")

    def sample_loss(self, sel: Dict[str, Tensor], fixed: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Loss of one sample (``x`` without batch dim), batch-1 semantics."""
        out = self.outputs(sel, fixed, x.unsqueeze(0))
        return self.one_loss(out, y.unsqueeze(0), values=False)

    def one_loss(self, out: Tensor, y: Tensor, values: bool = True) -> Tensor:
        """``loss_fn`` of one sample's output ``(1, ...)`` and target ``(1,)``, as a scalar."""
        self.check_outputs(out, y, values)
        loss = self.loss_fn(out, y)
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return one value for a batch of one sample, got shape {tuple(loss.shape)}")
        return loss.reshape(())

    def batch_losses(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses ``(N,)`` of a batched output: row ``i`` is ``loss_fn(out[i:i+1], y[i:i+1])``."""
        self.check_outputs(out, y)
        if not self.custom_loss:
            return F.cross_entropy(out, y, reduction="none")
        return torch.stack([self.one_loss(out[i : i + 1], y[i : i + 1]) for i in range(out.shape[0])])


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
