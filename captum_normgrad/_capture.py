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
from torch.nn.modules.module import register_module_forward_pre_hook

from . import _targets

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
    """Restore buffers (running statistics) that a forward pass in training mode may update.

    Every module that runs in training mode during the block has its buffers saved before its
    first call (a global forward pre-hook, removed on exit) and restored afterwards, whatever the
    forward function is (the model itself, a bound method, a lambda or a wrapper around it).
    ``model``, when known, is snapshotted up front as well.
    """
    saved: Dict[int, Tuple[Tensor, Tensor]] = {}

    def snapshot(module: Module, recurse: bool) -> None:
        for b in module.buffers(recurse=recurse):
            if id(b) not in saved:
                saved[id(b)] = (b, b.detach().clone())

    if model is not None and any(m.training for m in model.modules()):
        snapshot(model, True)

    def pre_hook(module: Module, inp: Any) -> None:
        if module.training:
            snapshot(module, False)

    handle = register_module_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for b, v in saved.values():
                if b.shape == v.shape:
                    b.copy_(v)


def check_inputs(inputs: Tuple[Any, ...]) -> None:
    """Reject what gradients cannot explain, each with the fix.

    Non-tensors, empty batches, tensors on the ``meta`` device (no data), complex tensors and
    floating-point inputs with NaN or Inf.
    """
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"inputs[{i}] is a {type(t).__name__}, not a torch.Tensor; pass a tensor or a tuple of "
                "tensors (non-tensor arguments go in additional_forward_args)"
            )
        if t.is_meta:
            raise ValueError(
                f"inputs[{i}] is on the 'meta' device (a shape without data); attributions need real "
                "values: create the input on 'cpu' or 'cuda'"
            )
        if t.is_complex():
            raise TypeError(
                f"inputs[{i}] is complex ({t.dtype}); attributions are defined for real inputs: pass "
                "the real and imaginary parts as separate real channels (torch.view_as_real)"
            )
        if t.dim() == 0:
            raise ValueError(
                f"inputs[{i}] is a 0-dim tensor; inputs need a batch dim 0 (use x.unsqueeze(0) for one example)"
            )
        if t.shape[0] == 0:
            raise ValueError(f"inputs[{i}] has an empty batch (shape {tuple(t.shape)}); pass at least one example")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"inputs[{i}] contains NaN or Inf values; attributions of non-finite inputs are "
                "undefined. Clean the input (e.g. torch.nan_to_num) before calling attribute()"
            )


def _check_target(output: Tensor, target: Any) -> None:
    """Clear errors for targets that Captum would reject deep inside torch (or silently accept)."""
    _targets.check_target(output.shape, target)


def _loss_target(output: Tensor, target: Any) -> Any:
    """The target handed to ``loss_fn``: Captum's class-index forms become an ``(N,)`` tensor.

    An int, a 1-tuple or a one-element integer tensor applies to every example (Captum semantics),
    and a list of ints or a 1-D integer tensor has one index per example; all are range-checked
    against the output (negative indices count from the end) and given to the loss as a ``(N,)``
    long tensor on the output's device, so that e.g. ``nn.CrossEntropyLoss(reduction="none")``
    accepts every Captum target form. Any other target (soft labels, regression values, outputs
    with more than 2 dims) is passed unchanged.
    """
    if isinstance(target, Tensor) and target.dtype == torch.bool:
        raise TypeError(
            "a target tensor must hold integer class indices, got dtype torch.bool (a mask?); convert "
            "with target.long() if you mean the indices 0/1"
        )
    index_form = isinstance(target, (int, tuple, list)) or (
        isinstance(target, Tensor) and not (target.is_floating_point() or target.is_complex())
    )
    if index_form and output.dim() >= 2 and not (isinstance(target, list) and target and isinstance(target[0], Tensor)):
        _targets.check_target(output.shape, target)
    if output.dim() == 2 and _targets.is_class_index_target(target):
        return _targets.class_indices(output.shape, target, output.device)
    return target


def select_objective(output: Tensor, target: Any, loss_fn: Optional[LossFn]) -> Tensor:
    """The per-sample objective whose gradient is attributed: ``(N,)``.

    With ``loss_fn=None`` it is the selected output (Captum convention); otherwise the per-sample
    losses ``loss_fn(output, target)``.
    """
    if not isinstance(output, Tensor):
        raise TypeError(f"the forward function must return a tensor, got {type(output).__name__}")
    if loss_fn is None:
        sel = _select_targets(output, _targets.normalize_target(output.shape, target))
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


