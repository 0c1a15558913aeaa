r"""Hook and autograd plumbing: the only module that registers hooks on a user's model.

:func:`capture` runs **one** forward and **one** backward pass and returns, for every requested
layer, the activations and the gradients of the objective at that layer (its output, its input,
or — for the layer's own weights — its input activations together with its output gradients).
Hooks are removed in every case, also when the forward pass, the objective or the backward pass
raises. ``torch.autograd.grad`` is used (never ``.backward()``), so no ``.grad`` field of the model
is touched; the user's input tensors' ``requires_grad`` flags are never changed; BatchNorm-style
buffers that a forward pass in training mode would update are restored afterwards.

``nn.DataParallel`` is supported the way Captum supports it: hooks fire once per replica, tensors
are keyed by device and concatenated in ``device_ids`` order.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import (
    _format_additional_forward_args,
    _format_tensor_into_tuples,
    _reduce_list,
    _select_targets,
    _sort_key_list,
)
from torch import Tensor
from torch.nn import Module

__all__ = ["LayerCapture", "capture", "owning_module", "preserve_module_state", "check_inputs", "select_objective"]

LossFn = Callable[[Tensor, Any], Tensor]


@dataclass
class LayerCapture:
    """What :func:`capture` returns for one layer.

    Attributes:
        activations (tuple[Tensor, ...]): detached activations at the capture point (for
                    ``where="weights"``: the layer's input).
        gradients (tuple[Tensor, ...]): gradients of the objective w.r.t. the capture point (for
                    ``where="weights"``: w.r.t. the layer's output).
    """

    activations: Tuple[Tensor, ...]
    gradients: Tuple[Tensor, ...]


def owning_module(forward_func: Callable[..., Any]) -> Optional[Module]:
    """The ``nn.Module`` behind ``forward_func`` (the module itself or a bound method's owner)."""
    if isinstance(forward_func, Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, Module) else None


def _layer_name(model: Optional[Module], layer: Module) -> str:
    if model is not None:
        for name, mod in model.named_modules():
            if mod is layer:
                return name or "<root>"
    return type(layer).__name__


def check_layers_in_model(forward_func: Callable[..., Any], layers: Sequence[Module]) -> None:
    """Raise ``ValueError`` if ``forward_func`` is a module and a layer is not one of its submodules."""
    for layer in layers:
        if not isinstance(layer, Module):
            raise TypeError(
                f"layer must be a torch.nn.Module or a list of modules, got {type(layer).__name__}; "
                "pass e.g. model.layer3 (look names up with dict(model.named_modules()))"
            )
    model = owning_module(forward_func)
    if model is None:
        return
    owned = {id(m) for m in model.modules()}
    for layer in layers:
        if id(layer) not in owned:
            raise ValueError(
                f"layer {type(layer).__name__} is not a submodule of the model "
                f"{type(model).__name__}; pass a module taken from this model "
                "(e.g. model.layer3, not a module of another copy of the model)"
            )


@contextmanager
def preserve_module_state(model: Optional[Module]) -> Iterator[None]:
    """Restore buffers (running statistics) that a forward pass in training mode may update."""
    if model is None or not any(m.training for m in model.modules()):
        yield
        return
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape:
                    b.copy_(v)


def check_inputs(inputs: Tuple[Any, ...]) -> None:
    """Reject inputs that are not tensors and floating-point inputs with NaN or Inf."""
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"inputs[{i}] is a {type(t).__name__}, not a torch.Tensor; pass a tensor or a tuple of "
                "tensors (non-tensor arguments go in additional_forward_args)"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"inputs[{i}] contains NaN or Inf values; attributions of non-finite inputs are "
                "undefined. Clean the input (e.g. torch.nan_to_num) before calling attribute()"
            )


def _check_target(output: Tensor, target: Any) -> None:
    """Clear errors for targets that Captum would reject deep inside torch (or silently accept)."""
    n = output.shape[0]
    per_sample = output[0].numel() if n > 0 else 0
    if target is None:
        if per_sample != 1:
            raise ValueError(
                f"target is required: the model returns {per_sample} values per example "
                f"(output shape {tuple(output.shape)}); pass target=<class index>, a list/tensor of "
                "one index per example, or a tuple index for outputs with more than 2 dims"
            )
        return
    if output.dim() < 2:
        raise ValueError(
            f"target={target!r} given but the model returns one value per example "
            f"(output shape {tuple(output.shape)}); use target=None"
        )

    def check_index(idx: Any, where: str) -> None:
        idx_t = idx if isinstance(idx, tuple) else (idx,)
        if len(idx_t) > output.dim() - 1:
            raise ValueError(
                f"target{where} {idx!r} has {len(idx_t)} indices but the output "
                f"{tuple(output.shape)} has only {output.dim() - 1} dims per example"
            )
        for d, v in enumerate(idx_t):
            if isinstance(v, Tensor):
                v = v.item()
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"target{where} must contain integers, got {v!r} of type {type(v).__name__}")
            size = output.shape[1 + d]
            if not 0 <= v < size:
                raise ValueError(
                    f"target{where} index {v} is out of range for output dim {1 + d} of size {size} "
                    f"(output shape {tuple(output.shape)}); valid indices are 0..{size - 1}"
                )

    if isinstance(target, Tensor):
        if target.is_floating_point():
            raise TypeError(f"a target tensor must hold integer class indices, got dtype {target.dtype}")
        if target.numel() == 1:
            check_index(int(target.item()), "")
        elif target.dim() == 1 and target.numel() == n:
            for i, v in enumerate(target.tolist()):
                check_index(int(v), f"[{i}]")
        else:
            raise ValueError(
                f"a target tensor must have 1 element or one per example ({n}); got shape "
                f"{tuple(target.shape)}"
            )
    elif isinstance(target, list):
        if len(target) != n:
            raise ValueError(f"target list has {len(target)} entries but the batch has {n} examples")
        for i, v in enumerate(target):
            check_index(v, f"[{i}]")
    elif isinstance(target, (int, tuple)) and not isinstance(target, bool):
        check_index(target, "")
    else:
        raise TypeError(
            f"target must be None, an int, a tuple, a list or a tensor (Captum's target forms), got "
            f"{type(target).__name__}"
        )


def _loss_target(output: Tensor, target: Any) -> Any:
    """The target handed to ``loss_fn``: Captum's class-index forms become an ``(N,)`` tensor.

    An int or a one-element integer tensor applies to every example (Captum semantics), and a list
    of ints or a 1-D integer tensor has one index per example; all are range-checked against the
    output and given to the loss as a ``(N,)`` long tensor on the output's device, so that e.g.
    ``nn.CrossEntropyLoss(reduction="none")`` accepts every Captum target form. Any other target
    (soft labels, regression values, outputs with more than 2 dims) is passed unchanged.
    """
    n = output.shape[0]
    if isinstance(target, bool) or output.dim() != 2:
        return target
    if isinstance(target, tuple) and len(target) > 0 and all(isinstance(v, int) and not isinstance(v, bool) for v in target):
        _check_target(output, target)  # a 1-tuple is the only valid index of a 2-D output
        target = target[0]
    if isinstance(target, int):
        _check_target(output, target)
        return torch.full((n,), target, dtype=torch.long, device=output.device)
    if isinstance(target, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in target):
        _check_target(output, target)
        return torch.tensor(target, dtype=torch.long, device=output.device)
    if isinstance(target, Tensor) and not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool):
        if target.numel() == 1:
            _check_target(output, target)
            return target.reshape(1).expand(n).to(device=output.device, dtype=torch.long)
        if target.dim() == 1:
            _check_target(output, target)
            return target.to(output.device)
    return target


