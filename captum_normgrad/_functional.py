r"""Per-sample plumbing for order-1 NormGrad: the model as a pure function of parameter dictionaries.

The model is evaluated with :func:`torch.func.functional_call` on parameter dictionaries, so the
caller's parameters are never modified (no ``.data`` writes, no in-place updates, no optimizer).
Every sample gets its own parameter set.

Activation gradients are obtained with the *zero-perturbation trick*: a forward hook adds a zero
tensor ``delta`` to the chosen call of a layer (each tensor of its output, or of its input), and
the gradient of the loss w.r.t. ``delta`` is the gradient w.r.t. that activation. The activation is
recorded as a **copy** (in-place operations after the layer, like ``ReLU(inplace=True)``, modify the
tensor the model goes on using, never the recorded one). The hooks live only for the duration of
one call and are removed in every case.

Three strategies give the same maps:

* ``"batched"``: whole-batch passes in which every sample runs with its own parameters
  ``theta + c_i D_i``, where ``D_i`` is a per-sample gradient from activation x backprop
  (:func:`~captum_normgrad._per_sample_grads.batched_pass`): per-sample weights as grouped
  convolutions in early layers and as low-rank corrections ``G_i (A_i^T x)`` where a layer has
  few locations. It serves models made of Conv/Linear/BatchNorm parameters used once per pass
  (:func:`~captum_normgrad._per_sample_grads.coverage_problem`), batch-first layers;
* ``"loop"``: a Python loop of ordinary batch-1 passes with plain :mod:`torch.autograd` (any
  model, and compatible with the caller's own module hooks, e.g. ``register_full_backward_hook``);
* ``"vmap"``: :func:`torch.func.vmap` over the samples (per-sample weights become grouped
  convolutions; :mod:`torch.func` does not support full backward hooks).

What is per-example among the extra forward arguments is decided here, once, by
:func:`per_example_flags`, for every strategy.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from ._capture import resolve_call
from ._per_sample_grads import NotCovered, SampleGrads, batched_pass, coverage_problem, training_mode_offenders

__all__ = [
    "FunctionalModel",
    "PerSampleModel",
    "STRATEGIES",
    "per_example_flags",
    "backward_hook_owners",
    "sample_param_grads",
    "per_example_cross_entropy",
    "axpy",
    "Shifted",
    "NotCovered",
]

Params = Dict[str, Tensor]
STRATEGIES = ("auto", "batched", "vmap", "loop")
LossFn = Callable[[Tensor, Tensor], Tensor]


def axpy(theta: Params, direction: Params, alpha: Union[float, Tensor]) -> Params:
    """Per-sample parameter sets ``theta + alpha_i * direction_i`` (leading sample dim).

    ``alpha`` is a number or one value per sample; a single sample uses one fused ``torch.add``.
    """
    if isinstance(alpha, Tensor):
        if alpha.numel() == 1:
            alpha = float(alpha.item())
        else:
            return {
                k: theta[k].unsqueeze(0) + alpha.reshape(-1, *([1] * theta[k].dim())).to(d.dtype) * d
                for k, d in direction.items()
            }
    return {k: torch.add(theta[k].unsqueeze(0), d, alpha=alpha) for k, d in direction.items()}


def _device_of(theta: Params) -> torch.device:
    for t in theta.values():
        return t.device
    return torch.device("cpu")


class Shifted(NamedTuple):
    """Per-sample parameters ``theta + coef_i * direction_i`` for the batched strategy (never expanded)."""

    theta: Params
    direction: SampleGrads
    coef: Tensor


def per_example_flags(extra: Sequence[Any], n: int, override: Optional[Sequence[bool]] = None) -> Tuple[bool, ...]:
    """Which extra forward arguments are split per example: **the one rule** of the package.

    Captum's convention: a tensor whose first dim equals the batch size ``n`` is per-example (row
    ``i`` goes with example ``i``); anything else (a per-channel gate of shape ``(C,)``, a mask of
    shape ``(T, T)``, a number, ``None``) is shared by the whole batch. Where that is ambiguous (a
    shared tensor whose first dim happens to equal ``n``), ``override`` gives one flag per argument.

    Args:
        extra (sequence): the additional forward arguments (already a tuple).
        n (int): the batch size.
        override (sequence of bool, optional): one flag per argument; True = per-example.

    Returns:
        tuple[bool, ...]: one flag per argument.
    """
    if override is not None:
        flags = tuple(override)
        if len(flags) != len(extra) or not all(isinstance(f, bool) for f in flags):
            raise ValueError(
                f"per_example_args must hold one bool per additional forward argument ({len(extra)}), got {override!r}"
            )
        for i, (e, f) in enumerate(zip(extra, flags)):
            if f and not (isinstance(e, Tensor) and e.dim() > 0 and e.shape[0] == n):
                shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
                raise ValueError(
                    f"per_example_args[{i}] is True but additional_forward_args[{i}] ({shape}) has no "
                    f"first dim of size {n} (the batch) to split"
                )
        return flags
    return tuple(isinstance(e, Tensor) and e.dim() > 0 and e.shape[0] == n for e in extra)


def backward_hook_owners(model: nn.Module) -> List[str]:
    """Names of the submodules that carry a backward hook (``register_full_backward_hook`` and
    friends), which :mod:`torch.func` transforms do not support."""
    return [
        name or "<root>"
        for name, m in model.named_modules()
        if getattr(m, "_backward_hooks", None) or getattr(m, "_backward_pre_hooks", None)
    ]


def sample_param_grads(
    loss: Callable[[Params], Tensor], params: Params, create_graph: bool = False
) -> Tuple[Params, Tensor]:
    """One example's parameter gradients with plain autograd (any module, the model's own hooks):
    ``loss(params)`` on leaf copies of ``params``; unused parameters get zeros.

    Returns:
        (dict[str, Tensor], Tensor): the gradients and the loss.
    """
    with torch.enable_grad():
        live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        value = loss(live)
        grads = torch.autograd.grad(value, list(live.values()), create_graph=create_graph, allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(live[k])) for k, g in zip(live, grads)}, value


def per_example_cross_entropy(outputs: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per example ``(N, K), (N,) -> (N,)``: the default loss of every per-sample method."""
    return F.cross_entropy(outputs, target.reshape(-1).long(), reduction="none")