def resolve_call(model: Optional[Module], layer: Module, n_calls: int, layer_call: Optional[int]) -> int:
    """The index of the call of ``layer`` to attribute, among ``n_calls`` calls in one forward pass."""
    name = _layer_name(model, layer)
    if n_calls == 0:
        raise ValueError(
            f"layer {name} was not reached in the forward pass; choose a module that the model's forward() "
            "actually calls"
        )
    if layer_call is None:
        if n_calls > 1:
            raise ValueError(
                f"layer {name} was called {n_calls} times in one forward pass (a module shared by several call "
                "sites, like the `relu` of a torchvision BasicBlock/Bottleneck). Choose the call to attribute "
                "with layer_call=<index> (0 = first call, -1 = last call), or hook a module used once (for a "
                "block's output, the block itself, e.g. model.layer1[0])"
            )
        return 0
    if not -n_calls <= layer_call < n_calls:
        raise ValueError(
            f"layer_call={layer_call} but layer {name} is called {n_calls} time(s) per forward pass; use "
            f"0..{n_calls - 1} (or -{n_calls}..-1)"
        )
    return layer_call % n_calls


def check_layer_call(layer_call: Optional[int]) -> None:
    """``layer_call`` must be None or an int."""
    if layer_call is not None and (not isinstance(layer_call, int) or isinstance(layer_call, bool)):
        raise TypeError(f"layer_call must be None or an int (0 = first call, -1 = last), got {layer_call!r}")


def grad_options(grad_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Keyword arguments for ``torch.autograd.grad``: the caller's, over ``allow_unused=True``."""
    if grad_kwargs is not None and not isinstance(grad_kwargs, dict):
        raise TypeError(f"grad_kwargs must be a dict of torch.autograd.grad options, got {type(grad_kwargs).__name__}")
    reserved = {"outputs", "inputs", "grad_outputs"} & set(grad_kwargs or {})
    if reserved:
        raise ValueError(f"grad_kwargs cannot set {sorted(reserved)}: they are chosen by the attribution")
    return {"allow_unused": True, **(grad_kwargs or {})}


class _Recorder:
    """Forward hooks that record every call of the hooked layers, per device (thread-safe)."""

    def __init__(
        self, model: Optional[Module], layers: Sequence[Module], wheres: Sequence[str], keep_graph: bool
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.wheres = list(wheres)
        self.keep_graph = keep_graph
        self.lock = threading.Lock()
        # per layer, per device: list over calls of (saved activations, tensors to differentiate)
        self.calls: List[Dict[torch.device, List[Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]]]] = [{} for _ in layers]

    def _grad_ready(self, t: Any, li: int) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(
                f"layer {_layer_name(self.model, self.layers[li])} produced a {type(t).__name__}, not a tensor"
            )
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(
                f"layer {_layer_name(self.model, self.layers[li])} produced a tensor of dtype {t.dtype}; gradients "
                "need floating-point activations. Choose a layer after the embedding/cast"
            )
        return t if t.requires_grad else t.detach().requires_grad_()

    def _keep(self, t: Tensor) -> Tensor:
        # with create_graph the map must stay differentiable w.r.t. the parameters
        return t if self.keep_graph else t.detach()

    def _store(self, li: int, acts: Tuple[Tensor, ...], diff: Tuple[Tensor, ...]) -> None:
        with self.lock:
            self.calls[li].setdefault(diff[0].device, []).append((acts, diff))

    def forward_hook(self, li: int, mode: str) -> Callable[..., Any]:
        def hook(module: Module, inp: Tuple[Any, ...], out: Any) -> Any:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            diff = tuple(self._grad_ready(t, li) for t in outs)
            if mode == "weights":
                acts: Tuple[Tensor, ...] = (inp[0].clone() if self.keep_graph else inp[0].detach().clone(),)
            else:
                acts = tuple(self._keep(t) for t in diff)
            self._store(li, acts, diff)
            # downstream sees clones, so in-place ops after the layer cannot alter saved tensors
            clones = tuple(t.clone() for t in diff)
            if isinstance(out, tuple):
                return clones
            if isinstance(out, list):
                return list(clones)
            return clones[0]

        return hook

    def pre_hook(self, li: int) -> Callable[..., Any]:
        def hook(module: Module, inp: Tuple[Any, ...]) -> Any:
            tensors = [t for t in inp if isinstance(t, Tensor)]
            if not tensors:
                raise TypeError(f"layer {_layer_name(self.model, self.layers[li])} received no tensor input")
            diff = tuple(self._grad_ready(t, li) for t in tensors)
            self._store(li, tuple(self._keep(t) for t in diff), diff)
            it = iter(t.clone() for t in diff)
            return tuple(next(it) if isinstance(t, Tensor) else t for t in inp)

        return hook

    @contextmanager
    def hooked(self) -> Iterator[None]:
        handles = []
        try:
            for li, (layer, w) in enumerate(zip(self.layers, self.wheres)):
                if w == "input":
                    handles.append(layer.register_forward_pre_hook(self.pre_hook(li)))
                elif w in ("output", "weights"):
                    handles.append(layer.register_forward_hook(self.forward_hook(li, w)))
                else:
                    raise ValueError(f"unknown capture point {w!r}")
            yield
        finally:
            for h in handles:
                h.remove()

    def selected(
        self, layer_calls: Sequence[Optional[int]], keys: Sequence[torch.device]
    ) -> List[List[Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]]]:
        """Per layer, per device (in ``keys`` order): the chosen call's (activations, tensors)."""
        out = []
        for li, layer in enumerate(self.layers):
            per_dev = self.calls[li]
            n_calls = max((len(v) for v in per_dev.values()), default=0)
            k = resolve_call(self.model, layer, n_calls, layer_calls[li])
            out.append([per_dev[d][k] for d in keys])
        return out


