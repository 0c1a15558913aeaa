r"""Localisation metrics: the pointing game (TorchRay protocol) and the energy-based pointing game.

Both take maps from any attribution method (layer maps ``(N, 1, h, w)``, or input-shaped maps
``(N, C, H, W)`` whose channels are summed) and ground-truth masks ``(N, H, W)`` at image
resolution. Maps are upsampled bilinearly to the mask size first.

Pointing game (Zhang et al., "Top-down neural attention by excitation backprop"; TorchRay
protocol): the point is the argmax of the upsampled map (first maximum in row-major order, as
``torch.argmax``); it is a hit when some mask pixel lies strictly within ``tolerance`` pixels
(Euclidean, ``d^2 < tolerance^2``) of the point. The score is the mean over classes of the
per-class hit rate. TorchRay averages over all ``num_classes`` of the dataset; here the mean is
over the classes present in ``labels`` (the same number when every class occurs).

Energy-based pointing game (Wang et al., Score-CAM): the fraction of the map's positive mass that
falls inside the mask (or box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._maps import reduce_map_channels, resize_maps

__all__ = [
    "PointingGameResult",
    "boxes_to_masks",
    "energy_pointing_game",
    "pointing_accuracy",
    "pointing_game",
    "pointing_game_hits",
    "pointing_points",
]

_NEGATIVE_CHOICES = ("raise", "clip", "abs")


def _check_maps(maps: Tensor, name: str = "maps") -> Tensor:
    if not isinstance(maps, Tensor):
        raise TypeError(
            f"{name} must be a Tensor of shape (N, 1, h, w), got {type(maps).__name__}"
            + ("; a list means several layers: fuse them first with captum_normgrad.fuse_maps" if isinstance(maps, list) else "")
        )
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4:
        raise ValueError(f"{name} must have shape (N, 1, h, w) or (N, h, w), got {tuple(maps.shape)}")
    if maps.is_floating_point() and not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{name} contain NaN or Inf values; clean them (e.g. torch.nan_to_num) first")
    return reduce_map_channels(maps.float() if not maps.is_floating_point() else maps, "sum")


def _check_tolerance(tolerance: float) -> None:
    # NaN compares False with everything: without the isfinite check ``tolerance=nan`` passed and
    # made every sample a miss (``d2 < nan`` is False), a silent wrong score
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0 (pixels), got {tolerance!r}")


def _check_masks(masks: Tensor, n: int) -> Tensor:
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a Tensor of shape (N, H, W), got {type(masks).__name__}")
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(
                f"masks must have shape (N, H, W) or (N, 1, H, W), got {tuple(masks.shape)}; "
                "give one binary mask per explained map"
            )
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(
            f"masks must have shape (N, H, W) or (N, 1, H, W), got {tuple(masks.shape)}; "
            "give one binary mask per explained map (use boxes_to_masks for boxes)"
        )
    if masks.shape[0] != n:
        raise ValueError(
            f"batch sizes differ: {n} maps but {masks.shape[0]} masks; give one mask per map "
            "(the mask of the class that map explains)"
        )
    if masks.dtype != torch.bool:
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError("masks must be boolean or contain only 0 and 1")
        masks = masks.bool()
    return masks


def _negative_policy(maps: Tensor, negative: str, metric: str) -> Tensor:
    if negative not in _NEGATIVE_CHOICES:
        raise ValueError(f"unknown negative {negative!r}; choose one of {', '.join(map(repr, _NEGATIVE_CHOICES))}")
    if negative == "clip":
        return maps.clamp(min=0)
    if negative == "abs":
        return maps.abs()
    if bool((maps < 0).any()):
        raise ValueError(
            f"{metric} needs non-negative maps, but these maps have negative values (a signed method, "
            "e.g. LayerGradientXActivation, LayerGradCam without relu_attributions=True, or NormGrad with "
            "aggregation='sum'/'max'); pass negative='clip' to keep the positive part (the Score-CAM "
            "definition) or negative='abs' to use magnitudes"
        )
    return maps


def pointing_points(maps: Tensor, size: Sequence[int], interpolate_mode: str = "bilinear") -> Tensor:
    r"""The pointing-game point of each map: the argmax after upsampling to ``size``.

    Args:
        maps (Tensor): ``(N, 1, h, w)`` or ``(N, h, w)`` maps (channels are summed if ``C > 1``).
        size (tuple of int): image size ``(H, W)``.
        interpolate_mode (str, optional): upsampling mode. Default: ``"bilinear"``

    Returns:
        Tensor: ``(N, 2)`` long tensor of ``(row, column)`` points; ties go to the first maximum in
        row-major order.

    Examples::

        >>> m = torch.zeros(1, 1, 4, 4); m[0, 0, 1, 2] = 1.0
        >>> pointing_points(m, (4, 4))
        tensor([[1, 2]])
    """
    m = _check_maps(maps)
    up = resize_maps(m, size, interpolate_mode)[:, 0]
    w = up.shape[-1]
    idx = up.reshape(up.shape[0], -1).argmax(dim=1)
    return torch.stack((idx // w, idx % w), dim=1)


def pointing_game_hits(
    maps: Tensor,
    masks: Tensor,
    tolerance: float = 15,
    interpolate_mode: str = "bilinear",
) -> Tensor:
    r"""Hit or miss of each map in the pointing game (TorchRay protocol).

    The map is upsampled to the mask size, its argmax is the point, and it is a hit when a mask
    pixel lies at Euclidean distance strictly below ``tolerance`` pixels from the point.

    Args:
        maps (Tensor): ``(N, 1, h, w)`` or ``(N, h, w)`` maps, signed maps allowed (only the argmax
                    matters).
        masks (Tensor): ``(N, H, W)`` or ``(N, 1, H, W)`` boolean (or 0/1) ground-truth masks of the
                    explained class, at image resolution.
        tolerance (float, optional): tolerance in pixels. ``0`` demands the point itself be inside
                    the mask. Default: 15
        interpolate_mode (str, optional): upsampling mode. Default: ``"bilinear"``

    Returns:
        Tensor: ``(N,)`` boolean hits.

    Raises:
        ValueError: wrong map or mask shapes, different batch sizes, an empty mask, a negative
                    tolerance.

    Examples::

        >>> maps = torch.zeros(1, 1, 8, 8); maps[0, 0, 6, 6] = 1.0
        >>> mask = torch.zeros(1, 64, 64, dtype=torch.bool); mask[0, :20, :20] = True
        >>> pointing_game_hits(maps, mask)
        tensor([False])
    """
    m = _check_maps(maps)
    mk = _check_masks(masks, m.shape[0])
    _check_tolerance(tolerance)
    empty = (~mk.reshape(mk.shape[0], -1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"masks of samples {empty} are empty; the pointing game needs the explained class to be "
            "present (drop those samples)"
        )
    points = pointing_points(m, mk.shape[-2:], interpolate_mode)
    h, w = mk.shape[-2:]
    rows = torch.arange(h, dtype=torch.float64)
    cols = torch.arange(w, dtype=torch.float64)
    hits = []
    for i in range(mk.shape[0]):
        d2 = (rows[:, None] - float(points[i, 0])) ** 2 + (cols[None, :] - float(points[i, 1])) ** 2
        accept = d2 < float(tolerance) ** 2 if tolerance > 0 else d2 == 0
        hits.append(bool((accept & mk[i].cpu()).any()))
    return torch.tensor(hits, dtype=torch.bool)


def pointing_accuracy(hits: Tensor, labels: Optional[Union[Tensor, Sequence[int]]] = None) -> Tuple[float, Dict[int, float]]:
    r"""Mean over classes of the per-class hit rate (TorchRay aggregation).

    Use it to aggregate hits collected over a dataset, batch after batch.

    Args:
        hits (Tensor): ``(N,)`` booleans from :func:`pointing_game_hits`.
        labels (Tensor or sequence of int, optional): class of each explained map; ``None``
                    counts everything as one class (plain hit rate). Default: None

    Returns:
        tuple: ``(accuracy, class_accuracies)``, the mean of the per-class hit rates and a dict
        class -> hit rate.

    Examples::

        >>> pointing_accuracy(torch.tensor([True, False, True]), [0, 0, 1])
        (0.75, {0: 0.5, 1: 1.0})
    """
    h = torch.as_tensor(hits).bool().flatten()
    if h.numel() == 0:
        raise ValueError("no hits to aggregate")
    lab = torch.zeros_like(h, dtype=torch.long) if labels is None else torch.as_tensor(labels).long().flatten()
    if lab.numel() != h.numel():
        raise ValueError(f"got {lab.numel()} labels for {h.numel()} hits; give one class per explained map")
    per: Dict[int, float] = {}
    for c in sorted(set(lab.tolist())):
        sel = h[lab == c]
        per[int(c)] = float(sel.float().mean())
    return float(sum(per.values()) / len(per)), per


@dataclass
class PointingGameResult:
    r"""Result of :func:`pointing_game`.

    Attributes:
        accuracy (float): mean over classes of the per-class hit rate.
        class_accuracies (dict[int, float]): hit rate of each class.
        hits (Tensor): ``(N,)`` booleans.
        points (Tensor): ``(N, 2)`` ``(row, column)`` points at mask resolution.
        tolerance (float): the tolerance used, in pixels.

    Examples::

        >>> result = pointing_game(maps, masks, labels)
        >>> result.accuracy, result.class_accuracies, result.hits
    """

    accuracy: float
    class_accuracies: Dict[int, float]
    hits: Tensor
    points: Tensor
    tolerance: float = 15.0
    labels: Optional[Tensor] = field(default=None, repr=False)


def pointing_game(
    maps: Tensor,
    masks: Tensor,
    labels: Optional[Union[Tensor, Sequence[int]]] = None,
    tolerance: float = 15,
    interpolate_mode: str = "bilinear",
) -> PointingGameResult:
    r"""Pointing game with the TorchRay protocol.

    For each explained (image, class) pair: upsample the map (bilinear) to the mask, take its
    argmax, count a hit when it is within ``tolerance`` pixels of the class mask; the score is
    the mean over classes of the per-class hit rate.

    Args:
        maps (Tensor): ``(N, 1, h, w)`` or ``(N, h, w)`` maps, one per (image, class) pair.
        masks (Tensor): ``(N, H, W)`` masks of the explained class in each image.
        labels (Tensor or sequence of int, optional): explained class of each map; ``None`` means
                    one class. Default: None
        tolerance (float, optional): tolerance in pixels. Default: 15
        interpolate_mode (str, optional): upsampling mode. Default: ``"bilinear"``

    Returns:
        PointingGameResult: accuracy, per-class accuracies, hits and points.

    Examples::

        >>> maps = LayerNormGrad(net, net.layer2).attribute(images, target=labels)
        >>> result = pointing_game(maps, masks, labels)
        >>> result.accuracy
    """
    m = _check_maps(maps)
    hits = pointing_game_hits(m, masks, tolerance, interpolate_mode)
    mk = _check_masks(masks, m.shape[0])
    acc, per = pointing_accuracy(hits, labels)
    lab = None if labels is None else torch.as_tensor(labels).long().flatten()
    return PointingGameResult(acc, per, hits, pointing_points(m, mk.shape[-2:], interpolate_mode), float(tolerance), lab)


def boxes_to_masks(boxes: Union[Tensor, Sequence[Tensor]], size: Sequence[int]) -> Tensor:
    r"""Boolean masks from bounding boxes (the union of each sample's boxes).

    Args:
        boxes (Tensor or sequence of Tensor): ``(N, 4)`` (one box per sample) or a list of
                    ``(K_i, 4)`` tensors; boxes are ``(x0, y0, x1, y1)`` in pixels, ``x1`` and ``y1``
                    exclusive, clipped to the image.
        size (tuple of int): ``(H, W)``.

    Returns:
        Tensor: ``(N, H, W)`` boolean masks.

    Examples::

        >>> boxes_to_masks(torch.tensor([[1, 0, 3, 2]]), (3, 4)).int()
        tensor([[[0, 1, 1, 0],
                 [0, 1, 1, 0],
                 [0, 0, 0, 0]]], dtype=torch.int32)
    """
    h, w = int(size[0]), int(size[1])
    per_sample: List[Tensor]
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4) as (x0, y0, x1, y1), got {tuple(boxes.shape)}")
        per_sample = [b[None] for b in boxes]
    else:
        per_sample = [torch.as_tensor(b).reshape(-1, 4) for b in boxes]
    out = torch.zeros(len(per_sample), h, w, dtype=torch.bool)
    for i, bs in enumerate(per_sample):
        for b in bs.tolist():
            x0, y0, x1, y1 = (int(round(v)) for v in b)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"box {b} of sample {i} is empty; boxes are (x0, y0, x1, y1) with x1 > x0, y1 > y0")
            out[i, max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] = True
    return out


def energy_pointing_game(
    maps: Tensor,
    masks: Tensor,
    negative: str = "raise",
    interpolate_mode: str = "bilinear",
) -> Tensor:
    r"""Energy-based pointing game: the fraction of the map's mass inside the mask.

    ``E = sum_{u in mask} m_u / sum_u m_u`` on the map upsampled (bilinear) to the mask size.
    The measure needs non-negative maps. By default a map with negative values raises
    ``ValueError`` rather than silently changing the method; ``negative="clip"`` keeps the
    positive part (the Score-CAM definition, "positive mass") and ``negative="abs"`` uses
    magnitudes. The sign is checked on the maps as given, before upsampling. A map with no
    (positive) mass at all scores 0.

    Args:
        maps (Tensor): ``(N, 1, h, w)`` or ``(N, h, w)`` maps.
        masks (Tensor): ``(N, H, W)`` boolean masks (see :func:`boxes_to_masks` for boxes).
        negative (str, optional): ``"raise"``, ``"clip"`` or ``"abs"``. Default: ``"raise"``
        interpolate_mode (str, optional): upsampling mode. Default: ``"bilinear"``

    Returns:
        Tensor: ``(N,)`` fractions in ``[0, 1]``.

    Examples::

        >>> maps = torch.tensor([[[[1.0, 3.0], [0.0, 0.0]]]])
        >>> mask = torch.tensor([[[False, True], [False, False]]])
        >>> energy_pointing_game(maps, mask)
        tensor([0.7500])
    """
    m = _check_maps(maps)
    mk = _check_masks(masks, m.shape[0])
    m = _negative_policy(m, negative, "energy_pointing_game")
    up = resize_maps(m.double(), mk.shape[-2:], interpolate_mode)[:, 0].clamp(min=0)
    total = up.reshape(up.shape[0], -1).sum(1)
    inside = (up * mk.to(up.device, up.dtype)).reshape(up.shape[0], -1).sum(1)
    frac = torch.where(total > 0, inside / total.clamp(min=torch.finfo(up.dtype).tiny), torch.zeros_like(total))
    return frac.to(maps.dtype if maps.is_floating_point() else torch.float32)