class FunctionalModel:
    """The caller's model, **as it is at call time**, as a pure function of tensor dictionaries:
    the selected parameters (differentiated) and everything else (fixed), for one loss per example.

    Nothing is copied at construction: every evaluation reads the model's current modules,
    parameters and buffers (a submodule swapped after construction is used).
    ``functional_call`` swaps tensors on the caller's model for the duration of one call and
    restores them. Parameter saliency and input-space saliency evaluate the model through it;
    order 1 (:class:`PerSampleModel`) takes its tensors from it.

    Args:
        model (nn.Module): the caller's model.
        selected (sequence of str): names of the parameters that are differentiated.
        loss_fn (Callable, optional): ``(outputs, target) -> loss``, one value per example; None is
                    per-example cross-entropy.
        purpose (str, optional): what the model is evaluated for, in the training-mode message.
    """

    def __init__(
        self,
        model: nn.Module,
        selected: Sequence[str],
        loss_fn: Optional[LossFn],
        purpose: str = "parameter saliency is defined in eval mode",
    ) -> None:
        self.model = model
        self.purpose = purpose
        self.selected = list(selected)
        self.custom_loss = loss_fn is not None
        self.loss_fn = loss_fn or per_example_cross_entropy

    def check_mode(self) -> None:
        """The package's one policy for models in training mode: refuse BatchNorm/Dropout in training mode."""
        bad = training_mode_offenders(self.model)
        if bad:
            raise ValueError(
                f"the model is in training mode with BatchNorm/Dropout ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): batch statistics would mix the samples (and update the "
                "running statistics) and dropout would make the saliency random. Call model.eval() first "
                f"({self.purpose})"
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


class PerSampleModel:
    r"""A model, some layers and a per-sample loss, as pure functions of parameter dictionaries.

    Args:
        model (nn.Module): the caller's model (never modified).
        layers (sequence of nn.Module): layers whose activations/gradients are needed.
        where (sequence of str): per layer ``"output"``, ``"input"`` or ``"weights"`` (perturb the
                    output, record the layer input as activation).
        loss_fn (Callable): ``(outputs, targets) -> (B,)`` per-sample losses.
        extra_args (tuple): additional forward arguments.
        batched_extra (tuple of bool): which of them are per-example (:func:`per_example_flags`).
        strategy (str): ``"batched"``, ``"loop"`` or ``"vmap"``.
        layer_calls (sequence of int or None): per layer, which call to attribute (None: the
                    layer must be called once).
        batch_loss (bool): ``loss_fn`` may be called on the whole batch (the default
                    cross-entropy); otherwise the batched strategy calls it row by row.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[nn.Module],
        where: Sequence[str],
        loss_fn: LossFn,
        extra_args: Tuple[Any, ...],
        batched_extra: Tuple[bool, ...],
        strategy: str = "loop",
        layer_calls: Optional[Sequence[Optional[int]]] = None,
        batch_loss: bool = False,
    ) -> None:
        self.model = model
        self.batch_loss = batch_loss
        self.layers = list(layers)
        self.where = list(where)
        self.loss_fn = loss_fn
        self.extra_args = extra_args
        self.batched_extra = batched_extra
        self.strategy = strategy
        self.layer_calls = list(layer_calls) if layer_calls is not None else [None] * len(self.layers)
        fm = FunctionalModel(
            model,
            [k for k, p in model.named_parameters() if p.requires_grad],
            None,
            purpose="order-1 NormGrad uses the model's inference behaviour",
        )
        self.trainable, self.constants = fm.tensors()
        # per layer: the call index to perturb and the (batch-1) shapes of its tensors
        self.chosen: List[int] = [0] * len(self.layers)
        self.slots: List[List[torch.Size]] = [[] for _ in self.layers]
        # state shared with the hooks during one functional evaluation
        self._probing = False
        self._deltas: Optional[Tuple[Tensor, ...]] = None
        self._acts: List[List[Tensor]] = [[] for _ in self.layers]
        self._calls: List[int] = [0] * len(self.layers)
        self._probe_shapes: List[List[List[torch.Size]]] = [[] for _ in self.layers]

    # ------------------------------------------------------------------ hooks
    def _offset(self, i: int) -> int:
        return sum(len(s) for s in self.slots[:i])

    def _on_call(self, i: int, tensors: Sequence[Any]) -> Optional[List[Any]]:
        """Perturb the chosen call's floating tensors; record copies of them as activations."""
        k = self._calls[i]
        self._calls[i] += 1
        floats = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
        if not floats:
            raise TypeError(
                f"layer {type(self.layers[i]).__name__} produced no floating-point tensor; order-1 NormGrad "
                "needs floating-point activations (choose a layer after the embedding/cast)"
            )
        if self._probing:
            self._probe_shapes[i].append([t.shape for t in floats])
            return None
        if k != self.chosen[i]:
            return None
        new: List[Any] = []
        j = self._offset(i)
        for t in tensors:
            if isinstance(t, Tensor) and t.is_floating_point():
                if self._deltas is not None:
                    if self.strategy == "batched" and t.shape != self._deltas[j].shape:
                        raise NotCovered(
                            f"the layer's tensor has shape {tuple(t.shape)} on the batch, not (N, *one example's "
                            "shape): the batch is not its first dim"
                        )
                    t = t + self._deltas[j]
                j += 1
            new.append(t)
        # a copy: in-place ops after the layer (ReLU(inplace=True)) must not alter the record
        self._acts[i] = [t.detach().clone() for t in new if isinstance(t, Tensor) and t.is_floating_point()]
        return new

    def _make_hook(self, i: int, where: str) -> Tuple[Callable[..., Any], bool]:
        if where == "input":

            def pre_hook(module: nn.Module, inp: Tuple[Any, ...]) -> Any:
                new = self._on_call(i, inp)
                return None if new is None else tuple(new)

            return pre_hook, True

        def hook(module: nn.Module, inp: Tuple[Any, ...], out: Any) -> Any:
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            new = self._on_call(i, outs)
            if new is None:
                return None
            if where == "weights" and not self._probing:
                self._acts[i] = [inp[0].detach().clone()]
            if isinstance(out, tuple):
                return tuple(new)
            if isinstance(out, list):
                return new
            return new[0]

        return hook, False

    @contextmanager
    def hooked(self) -> Iterator[None]:
        handles = []
        try:
            for i, (layer, w) in enumerate(zip(self.layers, self.where)):
                fn, pre = self._make_hook(i, w)
                handles.append(layer.register_forward_pre_hook(fn) if pre else layer.register_forward_hook(fn))
            yield
        finally:
            for h in handles:
                h.remove()
            self._deltas = None
            self._acts = [[] for _ in self.layers]

    # ------------------------------------------------------------ functions
    def forward(self, params: Params, x: Tuple[Tensor, ...], extra: Tuple[Any, ...]) -> Tensor:
        """The model on ONE example (``x`` without batch dim; per-example extras likewise)."""
        args = tuple(t.unsqueeze(0) for t in x) + tuple(
            e.unsqueeze(0) if b else e for e, b in zip(extra, self.batched_extra)
        )
        out = functional_call(self.model, (params, self.constants), args, strict=False)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the model must return a tensor, got {type(out).__name__}; wrap it so that forward() returns "
                "the logits tensor (e.g. lambda-free nn.Module that picks out['logits'])"
            )
        return out

    def loss(
        self,
        params: Params,
        deltas: Optional[Tuple[Tensor, ...]],
        x: Tuple[Tensor, ...],
        target: Tensor,
        extra: Tuple[Any, ...],
    ) -> Tuple[Tensor, Tuple[Tensor, ...], Tensor]:
        """Loss of one example, the recorded activations (flat, per slot) and the output."""
        self._deltas = deltas
        self._calls = [0] * len(self.layers)
        try:
            out = self.forward(params, x, extra)
            losses = self.loss_fn(out, target.unsqueeze(0))
        finally:
            self._deltas = None
        for i, c in enumerate(self._calls):
            if c <= self.chosen[i]:
                resolve_call(self.model, self.layers[i], c, self.layer_calls[i])
        acts = tuple(a for per_layer in self._acts for a in per_layer)
        return losses.sum(), acts, out

    def probe(self, x: Tuple[Tensor, ...], extra: Tuple[Any, ...]) -> Tensor:
        """Count each layer's calls and record the chosen call's tensor shapes with one example;
        returns that example's output (its shape is the batch's output shape, batch dim 1)."""
        self._probing = True
        self._probe_shapes = [[] for _ in self.layers]
        self._calls = [0] * len(self.layers)
        try:
            with torch.no_grad():
                out = self.forward(
                    self.trainable,
                    tuple(t[0] for t in x),
                    tuple(e[0] if b else e for e, b in zip(extra, self.batched_extra)),
                )
        finally:
            self._probing = False
        for i, layer in enumerate(self.layers):
            self.chosen[i] = resolve_call(self.model, layer, len(self._probe_shapes[i]), self.layer_calls[i])
            self.slots[i] = list(self._probe_shapes[i][self.chosen[i]])
        return out

    def n_slots(self) -> int:
        return sum(len(s) for s in self.slots)

    def zero_deltas(self, n: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, ...]:
        """Zero perturbations of the layers' tensors, ``(n, 1, *shape)`` per example (``(n, *shape)``
        for the batched strategy, whose layer tensors are the whole batch's)."""
        if self.strategy == "batched":
            return tuple(torch.zeros((n, *s[1:]), dtype=dtype, device=device) for per in self.slots for s in per)
        return tuple(torch.zeros((n, *s), dtype=dtype, device=device) for per in self.slots for s in per)

    def batched_problem(self) -> Optional[str]:
        """Why the batched strategy cannot serve this model and these layers (None: it can)."""
        problem = coverage_problem(self.model, list(self.trainable))
        if problem is not None:
            return problem
        for layer, per in zip(self.layers, self.slots):
            if any(len(s) == 0 or s[0] != 1 for s in per):
                return f"the tensors of {type(layer).__name__} are not batch-first"
        return None

    def shift(self, theta: Params, direction: Any, coef: Union[float, Tensor]) -> Any:
        """Per-sample parameters ``theta + coef_i * direction_i``: a parameter dictionary with a leading
        sample dim, or (batched strategy) a :class:`Shifted` that is never expanded."""
        if isinstance(direction, SampleGrads):
            dtype = next(iter(theta.values())).dtype if theta else torch.float32
            # built in the parameters' dtype (a float32 copy of epsilon would be off by 1e-8)
            c = coef if isinstance(coef, Tensor) else torch.full((direction.n,), float(coef), dtype=dtype)
            return Shifted(theta, direction, c.to(dtype=dtype, device=_device_of(theta)))
        return axpy(theta, direction, coef)

    @staticmethod
    def sq_norms(direction: Any) -> Tensor:
        """``||direction_i||^2`` per sample (a parameter dictionary is read as dense :class:`SampleGrads`)."""
        if not isinstance(direction, SampleGrads):
            first = next(iter(direction.values()))
            dense, direction = direction, SampleGrads(first.shape[0], like=first)
            direction.dense = dict(dense)
        return direction.sq_norms()

    def _batched(
        self,
        params: Any,
        deltas: Tuple[Tensor, ...],
        x: Tuple[Tensor, ...],
        target: Tensor,
        extra: Tuple[Any, ...],
        collect: bool,
    ) -> Tuple[Tensor, Tensor, Tuple[Tensor, ...], Tuple[Tensor, ...], Optional[SampleGrads]]:
        """One batched pass (:func:`batched_pass`): output, losses, activation grads, activations,
        per-sample parameter grads (``collect``). ``params`` is ``theta`` or a :class:`Shifted`."""
        theta, offsets = (
            (params.theta, (params.direction, params.coef)) if isinstance(params, Shifted) else (params, None)
        )
        leaves = [t.detach().requires_grad_() for t in x if t.is_floating_point()] if collect else []
        live = iter(leaves)
        args = tuple(next(live).clone() if t.is_floating_point() and collect else t for t in x) + tuple(extra)
        d = tuple(t.detach().requires_grad_() for t in deltas)

        def forward() -> Tensor:
            self._deltas = d if d else None
            self._calls = [0] * len(self.layers)
            out = functional_call(self.model, (theta, self.constants), args, strict=False)
            if not isinstance(out, Tensor):
                raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
            return out

        def losses_of(out: Tensor) -> Tensor:
            if self.batch_loss:
                return self.loss_fn(out, target)
            return torch.cat([self.loss_fn(out[i : i + 1], target[i : i + 1]) for i in range(out.shape[0])])

        try:
            out, losses, dg, grads = batched_pass(
                self.model,
                theta,
                list(theta),
                forward,
                losses_of,
                wrt=d,
                leaves=leaves,
                offsets=offsets,
                collect=collect,
            )
        finally:
            self._deltas = None
        for i, c in enumerate(self._calls):
            if c <= self.chosen[i]:
                resolve_call(self.model, self.layers[i], c, self.layer_calls[i])
        acts = tuple(a for per_layer in self._acts for a in per_layer)
        return out, losses, tuple(g.unsqueeze(1) for g in dg), tuple(a.unsqueeze(1) for a in acts), grads

    def _extra_dims(self) -> Tuple[Optional[int], ...]:
        return tuple(0 if b else None for b in self.batched_extra)

    def _sample(
        self, xs: Tuple[Tensor, ...], es: Tuple[Any, ...], i: int
    ) -> Tuple[Tuple[Tensor, ...], Tuple[Any, ...]]:
        return tuple(t[i] for t in xs), tuple(e[i] if b else e for e, b in zip(es, self.batched_extra))

    # ------------------------------------------------------- batched passes
    def per_sample_param_grads(
        self, params: Params, x: Tuple[Tensor, ...], target: Tensor, extra: Tuple[Any, ...]
    ) -> Tuple[Params, Tensor, Tensor]:
        """``grad_theta loss(theta, x_i)`` for every example, with shared ``theta``: (N, *p) each;
        also the losses ``(N,)`` and the outputs ``(N, *out)``. The batched strategy gives a
        :class:`SampleGrads`."""
        if self.strategy == "batched":
            out, losses, _, _, sg = self._batched(params, (), x, target, extra, collect=True)
            assert sg is not None
            return sg, losses, out  # type: ignore[return-value]
        if self.strategy == "vmap":

            def f(
                p: Params, xi: Tuple[Tensor, ...], ti: Tensor, ei: Tuple[Any, ...]
            ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
                loss, _, out = self.loss(p, None, xi, ti, ei)
                return loss, (loss.detach(), out.detach()[0])

            g, (losses, outs) = vmap(grad(f, has_aux=True), in_dims=(None, 0, 0, self._extra_dims()))(
                params, x, target, extra
            )
            return g, losses, outs
        keys = list(params)
        grads: List[List[Tensor]] = [[] for _ in keys]
        losses_l, outs_l = [], []
        for i in range(x[0].shape[0]):
            xi, ei = self._sample(x, extra, i)
            seen: List[Tensor] = []
            g, loss = sample_param_grads(
                functools.partial(self._recorded_loss, xi=xi, ti=target[i], ei=ei, seen=seen), params
            )
            for j, k in enumerate(keys):
                grads[j].append(g[k])
            losses_l.append(loss.detach())
            outs_l.append(seen[0])
        return {k: torch.stack(grads[j]) for j, k in enumerate(keys)}, torch.stack(losses_l), torch.stack(outs_l)

    def _recorded_loss(
        self, p: Params, xi: Tuple[Tensor, ...], ti: Tensor, ei: Tuple[Any, ...], seen: List[Tensor]
    ) -> Tensor:
        """One example's loss; its output is appended to ``seen``."""
        loss, _, out = self.loss(p, None, xi, ti, ei)
        seen.append(out.detach()[0])
        return loss

    def grads_at(
        self,
        params: Params,
        deltas: Tuple[Tensor, ...],
        x: Tuple[Tensor, ...],
        target: Tensor,
        extra: Tuple[Any, ...],
        with_params: bool,
    ) -> Tuple[Optional[Params], Tuple[Tensor, ...], Tuple[Tensor, ...], Tensor]:
        """Per-example parameters (leading N, or a :class:`Shifted`): (param grads), activation grads,
        activations, losses."""
        if self.strategy == "batched":
            _, losses, dg, acts, g = self._batched(params, deltas, x, target, extra, collect=with_params)
            return g, dg, acts, losses  # type: ignore[return-value]
        if self.strategy == "vmap":

            def f(
                p: Params, d: Tuple[Tensor, ...], xi: Tuple[Tensor, ...], ti: Tensor, ei: Tuple[Any, ...]
            ) -> Tuple[Tensor, Tuple[Tuple[Tensor, ...], Tensor]]:
                loss, acts, _ = self.loss(p, d, xi, ti, ei)
                return loss, (acts, loss.detach())

            argnums = (0, 1) if with_params else 1
            gfn = grad(f, argnums=argnums, has_aux=True)
            out, (acts, losses) = vmap(gfn, in_dims=(0, 0, 0, 0, self._extra_dims()))(params, deltas, x, target, extra)
            if with_params:
                pg, dg = out
                return pg, dg, acts, losses
            return None, out, acts, losses
        keys = list(params)
        pgs: List[List[Tensor]] = [[] for _ in keys]
        dgs: List[List[Tensor]] = [[] for _ in deltas]
        acts_l: List[List[Tensor]] = [[] for _ in deltas]
        losses_l = []
        for i in range(x[0].shape[0]):
            xi, ei = self._sample(x, extra, i)
            p = {k: v[i].detach().requires_grad_(with_params) for k, v in params.items()}
            d = tuple(t[i].detach().requires_grad_() for t in deltas)
            with torch.enable_grad():
                loss, acts, _ = self.loss(p, d, xi, target[i], ei)
                wrt = list(d) + ([p[k] for k in keys] if with_params else [])
                gs = torch.autograd.grad(loss, wrt, allow_unused=True)
            for j, t in enumerate(d):
                dgs[j].append(torch.zeros_like(t) if gs[j] is None else gs[j])
                acts_l[j].append(acts[j])
            if with_params:
                for j, k in enumerate(keys):
                    gk = gs[len(d) + j]
                    pgs[j].append(torch.zeros_like(p[k]) if gk is None else gk)
            losses_l.append(loss.detach())
        pg = {k: torch.stack(pgs[j]) for j, k in enumerate(keys)} if with_params else None
        return (
            pg,
            tuple(torch.stack(g) for g in dgs),
            tuple(torch.stack(a) for a in acts_l),
            torch.stack(losses_l),
        )

    def activation_grad_jvp(
        self,
        params: Params,
        tangent: Params,
        deltas: Tuple[Tensor, ...],
        x: Tuple[Tensor, ...],
        target: Tensor,
        extra: Tuple[Any, ...],
    ) -> Tuple[Tensor, ...]:
        """Exact directional derivative of the activation gradients along ``tangent``
        (forward-over-reverse). ``params`` is shared (unbatched); ``tangent`` has a leading sample dim."""

        def act_grad(
            p: Params, d: Tuple[Tensor, ...], xi: Tuple[Tensor, ...], ti: Tensor, ei: Tuple[Any, ...]
        ) -> Tuple[Tensor, ...]:
            return grad(lambda dd: self.loss(p, dd, xi, ti, ei)[0])(d)

        def one(
            tv: Params, d: Tuple[Tensor, ...], xi: Tuple[Tensor, ...], ti: Tensor, ei: Tuple[Any, ...]
        ) -> Tuple[Tensor, ...]:
            with warnings.catch_warnings():
                # torch's forward-mode rules script a helper on first use and warn that
                # torch.jit.script is deprecated: an internal detail, not the caller's concern
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
                dg = jvp(lambda p: act_grad(p, d, xi, ti, ei), (params,), (tv,))[1]
            return dg

        if self.strategy == "vmap":
            return vmap(one, in_dims=(0, 0, 0, 0, self._extra_dims()))(tangent, deltas, x, target, extra)
        # forward-over-reverse (torch.func) is about twice as fast as the double-vjp trick, which
        # is kept for models with backward hooks (torch.func does not run them)
        hooks = bool(backward_hook_owners(self.model))
        outs: List[List[Tensor]] = [[] for _ in deltas]
        for i in range(x[0].shape[0]):
            xi, ei = self._sample(x, extra, i)
            ti, di = {k: v[i] for k, v in tangent.items()}, tuple(t[i] for t in deltas)
            dg = self._jvp_autograd(params, ti, di, xi, target[i], ei) if hooks else one(ti, di, xi, target[i], ei)
            for j, t in enumerate(dg):
                outs[j].append(t)
        return tuple(torch.stack(o) for o in outs)

    def _jvp_autograd(
        self,
        params: Params,
        tangent: Params,
        d: Tuple[Tensor, ...],
        xi: Tuple[Tensor, ...],
        ti: Tensor,
        ei: Tuple[Any, ...],
    ) -> Tuple[Tensor, ...]:
        """One example's exact ``J v`` with plain autograd (the double-vjp trick), hook-friendly:
        ``s = J^T w`` with a dummy ``w``, then ``J v = d(s . v)/dw``."""
        keys = list(params)
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        dd = tuple(t.detach().requires_grad_() for t in d)
        with torch.enable_grad():
            loss, _, _ = self.loss(p, dd, xi, ti, ei)
            gd = torch.autograd.grad(loss, dd, create_graph=True)
            w = tuple(torch.zeros_like(g, requires_grad=True) for g in gd)
            s = torch.autograd.grad(gd, [p[k] for k in keys], grad_outputs=w, create_graph=True, allow_unused=True)
            pairs = [(si, tangent[k]) for si, k in zip(s, keys) if si is not None]
            if not pairs:
                return tuple(torch.zeros_like(t) for t in d)
            jv = torch.autograd.grad([si for si, _ in pairs], w, grad_outputs=[t for _, t in pairs], allow_unused=True)
        return tuple(torch.zeros_like(t) if j is None else j.detach() for j, t in zip(jv, d))
