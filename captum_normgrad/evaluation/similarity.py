r"""Similarity measures between two maps (Adebayo et al.'s four), shared by the sanity checks and
the figures: :mod:`captum_normgrad.evaluation.sanity` and :mod:`captum_normgrad.viz` both import
them from here and never each other.

* ``"spearman_abs"``: Spearman rank correlation of the absolute maps (clipped at their 99th
  percentile and scaled to ``[0, 1]``: :func:`normalize_abs`);
* ``"spearman"``: Spearman rank correlation of the signed maps;
* ``"ssim"``: structural similarity of the ``[0, 1]`` absolute maps (:mod:`skimage.metrics`);
* ``"hog_spearman"``: Spearman rank correlation of the HOG features of the ``[0, 1]`` absolute maps.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from torch import Tensor

__all__ = ["MEASURES", "map_similarity", "normalize_abs", "spearman_rho"]

MEASURES: Tuple[str, ...] = ("spearman_abs", "spearman", "ssim", "hog_spearman")


def spearman_rho(a: Union[np.ndarray, Tensor], b: Union[np.ndarray, Tensor]) -> float:
    r"""Spearman's rank correlation rho of two arrays (flattened); NaN if either is constant.

    Ties get average ranks. Only rho is returned, never a p-value.

    Args:
        a (ndarray or Tensor): first array.
        b (ndarray or Tensor): second array, same number of elements.

    Returns:
        float: rho in ``[-1, 1]``, or NaN.

    Examples::

        >>> spearman_rho(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 15.0]))
        0.5
    """
    from scipy.stats import rankdata

    x = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64).ravel()
    y = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"arrays have different sizes: {x.size} and {y.size}")
    rx = rankdata(x) - (x.size + 1) / 2.0
    ry = rankdata(y) - (y.size + 1) / 2.0
    den = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    if den == 0.0:
        return float("nan")
    return float(np.clip((rx * ry).sum() / den, -1.0, 1.0))


def normalize_abs(m: Union[np.ndarray, Tensor], percentile: float = 99.0) -> np.ndarray:
    r"""Absolute map clipped at its ``percentile``-th percentile and scaled to ``[0, 1]``.

    The visualisation normalisation of Adebayo et al.; an all-zero map stays all zero.

    Args:
        m (ndarray or Tensor): a map (any shape).
        percentile (float, optional): clipping percentile. Default: 99.0

    Returns:
        ndarray: float64 array of the same shape in ``[0, 1]``.

    Examples::

        >>> normalize_abs(np.array([-2.0, 1.0, 0.0]), percentile=100)
        array([1. , 0.5, 0. ])
    """
    a = np.abs(np.asarray(m.detach().cpu() if isinstance(m, Tensor) else m, dtype=np.float64))
    hi = float(np.percentile(a, percentile)) if a.size else 0.0
    if hi <= 0.0:
        hi = float(a.max()) if a.size else 0.0
    if hi <= 0.0:
        return np.zeros_like(a)
    return np.clip(a, 0.0, hi) / hi


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    if a.ndim != 2:
        return float("nan")
    side = min(a.shape)
    win = min(7, side if side % 2 == 1 else side - 1)
    if win < 3:
        return float("nan")
    return float(structural_similarity(a, b, data_range=1.0, win_size=win))


def _hog_pixels_per_cell(shape: Sequence[int]) -> int:
    side = min(shape)
    return 8 if side >= 32 else max(1, side // 4)


def _hog_rho(a: np.ndarray, b: np.ndarray, pixels_per_cell: Optional[int]) -> float:
    from skimage.feature import hog

    if a.ndim != 2:
        return float("nan")
    ppc = _hog_pixels_per_cell(a.shape) if pixels_per_cell is None else int(pixels_per_cell)
    if min(a.shape) < 2 * ppc:
        return float("nan")
    kw = dict(orientations=9, pixels_per_cell=(ppc, ppc), cells_per_block=(2, 2), feature_vector=True)
    return spearman_rho(hog(a, **kw), hog(b, **kw))


def map_similarity(
    original: Union[np.ndarray, Tensor],
    other: Union[np.ndarray, Tensor],
    hog_pixels_per_cell: Optional[int] = None,
) -> Dict[str, float]:
    r"""The four similarity measures of Adebayo et al. between two single-channel maps.

    Args:
        original (ndarray or Tensor): ``(H, W)`` map (any shape for the Spearman measures; SSIM
                    and HOG need 2-D maps and are NaN otherwise).
        other (ndarray or Tensor): map of the same shape.
        hog_pixels_per_cell (int, optional): HOG cell size; ``None`` uses 8 for maps of side
                    >= 32 and ``side // 4`` below. Default: None

    Returns:
        dict[str, float]: ``{"spearman_abs", "spearman", "ssim", "hog_spearman"}`` values.

    Examples::

        >>> a = np.random.rand(32, 32)
        >>> map_similarity(a, a)["spearman"]
        1.0
    """
    a = np.asarray(original.detach().cpu() if isinstance(original, Tensor) else original, dtype=np.float64)
    b = np.asarray(other.detach().cpu() if isinstance(other, Tensor) else other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps have different shapes {a.shape} and {b.shape}; resize them to a common size first")
    na, nb = normalize_abs(a), normalize_abs(b)
    return {
        "spearman_abs": spearman_rho(na, nb),
        "spearman": spearman_rho(a, b),
        "ssim": _ssim(na, nb),
        "hog_spearman": _hog_rho(na, nb, hog_pixels_per_cell),
    }
