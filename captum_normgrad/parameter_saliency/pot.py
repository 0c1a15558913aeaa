r"""Extreme-value (peaks-over-threshold) parameter saliency (Wang & Sato).

Instead of assuming that a filter's naive saliency ``s_j`` is normally distributed over the data
(what standardisation implicitly does), model its upper tail. From the reference set's naive
profiles, per filter ``j``:

1. threshold ``t_j`` = the ``quantile`` (0.9) of the reference values;
2. peaks ``s - t_j`` of the reference values ``s > t_j``, ``N_t`` of them out of ``N``;
3. a generalized Pareto distribution (GPD) fitted to the peaks with
   ``scipy.stats.genpareto.fit(peaks, floc=0)`` (shape ``gamma``, scale ``sigma``).

A new sample's filter with ``s_j > t_j`` gets the tail probability

.. math::

    p_j = \frac{N_t}{N} \left(1 + \gamma \frac{s_j - t_j}{\sigma}\right)^{-1/\gamma}
    \qquad (\text{at } \gamma = 0:\ \tfrac{N_t}{N} e^{-(s_j - t_j)/\sigma}),

the estimated probability that a reference sample exceeds ``s_j``. Filters are ranked by
ascending ``p`` (most anomalous first); filters at or below their threshold are not ranked.

Filters without a usable tail model
-----------------------------------
A filter whose reference values have fewer than ``min_peaks`` peaks (typically: many ties at the
threshold, e.g. a filter whose gradient is exactly zero for most samples), or whose GPD fit fails
(non-finite or non-positive scale), has no fitted tail. ``no_peaks`` decides what such a filter
scores when a sample exceeds its threshold:

- ``"empirical"`` (default): the add-one empirical tail probability
  ``p = (#{reference values >= s} + 1) / (N + 1)``. With no peaks at all every reference value is
  ``<= t < s``, so ``p = 1 / (N + 1)``: "more extreme than anything seen, by an unknown margin".
  Such a filter ranks behind filters whose fitted tail says they are rarer than that, and ahead of
  those whose tail says they are commoner.
- ``"exclude"``: ``p`` is NaN; the filter is never ranked.
- ``"zero"``: ``p = 0``, the **reference implementation's behaviour** (it stores ``gamma = sigma =
  1e9`` and ``N_t = 0``, so the formula silently gives 0): such a filter outranks every fitted
  filter as soon as a sample exceeds its threshold.

Other differences from the reference implementation (Sooh317/POT-saliency), all selectable:

- threshold: ``threshold="interpolated"`` (default) is ``numpy.quantile``'s linear interpolation;
  ``"order_statistic"`` is the reference code's ``sorted(values)[int(quantile * N)]``.
- ``min_peaks``: the reference code fits any non-empty set of peaks (``min_peaks=1``); with a
  handful of peaks the GPD likelihood degenerates (``gamma`` far below -1), hence the default 5.
- fitting: ``scipy.stats.genpareto.fit(peaks, floc=0)`` (as specified) instead of the reference
  code's Grimshaw root search; both maximise the same likelihood, and agree to optimiser tolerance.
- ``gamma < 0`` bounds the GPD's support at ``t - sigma / gamma``; beyond it we return ``p = 0``
  (the reference formula raises a negative number to a fractional power there).

``POTScorer(no_peaks="zero", min_peaks=1, threshold="order_statistic")`` reproduces the reference
behaviour.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["POTScorer", "NO_PEAKS_POLICIES", "THRESHOLD_METHODS"]

#: What filters without a fitted tail score: see the module documentation.
NO_PEAKS_POLICIES = ("empirical", "exclude", "zero")
#: How thresholds are computed: ``numpy.quantile`` (linear) or the reference code's order statistic.
THRESHOLD_METHODS = ("interpolated", "order_statistic")

ArrayLike = Union[Tensor, np.ndarray]


def _to_numpy_2d(values: Any, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        arr = values.detach().cpu().to(torch.float64).numpy()
    elif isinstance(values, np.ndarray):
        arr = values.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(values).__name__}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (N, num_filters), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


class POTScorer:
    r"""
    Peaks-over-threshold scorer of naive parameter-saliency profiles (Wang & Sato).

    Args:

        quantile (float, optional): Quantile of the reference values used as threshold,
                    in (0, 1).
                    Default: 0.9
        no_peaks (str, optional): Score of filters without a fitted tail (fewer than
                    ``min_peaks`` peaks, or a failed fit): ``"empirical"``, ``"exclude"`` or
                    ``"zero"`` (the reference implementation). See the module documentation.
                    Default: ``"empirical"``
        min_peaks (int, optional): Fewest peaks a GPD is fitted to.
                    Default: 5
        threshold (str, optional): ``"interpolated"`` (``numpy.quantile``, linear) or
                    ``"order_statistic"`` (``sorted(values)[int(quantile * N)]``, the reference code).
                    Default: ``"interpolated"``
        progress (bool, optional): Show a tqdm progress bar while fitting.
                    Default: True

    Attributes (after :meth:`fit`):
        thresholds (Tensor): ``(F,)`` thresholds ``t_j``.
        n_peaks (Tensor): ``(F,)`` number of reference values above the threshold.
        gpd_shape (Tensor): ``(F,)`` fitted GPD shapes ``gamma`` (NaN where not fitted).
        gpd_scale (Tensor): ``(F,)`` fitted GPD scales ``sigma`` (NaN where not fitted).
        fitted (Tensor): ``(F,)`` bool, True where a GPD was fitted.
        n_reference (int): ``N``.

    Examples::

        >>> ps = ParameterSaliency(model).fit(reference_loader, keep_profiles=True)
        >>> pot = POTScorer().fit(ps.reference_profiles)
        >>> s = ps.profiles(images, labels)            # naive profiles
        >>> p = pot.tail_probability(s)                # (N, F), NaN where not ranked
        >>> ranking = pot.rank(s, k=10)                # list of (<= 10,) index tensors
    """

    def __init__(
        self,
        quantile: float = 0.9,
        no_peaks: str = "empirical",
        min_peaks: int = 5,
        threshold: str = "interpolated",
        progress: bool = True,
    ) -> None:
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"quantile must be a float in (0, 1), got {quantile!r}")
        if no_peaks not in NO_PEAKS_POLICIES:
            raise ValueError(f"no_peaks must be one of {list(NO_PEAKS_POLICIES)}, got {no_peaks!r}")
        if isinstance(min_peaks, bool) or not isinstance(min_peaks, int) or min_peaks < 1:
            raise ValueError(f"min_peaks must be a positive int, got {min_peaks!r}")
        if threshold not in THRESHOLD_METHODS:
            raise ValueError(f"threshold must be one of {list(THRESHOLD_METHODS)}, got {threshold!r}")
        self.quantile = float(quantile)
        self.no_peaks = no_peaks
        self.min_peaks = min_peaks
        self.threshold = threshold
        self.progress = bool(progress)
        self._t: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ fitting
    @property
    def is_fitted(self) -> bool:
        return self._t is not None

    def _thresholds(self, ref: np.ndarray) -> np.ndarray:
        if self.threshold == "interpolated":
            return np.quantile(ref, self.quantile, axis=0)
        idx = min(int(self.quantile * ref.shape[0]), ref.shape[0] - 1)
        return np.sort(ref, axis=0)[idx]

    def fit(self, reference_profiles: ArrayLike) -> "POTScorer":
        r"""
        Fit thresholds and per-filter GPDs to the reference set's naive profiles.

        Args:

            reference_profiles (Tensor or ndarray): ``(N, F)`` naive profiles of the reference
                        set (e.g. ``ParameterSaliency.fit(..., keep_profiles=True).reference_profiles``).

        Returns:
            *POTScorer*: ``self``.
        """
        from scipy.stats import genpareto
        from tqdm.auto import tqdm

        ref = _to_numpy_2d(reference_profiles, "reference_profiles")
        n, f = ref.shape
        if n < 2:
            raise ValueError(f"the reference set needs at least 2 samples, got {n}")
        t = self._thresholds(ref)
        gamma = np.full(f, np.nan)
        sigma = np.full(f, np.nan)
        n_peaks = np.zeros(f, dtype=np.int64)
        fitted = np.zeros(f, dtype=bool)
        for j in tqdm(range(f), desc="POT: GPD fits", unit="filter", disable=not self.progress):
            col = ref[:, j]
            peaks = col[col > t[j]] - t[j]
            n_peaks[j] = peaks.size
            if peaks.size < self.min_peaks:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    c, _, scale = genpareto.fit(peaks, floc=0)
                except Exception:  # noqa: BLE001 - a failed optimisation: no tail model for this filter
                    continue
            if np.isfinite(c) and np.isfinite(scale) and scale > 0:
                gamma[j], sigma[j], fitted[j] = float(c), float(scale), True
        self._t, self._gamma, self._sigma = t, gamma, sigma
        self._n_peaks, self._fitted, self._n = n_peaks, fitted, n
        # for the empirical fallback and for ordering filters below their threshold
        self._sorted_unfitted = {int(j): np.sort(ref[:, j]) for j in np.flatnonzero(~fitted)}
        spread = ref.std(axis=0, ddof=1)
        self._spread = np.where(spread > 0, spread, 1.0)
        return self

    def _require_fit(self) -> None:
        if self._t is None:
            raise ValueError("this POTScorer is not fitted: call fit(reference_profiles) first")

    def _fitted_t(self) -> np.ndarray:
        """The fitted thresholds (raises when not fitted)."""
        self._require_fit()
        assert self._t is not None
        return self._t

    # ------------------------------------------------------------------ results
    def _tensor(self, a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.array(a, copy=True))

    @property
    def thresholds(self) -> Tensor:
        self._require_fit()
        return self._tensor(self._fitted_t())

    @property
    def gpd_shape(self) -> Tensor:
        self._require_fit()
        return self._tensor(self._gamma)

    @property
    def gpd_scale(self) -> Tensor:
        self._require_fit()
        return self._tensor(self._sigma)

    @property
    def n_peaks(self) -> Tensor:
        self._require_fit()
        return self._tensor(self._n_peaks)

    @property
    def fitted(self) -> Tensor:
        self._require_fit()
        return self._tensor(self._fitted)

    @property
    def n_reference(self) -> int:
        self._require_fit()
        return int(self._n)

    @property
    def num_features(self) -> int:
        self._require_fit()
        return int(self._fitted_t().size)

    def _profiles(self, profiles: ArrayLike) -> np.ndarray:
        self._require_fit()
        arr = _to_numpy_2d(profiles, "profiles")
        if arr.shape[1] != self._fitted_t().size:
            raise ValueError(
                f"profiles have {arr.shape[1]} filters but the scorer was fitted on {self._fitted_t().size}; "
                "use naive profiles of the same model and aggregation"
            )
        return arr

    def tail_probability(self, profiles: ArrayLike) -> Tensor:
        r"""
        Tail probabilities ``p_j`` of naive profiles.

        Args:

            profiles (Tensor or ndarray): ``(N, F)`` (or ``(F,)``) naive profiles.

        Returns:
            *Tensor*: float64 ``(N, F)``; NaN where ``s_j <= t_j`` (not ranked) and, with
            ``no_peaks="exclude"``, for filters without a fitted tail.
        """
        from scipy.stats import genpareto

        s = self._profiles(profiles)
        z = s - self._fitted_t()[None, :]
        above = z > 0
        p = np.full(s.shape, np.nan)
        fit = self._fitted
        if fit.any():
            zf = np.where(above[:, fit], z[:, fit], 0.0)
            frac = self._n_peaks[fit] / self._n
            sf = genpareto.sf(zf, self._gamma[fit][None, :], loc=0.0, scale=self._sigma[fit][None, :])
            p[:, fit] = np.where(above[:, fit], frac[None, :] * sf, np.nan)
        for j, col in self._sorted_unfitted.items():
            rows = above[:, j]
            if not rows.any():
                continue
            if self.no_peaks == "zero":
                p[rows, j] = 0.0
            elif self.no_peaks == "empirical":
                n_ge = col.size - np.searchsorted(col, s[rows, j], side="left")
                p[rows, j] = (n_ge + 1.0) / (self._n + 1.0)
            # "exclude": stays NaN
        return torch.from_numpy(p)

    def order(self, profiles: ArrayLike) -> Tensor:
        r"""
        A full ordering of the filters of each sample, most anomalous first.

        Ranked filters (finite ``p``) come first by ascending ``p`` (ties keep index order), then
        the others by descending ``(s_j - t_j) / std_j`` (closest to or farthest above their
        threshold first), ``std_j`` the reference standard deviation. Used to take "top-k" and
        "least salient" sets of exactly ``k`` filters.

        Returns:
            *Tensor*: long ``(N, F)``.
        """
        s = self._profiles(profiles)
        p = self.tail_probability(s).numpy()
        margin = (s - self._fitted_t()[None, :]) / self._spread[None, :]
        ranked = np.isfinite(p)
        out = np.empty(s.shape, dtype=np.int64)
        for i in range(s.shape[0]):
            r = np.flatnonzero(ranked[i])
            u = np.flatnonzero(~ranked[i])
            r = r[np.argsort(p[i, r], kind="stable")]
            u = u[np.argsort(-margin[i, u], kind="stable")]
            out[i] = np.concatenate([r, u])
        return torch.from_numpy(out)

    def rank(self, profiles: ArrayLike, k: Optional[int] = None) -> List[Tensor]:
        r"""
        Ranked filters of each sample: ascending tail probability, only filters above threshold.

        Args:

            profiles (Tensor or ndarray): ``(N, F)`` naive profiles.
            k (int, optional): Keep at most ``k`` per sample. Default: None (all ranked)

        Returns:
            *list[Tensor]*: one long tensor per sample (lengths differ: filters at or below
            their threshold, and excluded filters, are not ranked).
        """
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive int, got {k!r}")
        s = self._profiles(profiles)
        p = self.tail_probability(s).numpy()
        out: List[Tensor] = []
        for i in range(s.shape[0]):
            r = np.flatnonzero(np.isfinite(p[i]))
            r = r[np.argsort(p[i, r], kind="stable")]
            out.append(torch.from_numpy(r[:k] if k is not None else r))
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict[str, Any]:
        self._require_fit()
        return {
            "config": {
                "quantile": self.quantile,
                "no_peaks": self.no_peaks,
                "min_peaks": self.min_peaks,
                "threshold": self.threshold,
            },
            "thresholds": self._tensor(self._fitted_t()),
            "shape": self._tensor(self._gamma),
            "scale": self._tensor(self._sigma),
            "n_peaks": self._tensor(self._n_peaks),
            "fitted": self._tensor(self._fitted),
            "spread": self._tensor(self._spread),
            "n_reference": int(self._n),
            "unfitted_index": torch.tensor(sorted(self._sorted_unfitted), dtype=torch.long),
            "unfitted_sorted": torch.from_numpy(
                np.stack([self._sorted_unfitted[j] for j in sorted(self._sorted_unfitted)])
                if self._sorted_unfitted
                else np.zeros((0, self._n))
            ),
        }

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "POTScorer":
        out = cls(**state["config"], progress=False)
        out._t = state["thresholds"].numpy().astype(np.float64)
        out._gamma = state["shape"].numpy().astype(np.float64)
        out._sigma = state["scale"].numpy().astype(np.float64)
        out._n_peaks = state["n_peaks"].numpy().astype(np.int64)
        out._fitted = state["fitted"].numpy().astype(bool)
        out._spread = state["spread"].numpy().astype(np.float64)
        out._n = int(state["n_reference"])
        idx = state["unfitted_index"].tolist()
        rows = state["unfitted_sorted"].numpy()
        out._sorted_unfitted = {int(j): rows[i] for i, j in enumerate(idx)}
        return out

    def __repr__(self) -> str:
        if self._t is None:
            return f"POTScorer(quantile={self.quantile}, no_peaks={self.no_peaks!r}, not fitted)"
        return (
            f"POTScorer(quantile={self.quantile}, no_peaks={self.no_peaks!r}, {self._t.size} filters, "
            f"{int(self._fitted.sum())} GPD fits, N={self._n})"
        )
