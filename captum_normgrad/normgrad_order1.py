"""NormGrad order 1 (meta-learning) as a Captum layer attribution (``LayerNormGradOrder1``)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from captum._utils.common import _format_additional_forward_args, _format_tensor_into_tuples
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from . import _capture, _dispatch
from ._functional import STRATEGIES, Params, PerSampleModel

__all__ = ["LayerNormGradOrder1", "per_sample_cross_entropy"]

HESSIAN_CHOICES = ("finite_difference", "exact", "none")
_DEFAULT_BUDGET_BYTES = 2 * 1024**3


def per_sample_cross_entropy(outputs: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy ``(N, K), (N,) -> (N,)``: the default loss of order-1 NormGrad."""
    return F.cross_entropy(outputs, target.reshape(-1).long(), reduction="none")


def _per_sample_targets(target: TargetType, n: int, device: torch.device) -> Tensor:
    """Captum target forms -> one target row per sample (a tensor with leading dim ``n``)."""
    if isinstance(target, Tensor):
        t = target.to(device)
        return t.reshape(1).expand(n).clone() if t.numel() == 1 else t.reshape(n, *t.shape[1:])
    if isinstance(target, bool):
        raise TypeError("target must be an int, tuple, list or tensor, not a bool")
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=device)
    if isinstance(target, tuple):
        return torch.tensor([list(target)] * n, dtype=torch.long, device=device)
    if isinstance(target, list):
        if target and isinstance(target[0], tuple):
            return torch.tensor([list(t) for t in target], dtype=torch.long, device=device)
        return torch.tensor(target, dtype=torch.long, device=device)
    raise TypeError(f"unsupported target type {type(target).__name__}")


def _axpy(theta: Params, direction: Params, alpha: Union[float, Tensor]) -> Params:
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


