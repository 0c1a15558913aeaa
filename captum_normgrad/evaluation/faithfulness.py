r"""Deletion and insertion curves (Petsiuk et al., RISE, 2018) and their areas under the curve.

Pixels are ranked by the map (upsampled bilinearly to the input, channels summed), most
important first; ties go to the lower row-major index. At step ``k`` of ``n_steps`` the first
``floor(k * P / n_steps)`` of the ``P`` pixels are

* **deleted**: replaced by the baseline in every channel (deletion curve; a good map makes the
  score fall fast, low AUC is better), or
* **inserted**: copied from the image into the baseline (insertion curve; a good map makes the
  score rise fast, high AUC is better).

The score is the softmax probability of the target class (``score="softmax"``), its logit
(``"logit"``) or any ``callable(outputs, target) -> (N,)``. The AUC is the trapezoidal area over the
fraction of pixels changed, in ``[0, 1]``. Signed maps are fine: only their ordering is used.

The model is called under ``torch.no_grad``; its parameters, buffers and mode are left as they
are (buffers a forward pass in training mode would update are restored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from captum._utils.common import _format_additional_forward_args, _select_targets
from captum._utils.typing import TargetType
from torch import Tensor
from tqdm.auto import tqdm

from .._capture import owning_module, preserve_module_state
from .._maps import reduce_map_channels, resize_maps
from .._targets import normalize_target

__all__ = ["FaithfulnessCurve", "deletion_curve", "insertion_curve", "blur_baseline"]

Baseline = Union[float, Tensor, str, Callable[[Tensor], Tensor]]
ScoreFn = Union[str, Callable[[Tensor, Any], Tensor]]


@dataclass
class FaithfulnessCurve:
    r"""A deletion or insertion curve.

    Attributes:
        kind (str): ``"deletion"`` or ``"insertion"``.
        fractions (Tensor): ``(S + 1,)`` fraction of pixels deleted/inserted at each step.
        scores (Tensor): ``(N, S + 1)`` model score at each step.
        auc (Tensor): ``(N,)`` trapezoidal area under ``scores`` over ``fractions``.

    Examples::

        >>> curve = deletion_curve(net, x, maps, target=3)
        >>> curve.scores.shape, curve.auc, curve.mean_auc()
    """

    kind: str
    fractions: Tensor
    scores: Tensor
    auc: Tensor

    def mean_auc(self) -> float:
        """Mean AUC over the batch."""
        return float(self.auc.mean())


def blur_baseline(inputs: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    r"""A Gaussian-blurred copy of the images (the insertion baseline of RISE).

    Args:
        inputs (Tensor): ``(N, C, H, W)`` images.
        kernel_size (int, optional): odd kernel size (reduced to fit small images). Default: 11
        sigma (float, optional): Gaussian standard deviation in pixels. Default: 5.0

    Returns:
        Tensor: the blurred images, same shape.

    Examples::

        >>> blur_baseline(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """
    if inputs.dim() != 4:
        raise ValueError(f"blur_baseline needs (N, C, H, W) images, got {tuple(inputs.shape)}")
    k = min(kernel_size, 2 * (min(inputs.shape[-2:]) // 2) - 1 if min(inputs.shape[-2:]) > 1 else 1)
    k = max(k, 1)
    r = torch.arange(k, dtype=inputs.dtype, device=inputs.device) - (k - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    c = inputs.shape[1]
    x = F.pad(inputs, (k // 2,) * 4, mode="reflect") if k > 1 else inputs
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return x


def _score(outputs: Tensor, target: TargetType, score: ScoreFn) -> Tensor:
    if callable(score):
        return torch.as_tensor(score(outputs, target)).reshape(outputs.shape[0])
    if score in ("softmax", "logit"):
        # the package's one target rule: negative indices, 1-tuples, bool tensors refused
        target = normalize_target(outputs.shape, target)
    if score == "softmax":
        return _select_targets(torch.softmax(outputs, dim=1), target)
    if score == "logit":
        return _select_targets(outputs, target)
    raise ValueError(f"unknown score {score!r}; choose 'softmax', 'logit' or a callable(outputs, target)")


def _resolve_baseline(baseline: Baseline, inputs: Tensor) -> Tensor:
    if isinstance(baseline, str):
        if baseline != "blur":
            raise ValueError(f"unknown baseline {baseline!r}; use 'blur', a number, a tensor or a callable")
        return blur_baseline(inputs)
    if callable(baseline):
        b = baseline(inputs)
    elif isinstance(baseline, Tensor):
        b = baseline.to(inputs.device, inputs.dtype)
    elif isinstance(baseline, (int, float)):
        b = torch.full_like(inputs, float(baseline))
    else:
        raise TypeError(f"baseline must be a number, a Tensor, 'blur' or a callable, got {type(baseline).__name__}")
    try:
        return torch.broadcast_to(b, inputs.shape).to(inputs.dtype)
    except RuntimeError as err:
        raise ValueError(
            f"baseline of shape {tuple(b.shape)} does not broadcast to inputs {tuple(inputs.shape)}"
        ) from err


def _per_sample_target(target: TargetType, n: int) -> Optional[list]:
    """``None`` when one target applies to every sample, else a list with one target per sample."""
    if target is None or isinstance(target, (int, tuple)):
        return None
    if isinstance(target, Tensor):
        if target.numel() == 1:
            return None
        target = target.flatten().tolist()
    if not isinstance(target, list):
        raise TypeError(f"target must be an int, a tuple, a list or a Tensor, got {type(target).__name__}")
    if len(target) != n:
        raise ValueError(f"target has {len(target)} entries for {n} samples; give one target per sample")
    return list(target)


def _curve(
    kind: str,
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    maps: Tensor,
    target: TargetType,
    n_steps: int,
    baseline: Baseline,
    score: ScoreFn,
    additional_forward_args: Any,
    batch_size: int,
    interpolate_mode: str,
    show_progress: bool,
) -> FaithfulnessCurve:
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError(
            f"{kind}_curve needs a single (N, C, H, W) image tensor as inputs, got "
            f"{type(inputs).__name__ if not isinstance(inputs, Tensor) else tuple(inputs.shape)}"
        )
    if isinstance(maps, list):
        raise ValueError("got a list of maps (several layers); fuse them first with captum_normgrad.fuse_maps")
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a Tensor, got {type(maps).__name__}")
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4:
        raise ValueError(f"maps must have shape (N, 1, h, w), (N, h, w) or (N, C, H, W), got {tuple(maps.shape)}")
    if maps.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"batch sizes differ: {maps.shape[0]} maps for {inputs.shape[0]} inputs; compute the maps on these inputs"
        )
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n, c, h, w = inputs.shape
    p = h * w
    m = resize_maps(reduce_map_channels(maps.detach(), "sum"), (h, w), interpolate_mode)[:, 0].reshape(n, p)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("maps contain NaN or Inf values")
    order = torch.argsort(-m.double(), dim=1, stable=True)  # most important first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(p, device=order.device).expand(n, p))
    counts = torch.tensor([(k * p) // n_steps for k in range(n_steps + 1)], device=inputs.device)
    x = inputs.detach()
    base = _resolve_baseline(baseline, x)
    start, other = (x, base) if kind == "deletion" else (base, x)
    add_args = _format_additional_forward_args(additional_forward_args)
    per_target = _per_sample_target(target, n)
    model = owning_module(forward_func)
    scores = torch.empty(n, n_steps + 1, dtype=torch.float64)
    pairs = [(i, k) for i in range(n) for k in range(n_steps + 1)]
    with torch.no_grad(), preserve_module_state(model):
        for lo in tqdm(range(0, len(pairs), batch_size), desc=f"{kind} curve", disable=not show_progress):
            chunk = pairs[lo : lo + batch_size]
            idx = torch.tensor([i for i, _ in chunk], device=inputs.device)
            ks = torch.tensor([k for _, k in chunk], device=inputs.device)
            changed = (rank[idx] < counts[ks][:, None]).reshape(len(chunk), 1, h, w)
            batch = torch.where(changed, other[idx], start[idx])
            args = (
                ()
                if add_args is None
                else tuple(a[idx] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n else a for a in add_args)
            )
            out = forward_func(batch, *args)
            tgt = target if per_target is None else [per_target[i] for i, _ in chunk]
            s = _score(out, tgt, score)
            scores[idx.cpu(), ks.cpu()] = s.detach().double().cpu().reshape(-1)
    fractions = counts.double().cpu() / p
    auc = torch.trapezoid(scores, fractions, dim=1)
    return FaithfulnessCurve(kind, fractions, scores, auc)


def deletion_curve(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    maps: Tensor,
    target: TargetType = None,
    n_steps: int = 16,
    baseline: Baseline = 0.0,
    score: ScoreFn = "softmax",
    additional_forward_args: Any = None,
    batch_size: int = 64,
    interpolate_mode: str = "bilinear",
    show_progress: bool = False,
) -> FaithfulnessCurve:
    r"""Deletion curve: delete pixels, most important first, and follow the target score.

    Args:
        forward_func (Callable): the model (or any function of the inputs returning ``(N, K)``).
        inputs (Tensor): ``(N, C, H, W)`` images.
        maps (Tensor): ``(N, 1, h, w)``, ``(N, h, w)`` or input-shaped ``(N, C, H, W)`` maps
                    (channels summed), from any attribution method.
        target (int, list, or Tensor, optional): target class(es), as in Captum. Default: None
        n_steps (int, optional): number of deletion steps (``n_steps + 1`` points). Default: 16
        baseline (float, Tensor, str, or Callable, optional): value given to deleted pixels: a
                    number, a tensor broadcastable to the inputs, ``"blur"`` (a blurred copy) or a
                    callable of the inputs. Default: 0.0
        score (str or Callable, optional): ``"softmax"``, ``"logit"`` or
                    ``callable(outputs, target) -> (N,)``. Default: ``"softmax"``
        additional_forward_args (Any, optional): extra arguments of ``forward_func``; tensors with
                    one row per sample are indexed along with the inputs. Default: None
        batch_size (int, optional): forward-pass batch size. Default: 64
        interpolate_mode (str, optional): map upsampling mode. Default: ``"bilinear"``
        show_progress (bool, optional): tqdm progress bar. Default: False

    Returns:
        FaithfulnessCurve: fractions, scores and AUC (lower is better for deletion).

    Examples::

        >>> maps = LayerNormGrad(net, net.conv4).attribute(x, target=3)
        >>> curve = deletion_curve(net, x, maps, target=3, n_steps=20)
        >>> curve.auc            # (N,)
    """
    return _curve(
        "deletion",
        forward_func,
        inputs,
        maps,
        target,
        n_steps,
        baseline,
        score,
        additional_forward_args,
        batch_size,
        interpolate_mode,
        show_progress,
    )


def insertion_curve(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    maps: Tensor,
    target: TargetType = None,
    n_steps: int = 16,
    baseline: Baseline = "blur",
    score: ScoreFn = "softmax",
    additional_forward_args: Any = None,
    batch_size: int = 64,
    interpolate_mode: str = "bilinear",
    show_progress: bool = False,
) -> FaithfulnessCurve:
    r"""Insertion curve: start from the baseline and insert pixels, most important first.

    Arguments as in :func:`deletion_curve`; the default baseline is a blurred copy of the image
    (RISE). Higher AUC is better.

    Returns:
        FaithfulnessCurve: fractions, scores and AUC.

    Examples::

        >>> maps = LayerGradCam(net, net.conv4).attribute(x, target=3, relu_attributions=True)
        >>> insertion_curve(net, x, maps, target=3).auc
    """
    return _curve(
        "insertion",
        forward_func,
        inputs,
        maps,
        target,
        n_steps,
        baseline,
        score,
        additional_forward_args,
        batch_size,
        interpolate_mode,
        show_progress,
    )