def select_objective(output: Tensor, target: Any, loss_fn: Optional[LossFn]) -> Tensor:
    """The per-sample objective whose gradient is attributed: ``(N,)``.

    With ``loss_fn=None`` it is the selected output (Captum convention); otherwise the per-sample
    losses ``loss_fn(output, target)``.
    """
    if not isinstance(output, Tensor):
        raise TypeError(f"the forward function must return a tensor, got {type(output).__name__}")
    if loss_fn is None:
        _check_target(output, target)
        sel = _select_targets(output, target)
        if sel.numel() != output.shape[0]:
            raise ValueError(
                f"target={target!r} selects {sel[0].numel()} values per example from output of shape "
                f"{tuple(output.shape)}; give one index per output dim (a tuple) so that one value per "
                "example is selected"
            )
        return sel.reshape(output.shape[0])
    losses = loss_fn(output, _loss_target(output, target))
    if not isinstance(losses, Tensor) or losses.shape != (output.shape[0],):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return one loss per example, shape ({output.shape[0]},); got {shape}. "
            "Use a per-sample loss (e.g. reduction='none'): a batch mean would mix the examples"
        )
    if not bool(torch.isfinite(losses).all()):
        raise ValueError("loss_fn returned NaN or Inf for some examples; check the targets and the model output")
    return losses