class LayerNormGradOrder1(LayerAttribution, GradientAttribution):
    r"""
    Computes NormGrad order-1 (training-specific or adversarial) attributions for a chosen layer.

    Order 1 differentiates the loss *after one inner SGD step* on the sample,
    ``l(theta', x)`` with ``theta' = theta - eps * grad_theta l(theta, x)``. Its gradient is
    ``grad l(theta') - eps * H(theta) grad l(theta')``; decomposed per location like order 0 and with
    a centred finite difference for the Hessian-vector product (``v = grad l(theta')``,
    ``h = 0.5 / ||v||``, ``theta_pm = theta +- h v``) the map is

    .. math::

        m_u \approx \left\| g_{u,\theta'} - \frac{\epsilon}{2h}\,(g_{u,\theta^+} - g_{u,\theta^-}) \right\|
        \cdot \| x_{u,\theta'} \| ,

    where ``g_{u,theta}`` is the gradient of the loss w.r.t. the activation at location ``u`` under
    parameters ``theta``. It highlights what the model would *learn* from the sample (the target
    object); the adversarial map (``theta' = theta + eps grad``, ``+`` sign) highlights what would
    degrade it. ``eps -> 0`` recovers order 0 with the loss objective.

    Every sample gets its own inner step (per-sample ``theta'``): the batch result equals the
    one-at-a-time result. The computation uses :func:`torch.func.functional_call` on parameter
    dictionaries batched with ``vmap``, so the caller's model is never written to, not even
    transiently through ``.data``. ``theta`` is every parameter with ``requires_grad``; the model
    must be in eval mode where it has BatchNorm or Dropout (their buffers are never updated).

    Four forward-backward passes (``hessian="finite_difference"``); ``hessian="exact"`` replaces the
    finite difference by the exact directional derivative (forward-over-reverse); ``hessian="none"``
    is the lookahead variant (order 0 on ``theta'``, the authors' CVPR meta-saliency), two passes.

    More details: https://arxiv.org/abs/2004.02866
    """

    def __init__(
        self,
        forward_func: nn.Module,
        layer: Union[nn.Module, List[nn.Module]],
        loss_fn: Optional[Callable[[Tensor, Any], Tensor]] = None,
        device_ids: Union[None, List[int]] = None,
    ) -> None:
        r"""
        Args:

            forward_func (torch.nn.Module): The model. It must be an ``nn.Module``
                        (its trainable parameters are the ``theta`` of the inner
                        step); an ``nn.DataParallel`` wrapper is unwrapped and the
                        computation runs on its module's device.
            layer (torch.nn.Module or list[torch.nn.Module]): Layer(s) for which
                        attributions are computed. Each must return a single tensor.
                        With a list, ``attribute`` returns a list of maps.
            loss_fn (Callable, optional): ``(outputs, target) -> losses`` with one
                        loss per example (shape ``(N,)``). It is called on one
                        example at a time (``outputs`` has batch size 1, ``target``
                        one row). None means per-sample cross-entropy with the target
                        (:func:`per_sample_cross_entropy`).
                        Default: None
            device_ids (list[int], optional): Accepted for signature compatibility
                        with Captum layer methods; the per-sample computation runs on
                        a single device.
                        Default: None
        """
        model = forward_func.module if isinstance(forward_func, nn.DataParallel) else forward_func
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LayerNormGradOrder1 needs the model itself (an nn.Module), got {type(forward_func).__name__}: "
                "order 1 takes an SGD step on the model's parameters. Wrap a function in an nn.Module"
            )
        layers, _ = _dispatch.layer_list(layer)
        _capture.check_layers_in_model(model, layers)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "the model has no parameter with requires_grad=True, so there is no inner SGD step to take; "
                "enable gradients on the parameters that define theta (e.g. model.requires_grad_(True))"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self.model = model
        self.loss_fn = loss_fn

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        attribute_to_layer_input: bool = False,
        epsilon: float = 5e-4,
        adversarial: bool = False,
        hessian: str = "finite_difference",
        h: Optional[float] = None,
        virtual_layer: str = "conv1x1",
        aggregation: str = "norm",
        weights_grid: str = "input",
        channel_dim: int = 1,
        chunk_size: Optional[int] = None,
        compute_dtype: Union[None, str, torch.dtype] = None,
        strategy: str = "auto",
        grad_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Union[Tensor, List[Tensor]]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): Input for which attributions
                        are computed, batch on dim 0 (one tensor, or a tuple of
                        tensors for multi-input models). Must be finite.
            target (int, tuple, Tensor, or list): The class (label) of each example
                        used by the loss, in any Captum form: an int or one-element
                        tensor for all examples, a list / 1D tensor with one per
                        example. Required with the default cross-entropy loss.
                        Default: None
            additional_forward_args (Any, optional): Extra forward arguments given
                        after the inputs. Tensors among them are taken to be batch
                        aligned (dim 0 = example), as in Captum; other objects are
                        passed unchanged.
                        Default: None
            attribute_to_layer_input (bool, optional): Attribute to the layer's
                        input instead of its output.
                        Default: False
            epsilon (float, optional): Learning rate of the inner SGD step (the
                        paper: 5e-4). For ``hessian="none"`` it is the lookahead step.
                        Default: 5e-4
            adversarial (bool, optional): The adversarial map: ``theta' = theta +
                        eps grad`` and the ``+`` sign (locations that degrade the model).
                        Default: False
            hessian (str, optional): ``"finite_difference"`` (the paper's centred
                        difference, 4 passes), ``"exact"`` (exact directional
                        derivative of the activation gradient along ``v``,
                        forward-over-reverse) or ``"none"`` (lookahead: order 0 at
                        ``theta'``).
                        Default: ``"finite_difference"``
            h (float, optional): Finite-difference step. None uses the paper's
                        ``h = 0.5 / ||grad l(theta')||`` per example (over all trainable
                        parameters); a sample whose ``grad l(theta')`` is exactly zero
                        gets no Hessian term (its map is order 0 at ``theta'``).
                        Default: None
            virtual_layer (str, optional): As in :class:`LayerNormGrad`
                        (``"conv1x1"``, ``"scaling"``, ``"bias"``, ``"conv3x3"``,
                        ``"weights"``). The order-1 combination is linear in the
                        activation gradient, so every virtual layer applies.
                        Default: ``"conv1x1"``
            aggregation (str, optional): As in :class:`LayerNormGrad`.
                        Default: ``"norm"``
            weights_grid (str, optional): As in :class:`LayerNormGrad`.
                        Default: ``"input"``
            channel_dim (int, optional): As in :class:`LayerNormGrad`.
                        Default: 1
            chunk_size (int, optional): Number of examples whose per-sample
                        parameter sets are held in memory at once. None chooses it so
                        that about 2 GiB of per-sample parameter copies are used
                        (e.g. 4 for ResNet-50 in float32).
                        Ignored by ``strategy="loop"``, which holds one example's
                        parameter sets at a time.
                        Default: None
            compute_dtype (torch.dtype or str, optional): None computes in the
                        model's dtype; ``torch.float64`` computes everything in
                        float64; ``"auto"`` recomputes in float64 only the examples
                        whose ``grad l(theta')`` underflows to zero in the model's
                        dtype (confidently classified, small-loss examples). Maps are
                        returned in the model's dtype except for ``torch.float64``.
                        Default: None
            strategy (str, optional): How the per-sample passes are batched:
                        ``"vmap"`` (``torch.func.vmap``: per-sample weights become
                        grouped convolutions, the fast choice on GPUs), ``"loop"`` (a
                        Python loop of ordinary batch-1 passes, faster on CPUs) or
                        ``"auto"`` (``"vmap"`` on CUDA, ``"loop"`` otherwise). All give
                        the same maps.
                        Default: ``"auto"``
            grad_kwargs (dict, optional): Not supported (the gradients are taken
                        with ``torch.func``); must be None.
                        Default: None

        Returns:
            *Tensor* or *list[Tensor]*:
            - **attributions**: the raw map ``(N, 1, *locations)`` per layer (a list
                        with one map per layer when a list of layers was given).

        Examples::

            >>> net = ImageClassifier().eval()
            >>> ng1 = LayerNormGradOrder1(net, net.conv4)
            >>> x = torch.randn(2, 3, 32, 32)
            >>> train_map = ng1.attribute(x, target=[3, 5])                 # (2, 1, 8, 8)
            >>> adv_map = ng1.attribute(x, target=[3, 5], adversarial=True)
            >>> exact = ng1.attribute(x, target=[3, 5], hessian="exact")
            >>> lookahead = ng1.attribute(x, target=[3, 5], hessian="none", epsilon=1e-3)
        """
        layers, is_list = _dispatch.layer_list(self.layer)
        _dispatch.check_options(layers, virtual_layer, aggregation, weights_grid, channel_dim, attribute_to_layer_input)
        if hessian not in HESSIAN_CHOICES:
            raise ValueError(f"unknown hessian {hessian!r}; choose one of {', '.join(map(repr, HESSIAN_CHOICES))}")
        if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        if h is not None and (not isinstance(h, (int, float)) or not math.isfinite(h) or h <= 0):
            raise ValueError(f"h must be a finite number > 0 (or None for 0.5/||v||), got {h!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(map(repr, STRATEGIES))}")
        if grad_kwargs:
            raise ValueError("grad_kwargs is not supported by LayerNormGradOrder1 (gradients use torch.func)")
        if compute_dtype not in (None, "auto") and not isinstance(compute_dtype, torch.dtype):
            raise ValueError(f"compute_dtype must be None, 'auto' or a torch dtype, got {compute_dtype!r}")
        self._check_mode()

        inputs_t = _format_tensor_into_tuples(inputs)
        _capture.check_inputs(inputs_t)
        n = inputs_t[0].shape[0]
        for i, t in enumerate(inputs_t):
            if t.shape[0] != n:
                raise ValueError(f"inputs[{i}] has {t.shape[0]} examples but inputs[0] has {n}")
        extra = _format_additional_forward_args(additional_forward_args) or ()
        batched_extra = tuple(isinstance(e, Tensor) and e.dim() > 0 and e.shape[0] == n for e in extra)
        if target is None and self.loss_fn is None:
            raise ValueError(
                "target is required: order-1 NormGrad differentiates the cross-entropy with the target class; "
                "pass target=<class index> (or one per example), or give a loss_fn"
            )

        where = "weights" if virtual_layer == "weights" else ("input" if attribute_to_layer_input else "output")
        loss_fn = self._resolve_loss(target)
        psm = PerSampleModel(self.model, layers, [where] * len(layers), loss_fn, tuple(extra), batched_extra)
        device = next(iter(psm.trainable.values())).device
        psm.strategy = ("vmap" if device.type == "cuda" else "loop") if strategy == "auto" else strategy
        base_dtype = next(iter(psm.trainable.values())).dtype
        targets = _per_sample_targets(target if target is not None else 0, n, device)
        if targets.shape[0] != n:
            raise ValueError(f"target gives {targets.shape[0]} entries but the batch has {n} examples")

        with psm.hooked():
            if target is not None:
                self._check_target_range(psm, inputs_t, target, tuple(extra), n)
            psm.probe_shapes(inputs_t, targets, tuple(extra))
            # the loop strategy runs one sample at a time anyway: keep one parameter set in memory
            chunk = 1 if psm.strategy == "loop" else (chunk_size or self._auto_chunk(psm, n))
            want64 = compute_dtype == torch.float64
            maps_per_layer: List[List[Tensor]] = [[] for _ in layers]
            for start in range(0, n, chunk):
                sl = slice(start, min(n, start + chunk))
                xs = tuple(t[sl] for t in inputs_t)
                es = tuple(e[sl] if b else e for e, b in zip(extra, batched_extra))
                ts = targets[sl]
                dtype = torch.float64 if want64 else None
                res, zero_v = self._chunk_maps(psm, xs, ts, es, epsilon, adversarial, hessian, h, dtype)
                if compute_dtype == "auto" and bool(zero_v.any()) and base_dtype != torch.float64:
                    idx = zero_v.nonzero().flatten()
                    x64 = tuple(t[idx] for t in xs)
                    e64 = tuple(e[idx] if b else e for e, b in zip(es, batched_extra))
                    res64, _ = self._chunk_maps(psm, x64, ts[idx], e64, epsilon, adversarial, hessian, h, torch.float64)
                    res = [
                        (tuple(a.clone() for a in acts), tuple(g.clone() for g in grads))
                        for acts, grads in res
                    ]
                    for li, (acts64, grads64) in enumerate(res64):
                        for a, a64 in zip(res[li][0], acts64):
                            a[idx] = a64.to(a.dtype)
                        for g, g64 in zip(res[li][1], grads64):
                            g[idx] = g64.to(g.dtype)
                for li, (layer, (acts, grads)) in enumerate(zip(layers, res)):
                    m = _dispatch.maps_for_layer(layer, acts, grads, virtual_layer, aggregation, weights_grid, channel_dim)
                    maps_per_layer[li].append(m[0])
        out = [torch.cat(ms, 0) for ms in maps_per_layer]
        for m in out:
            if not bool(torch.isfinite(m).all()):
                raise ValueError(
                    "order-1 map is not finite (the inner step diverged): use a smaller epsilon, or "
                    "compute_dtype=torch.float64"
                )
        return out if is_list else out[0]

    # ------------------------------------------------------------------ helpers
    def _check_mode(self) -> None:
        bad = [
            name or "<root>"
            for name, m in self.model.named_modules()
            if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
        ]
        if bad:
            raise ValueError(
                f"the model is in training mode with BatchNorm/Dropout ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}); order-1 NormGrad uses the model's inference behaviour "
                "and never updates BatchNorm buffers. Call model.eval() first"
            )

    def _resolve_loss(self, target: TargetType) -> Callable[[Tensor, Tensor], Tensor]:
        user = self.loss_fn
        if user is None:
            if isinstance(target, tuple) or (isinstance(target, list) and target and isinstance(target[0], tuple)):
                raise ValueError(
                    "tuple targets (outputs with more than 2 dims) need a loss_fn: the default "
                    "cross-entropy takes one class index per example"
                )
            return per_sample_cross_entropy

        def wrapped(outputs: Tensor, t: Tensor) -> Tensor:
            losses = user(outputs, None if target is None else t)
            if not isinstance(losses, Tensor) or losses.shape != (outputs.shape[0],):
                shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise ValueError(
                    f"loss_fn must return one loss per example, shape ({outputs.shape[0]},); got {shape}. "
                    "Use a per-sample loss (e.g. reduction='none')"
                )
            return losses

        return wrapped

    def _check_target_range(
        self, psm: PerSampleModel, inputs_t: Tuple[Tensor, ...], target: TargetType, extra: Tuple[Any, ...], n: int
    ) -> None:
        with torch.no_grad():
            out = psm._forward(psm.trainable, tuple(t[0] for t in inputs_t), tuple(
                e[0] if b else e for e, b in zip(extra, psm.batched_extra)
            ))
        fake = torch.empty((n, *out.shape[1:]), device="meta")
        _capture._check_target(fake, target)

    def _auto_chunk(self, psm: PerSampleModel, n: int) -> int:
        per_sample = sum(p.numel() * p.element_size() for p in psm.trainable.values())
        # grads/theta', v, theta+ (theta- reuses it) and slack for autograd buffers
        return int(max(1, min(n, _DEFAULT_BUDGET_BYTES // max(1, 4 * per_sample))))

    def _chunk_maps(
        self,
        psm: PerSampleModel,
        xs: Tuple[Tensor, ...],
        ts: Tensor,
        es: Tuple[Any, ...],
        epsilon: float,
        adversarial: bool,
        hessian: str,
        h: Optional[float],
        dtype: Optional[torch.dtype],
    ) -> Tuple[List[Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]], Tensor]:
        """Activations at theta' and combined activation gradients for one chunk of examples."""
        theta: Params = psm.trainable
        saved_constants = psm.constants
        if dtype is not None:
            theta = {k: v.to(dtype) for k, v in theta.items()}
            psm.constants = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in saved_constants.items()}
            xs = tuple(t.to(dtype) if t.is_floating_point() else t for t in xs)
            es = tuple(e.to(dtype) if isinstance(e, Tensor) and e.is_floating_point() else e for e in es)
        try:
            m = xs[0].shape[0]
            sign = 1.0 if adversarial else -1.0
            g1, losses = psm.per_sample_param_grads(theta, xs, ts, es)
            if not bool(torch.isfinite(losses).all()):
                raise ValueError("the loss is NaN or Inf for some examples; check the targets and the model output")
            theta_p = _axpy(theta, g1, sign * epsilon)
            del g1
            pdtype = next(iter(theta.values())).dtype
            deltas = psm.zero_deltas(m, pdtype, ts.device)
            need_v = hessian != "none"
            v, g_p, acts, losses_p = psm.grads_at(theta_p, deltas, xs, ts, es, with_params=need_v)
            del theta_p
            if not bool(torch.isfinite(losses_p).all()):
                raise ValueError(
                    f"the loss after the inner step (epsilon={epsilon}) is NaN or Inf; use a smaller epsilon"
                )
            zero_v = torch.zeros(m, dtype=torch.bool, device=ts.device)
            combined = g_p
            if need_v:
                assert v is not None
                vnorm = torch.sqrt(sum(t.reshape(m, -1).square().sum(1) for t in v.values()))  # type: ignore[arg-type]
                zero_v = vnorm == 0
                if hessian == "finite_difference":
                    if h is None:
                        # h = 0.5/||v||: step h*v = 0.5 v/||v||, coefficient eps/(2h) = eps*||v||
                        scale = torch.where(zero_v, torch.zeros_like(vnorm), 0.5 / torch.where(zero_v, torch.ones_like(vnorm), vnorm))
                        coef = epsilon * vnorm
                    else:
                        scale = torch.full_like(vnorm, float(h))
                        coef = torch.full_like(vnorm, epsilon / (2.0 * float(h)))
                    plus = _axpy(theta, v, scale)
                    _, g_plus, _, _ = psm.grads_at(plus, deltas, xs, ts, es, with_params=False)
                    del plus
                    minus = _axpy(theta, v, -scale)
                    del v
                    _, g_minus, _, _ = psm.grads_at(minus, deltas, xs, ts, es, with_params=False)
                    del minus
                    combined = tuple(
                        gp + sign * coef.reshape(m, *([1] * (gp.dim() - 1))) * (a - b)
                        for gp, a, b in zip(g_p, g_plus, g_minus)
                    )
                else:  # exact
                    jv = psm.activation_grad_jvp(theta, v, deltas, xs, ts, es)
                    del v
                    combined = tuple(gp + sign * epsilon * j for gp, j in zip(g_p, jv))
            out = []
            for a, g in zip(acts, combined):
                # per-sample tensors carry the inner batch dim of 1
                out.append(((a.squeeze(1),), (g.squeeze(1),)))
            return out, zero_v
        finally:
            psm.constants = saved_constants
