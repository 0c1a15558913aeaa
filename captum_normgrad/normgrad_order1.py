"""NormGrad order 1 (meta-learning) as a Captum layer attribution (``LayerNormGradOrder1``)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _format_additional_forward_args, _format_output, _format_tensor_into_tuples
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from . import _capture, _dispatch, _targets
from ._functional import (
    STRATEGIES,
    NotCovered,
    Params,
    PerSampleModel,
    backward_hook_owners,
    per_example_cross_entropy,
    per_example_flags,
)
from ._per_sample_grads import check_independent, same_outputs, training_mode_offenders

__all__ = ["LayerNormGradOrder1", "per_sample_cross_entropy"]

HESSIAN_CHOICES = ("finite_difference", "exact", "none")
_DEFAULT_BUDGET_BYTES = 2 * 1024**3


def per_sample_cross_entropy(outputs: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy ``(N, K), (N,) -> (N,)``: the default loss of order-1 NormGrad (and of
    parameter saliency: the package's one per-example loss, :mod:`captum_normgrad._functional`)."""
    return per_example_cross_entropy(outputs, target)


def _target_rows(target: TargetType, shape: Tuple[int, ...], device: torch.device) -> Tensor:
    """One target row per example for the per-sample engine: ``(N,)`` class indices, or ``(N, k)``
    index tuples for outputs with more than 2 dims (validated, negative indices resolved)."""
    n = shape[0]
    t = _targets.normalize_target(shape, target)
    if t is None:
        return torch.zeros(n, dtype=torch.long, device=device)
    if len(shape) == 2:
        return _targets.class_indices(shape, t, device)
    if isinstance(t, tuple):
        return torch.tensor([list(t)] * n, dtype=torch.long, device=device)
    if isinstance(t, list):
        return torch.tensor([list(r) if isinstance(r, tuple) else [r] for r in t], dtype=torch.long, device=device)
    tt = t.to(device=device, dtype=torch.long)
    return tt.reshape(1).expand(n).clone() if tt.numel() == 1 else tt.reshape(n)


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
    parameters ``theta``. The adversarial map uses ``theta' = theta + eps grad`` and the ``+`` sign.
    ``eps -> 0`` recovers order 0 with the loss objective.

    **What it shows, measured.** The paper reads the training map as highlighting the target
    object and the adversarial map the other object. On the project's ground-truth benchmark
    (``benchmarks/bench_claims.py``, two-object images, trained VGG and ResNet) this does **not**
    reproduce at the paper's ``eps = 5e-4``: the order-1 map has Spearman 0.98-1.00 with order 0 on
    the loss, and the best target/other energy ratio over ``eps`` in {5e-4, 5e-3, 5e-2} is 1.68
    (VGG) and 1.26 (ResNet) against a 2x criterion. The paper's step ``h = 0.5/||v||`` moves the
    parameters by a vector of norm 0.5: a large-step secant, 1.0-3.5 relative error from the exact
    Hessian-vector product (``hessian="exact"``) at every block. See ``docs/benchmarks.md``.

    Every sample gets its own inner step (per-sample ``theta'``): the batch result equals the
    one-at-a-time result. The computation uses :func:`torch.func.functional_call` on parameter
    dictionaries, so the caller's model is never written to, not even transiently through
    ``.data``. ``theta`` is every parameter with ``requires_grad``; the model must be in eval mode
    where it has BatchNorm or Dropout (their buffers are never updated).

    More details: https://arxiv.org/abs/2004.02866
    """

    def __init__(
        self,
        forward_func: nn.Module,
        layer: Union[nn.Module, List[nn.Module]],
        loss_fn: Optional[Callable[[Tensor, Any], Tensor]] = None,
        device_ids: Union[None, List[int]] = None,
        *,
        strategy: str = "auto",
        chunk_size: Optional[int] = None,
        compute_dtype: Union[None, str, torch.dtype] = None,
    ) -> None:
        r"""
        Args:

            forward_func (torch.nn.Module): The model. It must be an ``nn.Module``
                        (its trainable parameters are the ``theta`` of the inner
                        step). An ``nn.DataParallel`` wrapper over at most one device is
                        unwrapped; over several devices it is refused (the per-sample
                        steps run on one device: pass ``model.module``).
            layer (torch.nn.Module or list[torch.nn.Module]): Layer(s) for which
                        attributions are computed. A layer may return a tensor or a
                        tuple of tensors (one map each). With a list, ``attribute``
                        returns a list of maps.
            loss_fn (Callable, optional): ``(outputs, target) -> losses``, one loss
                        per example: the same contract as ``LayerNormGrad``'s
                        ``loss_fn``, called on one example at a time (``outputs`` has
                        batch size 1; ``target`` is that example's ``(1,)`` class index,
                        or ``(1, k)`` index tuple for outputs with more than 2 dims).
                        None means per-sample cross-entropy with the target
                        (:func:`per_sample_cross_entropy`).
                        Default: None
            device_ids (list[int], optional): Accepted for signature compatibility
                        with Captum; more than one device is refused (see above).
                        Default: None
            strategy (str, optional): How the per-sample passes run. All give the
                        same maps (to round-off). ``"batched"``: each of the four
                        passes runs once on the whole batch, every sample with its own
                        parameters ``theta + c_i D_i`` (``D_i`` a per-sample gradient from
                        activation x backprop: grouped convolutions where a layer has
                        many locations, low-rank corrections ``G_i (A_i^T x)`` where it
                        has few); it serves models whose trainable parameters belong to
                        Conv1d/Conv2d/Linear/eval-BatchNorm modules each called once per
                        pass, batch-first layers, samples that do not interact
                        (checked once per call signature: modules, training flags,
                        hooks, trainable parameters, input shapes), and the
                        finite-difference and lookahead modes. ``"loop"``: a loop of batch-1 passes with plain
                        autograd (any model; the model's own backward hooks run).
                        ``"vmap"``: ``torch.func.vmap`` over the samples. ``"auto"``:
                        ``"batched"`` where it applies, otherwise ``"vmap"`` on CUDA and
                        ``"loop"`` on CPU (``last_strategy`` says which ran). An explicit
                        ``"batched"`` that does not apply raises with the reason.
                        Default: ``"auto"``
            chunk_size (int, optional): Examples whose per-sample state (parameter
                        sets for ``"vmap"``; per-sample gradients and whole-batch
                        activations for ``"batched"``) is in memory at once: the memory
                        for speed trade-off. None chooses it so that about 2 GiB of
                        per-sample parameter copies would be used. The loop holds one
                        example at a time.
                        Default: None
            compute_dtype (torch.dtype or str, optional): None computes in the
                        model's dtype; ``torch.float64`` computes everything in float64;
                        ``"auto"`` recomputes in float64 only the examples whose
                        ``grad l(theta')`` underflows to zero in the model's dtype
                        (confidently classified, small-loss examples).
                        Default: None
        """
        model = forward_func.module if isinstance(forward_func, nn.DataParallel) else forward_func
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LayerNormGradOrder1 needs the model itself (an nn.Module), got {type(forward_func).__name__}: "
                "order 1 takes an SGD step on the model's parameters. Wrap a function in an nn.Module"
            )
        dp_ids = (
            list(getattr(forward_func, "device_ids", None) or []) if isinstance(forward_func, nn.DataParallel) else []
        )
        if len(dp_ids) > 1 or (device_ids is not None and len(device_ids) > 1):
            raise ValueError(
                "LayerNormGradOrder1 runs each example's inner step on one device; DataParallel over several "
                "devices (device_ids) is not supported. Pass the wrapped model (model.module) and split the "
                "batch across devices yourself if needed"
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
        self._check_execution(strategy, chunk_size, compute_dtype)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self.model = model
        self.loss_fn = loss_fn
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype
        self._outs: List[Tensor] = []
        #: the strategy the last ``attribute`` call ran ("batched", "loop" or "vmap")
        self.last_strategy: Optional[str] = None
        self._probe_out: Optional[Tensor] = None
        self._probe_checked = False
        # what the probe found for call signatures that ran batched (see _signature)
        self._probed: Dict[Tuple[Any, ...], Tuple[List[int], List[List[torch.Size]], Tuple[int, ...]]] = {}

    @staticmethod
    def _check_execution(strategy: Optional[str], chunk_size: Optional[int], compute_dtype: Any) -> None:
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(map(repr, STRATEGIES))}")
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if compute_dtype not in (None, "auto") and not isinstance(compute_dtype, torch.dtype):
            raise ValueError(f"compute_dtype must be None, 'auto' or a torch dtype, got {compute_dtype!r}")

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        attr_dim_summation: bool = True,
        grad_kwargs: Optional[Dict[str, Any]] = None,
        *,
        epsilon: float = 5e-4,
        adversarial: bool = False,
        hessian: str = "finite_difference",
        h: Optional[float] = None,
        virtual_layer: str = "conv1x1",
        aggregation: str = "norm",
        weights_grid: str = "input",
        channel_dim: int = 1,
        layer_call: Optional[int] = None,
        per_example_args: Optional[Sequence[bool]] = None,
        strategy: Optional[str] = None,
        chunk_size: Optional[int] = None,
        compute_dtype: Union[None, str, torch.dtype] = None,
    ) -> Union[Tensor, Tuple[Tensor, ...], List[Union[Tensor, Tuple[Tensor, ...]]]]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): Input for which attributions
                        are computed, batch on dim 0 (one tensor, or a tuple of
                        tensors for multi-input models). Must be finite.
            target (int, tuple, Tensor, or list): The class (label) of each example
                        used by the loss, in any Captum form (negative indices count
                        from the end; a 1-tuple on 2-D outputs is its int). Required
                        with the default cross-entropy loss.
                        Default: None
            additional_forward_args (Any, optional): Extra forward arguments given
                        after the inputs. A tensor whose first dim equals the batch size
                        is split per example (Captum's convention); anything else is
                        shared by the batch. Override the rule with ``per_example_args``.
                        Default: None
            attribute_to_layer_input (bool, optional): Attribute to the layer's
                        input(s) instead of its output(s).
                        Default: False
            relu_attributions (bool, optional): As in ``LayerGradCam``: keep the
                        positive part of the map (a no-op for ``"norm"``).
                        Default: False
            attr_dim_summation (bool, optional): As in ``LayerGradCam``: False returns
                        per-channel terms (see :class:`LayerNormGrad`).
                        Default: True
            grad_kwargs (dict, optional): Accepted for signature compatibility; the
                        gradients are internal to the inner step, so
                        ``create_graph=True`` (a differentiable order-1 map) is refused.
                        Default: None

        The order-1 options below are keyword-only.

            epsilon (float, optional): Learning rate of the inner SGD step (the
                        paper: 5e-4). For ``hessian="none"`` it is the lookahead step.
                        Default: 5e-4
            adversarial (bool, optional): The adversarial map: ``theta' = theta +
                        eps grad`` and the ``+`` sign.
                        Default: False
            hessian (str, optional): ``"finite_difference"`` (the paper's centred
                        difference, 4 passes), ``"exact"`` (exact directional
                        derivative of the activation gradient along ``v``) or
                        ``"none"`` (lookahead: order 0 at ``theta'``, 2 passes).
                        Default: ``"finite_difference"``
            h (float, optional): Finite-difference step. None uses the paper's
                        ``h = 0.5 / ||grad l(theta')||`` per example; a sample whose
                        ``grad l(theta')`` is exactly zero gets no Hessian term.
                        Default: None
            virtual_layer (str, optional): As in :class:`LayerNormGrad`.
                        Default: ``"conv1x1"``
            aggregation (str, optional): As in :class:`LayerNormGrad`.
                        Default: ``"norm"``
            weights_grid (str, optional): As in :class:`LayerNormGrad`.
                        Default: ``"input"``
            channel_dim (int, optional): As in :class:`LayerNormGrad`.
                        Default: 1
            layer_call (int, optional): As in :class:`LayerNormGrad`: which call of
                        a module called several times per forward pass.
                        Default: None
            per_example_args (sequence of bool, optional): One flag per additional
                        forward argument: True splits it per example (its first dim
                        is the batch), False shares it. None applies the rule above.
                        The per-example outputs are checked against one batched
                        forward pass, and a mismatch (a shared tensor taken for a
                        per-example one, or the reverse) raises with this fix.
                        Default: None
            strategy, chunk_size, compute_dtype: Override the constructor's
                        execution settings for this call (None keeps them).
                        Default: None

        Returns:
            *Tensor*, *tuple[Tensor, ...]* or a *list* of them:
            - **attributions**: the map ``(N, 1, *locations)`` for each layer tensor
                        (a tuple when the layer returns several tensors; a list with
                        one entry per layer when a list of layers was given), in
                        float32 for half-precision models.

        Warns:
            UserWarning: when a map is all zero or non-finite, when the inner step
                        raised the loss (epsilon too large), and when the objective is
                        constant (cross-entropy on a single-output model).

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
        _dispatch.check_options(
            layers, virtual_layer, aggregation, weights_grid, channel_dim, attribute_to_layer_input, attr_dim_summation
        )
        _capture.check_layer_call(layer_call)
        self._check_numbers(epsilon, h, hessian)
        if grad_kwargs is not None and not isinstance(grad_kwargs, dict):
            raise TypeError(f"grad_kwargs must be a dict or None, got {type(grad_kwargs).__name__}")
        if grad_kwargs and grad_kwargs.get("create_graph"):
            raise ValueError(
                "grad_kwargs={'create_graph': True} is not supported by LayerNormGradOrder1: its gradients are "
                "internal to the inner SGD step, so the order-1 map is not differentiable w.r.t. the model. "
                "For attribution penalties during training use LayerNormGrad (order 0), whose map is differentiable"
            )
        self._check_execution(strategy, chunk_size, compute_dtype)
        strategy = strategy or self.strategy
        chunk_size = chunk_size or self.chunk_size
        compute_dtype = compute_dtype if compute_dtype is not None else self.compute_dtype
        self._check_mode()
        if not isinstance(inputs, (Tensor, tuple)):
            raise TypeError(
                f"inputs must be a torch.Tensor or a tuple of tensors, got {type(inputs).__name__}; "
                "convert with torch.as_tensor(...)"
            )
        inputs_t = _format_tensor_into_tuples(inputs)
        _capture.check_inputs(inputs_t)
        n = inputs_t[0].shape[0]
        for i, t in enumerate(inputs_t):
            if t.shape[0] != n:
                raise ValueError(f"inputs[{i}] has {t.shape[0]} examples but inputs[0] has {n}")
        extra = tuple(_format_additional_forward_args(additional_forward_args) or ())
        batched_extra = per_example_flags(extra, n, per_example_args)
        if target is None and self.loss_fn is None:
            raise ValueError(
                "target is required: order-1 NormGrad differentiates the cross-entropy with the target class; "
                "pass target=<class index> (or one per example), or give a loss_fn"
            )

        where = "weights" if virtual_layer == "weights" else ("input" if attribute_to_layer_input else "output")
        psm = PerSampleModel(
            self.model,
            layers,
            [where] * len(layers),
            self._resolve_loss(target),
            extra,
            batched_extra,
            layer_calls=[layer_call] * len(layers),
            batch_loss=self.loss_fn is None,
        )
        device = next(iter(psm.trainable.values())).device
        # where the batched strategy does not apply: vmap on CUDA, unless torch.func cannot run the model's hooks
        fallback = "vmap" if device.type == "cuda" and not backward_hook_owners(self.model) else "loop"
        psm.strategy = "batched" if strategy == "auto" else strategy
        if psm.strategy == "vmap":
            hooked = backward_hook_owners(self.model)
            if hooked:
                raise ValueError(
                    f"the model carries backward hooks (on {', '.join(hooked[:3])}), which torch.func's vmap does "
                    "not support; use strategy='loop' (same maps, plain autograd)"
                )
        options: Tuple[Any, ...] = (epsilon, adversarial, hessian, h, compute_dtype, layers, virtual_layer)
        options += (aggregation, weights_grid, channel_dim, attr_dim_summation)

        key = self._signature(inputs_t, extra, batched_extra, where, layer_call)
        known = self._probed.get(key) if psm.strategy == "batched" and hessian != "exact" else None
        with psm.hooked():
            if known is None:
                # one forward pass of one example: layer call counts and shapes, the output shape, and
                # (batched strategy) the reference of the check that the samples do not interact
                probe_out = psm.probe(inputs_t, extra)
                self._probe_out, self._probe_checked = probe_out, False
                example_shape = tuple(probe_out.shape[1:])
            else:
                # this signature already passed the probe and the check in a batched call
                psm.chosen, psm.slots = list(known[0]), [list(s) for s in known[1]]
                self._probe_out, self._probe_checked = None, True
                example_shape = known[2]
            out_shape = self._output_shape(example_shape, n)
            targets = _target_rows(target, out_shape, device)
            self._warn_constant_objective(out_shape)
            if psm.strategy == "batched":
                problem = psm.batched_problem()
                if hessian == "exact":
                    problem = "hessian='exact' runs per sample (forward-over-reverse)"
                if problem is not None:
                    if strategy == "batched":
                        raise ValueError(f"strategy='batched' cannot serve this call: {problem}; use strategy='loop'")
                    psm.strategy = fallback
            try:
                per_slot = self._all_chunks(psm, inputs_t, extra, targets, n, chunk_size, options)
            except NotCovered as exc:
                if strategy == "batched":
                    raise ValueError(f"strategy='batched' cannot serve this call: {exc}; use strategy='loop'") from None
                psm.strategy = fallback
                per_slot = self._all_chunks(psm, inputs_t, extra, targets, n, chunk_size, options)
            if psm.strategy != "batched" and any(isinstance(e, Tensor) for e in extra):
                outs = torch.cat([o.to(self._outs[0].dtype) for o in self._outs])
                self._check_per_example(psm, inputs_t, extra, outs, psm.trainable)
        self.last_strategy = psm.strategy
        if psm.strategy == "batched" and self._probe_out is not None and self._probe_checked:
            if len(self._probed) >= 16:
                self._probed.pop(next(iter(self._probed)))
            self._probed[key] = (list(psm.chosen), [list(s) for s in psm.slots], example_shape)
        self._outs = []
        maps = [torch.cat(ms, 0) for ms in per_slot]
        results: List[Union[Tensor, Tuple[Tensor, ...]]] = []
        j = 0
        for i in range(len(layers)):
            k = 1 if virtual_layer == "weights" else len(psm.slots[i])
            layer_maps = tuple(maps[j : j + k])
            j += k
            _dispatch.warn_degenerate(
                layer_maps,
                "LayerNormGradOrder1",
                "An all-zero order-1 map comes from a vanishing loss gradient (a saturated example: try "
                "compute_dtype='auto' or torch.float64) or a constant objective (check loss_fn/target); "
                "NaN/Inf from a diverging inner step (use a smaller epsilon, or hessian='exact').",
            )
            results.append(_format_output(len(layer_maps) > 1, _dispatch.finalize(layer_maps, relu_attributions)))
        return results if is_list else results[0]

    # ------------------------------------------------------------------ helpers
    def _all_chunks(
        self,
        psm: PerSampleModel,
        inputs_t: Tuple[Tensor, ...],
        extra: Tuple[Any, ...],
        targets: Tensor,
        n: int,
        chunk_size: Optional[int],
        options: Tuple[Any, ...],
    ) -> List[List[Tensor]]:
        """The maps of all examples, chunk by chunk (one list of chunk maps per slot)."""
        chunk = 1 if psm.strategy == "loop" else (chunk_size or self._auto_chunk(psm, n))
        per_slot: List[List[Tensor]] = [[] for _ in range(psm.n_slots())]
        self._outs = []
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            res = self._chunk_with_dtype(psm, inputs_t, extra, targets, sl, *options)
            for j, m in enumerate(res):
                per_slot[j].append(m)
        return per_slot

    def _check_batched_output(self, psm: PerSampleModel, outs: Tensor) -> None:
        """The batched strategy runs the samples together: the first example's output must equal its
        output alone (the probe), or the model mixes the samples (then the per-sample loop is used)."""
        if psm.strategy != "batched" or self._probe_checked or self._probe_out is None:
            return
        self._probe_checked = True
        check_independent(outs[:1], self._probe_out.to(outs.dtype))

    @staticmethod
    def _check_numbers(epsilon: Any, h: Any, hessian: str) -> None:
        if hessian not in HESSIAN_CHOICES:
            raise ValueError(f"unknown hessian {hessian!r}; choose one of {', '.join(map(repr, HESSIAN_CHOICES))}")
        if (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, (int, float))
            or not math.isfinite(epsilon)
            or epsilon < 0
        ):
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        if h is not None and (isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h <= 0):
            raise ValueError(f"h must be a finite number > 0 (or None for 0.5/||v||), got {h!r}")

    def _check_mode(self) -> None:
        """The package's one policy for models in training mode (as parameter saliency)."""
        bad = training_mode_offenders(self.model)
        if bad:
            raise ValueError(
                f"the model is in training mode with BatchNorm/Dropout ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}); order-1 NormGrad uses the model's inference behaviour "
                "and never updates BatchNorm buffers. Call model.eval() first"
            )

    def _resolve_loss(self, target: TargetType) -> Callable[[Tensor, Tensor], Tensor]:
        user = self.loss_fn
        if user is None:
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

    def _signature(
        self,
        inputs_t: Tuple[Tensor, ...],
        extra: Tuple[Any, ...],
        batched_extra: Tuple[bool, ...],
        where: str,
        layer_call: Optional[int],
    ) -> Tuple[Any, ...]:
        """What the probe's findings depend on: the model's modules (identity, type, training flag,
        hooks), its parameters (identity, shape, requires_grad), the inputs' and extra arguments' shapes, dtypes and devices (other
        extra arguments by value or identity), and which tensors of which call are attributed."""
        modules = tuple(
            (
                id(m),
                type(m),
                m.training,
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
            )
            for m in self.model.modules()
        )
        params = tuple((id(p), tuple(p.shape), p.requires_grad) for p in self.model.parameters())
        ins = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs_t)
        ex = tuple(
            (tuple(e.shape), e.dtype, e.device)
            if isinstance(e, Tensor)
            else (type(e), e if isinstance(e, (bool, int, float, str, type(None))) else id(e))
            for e in extra
        )
        return (modules, params, ins, ex, batched_extra, where, layer_call)

    def _output_shape(self, example_shape: Tuple[int, ...], n: int) -> Tuple[int, ...]:
        """The batch's output shape from one example's (validated before any expensive pass)."""
        shape = (n, *example_shape)
        if self.loss_fn is None and len(shape) != 2:
            raise ValueError(
                f"the default cross-entropy needs outputs shaped (N, classes), got {shape}; tuple targets "
                "(outputs with more than 2 dims) need a loss_fn"
            )
        return shape

    def _warn_constant_objective(self, shape: Tuple[int, ...]) -> None:
        if self.loss_fn is None and len(shape) == 2 and shape[1] == 1:
            warnings.warn(
                "LayerNormGradOrder1: the model returns one value per example, so the default cross-entropy "
                "over a single class is constant (0) and every map is zero. Give a loss_fn that fits the "
                "model, e.g. lambda out, y: F.binary_cross_entropy_with_logits(out[:, 0], y.float(), "
                "reduction='none')",
                UserWarning,
                stacklevel=4,
            )

    def _auto_chunk(self, psm: PerSampleModel, n: int) -> int:
        per_sample = sum(p.numel() * p.element_size() for p in psm.trainable.values())
        # grads/theta', v, theta+ (theta- reuses it) and slack for autograd buffers
        return int(max(1, min(n, _DEFAULT_BUDGET_BYTES // max(1, 4 * per_sample))))

    def _check_per_example(
        self, psm: PerSampleModel, xs: Tuple[Tensor, ...], es: Tuple[Any, ...], outs: Tensor, theta: Params
    ) -> None:
        """Per-example outputs must equal one batched forward pass (the extra-argument rule is right)."""
        args = tuple(xs) + tuple(es)
        psm._probing = True
        try:
            with torch.no_grad():
                from torch.func import functional_call

                batched = functional_call(psm.model, (theta, psm.constants), args, strict=False)
        except RuntimeError as exc:
            raise ValueError(
                f"the model fails on the whole batch with these additional_forward_args ({exc}); check which "
                f"of them are per-example (per_example_args, now {list(psm.batched_extra)})"
            ) from exc
        finally:
            psm._probing = False
        if not isinstance(batched, Tensor) or batched.shape != outs.shape:
            raise ValueError(
                f"per-example outputs {tuple(outs.shape)} differ in shape from the batched output "
                f"{tuple(batched.shape) if isinstance(batched, Tensor) else type(batched).__name__}: an "
                "additional forward argument is split per example when it is shared (or the reverse); pass "
                f"per_example_args=[...] (one bool per argument; now {list(psm.batched_extra)})"
            )
        if not same_outputs(outs.to(batched.dtype), batched):
            raise ValueError(
                "the per-example outputs differ from one batched forward pass: an additional forward "
                "argument is split per example when it is shared by the batch (e.g. a (C,) gate or a (T, T) "
                "mask whose first dim equals the batch size), or the reverse, or the model mixes examples. "
                f"Pass per_example_args=[...] (one bool per argument; now {list(psm.batched_extra)})"
            )

    def _chunk_with_dtype(
        self,
        psm: PerSampleModel,
        inputs_t: Tuple[Tensor, ...],
        extra: Tuple[Any, ...],
        targets: Tensor,
        sl: slice,
        epsilon: float,
        adversarial: bool,
        hessian: str,
        h: Optional[float],
        compute_dtype: Any,
        layers: List[nn.Module],
        virtual_layer: str,
        aggregation: str,
        weights_grid: str,
        channel_dim: int,
        summed: bool,
    ) -> List[Tensor]:
        """The maps of one chunk of examples (one per slot), with the ``compute_dtype`` policy."""
        xs = tuple(t[sl] for t in inputs_t)
        es = tuple(e[sl] if b else e for e, b in zip(extra, psm.batched_extra))
        ts = targets[sl]
        base_dtype = next(iter(psm.trainable.values())).dtype
        want64 = compute_dtype == torch.float64
        acts, grads, zero_v = self._chunk(
            psm, xs, ts, es, epsilon, adversarial, hessian, h, torch.float64 if want64 else None
        )
        self._outs.append(self._last_outs)
        if compute_dtype == "auto" and bool(zero_v.any()) and base_dtype != torch.float64:
            idx = zero_v.nonzero().flatten()
            x64 = tuple(t[idx] for t in xs)
            e64 = tuple(e[idx] if b else e for e, b in zip(es, psm.batched_extra))
            acts64, grads64, _ = self._chunk(psm, x64, ts[idx], e64, epsilon, adversarial, hessian, h, torch.float64)
            acts = tuple(a.clone() for a in acts)
            grads = tuple(g.clone() for g in grads)
            for a, a64 in zip(acts, acts64):
                a[idx] = a64.to(a.dtype)
            for g, g64 in zip(grads, grads64):
                g[idx] = g64.to(g.dtype)
        out: List[Tensor] = []
        j = 0
        for i, layer in enumerate(layers):
            k = len(psm.slots[i])
            ms = _dispatch.maps_for_layer(
                layer, acts[j : j + k], grads[j : j + k], virtual_layer, aggregation, weights_grid, channel_dim, summed
            )
            j += k
            out.extend(ms)
        return out

    def _chunk(
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
    ) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...], Tensor]:
        """Activations at theta' and combined activation gradients (one per slot, batch first) for
        one chunk of examples, and which examples had ``grad l(theta') = 0``."""
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
            g1, losses, outs = psm.per_sample_param_grads(theta, xs, ts, es)
            if not bool(torch.isfinite(losses).all()):
                raise ValueError("the loss is NaN or Inf for some examples; check the targets and the model output")
            self._last_outs = outs.detach()
            self._check_batched_output(psm, outs)
            theta_p = psm.shift(theta, g1, sign * epsilon)
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
            if not adversarial and epsilon > 0:
                rose = losses_p > losses + 1e-6 * losses.abs().clamp_min(1e-30)
                if bool(rose.any()):
                    warnings.warn(
                        f"LayerNormGradOrder1: the inner SGD step (epsilon={epsilon}) increased the loss of "
                        f"example(s) {rose.nonzero().flatten().tolist()[:8]} (it overshoots): the map is then not "
                        "the 'training' map of the paper. Use a smaller epsilon",
                        UserWarning,
                        stacklevel=5,
                    )
            zero_v = torch.zeros(m, dtype=torch.bool, device=ts.device)
            combined = g_p
            if need_v:
                assert v is not None
                vnorm = torch.sqrt(psm.sq_norms(v))
                zero_v = vnorm == 0
                if hessian == "finite_difference":
                    if h is None:
                        # h = 0.5/||v||: step h*v = 0.5 v/||v||, coefficient eps/(2h) = eps*||v||
                        safe = torch.where(zero_v, torch.ones_like(vnorm), vnorm)
                        scale = torch.where(zero_v, torch.zeros_like(vnorm), 0.5 / safe)
                        coef = epsilon * vnorm
                    else:
                        scale = torch.full_like(vnorm, float(h))
                        coef = torch.full_like(vnorm, epsilon / (2.0 * float(h)))
                    plus = psm.shift(theta, v, scale)
                    _, g_plus, _, _ = psm.grads_at(plus, deltas, xs, ts, es, with_params=False)
                    del plus
                    minus = psm.shift(theta, v, -scale)
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
            # per-sample tensors carry the inner batch dim of 1
            return tuple(a.squeeze(1) for a in acts), tuple(g.squeeze(1) for g in combined), zero_v
        finally:
            psm.constants = saved_constants