def capture(
    forward_func: Callable[..., Any],
    layers: Sequence[Module],
    inputs: Union[Tensor, Tuple[Tensor, ...]],
    target: Any = None,
    additional_forward_args: Any = None,
    where: Union[str, Sequence[str]] = "output",
    loss_fn: Optional[LossFn] = None,
    device_ids: Optional[List[int]] = None,
    grad_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[List[LayerCapture], Tensor]:
    r"""One forward + one backward pass; activations and gradients at several layers.

    Args:
        forward_func (Callable): the model or any function of the inputs.
        layers (sequence of Module): the layers to capture.
        inputs (Tensor or tuple[Tensor, ...]): model inputs (batch on dim 0).
        target (optional): Captum target (ignored by the objective when ``loss_fn`` is given, but
                    passed to it).
        additional_forward_args (optional): extra forward arguments, as in Captum.
        where (str or sequence of str): per layer, ``"output"``, ``"input"`` or ``"weights"``
                    (layer input activations with layer *output* gradients).
        loss_fn (Callable, optional): ``(outputs, target) -> (N,)`` per-sample losses.
        device_ids (list[int], optional): DataParallel device order, as in Captum.
        grad_kwargs (dict, optional): extra keyword arguments for ``torch.autograd.grad``.

    Returns:
        (list[LayerCapture], Tensor): one capture per layer, and the model output.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "attributions need gradients, which torch.inference_mode() disables for good; call "
            "attribute() outside inference mode (torch.no_grad() is fine)"
        )
    # tensors created under inference mode cannot take part in autograd: use normal copies
    inputs_t = tuple(
        t.clone() if isinstance(t, Tensor) and t.is_inference() else t for t in _format_tensor_into_tuples(inputs)
    )
    extra = _format_additional_forward_args(additional_forward_args)
    wheres = [where] * len(layers) if isinstance(where, str) else list(where)
    if len(wheres) != len(layers):
        raise ValueError("one 'where' per layer is needed")
    model = owning_module(forward_func)
    lock = threading.Lock()
    # per layer, per device: (saved activations, tensors to differentiate)
    saved: List[Dict[torch.device, Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]]] = [{} for _ in layers]
    errors: List[BaseException] = []

    def _grad_ready(t: Tensor, li: int) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(
                f"layer {_layer_name(model, layers[li])} produced a {type(t).__name__}, not a tensor"
            )
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(
                f"layer {_layer_name(model, layers[li])} produced a tensor of dtype {t.dtype}; gradients "
                "need floating-point activations. Choose a layer after the embedding/cast"
            )
        return t if t.requires_grad else t.detach().requires_grad_()

    def _store(li: int, device: torch.device, acts: Tuple[Tensor, ...], diff: Tuple[Tensor, ...]) -> None:
        with lock:
            if device in saved[li]:
                errors.append(
                    ValueError(
                        f"layer {_layer_name(model, layers[li])} was called more than once in one forward "
                        "pass; NormGrad needs a single call site. Hook a module that is used once "
                        "(e.g. wrap the shared module's second use in nn.Identity)"
                    )
                )
            saved[li][device] = (acts, diff)

    def make_forward_hook(li: int, mode: str) -> Callable[..., Any]:
        def hook(module: Module, inp: Tuple[Any, ...], out: Any) -> Any:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            diff = tuple(_grad_ready(t, li) for t in outs)
            if mode == "weights":
                acts = (inp[0].detach().clone(),)
            else:
                acts = tuple(t.detach() for t in diff)
            _store(li, diff[0].device, acts, diff)
            # downstream sees clones, so in-place ops after the layer cannot alter saved tensors
            clones = tuple(t.clone() for t in diff)
            if isinstance(out, tuple):
                return clones
            if isinstance(out, list):
                return list(clones)
            return clones[0]

        return hook

    def make_pre_hook(li: int) -> Callable[..., Any]:
        def hook(module: Module, inp: Tuple[Any, ...]) -> Any:
            tensors = [t for t in inp if isinstance(t, Tensor)]
            if not tensors:
                raise TypeError(f"layer {_layer_name(model, layers[li])} received no tensor input")
            diff = tuple(_grad_ready(t, li) for t in tensors)
            _store(li, diff[0].device, tuple(t.detach() for t in diff), diff)
            it = iter(t.clone() for t in diff)
            return tuple(next(it) if isinstance(t, Tensor) else t for t in inp)

        return hook

    handles = []
    try:
        with torch.enable_grad(), preserve_module_state(model):
            for li, (layer, w) in enumerate(zip(layers, wheres)):
                if w == "input":
                    handles.append(layer.register_forward_pre_hook(make_pre_hook(li)))
                elif w in ("output", "weights"):
                    handles.append(layer.register_forward_hook(make_forward_hook(li, w)))
                else:
                    raise ValueError(f"unknown capture point {w!r}")
            try:
                output = forward_func(*inputs_t, *extra) if extra is not None else forward_func(*inputs_t)
            except RuntimeError as exc:
                bad = [i for i, t in enumerate(inputs_t) if isinstance(t, Tensor) and not t.is_floating_point()]
                if bad:
                    raise TypeError(
                        f"the forward pass failed on integer inputs (inputs{bad} have dtype "
                        f"{inputs_t[bad[0]].dtype}): {exc}. Image models need floating-point inputs: "
                        "convert with x.float() (scaled to the model's expected range)"
                    ) from exc
                raise
            finally:
                for h in handles:
                    h.remove()
                handles = []
            if errors:
                raise errors[0]
            for li, layer in enumerate(layers):
                if not saved[li]:
                    raise ValueError(
                        f"layer {_layer_name(model, layer)} was not reached in the forward pass; "
                        "choose a module that the model's forward() actually calls"
                    )
            objective = select_objective(output, target, loss_fn)
            keys = list(saved[0].keys())
            if len(keys) > 1:
                if device_ids is None:
                    device_ids = getattr(forward_func, "device_ids", None)
                if device_ids is None:
                    raise ValueError(
                        "layer tensors were produced on several devices but the device order is unknown; "
                        "pass device_ids=[...] (the DataParallel device ids) to the constructor"
                    )
                keys = _sort_key_list(keys, device_ids)
            diff_all = tuple(t for li in range(len(layers)) for k in keys for t in saved[li][k][1])
            grads = torch.autograd.grad(
                outputs=objective,
                inputs=diff_all,
                grad_outputs=torch.ones_like(objective),
                allow_unused=True,
                **(grad_kwargs or {}),
            )
    finally:
        for h in handles:
            h.remove()

    results: List[LayerCapture] = []
    offset = 0
    for li, layer in enumerate(layers):
        per_dev_acts = []
        per_dev_grads = []
        for k in keys:
            acts, diff = saved[li][k]
            gs = []
            for t in diff:
                gt = grads[offset]
                offset += 1
                gs.append(torch.zeros_like(t) if gt is None else gt)
            per_dev_acts.append(acts)
            per_dev_grads.append(tuple(gs))
        results.append(LayerCapture(activations=_reduce_list(per_dev_acts), gradients=_reduce_list(per_dev_grads)))
    return results, output
