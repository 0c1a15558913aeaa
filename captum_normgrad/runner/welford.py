r"""Mergeable running statistics (Welford / Chan et al.) and their merge across ranks.

A :class:`WelfordState` holds ``count``, ``mean`` and ``M2`` (the sum of squared deviations from
the mean) of a stream of vectors. Two states merge exactly (up to rounding) with the parallel
formula of Chan, Golub & LeVeque:

.. math::

    n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad
    \bar x = \bar x_a + \delta\, n_b / n,\quad
    M_2 = M_{2,a} + M_{2,b} + \delta^2\, n_a n_b / n .

:func:`all_reduce_welford` merges one state per rank over ``torch.distributed`` (an ``all_gather``
of the states followed by the merge in rank order, so every rank ends with the same state).
:func:`merge_states` folds any sequence in a fixed order: feeding it the per-shard states in shard
order gives a result that does not depend on how the shards were spread over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["WelfordState", "merge_states", "all_reduce_welford"]


@dataclass
class WelfordState:
    """Running count / mean / M2 of vectors of a fixed length (float64).

    Attributes:
        count (int): number of vectors seen.
        mean (Tensor): running mean, shape ``(F,)``.
        m2 (Tensor): sum of squared deviations from the mean, shape ``(F,)``.
    """

    count: int
    mean: Tensor
    m2: Tensor

    @classmethod
    def empty(cls, num_features: int) -> "WelfordState":
        """The state of no samples."""
        z = torch.zeros(num_features, dtype=torch.float64)
        return cls(0, z, z.clone())

    @classmethod
    def from_batch(cls, values: Tensor) -> "WelfordState":
        """The exact state of a batch ``(B, F)`` (two-pass mean and M2, float64)."""
        if values.dim() != 2:
            raise ValueError(f"values must have shape (batch, features), got {tuple(values.shape)}")
        v = values.detach().to(device="cpu", dtype=torch.float64)
        if v.shape[0] == 0:
            return cls.empty(v.shape[1])
        mean = v.mean(0)
        return cls(int(v.shape[0]), mean, ((v - mean) ** 2).sum(0))

    @property
    def num_features(self) -> int:
        return int(self.mean.numel())

    def merge(self, other: "WelfordState") -> "WelfordState":
        """The state of the union of both streams (parallel merge; neither input is modified)."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(
                f"cannot merge Welford states of {self.num_features} and {other.num_features} features; "
                "they come from different models or aggregations"
            )
        if other.count == 0:
            return WelfordState(self.count, self.mean.clone(), self.m2.clone())
        if self.count == 0:
            return WelfordState(other.count, other.mean.clone(), other.m2.clone())
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return WelfordState(n, mean, m2)

    def update(self, values: Tensor) -> "WelfordState":
        """The state after also seeing the rows of ``values`` ``(B, F)``."""
        return self.merge(WelfordState.from_batch(values))

    def variance(self, unbiased: bool = True) -> Tensor:
        """Per-feature variance (``M2/(n-1)`` when unbiased); NaN for too few samples."""
        d = self.count - 1 if unbiased else self.count
        if d <= 0:
            return torch.full_like(self.mean, float("nan"))
        return self.m2 / d

    def std(self, unbiased: bool = True, floor: float = 1e-14) -> Tensor:
        """Per-feature standard deviation; values ``<= floor`` (and NaN) replaced by 1 (METHODS.md §3)."""
        s = self.variance(unbiased).clamp_min(0).sqrt()
        return torch.where(torch.isnan(s) | (s <= floor), torch.ones_like(s), s)

    def to_tensors(self, prefix: str = "") -> Dict[str, Tensor]:
        """Tensors for a safetensors file (``count`` as a 1-element int64 tensor)."""
        return {
            f"{prefix}count": torch.tensor([self.count], dtype=torch.int64),
            f"{prefix}mean": self.mean.contiguous(),
            f"{prefix}m2": self.m2.contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: Dict[str, Tensor], prefix: str = "") -> "WelfordState":
        """Inverse of :meth:`to_tensors`."""
        return cls(
            int(tensors[f"{prefix}count"].reshape(-1)[0]),
            tensors[f"{prefix}mean"].to(torch.float64),
            tensors[f"{prefix}m2"].to(torch.float64),
        )


def merge_states(states: Iterable[WelfordState], num_features: Optional[int] = None) -> WelfordState:
    """Fold states left to right (``((s0 + s1) + s2) + ...``); deterministic for a fixed order."""
    acc: Optional[WelfordState] = WelfordState.empty(num_features) if num_features is not None else None
    for s in states:
        acc = s if acc is None else acc.merge(s)
    if acc is None:
        raise ValueError("merge_states needs at least one state (or num_features for an empty merge)")
    return acc


def all_reduce_welford(state: WelfordState, group: Optional[object] = None) -> WelfordState:
    """Merge one Welford state per rank; every rank returns the merged state.

    The states are exchanged with ``all_gather`` (count, mean and M2 packed into one float64
    tensor, on the GPU for NCCL) and merged in rank order, so all ranks hold bit-identical results.
    Without an initialised process group this returns a copy of ``state``.

    Args:
        state (WelfordState): this rank's state.
        group (ProcessGroup, optional): the process group. Default: the default group.

    Returns:
        *WelfordState*: the merged state of all ranks.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return WelfordState(state.count, state.mean.clone(), state.m2.clone())
    world = dist.get_world_size(group)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    # F is the same on every rank (checked below through the gathered sizes).
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([state.num_features], dtype=torch.int64, device=device), group=group)
    if len({int(s.item()) for s in sizes}) != 1:
        raise ValueError(f"ranks hold Welford states of different sizes {[int(s.item()) for s in sizes]}")
    packed = torch.cat([torch.tensor([float(state.count)], dtype=torch.float64), state.mean, state.m2]).to(device)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    f = state.num_features
    states = [WelfordState(int(p[0].item()), p[1 : 1 + f].cpu(), p[1 + f :].cpu()) for p in parts]
    return merge_states(states)