def _device_order(keys: List[torch.device], forward_func: Any, device_ids: Optional[List[int]]) -> List[torch.device]:
    if len(keys) <= 1:
        return keys
    if device_ids is None:
        device_ids = getattr(forward_func, "device_ids", None)
    if device_ids is None:
        raise ValueError(
            "layer tensors were produced on several devices but the device order is unknown; "
            "pass device_ids=[...] (the DataParallel device ids) to the constructor"
        )
    return _sort_key_list(keys, device_ids)


def _run_forward(forward_func: Callable[..., Any], inputs_t: Tuple[Any, ...], extra: Any) -> Any:
    try:
        return forward_func(*inputs_t, *extra) if extra is not None else forward_func(*inputs_t)
    except RuntimeError as exc:
        bad = [i for i, t in enumerate(inputs_t) if isinstance(t, Tensor) and not t.is_floating_point()]
        if bad:
            raise TypeError(
                f"the forward pass failed on integer inputs (inputs{bad} have dtype "
                f"{inputs_t[bad[0]].dtype}): {exc}. Image models need floating-point inputs: "
                "convert with x.float() (scaled to the model's expected range)"
            ) from exc
        raise


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
    layer_call: Union[None, int, Sequence[Optional[int]]] = None,
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
        grad_kwargs (dict, optional): extra keyword arguments for ``torch.autograd.grad``. With
                    ``create_graph=True`` the activations stay attached to the graph, so maps built
                    from the capture are differentiable w.r.t. the model's parameters.
        layer_call (int or sequence, optional): per layer (or one for all), which call of a layer
                    that runs several times per forward pass is captured (0 = first, -1 = last).
                    None requires a single call.

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
    calls: List[Optional[int]] = (
        list(layer_call) if isinstance(layer_call, (list, tuple)) else [layer_call] * len(layers)  # type: ignore[list-item]
    )
    for c in calls:
        check_layer_call(c)
    gkw = grad_options(grad_kwargs)
    model = owning_module(forward_func)
    rec = _Recorder(model, layers, wheres, keep_graph=bool(gkw.get("create_graph", False)))
    with torch.enable_grad(), preserve_module_state(model):
        with rec.hooked():
            output = _run_forward(forward_func, inputs_t, extra)
        keys0 = [list(c.keys()) for c in rec.calls]
        for li, layer in enumerate(layers):
            if not keys0[li]:
                resolve_call(model, layer, 0, calls[li])  # raises "not reached"
        keys = _device_order(keys0[0], forward_func, device_ids)
        chosen = rec.selected(calls, keys)
        objective = select_objective(output, target, loss_fn)
        diff_all = tuple(t for per_dev in chosen for _, diff in per_dev for t in diff)
        grads = torch.autograd.grad(outputs=objective, inputs=diff_all, grad_outputs=torch.ones_like(objective), **gkw)

    results: List[LayerCapture] = []
    offset = 0
    for per_dev in chosen:
        per_dev_acts = []
        per_dev_grads = []
        for acts, diff in per_dev:
            gs = []
            for t in diff:
                gt = grads[offset]
                offset += 1
                gs.append(torch.zeros_like(t) if gt is None else gt)
            per_dev_acts.append(acts)
            per_dev_grads.append(tuple(gs))
        results.append(LayerCapture(activations=_reduce_list(per_dev_acts), gradients=_reduce_list(per_dev_grads)))
    return results, output
