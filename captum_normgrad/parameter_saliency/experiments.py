r"""Validation experiments of parameter-space saliency, as functions returning tables.

- :func:`turn_off_experiment` (Levin et al., Sec. 4.1): zero the top-k salient filters of each
  misclassified sample (cumulatively in ``k``) and compare with ``k`` random and ``k`` least
  salient filters: drop of the wrong-class probability, rise of the true-class probability,
  fraction of samples corrected.
- :func:`fine_tune_experiment` (Sec. 4.2): one SGD step (lr 1e-3) on only the top-k filters of a
  misclassified sample; effect on that sample, on its nearest neighbours in saliency space and on
  random misclassified samples.
- :func:`nearest_neighbors` / :func:`cosine_distance`: neighbours by ``|cos(z_a, z_b) - 1|``.
- :func:`layer_depth_bias` (Wang & Sato): share of the top-k filters in each stage of the network
  for naive, standardised and POT rankings, against each stage's share of all filters.

Every experiment works on parameter dictionaries (``torch.func.functional_call``): the caller's
model is never modified, not even transiently.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._common import _check_choice
from .pot import POTScorer
from .profiles import MODES, ParameterSaliency

__all__ = [
    "Table",
    "cosine_distance",
    "nearest_neighbors",
    "turn_off_experiment",
    "fine_tune_experiment",
    "layer_depth_bias",
    "stage_labels",
]

Ranking = Union[str, POTScorer]


class Table(list):
    """A list of rows (dicts with the same keys), with a Markdown rendering."""

    @property
    def columns(self) -> List[str]:
        return list(self[0].keys()) if self else []

    def column(self, name: str) -> List[Any]:
        return [row[name] for row in self]

    def to_markdown(self, digits: int = 3) -> str:
        """A GitHub-flavoured Markdown table (floats with ``digits`` decimals)."""
        if not self:
            return "(empty table)"
        cols = self.columns

        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.{digits}f}"
            return str(v)

        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(fmt(row[c]) for c in cols) + " |" for row in self]
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def cosine_distance(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """``|cos(a_i, b_j) - 1|`` for all pairs: ``(Q, F) x (P, F) -> (Q, P)`` (float64)."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.dim() != 2 or b.dim() != 2:
        raise ValueError("cosine_distance takes two 2-D tensors (Q, F) and (P, F)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"profiles of different lengths: {a.shape[1]} and {b.shape[1]}")
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64).to(a.device)
    an = a64 / a64.norm(dim=1, keepdim=True).clamp_min(eps)
    bn = b64 / b64.norm(dim=1, keepdim=True).clamp_min(eps)
    return (an @ bn.T - 1.0).abs()


