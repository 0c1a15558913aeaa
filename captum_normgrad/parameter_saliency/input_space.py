r"""Input-space counterpart of parameter-space saliency (Levin et al., 2022, Section 5).

Which input features make the most salient filters malfunction? Take the sample's saliency profile
``z(x)`` (standardised by default), build a target profile ``t`` = ``z(x)`` detached with its top-k
entries multiplied by a boost factor (default 100), and differentiate the cosine similarity between
the profile and the target with respect to the input:

.. math::

    A(x) = \nabla_x \cos\big(z(x), t\big), \qquad t = \operatorname{boost}_k\big(\operatorname{sg}[z(x)]\big).

Since ``z(x)`` is itself made of parameter gradients, this is a double backward pass. With the
default batched engine the per-sample parameter gradients are built from differentiable
operations (activation x output gradient, :mod:`captum_normgrad._per_sample_grads`) on a
``create_graph`` backward pass, and ``A`` is their input gradient; the ``vmap`` engine uses
``torch.func.grad`` of a function that calls ``torch.func.grad``. Pixels with a large ``|A|`` are those that, if changed, would most move the profile
towards (or away from) the boosted salient filters. The paper displays ``max_c |A_c|``
(``reduce="max_abs"``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor
from torch.func import grad, vmap

from ._common import _check_choice
from .profiles import MODES, ParameterSaliency

__all__ = ["InputSpaceSaliency", "boosted_target"]


def boosted_target(saliency: Tensor, k: int = 10, boost: float = 100.0, by: str = "value") -> Tensor:
    r"""
    The target profile: ``saliency`` (detached copy) with its top-``k`` entries times ``boost``.

    Args:

        saliency (Tensor): ``(N, F)`` saliency profiles.
        k (int, optional): Number of boosted entries. Default: 10
        boost (float, optional): Multiplier of the boosted entries. Default: 100.0
        by (str, optional): Top-k by ``"value"`` or ``"abs"``. Default: ``"value"``

    Returns:
        *Tensor*: ``(N, F)``.
    """
    order = ParameterSaliency.rank(saliency.detach(), k=k, by=by)
    out = saliency.detach().clone()
    out.scatter_(-1, order, out.gather(-1, order) * boost)
    return out


class InputSpaceSaliency(GradientAttribution):
    r"""
    Input-space saliency driven by parameter-space saliency, as a Captum attribution.

    ``attribute`` returns, for each sample, the input gradient of the cosine similarity between
    its saliency profile and the boosted top-k target profile (see the module documentation):
    a map with the input's shape (or ``(N, 1, H, W)`` with ``reduce="max_abs"``).

    Args:

        saliency (ParameterSaliency): The parameter saliency (model, aggregation, statistics).
                    It must be fitted for the default standardised mode.

    Examples::

        >>> ps = ParameterSaliency(model).fit(reference_loader)
        >>> ig = InputSpaceSaliency(ps)
        >>> attr = ig.attribute(images, target=labels)                    # like images
        >>> heat = ig.attribute(images, target=labels, reduce="max_abs")  # (N, 1, H, W)
    """

    def __init__(self, saliency: ParameterSaliency) -> None:
        if not isinstance(saliency, ParameterSaliency):
            raise TypeError(
                f"InputSpaceSaliency takes a ParameterSaliency, got {type(saliency).__name__}; "
                "build one with ParameterSaliency(model) and fit it"
            )
        GradientAttribution.__init__(self, saliency.model)
        self.parameter_saliency = saliency

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor,
        target: Any,
        k: int = 10,
        boost: float = 100.0,
        mode: Optional[str] = None,
        by: str = "value",
        reduce: Optional[str] = None,
        chunk_size: Optional[int] = None,
    ) -> Tensor:
        r"""
        Args:

            inputs (Tensor): Batch ``(N, ...)`` of model inputs.
            target (int, list[int] or Tensor): True class of each sample (the loss label).
            k (int, optional): Number of salient filters boosted in the target profile.
                        Default: 10
            boost (float, optional): Boost factor of the top-k entries.
                        Default: 100.0
            mode (str, optional): Saliency mode of the profile: ``"standardized"``,
                        ``"naive"`` or ``"norm"``.
                        Default: None (the ParameterSaliency's mode)
            by (str, optional): Top-k by ``"value"`` or ``"abs"``.
                        Default: ``"value"``
            reduce (str, optional): None returns the raw gradient (input-shaped);
                        ``"max_abs"`` returns ``max`` over dim 1 (colour channels) of its
                        absolute value, shape ``(N, 1, ...)``, as displayed in the paper.
                        Default: None
            chunk_size (int, optional): At most this many samples are differentiated at once
                        (memory bound).
                        Default: None (the ParameterSaliency's ``chunk_size``; else 4 samples, or the
                        whole batch with the ``vmap`` engine)

        Returns:
            *Tensor*: attributions, detached, with the shape of ``inputs`` (or ``(N, 1, ...)``).
        """
        ps = self.parameter_saliency
        mode = ps.mode if mode is None else mode
        _check_choice("mode", mode, MODES)
        _check_choice("reduce", reduce, (None, "max_abs"))  # type: ignore[arg-type]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ps.num_features:
            raise ValueError(f"k must be an int in [1, {ps.num_features}], got {k!r}")
        if not isinstance(boost, (int, float)) or isinstance(boost, bool):
            raise TypeError(f"boost must be a number, got {type(boost).__name__}")
        if not math.isfinite(boost):
            raise ValueError(f"boost must be a finite number (e.g. the paper's 100.0), got {boost!r}")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if mode != "naive" and not ps.is_fitted:
            ps.standardize(torch.zeros(1, ps.num_features), mode)  # raises the explanatory error
        x, y = ps._prepare(inputs, target)
        if reduce == "max_abs" and x.dim() < 2:
            raise ValueError("reduce='max_abs' needs inputs with a channel dim (N, C, ...)")
        if not x.is_floating_point():
            raise TypeError(f"inputs must be floating point to be differentiated, got {x.dtype}")
        target_profile = boosted_target(ps.standardize(ps.profiles(x, y), mode), k, float(boost), by)
        engine = ps.resolve_strategy()
        if engine == "vmap":
            sel, fixed = ps._fn.tensors()
            loss = ps._fn.sample_loss

            def cosine(x_i: Tensor, y_i: Tensor, t_i: Tensor) -> Tensor:
                s = ps._profile_from_grads(grad(loss)(sel, fixed, x_i, y_i))
                return F.cosine_similarity(ps.standardize(s, mode), t_i, dim=0)

            cs = ps.chunk_size if chunk_size is None else chunk_size
            attr = vmap(grad(cosine), chunk_size=cs)(x, y, target_profile)
        else:
            # the batched engine builds its per-sample gradients from differentiable operations
            # (unfold, einsum), so the profile's graph reaches the input (a double backward pass)
            attr = torch.zeros_like(x)
            cs = chunk_size or ps.chunk_size or 4
            for start in range(0, x.shape[0], cs):
                sl = slice(start, start + cs)
                with torch.enable_grad():
                    xs = x[sl].detach().requires_grad_(True)
                    z = ps.standardize(ps._compute(xs, y[sl], create_graph=True), mode)
                    cos = F.cosine_similarity(z, target_profile[sl], dim=1)
                    (attr[sl],) = torch.autograd.grad(cos.sum(), xs)
        attr = attr.detach()
        if reduce == "max_abs":
            attr = attr.abs().amax(dim=1, keepdim=True)
        return attr
