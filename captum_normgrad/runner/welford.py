r"""Merging :class:`~captum_normgrad.parameter_saliency.WelfordState` s across shards and ranks.

A Welford state holds ``count``, ``mean`` and ``M2`` (sum of squared deviations from the mean).
Two states merge with the parallel formula of Chan, Golub & LeVeque
(:meth:`WelfordState.merge <captum_normgrad.parameter_saliency.WelfordState.merge>`):

.. math::

    n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad
    \bar x = \bar x_a + \delta\, n_b / n,\quad
    M_2 = M_{2,a} + M_{2,b} + \delta^2\, n_a n_b / n .

- :func:`all_reduce_welford` merges one state per rank over ``torch.distributed``: an
  ``all_gather`` of the packed states ``[count, mean, M2]`` followed by the merge in rank order, so
  every rank ends with the same (bit-identical) state, equal to the single-process statistics up
  to rounding.
- :func:`merge_states` folds states in a given order. The runner feeds it the per-shard states in
  shard order, which makes its statistics bit-identical whatever the number of processes.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from ..parameter_saliency import WelfordState, merge_welford

__all__ = ["WelfordState", "merge_states", "all_reduce_welford"]


def merge_states(states: Iterable[WelfordState], num_features: Optional[int] = None) -> WelfordState:
    """Fold states left to right (``((s0 + s1) + s2) + ...``): deterministic for a fixed order.

    Args:
        states (iterable of WelfordState): the states, in the order to merge them.
        num_features (int, optional): the profile length, needed only to merge zero states.
                    Default: None

    Returns:
        *WelfordState*: a new state (the inputs are not modified).
    """
    states = list(states)
    if not states:
        if num_features is None:
            raise ValueError("merge_states needs at least one state (or num_features for an empty merge)")
        return WelfordState(num_features)
    # the package's one merge (a left fold of WelfordState.merge): bit-identical whoever calls it
    return merge_welford(states)


def all_reduce_welford(state: WelfordState, group: Optional[Any] = None) -> WelfordState:
    """Merge one Welford state per rank; every rank returns the same merged state.

    The packed states (``WelfordState.pack``: one float64 tensor, on the current GPU under NCCL)
    are exchanged with ``all_gather`` and merged in rank order. Without an initialised process
    group this returns a copy of ``state``.

    Args:
        state (WelfordState): this rank's state.
        group (ProcessGroup, optional): the process group. Default: the default group.

    Returns:
        *WelfordState*: the statistics of the samples of all ranks.

    Examples::

        >>> ps = ParameterSaliency(model)
        >>> local = WelfordState(ps.num_features)
        >>> for x, y in my_shard_loader:            # this rank's disjoint part of the data
        ...     local.update(ps.profiles(x, y))
        >>> ps.statistics = all_reduce_welford(local)   # same on every rank
    """
    import torch.distributed as dist

    if not isinstance(state, WelfordState):
        raise TypeError(f"state must be a WelfordState, got {type(state).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        return state.copy()
    world = dist.get_world_size(group)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([state.num_features], dtype=torch.int64, device=device), group=group)
    if len({int(s.item()) for s in sizes}) != 1:
        raise ValueError(
            f"ranks hold Welford states of different sizes {[int(s.item()) for s in sizes]}; "
            "every rank must profile the same model with the same aggregation"
        )
    packed = state.pack().to(device)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    return merge_states(WelfordState.unpack(p.cpu()) for p in parts)