def nearest_neighbors(
    query: Tensor, pool: Tensor, k: int = 5, exclude: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    r"""
    Nearest neighbours in saliency space by cosine distance ``|cos(z_q, z_p) - 1|``.

    Args:

        query (Tensor): ``(Q, F)`` saliency profiles.
        pool (Tensor): ``(P, F)`` profiles to search.
        k (int, optional): Neighbours per query. Default: 5
        exclude (Tensor, optional): ``(Q,)`` pool index to skip for each query (e.g. the
                    query itself when ``pool`` contains the queries; -1 skips nothing).
                    Default: None

    Returns:
        *(Tensor, Tensor)*: distances ``(Q, k)`` (float64, ascending) and pool indices ``(Q, k)``.
    """
    d = cosine_distance(query, pool)
    if exclude is not None:
        ex = torch.as_tensor(exclude, dtype=torch.long, device=d.device).reshape(-1)
        if ex.numel() != d.shape[0]:
            raise ValueError(f"exclude must have one entry per query ({d.shape[0]}), got {ex.numel()}")
        rows = torch.nonzero(ex >= 0).flatten()
        d[rows, ex[rows]] = float("inf")
    available = d.shape[1] - (0 if exclude is None else 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(available, 0):
        raise ValueError(f"k must be an int in [1, {available}] for a pool of {d.shape[1]}, got {k!r}")
    dist, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
    return dist, idx


def _forward_probs(ps: ParameterSaliency, sel: Dict[str, Tensor], fixed: Dict[str, Tensor], x: Tensor) -> Tensor:
    with torch.no_grad():
        out = ps._fn.outputs(sel, fixed, x)
    return torch.softmax(out.to(torch.float64), dim=1)


def _masked(ps: ParameterSaliency, sel: Dict[str, Tensor], keep: Tensor) -> Dict[str, Tensor]:
    """New parameter dict with the profile entries where ``keep == 0`` zeroed (never in place)."""
    out = dict(sel)
    for name, sl in ps.feature_slices():
        m = keep[sl]
        if bool((m != 0).all()):
            continue
        w = sel[name]
        if ps.aggregation == "filter":
            shape = (m.numel(),) + (1,) * max(w.dim() - 1, 0) if w.dim() else ()
            out[name] = w * m.to(w.dtype).reshape(shape)
        else:
            out[name] = w * m.to(w.dtype).reshape(w.shape)
    return out


def _full_order(ps: ParameterSaliency, profiles: Tensor, ranking: Ranking, by: str) -> Tensor:
    if isinstance(ranking, POTScorer):
        return ranking.order(profiles).to(profiles.device)
    _check_choice("ranking", ranking, MODES)
    return ps.rank(ps.standardize(profiles, ranking), by=by)


def _check_ranking(ps: ParameterSaliency, ranking: Ranking) -> None:
    if isinstance(ranking, POTScorer):
        if not ranking.is_fitted:
            raise ValueError("the POTScorer is not fitted: call pot.fit(reference_profiles) first")
        if ranking.num_features != ps.num_features:
            raise ValueError(
                f"the POTScorer was fitted on {ranking.num_features} filters, the saliency has {ps.num_features}"
            )
        return
    if not isinstance(ranking, str):
        raise TypeError(f"ranking must be a mode {list(MODES)} or a fitted POTScorer, got {type(ranking).__name__}")
    _check_choice("ranking", ranking, MODES)
    if ranking != "naive" and not ps.is_fitted:
        raise ValueError(
            f"ranking={ranking!r} needs reference statistics: call ps.fit(reference_loader) or ps.load(path) "
            "first, or use ranking='naive'"
        )


def _misclassified(ps: ParameterSaliency, inputs: Tensor, target: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = ps._prepare(inputs, target)
    sel, fixed = ps._fn.tensors()
    probs = _forward_probs(ps, sel, fixed, x)
    pred = probs.argmax(1)
    mis = torch.nonzero(pred != y).flatten()
    return x, y, probs, mis


def _check_ks(ks: Sequence[int], num_features: int) -> List[int]:
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_features for k in ks):
        raise ValueError(f"ks must be ints in [1, {num_features}], got {ks!r}")
    return sorted(set(ks))


# --------------------------------------------------------------------------- turn-off


def turn_off_experiment(
    ps: ParameterSaliency,
    inputs: Tensor,
    target: Any,
    ks: Sequence[int] = (1, 5, 10, 25, 50),
    ranking: Ranking = "standardized",
    by: str = "value",
    n_random: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> Table:
    r"""
    Zero the ``k`` most salient filters of each misclassified sample, vs random and least salient.

    For every misclassified sample (prediction != target) and every ``k`` in ``ks``, the filters
    ranked ``1..k`` (cumulative: the set for a larger ``k`` contains the smaller one) are zeroed in a
    copy of the parameters and the sample is re-evaluated. Controls: the ``k`` least salient
    filters of the sample, and ``k`` uniformly random filters (``n_random`` draws, the same draws for
    all samples, each draw's sets nested in ``k``).

    Args:

        ps (ParameterSaliency): The saliency (its model is evaluated in eval mode).
        inputs (Tensor): Batch of samples; only misclassified ones are used.
        target (int, list[int] or Tensor): True labels.
        ks (sequence of int, optional): Numbers of filters to turn off.
                    Default: (1, 5, 10, 25, 50)
        ranking (str or POTScorer, optional): ``"standardized"``, ``"naive"``, ``"norm"`` or a
                    fitted :class:`POTScorer` (ranked by ascending tail probability, see
                    :meth:`POTScorer.order`).
                    Default: ``"standardized"``
        by (str, optional): Rank by ``"value"`` or ``"abs"`` (string rankings).
                    Default: ``"value"``
        n_random (int, optional): Random draws. Default: 10
        seed (int, optional): Seed of the random draws. Default: 0
        progress (bool, optional): tqdm progress bar. Default: True

    Returns:
        *Table*: one row per ``(k, filters)`` with ``filters`` in ``"top-k salient"``,
        ``"random"``, ``"least salient"`` and columns ``n_samples``, ``wrong_prob_drop`` (mean
        decrease of the probability of the originally predicted, wrong class),
        ``true_prob_rise`` (mean increase of the true-class probability) and
        ``fraction_corrected`` (prediction now equals the target).
    """
    from tqdm.auto import tqdm

    _check_ranking(ps, ranking)
    ks = _check_ks(ks, ps.num_features)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ValueError(f"n_random must be a positive int, got {n_random!r}")
    x, y, probs0, mis = _misclassified(ps, inputs, target)
    if mis.numel() == 0:
        raise ValueError(
            "none of the samples is misclassified; the turn-off experiment explains errors, pass "
            "samples the model gets wrong"
        )
    sel, fixed = ps._fn.tensors()
    xm, ym, p0 = x[mis], y[mis], probs0[mis]
    wrong = p0.argmax(1)
    ar = torch.arange(len(mis), device=x.device)
    order = _full_order(ps, ps.profiles(xm, ym), ranking, by)
    nf = ps.num_features
    dev = x.device

    def effect(probs: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return (
            p0[rows, wrong[rows]] - probs[torch.arange(len(rows)), wrong[rows]],
            probs[torch.arange(len(rows)), ym[rows]] - p0[rows, ym[rows]],
            (probs.argmax(1) == ym[rows]).to(torch.float64),
        )

    acc: Dict[Tuple[int, str], List[Tensor]] = {}
    total = len(ks) * (2 * len(mis) + n_random)
    bar = tqdm(total=total, desc="turn-off experiment", unit="eval", disable=not progress)
    try:
        for k in ks:
            for name, part in (("top-k salient", slice(0, k)), ("least salient", slice(nf - k, nf))):
                rows_out = []
                for i in range(len(mis)):
                    keep = torch.ones(nf, device=dev)
                    keep[order[i, part]] = 0
                    probs = _forward_probs(ps, _masked(ps, sel, keep), fixed, xm[i : i + 1])
                    rows_out.append(torch.stack(effect(probs, ar[i : i + 1])).squeeze(1))
                    bar.update(1)
                acc[(k, name)] = rows_out
        gen = torch.Generator().manual_seed(int(seed))
        perms = [torch.randperm(nf, generator=gen).to(dev) for _ in range(n_random)]
        for k in ks:
            rows_out = []
            for perm in perms:
                keep = torch.ones(nf, device=dev)
                keep[perm[:k]] = 0
                probs = _forward_probs(ps, _masked(ps, sel, keep), fixed, xm)
                rows_out.extend(torch.stack(effect(probs, ar)).T)
                bar.update(1)
            acc[(k, "random")] = rows_out
    finally:
        bar.close()
    table = Table()
    for k in ks:
        for name in ("top-k salient", "random", "least salient"):
            vals = torch.stack(acc[(k, name)])
            table.append(
                {
                    "k": k,
                    "filters": name,
                    "n_samples": int(len(mis)),
                    "wrong_prob_drop": float(vals[:, 0].mean()),
                    "true_prob_rise": float(vals[:, 1].mean()),
                    "fraction_corrected": float(vals[:, 2].mean()),
                }
            )
    return table


# --------------------------------------------------------------------------- fine-tune


def fine_tune_experiment(
    ps: ParameterSaliency,
    inputs: Tensor,
    target: Any,
    k: int = 10,
    lr: float = 1e-3,
    steps: int = 1,
    n_neighbors: int = 5,
    ranking: Ranking = "standardized",
    by: str = "value",
    neighbor_mode: Optional[str] = None,
    max_sources: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
) -> Table:
    r"""
    Fine-tune only the top-k filters on one misclassified sample; effect on its saliency neighbours.

    For each misclassified sample (a *source*; at most ``max_sources``): ``steps`` plain SGD steps
    with learning rate ``lr`` on the source's loss, updating only the weights of its ``k`` most
    salient filters (a copy of the parameters). Then the source, its ``n_neighbors`` nearest other
    misclassified samples in saliency space (:func:`nearest_neighbors`) and ``n_neighbors`` random
    other misclassified samples are re-evaluated.

    Args:

        ps (ParameterSaliency): The saliency.
        inputs (Tensor): Samples (sources and neighbour pool: the misclassified ones are used).
        target (int, list[int] or Tensor): True labels.
        k (int, optional): Filters fine-tuned. Default: 10
        lr (float, optional): SGD learning rate. Default: 1e-3
        steps (int, optional): SGD steps. Default: 1
        n_neighbors (int, optional): Neighbours (and random controls) per source. Default: 5
        ranking (str or POTScorer, optional): How the top-k filters are chosen.
                    Default: ``"standardized"``
        by (str, optional): ``"value"`` or ``"abs"``. Default: ``"value"``
        neighbor_mode (str, optional): Saliency mode of the neighbour search.
                    Default: None (``ranking`` if it is a mode, else ``ps.mode``)
        max_sources (int, optional): Use at most this many sources. Default: None (all)
        seed (int, optional): Seed of the random controls. Default: 0
        progress (bool, optional): tqdm progress bar. Default: True

    Returns:
        *Table*: rows ``"fine-tuned sample"``, ``"nearest neighbours"``, ``"random misclassified"``
        with ``n`` (evaluations), ``fraction_corrected``, ``true_prob_rise``, ``wrong_prob_drop``
        and ``mean_cosine_distance`` (to the source).
    """
    from tqdm.auto import tqdm

    _check_ranking(ps, ranking)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ps.num_features:
        raise ValueError(f"k must be an int in [1, {ps.num_features}], got {k!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if neighbor_mode is None:
        neighbor_mode = ranking if isinstance(ranking, str) else ps.mode
    _check_choice("neighbor_mode", neighbor_mode, MODES)
    if neighbor_mode != "naive" and not ps.is_fitted:
        raise ValueError(f"neighbor_mode={neighbor_mode!r} needs fitted statistics; fit ps or use 'naive'")
    x, y, probs0, mis = _misclassified(ps, inputs, target)
    if mis.numel() < 2:
        raise ValueError(
            f"the fine-tune experiment needs at least 2 misclassified samples (a source and a neighbour), "
            f"got {mis.numel()}; pass more samples the model gets wrong"
        )
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or not 1 <= n_neighbors <= mis.numel() - 1:
        raise ValueError(f"n_neighbors must be an int in [1, {mis.numel() - 1}], got {n_neighbors!r}")
    sel, fixed = ps._fn.tensors()
    xm, ym, p0 = x[mis], y[mis], probs0[mis]
    wrong = p0.argmax(1)
    prof = ps.profiles(xm, ym)
    order = _full_order(ps, prof, ranking, by)
    space = ps.standardize(prof, neighbor_mode)
    n_src = len(mis) if max_sources is None else min(int(max_sources), len(mis))
    dist_all = cosine_distance(space, space)
    nn_dist, nn_idx = nearest_neighbors(space[:n_src], space, n_neighbors, exclude=torch.arange(n_src))
    gen = torch.Generator().manual_seed(int(seed))
    loss = ps._fn.sample_loss
    groups: Dict[str, List[Tuple[float, float, float, float]]] = {
        "fine-tuned sample": [],
        "nearest neighbours": [],
        "random misclassified": [],
    }
    for i in tqdm(range(n_src), desc="fine-tune experiment", unit="sample", disable=not progress):
        keep = torch.zeros(ps.num_features, device=x.device)
        keep[order[i, :k]] = 1
        params = dict(sel)
        for _ in range(steps):
            # plain autograd (not torch.func): works with the model's own backward hooks
            live = {n: v.detach().requires_grad_(True) for n, v in params.items()}
            with torch.enable_grad():
                gs = torch.autograd.grad(loss(live, fixed, xm[i], ym[i]), list(live.values()), allow_unused=True)
            g = {n: torch.zeros_like(live[n]) if gi is None else gi for n, gi in zip(live, gs)}
            step = _masked(ps, {n: v.detach() for n, v in g.items()}, keep)
            params = {n: (params[n] - lr * step[n]) if n in step else params[n] for n in params}
        others = torch.tensor([j for j in range(len(mis)) if j != i])
        rnd = others[torch.randperm(len(others), generator=gen)[:n_neighbors]].to(x.device)
        for name, idx in (
            ("fine-tuned sample", torch.tensor([i], device=x.device)),
            ("nearest neighbours", nn_idx[i].to(x.device)),
            ("random misclassified", rnd),
        ):
            probs = _forward_probs(ps, params, fixed, xm[idx])
            r = torch.arange(len(idx))
            for a in range(len(idx)):
                j = int(idx[a])
                groups[name].append(
                    (
                        float(probs[r[a]].argmax() == ym[j]),
                        float(probs[r[a], ym[j]] - p0[j, ym[j]]),
                        float(p0[j, wrong[j]] - probs[r[a], wrong[j]]),
                        float(dist_all[i, j]),
                    )
                )
    table = Table()
    for name, vals in groups.items():
        t = torch.tensor(vals, dtype=torch.float64)
        table.append(
            {
                "samples": name,
                "n": int(t.shape[0]),
                "fraction_corrected": float(t[:, 0].mean()),
                "true_prob_rise": float(t[:, 1].mean()),
                "wrong_prob_drop": float(t[:, 2].mean()),
                "mean_cosine_distance": float(t[:, 3].mean()),
            }
        )
    return table


# --------------------------------------------------------------------------- depth bias


def stage_labels(ps: ParameterSaliency, stages: Union[None, int, Callable[[str], str]] = None) -> List[str]:
    r"""
    The network stage of every profile entry.

    Args:

        ps (ParameterSaliency): The saliency.
        stages (None, int or Callable, optional): None: the top-level child module
                    (``conv1``, ``layer1`` ... ``layer4`` for a ResNet); when that puts every entry in
                    one stage (e.g. a VGG's ``features``), 4 groups of consecutive layers
                    (``"depth 1/4"`` ...). An int ``n``: ``n`` such groups. A callable: maps a module
                    name to a stage label.
                    Default: None

    Returns:
        *list[str]*: one label per profile entry.
    """
    modules = ps.feature_modules()
    if callable(stages):
        return [str(stages(m)) for m in modules]
    if stages is None:
        top = [m.split(".")[0] if m else "<root>" for m in modules]
        if len(set(top)) >= 2:
            return top
        stages = 4
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be None, a positive int or a callable, got {stages!r}")
    layers = list(dict.fromkeys(modules))  # in order, unique
    n = min(stages, len(layers))
    group = {name: f"depth {i * n // len(layers) + 1}/{n}" for i, name in enumerate(layers)}
    return [group[m] for m in modules]


def layer_depth_bias(
    ps: ParameterSaliency,
    profiles: Tensor,
    k: int = 10,
    pot: Optional[POTScorer] = None,
    stages: Union[None, int, Callable[[str], str]] = None,
    by: str = "value",
) -> Table:
    r"""
    Share of the top-k filters that falls in each stage of the network, per ranking.

    Wang & Sato report that the standardised (and naive) ranking favours deep layers and the
    POT ranking less so. Compare each column with ``share_of_filters`` (the stage's share of all
    filters: what an unbiased random ranking would give).

    Args:

        ps (ParameterSaliency): The saliency.
        profiles (Tensor): ``(N, F)`` naive profiles of the analysed samples
                    (e.g. misclassified test samples).
        k (int, optional): Top-k per sample. Default: 10
        pot (POTScorer, optional): Adds a POT column (ranked filters only, up to ``k``).
                    Default: None
        stages (None, int or Callable, optional): See :func:`stage_labels`. Default: None
        by (str, optional): ``"value"`` or ``"abs"``. Default: ``"value"``

    Returns:
        *Table*: rows per stage (network order) with ``n_filters``, ``share_of_filters``,
        ``share_top_k_naive``, ``share_top_k_standardized`` (if ``ps`` is fitted) and
        ``share_top_k_pot`` (if ``pot`` is given); each share column sums to 1.
    """
    if not isinstance(profiles, Tensor) or profiles.dim() != 2 or profiles.shape[1] != ps.num_features:
        raise ValueError(f"profiles must be naive profiles of shape (N, {ps.num_features})")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ps.num_features:
        raise ValueError(f"k must be an int in [1, {ps.num_features}], got {k!r}")
    if pot is not None:
        _check_ranking(ps, pot)
    labels = stage_labels(ps, stages)
    names = list(dict.fromkeys(labels))
    stage_idx = torch.tensor([names.index(s) for s in labels])

    def shares(picks: Tensor) -> List[float]:
        if picks.numel() == 0:
            return [float("nan")] * len(names)
        counts = torch.bincount(stage_idx[picks.cpu()], minlength=len(names)).to(torch.float64)
        return (counts / counts.sum()).tolist()

    columns: Dict[str, List[float]] = {
        "share_top_k_naive": shares(ps.rank(profiles, k=k, by=by).flatten()),
    }
    if ps.is_fitted:
        columns["share_top_k_standardized"] = shares(
            ps.rank(ps.standardize(profiles, "standardized"), k=k, by=by).flatten()
        )
    if pot is not None:
        columns["share_top_k_pot"] = shares(torch.cat(pot.rank(profiles, k=k)))
    sizes = torch.bincount(stage_idx, minlength=len(names))
    table = Table()
    for s, name in enumerate(names):
        row: Dict[str, Any] = {
            "stage": name,
            "n_filters": int(sizes[s]),
            "share_of_filters": float(sizes[s]) / float(sizes.sum()),
        }
        row.update({c: v[s] for c, v in columns.items()})
        table.append(row)
    return table
