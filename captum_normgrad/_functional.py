r"""Per-sample functional plumbing for order-1 NormGrad (``torch.func``, no writes into the model).

The model is evaluated with :func:`torch.func.functional_call` on parameter dictionaries, so the
caller's parameters are never modified (no ``.data`` writes, no in-place updates, no optimizer).
Every sample gets its own parameter set (``vmap`` over a leading sample dim).

Activation gradients are obtained with the *zero-perturbation trick*: a forward hook adds a zero
tensor ``delta`` to the layer's output (or input), and the gradient of the loss w.r.t. ``delta``
is the gradient w.r.t. the activation. The hooks live only for the duration of one call and are
removed in every case.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_map, tree_flatten, tree_unflatten

__all__ = ["PerSampleModel", "map_samples", "STRATEGIES"]

Params = Dict[str, Tensor]
STRATEGIES = ("auto", "vmap", "loop")


def map_samples(fn: Callable[..., Any], in_dims: Tuple[Any, ...], strategy: str) -> Callable[..., Any]:
    """``vmap(fn, in_dims)`` or the same mapping as a Python loop over the samples.

    Both give identical per-sample semantics. ``vmap`` turns per-sample weights into grouped
    convolutions (fast on GPUs); the loop runs ordinary batch-1 kernels, which is faster on CPUs.
    """
    if strategy == "vmap":
        return vmap(fn, in_dims=in_dims)

    def looped(*args: Any) -> Any:
        n = None
        for a, d in zip(args, in_dims):
            if d is None:
                continue
            leaves, _ = tree_flatten(a)
            for leaf in leaves:
                if isinstance(leaf, Tensor):
                    n = leaf.shape[0]
                    break
            if n is not None:
                break
        assert n is not None, "no batched argument"
        if n == 1:  # one sample: views instead of copies
            sliced = tuple(
                a if d is None else tree_map(lambda t: t[0] if isinstance(t, Tensor) else t, a)
                for a, d in zip(args, in_dims)
            )
            return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, fn(*sliced))
        outs = []
        for i in range(n):
            sliced = tuple(
                a if d is None else tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, a)
                for a, d in zip(args, in_dims)
            )
            outs.append(fn(*sliced))
        flat0, spec = tree_flatten(outs[0])
        flats = [tree_flatten(o)[0] for o in outs]
        return tree_unflatten([torch.stack([f[j] for f in flats]) for j in range(len(flat0))], spec)

    return looped


class PerSampleModel:
    r"""A model, some layers and a per-sample loss, as pure functions of parameter dictionaries.

    Args:
        model (nn.Module): the caller's model (never modified).
        layers (sequence of nn.Module): layers whose activations/gradients are needed.
        where (sequence of str): per layer ``"output"``, ``"input"`` or ``"weights"`` (perturb the
                    output, record the layer input as activation).
        loss_fn (Callable): ``(outputs, targets) -> (B,)`` per-sample losses.
        buffers / frozen: tensors passed unchanged to every call.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[nn.Module],
        where: Sequence[str],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        extra_args: Tuple[Any, ...],
        batched_extra: Tuple[bool, ...],
        strategy: str = "vmap",
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.where = list(where)
        self.loss_fn = loss_fn
        self.extra_args = extra_args
        self.batched_extra = batched_extra
        self.strategy = strategy
        named = dict(model.named_parameters())
        self.trainable: Params = {k: p.detach() for k, p in named.items() if p.requires_grad}
        self.constants: Dict[str, Tensor] = {k: p.detach() for k, p in named.items() if not p.requires_grad}
        self.constants.update({k: b.detach() for k, b in model.named_buffers()})
        # state shared with the hooks during one functional evaluation
        self._deltas: Optional[Tuple[Tensor, ...]] = None
        self._acts: List[Optional[Tensor]] = [None] * len(self.layers)
        self.shapes: List[Optional[torch.Size]] = [None] * len(self.layers)
        self._calls: List[int] = [0] * len(self.layers)

    # ------------------------------------------------------------------ hooks
    def _on_tensor(self, i: int, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(
                f"layer {type(self.layers[i]).__name__} returned {type(t).__name__}; order-1 NormGrad needs "
                "a layer that returns a single tensor"
            )
        self._calls[i] += 1
        if self._deltas is None:
            self.shapes[i] = t.shape
            return t
        return t + self._deltas[i]

    def _make_hooks(self, i: int, where: str) -> Tuple[Callable[..., Any], bool]:
        if where == "input":

            def pre_hook(module: nn.Module, inp: Tuple[Any, ...]) -> Any:
                new = self._on_tensor(i, inp[0])
                self._acts[i] = new
                return (new,) + tuple(inp[1:])

            return pre_hook, True

        def hook(module: nn.Module, inp: Tuple[Any, ...], out: Any) -> Any:
            new = self._on_tensor(i, out)
            self._acts[i] = inp[0] if where == "weights" else new
            return new

        return hook, False

    @contextmanager
    def hooked(self) -> Iterator[None]:
        handles = []
        try:
            for i, (layer, w) in enumerate(zip(self.layers, self.where)):
                fn, pre = self._make_hooks(i, w)
                handles.append(layer.register_forward_pre_hook(fn) if pre else layer.register_forward_hook(fn))
            yield
        finally:
            for h in handles:
                h.remove()
            self._deltas = None
            self._acts = [None] * len(self.layers)

    # ------------------------------------------------------------ functions
    def _forward(self, params: Params, x: Tuple[Tensor, ...], extra: Tuple[Any, ...]) -> Tensor:
        args = tuple(t.unsqueeze(0) for t in x) + tuple(
            e.unsqueeze(0) if b else e for e, b in zip(extra, self.batched_extra)
        )
        return functional_call(self.model, (params, self.constants), args, strict=False)

    def loss(
        self,
        params: Params,
        deltas: Optional[Tuple[Tensor, ...]],
        x: Tuple[Tensor, ...],
        target: Tensor,
        extra: Tuple[Any, ...],
    ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """Loss of one sample (no batch dim in ``x``), and the detached activations."""
        self._deltas = deltas
        self._calls = [0] * len(self.layers)
        try:
            out = self._forward(params, x, extra)
            losses = self.loss_fn(out, target.unsqueeze(0))
        finally:
            self._deltas = None
        for i, c in enumerate(self._calls):
            if c == 0:
                raise ValueError(
                    f"layer {type(self.layers[i]).__name__} was not reached in the forward pass; choose a "
                    "module that the model's forward() actually calls"
                )
            if c > 1:
                raise ValueError(
                    f"layer {type(self.layers[i]).__name__} was called {c} times in one forward pass; "
                    "NormGrad needs a single call site"
                )
        acts = tuple(a.detach() for a in self._acts if a is not None)
        return losses.sum(), acts

    # ------------------------------------------------------- batched passes
    def _extra_dims(self) -> Tuple[Optional[int], ...]:
        return tuple(0 if b else None for b in self.batched_extra)

    def probe_shapes(self, x: Tuple[Tensor, ...], target: Tensor, extra: Tuple[Any, ...]) -> None:
        """Record per-sample layer shapes with one sample (no gradients)."""
        with torch.no_grad():
            self.loss(self.trainable, None, tuple(t[0] for t in x), target[0], tuple(
                e[0] if b else e for e, b in zip(extra, self.batched_extra)
            ))

    def zero_deltas(self, n: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, ...]:
        return tuple(torch.zeros((n, *s), dtype=dtype, device=device) for s in self.shapes)  # type: ignore[misc]

    def per_sample_param_grads(
        self, params: Params, x: Tuple[Tensor, ...], target: Tensor, extra: Tuple[Any, ...]
    ) -> Tuple[Params, Tensor]:
        """``grad_theta loss(theta, x_i)`` for every sample, with shared ``theta``: (N, *p) each."""

        def f(p: Params, xi: Tuple[Tensor, ...], ti: Tensor, ei: Tuple[Any, ...]) -> Tuple[Tensor, Tensor]:
            loss, _ = self.loss(p, None, xi, ti, ei)
            return loss, loss.detach()

        g, losses = map_samples(grad(f, has_aux=True), (None, 0, 0, self._extra_dims()), self.strategy)(params, x, target, extra)
        return g, losses

    def grads_at(
        self,
        params: Params,
        deltas: Tuple[Tensor, ...],
        x: Tuple[Tensor, ...],
        target: Tensor,
        extra: Tuple[Any, ...],
        with_params: bool,
    ) -> Tuple[Optional[Params], Tuple[Tensor, ...], Tuple[Tensor, ...], Tensor]:
        """Per-sample parameters (leading N): activation gradients, activations, (param grads), losses."""

        def f(
            p: Params, d: Tuple[Tensor, ...], xi: Tuple[Tensor, ...], ti: Tensor, ei: Tuple[Any, ...]
        ) -> Tuple[Tensor, Tuple[Tuple[Tensor, ...], Tensor]]:
            loss, acts = self.loss(p, d, xi, ti, ei)
            return loss, (acts, loss.detach())

        argnums = (0, 1) if with_params else 1
        gfn = grad(f, argnums=argnums, has_aux=True)
        out, (acts, losses) = map_samples(gfn, (0, 0, 0, 0, self._extra_dims()), self.strategy)(params, deltas, x, target, extra)
        if with_params:
            pg, dg = out
            return pg, dg, acts, losses
        return None, out, acts, losses

    def activation_grad_jvp(
        self,
        params: Params,
        tangent: Params,
        deltas: Tuple[Tensor, ...],
        x: Tuple[Tensor, ...],
        target: Tensor,
        extra: Tuple[Any, ...],
    ) -> Tuple[Tensor, ...]:
        """Exact directional derivative of the activation gradients along ``tangent`` (forward-over-reverse).

        ``params`` is shared (unbatched) and ``tangent`` has a leading sample dim.
        """

        def act_grad(p: Params, d: Tuple[Tensor, ...], xi: Tuple[Tensor, ...], ti: Tensor, ei: Tuple[Any, ...]) -> Tuple[Tensor, ...]:
            return grad(lambda dd: self.loss(p, dd, xi, ti, ei)[0])(d)

        def one(
            tv: Params, d: Tuple[Tensor, ...], xi: Tuple[Tensor, ...], ti: Tensor, ei: Tuple[Any, ...]
        ) -> Tuple[Tensor, ...]:
            with warnings.catch_warnings():
                # torch's forward-mode rules script a helper on first use and warn that
                # torch.jit.script is deprecated: an internal detail, not the caller's concern
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
                _, dg = jvp(lambda p: act_grad(p, d, xi, ti, ei), (params,), (tv,))
            return dg

        return map_samples(one, (0, 0, 0, 0, self._extra_dims()), self.strategy)(tangent, deltas, x, target, extra)
