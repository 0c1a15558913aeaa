"""Welford running statistics of saliency profiles, mergeable across processes (one merge for the package)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Union

import torch
from torch import Tensor

__all__ = ["SIGMA_FLOOR", "WelfordState", "merge_welford"]

#: Standard deviations (and, in ``"norm"`` mode, means) at or below this are replaced by 1.
SIGMA_FLOOR: float = 1e-14


# --------------------------------------------------------------------------- Welford statistics


class WelfordState:
    r"""Running count, mean and sum of squared deviations of profile vectors (float64).

    Mergeable: states computed on disjoint shards of a reference set combine exactly (Chan et al.'s
    parallel update) with :meth:`merge`, in any order, so that statistics can be computed on several
    processes and combined (e.g. ``torch.distributed.all_gather`` of :meth:`pack` ed states followed
    by :func:`merge_welford`).

    Args:
        num_features (int): Length of the profile vectors.
        device (torch.device or str, optional): Where the float64 statistics live.
                    Default: ``"cpu"``
    """

    def __init__(self, num_features: int, device: Union[str, torch.device] = "cpu") -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.count: int = 0
        self.mean: Tensor = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.m2: Tensor = torch.zeros(num_features, dtype=torch.float64, device=device)

    @property
    def num_features(self) -> int:
        return int(self.mean.numel())

    def __repr__(self) -> str:
        return f"WelfordState(num_features={self.num_features}, count={self.count})"

    def update(self, batch: Tensor) -> "WelfordState":
        """Add a batch of profiles ``(B, num_features)`` (in place; returns ``self``)."""
        if not isinstance(batch, Tensor):
            raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
        b = batch.detach().to(device=self.mean.device, dtype=torch.float64)
        if b.dim() == 1:
            b = b.unsqueeze(0)
        if b.dim() != 2 or b.shape[1] != self.num_features:
            raise ValueError(
                f"batch must have shape (B, {self.num_features}), got {tuple(batch.shape)}; pass profiles "
                "computed for the same model and aggregation"
            )
        if not bool(torch.isfinite(b).all()):
            raise ValueError("batch contains NaN or Inf profiles; check the model and the inputs")
        n_b = b.shape[0]
        if n_b == 0:
            return self
        mean_b = b.mean(0)
        m2_b = ((b - mean_b) ** 2).sum(0)
        self._combine(n_b, mean_b, m2_b)
        return self

    def _combine(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        n_a = self.count
        n = n_a + n_b
        if n_a == 0:
            self.mean = mean_b.clone()
            self.m2 = m2_b.clone()
        else:
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (n_b / n)
            self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b / n)
        self.count = n

    def merge(self, other: "WelfordState") -> "WelfordState":
        """A new state equal to the statistics of both states' samples together."""
        if not isinstance(other, WelfordState):
            raise TypeError(f"can only merge a WelfordState, got {type(other).__name__}")
        if other.num_features != self.num_features:
            raise ValueError(
                f"cannot merge states of {self.num_features} and {other.num_features} features "
                "(different models or aggregations)"
            )
        out = self.copy()
        if other.count:
            out._combine(other.count, other.mean.to(out.mean.device), other.m2.to(out.mean.device))
        return out

    def __add__(self, other: "WelfordState") -> "WelfordState":
        return self.merge(other)

    def copy(self) -> "WelfordState":
        out = WelfordState(self.num_features, self.mean.device)
        out.count, out.mean, out.m2 = self.count, self.mean.clone(), self.m2.clone()
        return out

    def variance(self) -> Tensor:
        """Unbiased variance ``m2 / (count - 1)`` (needs ``count >= 2``)."""
        if self.count < 2:
            raise ValueError(
                f"the unbiased variance needs at least 2 reference samples, got {self.count}; "
                "fit on a larger reference set"
            )
        return self.m2 / (self.count - 1)

    def std(self, floor: float = SIGMA_FLOOR) -> Tensor:
        """Unbiased standard deviation, with values ``<= floor`` replaced by 1."""
        sd = self.variance().clamp_min(0).sqrt()
        return torch.where(sd <= floor, torch.ones_like(sd), sd)

    # -- serialisation / distribution helpers
    def pack(self) -> Tensor:
        """One float64 tensor ``[count, mean..., m2...]`` (for ``all_gather``); see :meth:`unpack`."""
        head = torch.tensor([float(self.count)], dtype=torch.float64, device=self.mean.device)
        return torch.cat([head, self.mean, self.m2])

    @classmethod
    def unpack(cls, packed: Tensor) -> "WelfordState":
        """Inverse of :meth:`pack`."""
        if not isinstance(packed, Tensor) or packed.dim() != 1 or packed.numel() < 3 or packed.numel() % 2 == 0:
            raise ValueError("packed must be a 1-D tensor [count, mean (F), m2 (F)] as written by WelfordState.pack")
        num = (packed.numel() - 1) // 2
        out = cls(num, packed.device)
        out.count = int(round(float(packed[0])))
        out.mean = packed[1 : 1 + num].to(torch.float64).clone()
        out.m2 = packed[1 + num :].to(torch.float64).clone()
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"count": self.count, "mean": self.mean.cpu(), "m2": self.m2.cpu()}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "WelfordState":
        mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        out = cls(int(mean.numel()))
        out.count = int(state["count"])
        out.mean = mean.clone()
        out.m2 = torch.as_tensor(state["m2"], dtype=torch.float64).clone()
        if out.m2.shape != out.mean.shape:
            raise ValueError("corrupt Welford state: mean and m2 have different shapes")
        return out


def merge_welford(states: Iterable[WelfordState]) -> WelfordState:
    """Merge several :class:`WelfordState` s (e.g. one per process) into one."""
    states = list(states)
    if not states:
        raise ValueError("merge_welford needs at least one state")
    out = states[0].copy()
    for s in states[1:]:
        out = out.merge(s)
    return out
