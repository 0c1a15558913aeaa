r"""Parameter-space saliency profiles (Levin et al., NeurIPS 2022), from one batched pass.

For a sample ``x`` with true label ``y`` and the per-sample loss ``l = CE(f(x), y)``, the **naive
profile** of a convolution filter ``j`` (one output channel of a 4-D weight) is the mean absolute
gradient of the loss over the filter's weights,

.. math::

    s_j(x) = \operatorname{mean}_{w \in W_j} \left| \frac{\partial \ell(x, y)}{\partial w} \right| ,

in ``named_parameters()`` order (downsample convolutions included). Profiles are standardised over a
reference set, ``z_j = (s_j - \mu_j) / \sigma_j`` (Welford, unbiased ``\sigma``; ``\sigma \le 10^{-14}``
is replaced by 1), and filters are ranked by ``z`` (or ``|z|``) descending.

Per-sample gradients come, by default, from ONE batched forward and backward pass
(:mod:`captum_normgrad._per_sample_grads`: each layer's per-sample weight gradient is its input
activation times its output gradient, reduced to the profile inside the backward pass), with
``torch.func.vmap(grad)`` over ``functional_call`` and a per-sample autograd loop as exact
fallbacks. The caller's model is never written to (no ``.grad``, no ``.data``, no mode switch;
hooks live for one call). Models with BatchNorm/Dropout in training mode are refused (call
``model.eval()``).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from .._functional import FunctionalModel, backward_hook_owners, sample_param_grads
from .._per_sample_grads import (
    NotCovered,
    coverage_problem,
    per_sample_grads,
)
from ._common import _check_choice
from ._engine import (
    _check_inputs,
    _check_target,
    _unpack_batch,
    _unwrap,
)
from .filters import FilterRef, _Entry, _module_name
from .statistics import SIGMA_FLOOR, WelfordState, merge_welford

__all__ = [
    "MODES",
    "AGGREGATIONS",
    "STRATEGIES",
    "FilterRef",
    "WelfordState",
    "merge_welford",
    "ParameterSaliency",
]

#: Saliency modes: standardised ``(s - mu) / sigma``, raw ``s``, and ``s / mu``.
MODES: Tuple[str, ...] = ("standardized", "naive", "norm")
#: Aggregations: one value per filter (output channel) or one value per individual weight.
AGGREGATIONS: Tuple[str, ...] = ("filter", "parameter")
#: Per-sample gradient engines (see :class:`~captum_normgrad.parameter_saliency.ParameterSaliency`).
STRATEGIES: Tuple[str, ...] = ("auto", "batched", "vmap", "loop")

_FORMAT = "captum_normgrad.parameter_saliency.statistics"
_FORMAT_VERSION = 1

LossFn = Callable[[Tensor, Tensor], Tensor]
Selector = Union[str, Sequence[str], None]


# --------------------------------------------------------------------------- the saliency object


class ParameterSaliency:
    r"""
    Parameter-space saliency (Levin et al., 2022): which filters are responsible for a sample's loss.

    For each sample the **profile** is, per convolution filter (each output channel of every 4-D
    weight, in ``named_parameters()`` order), the mean absolute gradient of the sample's
    cross-entropy loss on its true label over the filter's weights. Per-sample gradients come from
    one batched forward and backward pass (see ``strategy``): one sample's profile never depends on
    the rest of the batch, and the caller's model is never modified.

    Profiles are compared with a reference set: :meth:`fit` (or :meth:`update_statistics`
    / :attr:`statistics` for distributed computation) stores the per-filter mean ``mu`` and unbiased
    standard deviation ``sigma`` (Welford, float64); :meth:`saliency` returns

    - ``"standardized"``: ``(s - mu) / sigma`` (``sigma <= 1e-14`` replaced by 1), the paper's saliency;
    - ``"naive"``: ``s`` itself (no reference set needed);
    - ``"norm"``: ``s / mu`` (``mu <= 1e-14`` replaced by 1).

    :meth:`rank` sorts filters by saliency (or its absolute value), :meth:`locate` maps a profile
    index back to ``(layer name, channel)``, :meth:`save` / :meth:`load` store the statistics with
    the names and shapes of the parameters they belong to.

    **Training mode.** Parameter saliency is defined in eval mode (BatchNorm running statistics, no
    dropout), as in the paper. A model with a BatchNorm or Dropout module in training mode is
    refused with a ``ValueError`` (call ``model.eval()``): batch statistics would make a sample's
    profile depend on its batch companions. This is the package's one policy (order 1 does the
    same). The model is used as it is at call time (modules swapped after construction are used).

    Args:

        model (nn.Module): A classifier taking one tensor ``(N, ...)`` and returning logits
                    ``(N, num_classes)``. ``nn.DataParallel`` / DDP wrappers are unwrapped.
        mode (str, optional): Default saliency mode: ``"standardized"``, ``"naive"`` or ``"norm"``.
                    Default: ``"standardized"``
        aggregation (str, optional): ``"filter"`` (one value per filter: mean of ``|grad|``
                    over the filter's weights) or ``"parameter"`` (one value per weight: ``|grad|``).
                    Default: ``"filter"``
        parameters (str or sequence of str, optional): Which parameters are profiled:
                    ``"conv"`` (every 4-D weight: the convolution filters), ``"all"`` (every
                    parameter; filter-wise, a "filter" is a slice along dim 0, e.g. one output unit
                    of a ``Linear`` weight or one entry of a bias), or an explicit list of names from
                    ``model.named_parameters()``. None picks ``"conv"`` for filter-wise and
                    ``"all"`` for parameter-wise aggregation (the authors' choices).
                    Default: None
        loss_fn (Callable, optional): ``(logits (1, K), target (1,)) -> loss`` for one sample.
                    Default: None (cross-entropy on the true label)
        vectorize (bool, optional): Batch the per-sample gradients over the samples (True) or
                    loop over the samples (False, the same as ``strategy="loop"``).
                    Default: True
        chunk_size (int, optional): At most this many samples' per-sample gradients (of one layer
                    with the ``"batched"`` engine, of the model with ``"vmap"``) are held at once
                    (lower memory). None lets the batched engine bound a chunk by 64 MiB and
                    ``vmap`` process the whole batch.
                    Default: None
        strategy (str, optional): How per-sample gradients are computed (the same option as
                    :class:`~captum_normgrad.LayerNormGradOrder1`'s ``strategy``) (all give the per-sample
                    loop's result):

                    - ``"batched"``: one batched forward and backward pass; each Conv1d/Conv2d/
                      Linear/BatchNorm layer's per-sample gradient is its input activation times
                      its output gradient (``unfold`` + ``einsum``), reduced to the profile inside
                      the backward pass. The fast path.
                    - ``"vmap"``: ``torch.func.vmap(grad)`` over ``functional_call``.
                    - ``"loop"``: one batch-1 forward/backward per sample (plain autograd; works
                      with any module and with the model's own backward hooks).
                    - ``"auto"``: ``"batched"`` where it covers the profiled parameters (exact
                      module types, each parameter used once by its own module), else ``"vmap"``,
                      or ``"loop"`` when the model carries backward hooks (``torch.func`` cannot
                      run them).

                    Default: ``"auto"``

    Examples::

        >>> model = torchvision.models.resnet18().eval()
        >>> ps = ParameterSaliency(model)
        >>> ps.fit(reference_loader)                 # mean / std per filter, with a progress bar
        >>> z = ps.saliency(images, labels)          # (N, 4800) standardised saliency
        >>> top = ps.rank(z, k=10)                   # (N, 10) filter indices, most salient first
        >>> ps.locate(int(top[0, 0]))                # FilterRef(... module='layer4.1.conv2', channel=17)
        >>> ps.save("resnet18_stats.pt")
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "standardized",
        aggregation: str = "filter",
        parameters: Selector = None,
        loss_fn: Optional[LossFn] = None,
        vectorize: bool = True,
        chunk_size: Optional[int] = None,
        strategy: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_choice("mode", mode, MODES)
        _check_choice("aggregation", aggregation, AGGREGATIONS)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable: (logits (1, K), target (1,)) -> scalar loss")
        _check_choice("strategy", strategy, STRATEGIES)
        if not vectorize and strategy not in ("auto", "loop"):
            raise ValueError(f"vectorize=False means strategy='loop'; it contradicts strategy={strategy!r}")
        self.strategy = "loop" if not vectorize else strategy
        self.model = _unwrap(model)
        self.mode = mode
        self.aggregation = aggregation
        self.vectorize = bool(vectorize)
        self.chunk_size = chunk_size
        self.parameters = parameters if parameters is not None else ("conv" if aggregation == "filter" else "all")
        self._entries = self._select(self.parameters)
        self._offsets = [e.offset for e in self._entries]
        self.num_features: int = self._entries[-1].offset + self._entries[-1].count
        self._fn = FunctionalModel(self.model, [e.name for e in self._entries], loss_fn)
        self._stats: Optional[WelfordState] = None
        #: naive profiles of the reference set, kept by ``fit(..., keep_profiles=True)`` (CPU), else None
        self.reference_profiles: Optional[Tensor] = None

    # ------------------------------------------------------------------ parameter selection
    def _select(self, parameters: Selector) -> List[_Entry]:
        named = list(self.model.named_parameters())
        if isinstance(parameters, str):
            if parameters == "conv":
                chosen = [(n, p) for n, p in named if p.dim() == 4]
                if not chosen:
                    raise ValueError(
                        f"{type(self.model).__name__} has no convolution filters (4-D weights), so there is "
                        "nothing to rank filter-wise. Use aggregation='parameter' (one value per weight of "
                        "every parameter) or parameters='all' (a filter is then a slice along dim 0 of every "
                        "parameter, e.g. one output unit of a Linear layer)"
                    )
            elif parameters == "all":
                chosen = named
            else:
                raise ValueError(f"parameters must be 'conv', 'all' or a list of parameter names, got {parameters!r}")
        elif isinstance(parameters, (list, tuple)) and all(isinstance(n, str) for n in parameters):
            lookup = dict(named)
            missing = [n for n in parameters if n not in lookup]
            if missing:
                raise ValueError(
                    f"unknown parameter name(s) {missing[:3]}; pick names from [n for n, _ in model.named_parameters()]"
                )
            wanted = set(parameters)
            chosen = [(n, p) for n, p in named if n in wanted]  # named_parameters() order
        else:
            raise TypeError(f"parameters must be 'conv', 'all' or a list of names, got {type(parameters).__name__}")
        if not chosen:
            raise ValueError(f"{type(self.model).__name__} has no parameters to profile")
        entries: List[_Entry] = []
        offset = 0
        for name, p in chosen:
            shape = tuple(p.shape)
            if self.aggregation == "filter":
                count = shape[0] if len(shape) else 1
            else:
                count = p.numel()
            if count == 0:
                continue
            entries.append(_Entry(name, shape, offset, count))
            offset += count
        if not entries:
            raise ValueError("the selected parameters are all empty")
        return entries

    @property
    def parameter_names(self) -> List[str]:
        """Names of the profiled parameters, in profile order."""
        return [e.name for e in self._entries]

    def identity(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """``[(parameter name, shape), ...]`` of the profiled parameters (what statistics belong to)."""
        return [(e.name, e.shape) for e in self._entries]

    def _check_model_unchanged(self, sel: Dict[str, Tensor]) -> None:
        for e in self._entries:
            if tuple(sel[e.name].shape) != e.shape:
                raise ValueError(
                    f"parameter {e.name} changed shape from {e.shape} to {tuple(sel[e.name].shape)} since this "
                    "ParameterSaliency was built; build a new one for the modified model"
                )

    # ------------------------------------------------------------------ index <-> filter
    def locate(self, index: int) -> FilterRef:
        """Map a profile index to the parameter, layer (module) name and channel it belongs to."""
        if isinstance(index, Tensor):
            index = int(index)
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= index < self.num_features:
            raise IndexError(f"index {index} out of range for a profile of {self.num_features} entries")
        e = self._entries[bisect.bisect_right(self._offsets, index) - 1]
        local = index - e.offset
        if self.aggregation == "filter":
            return FilterRef(index, e.name, _module_name(e.name), local if e.shape else 0)
        if not e.shape:
            return FilterRef(index, e.name, _module_name(e.name), 0, ())
        pos = []
        rest = local
        for size in reversed(e.shape):
            pos.append(rest % size)
            rest //= size
        pos = pos[::-1]
        return FilterRef(index, e.name, _module_name(e.name), pos[0], tuple(pos[1:]))

    def filter_index(self, parameter: str, channel: int) -> int:
        """Profile index of ``channel`` of ``parameter`` (filter-wise aggregation)."""
        if self.aggregation != "filter":
            raise ValueError("filter_index is defined for aggregation='filter' only")
        for e in self._entries:
            if e.name == parameter or _module_name(e.name) == parameter:
                if not 0 <= channel < e.count:
                    raise IndexError(f"{e.name} has {e.count} filters, channel {channel} is out of range")
                return e.offset + channel
        raise ValueError(f"{parameter!r} is not a profiled parameter or layer; see .parameter_names")

    def feature_modules(self) -> List[str]:
        """The module (layer) name of every profile entry, in profile order (length ``num_features``)."""
        out: List[str] = []
        for e in self._entries:
            out.extend([_module_name(e.name)] * e.count)
        return out

    def feature_slices(self) -> List[Tuple[str, slice]]:
        """``[(parameter name, slice of the profile), ...]``."""
        return [(e.name, slice(e.offset, e.offset + e.count)) for e in self._entries]

    # ------------------------------------------------------------------ profiles
    def _profile_from_grads(self, grads: Dict[str, Tensor]) -> Tensor:
        """Profile ``(F,)`` of one sample's gradients (``name -> gradient``)."""
        return torch.cat([self._entry_profile(e, grads[e.name].unsqueeze(0))[0] for e in self._entries])

    def _per_sample_fn(self, sel: Dict[str, Tensor], fixed: Dict[str, Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        loss = self._fn.sample_loss

        def profile_one(x: Tensor, y: Tensor) -> Tensor:
            return self._profile_from_grads(grad(loss)(sel, fixed, x, y))

        return profile_one

    def _prepare(self, inputs: Any, target: Any) -> Tuple[Tensor, Tensor]:
        x = _check_inputs(inputs)
        device = self._fn.device()
        x = x.to(device)
        y = _check_target(target, x.shape[0], device)
        return x, y

    def _entry_profile(self, e: _Entry, g: Tensor, owned: bool = False) -> Tensor:
        """Profile entries of parameter ``e`` from per-sample gradients ``g`` ``(n, rows, ...)``
        (``owned``: ``g`` may be overwritten)."""
        n = g.shape[0]
        if self.aggregation == "filter":
            flat = g.reshape(n, g.shape[1] if g.dim() > 1 else 1, -1)
            # on blocks small enough to stay in cache (see _per_sample_grads), abs().sum() is
            # 3-5x faster than linalg.vector_norm(ord=1) on CPU
            # (the engine's blocks are ours to overwrite: abs_ in place saves a pass over memory)
            mag = flat.abs() if flat.requires_grad or not owned else flat.abs_()
            return mag.sum(-1) / flat.shape[-1]
        return g.reshape(n, -1).abs()

    def resolve_strategy(self) -> str:
        """The engine :meth:`profiles` uses for the model as it is now (``"batched"``, ``"vmap"`` or ``"loop"``)."""
        names = [e.name for e in self._entries]
        if self.strategy == "batched":
            problem = coverage_problem(self.model, names)
            if problem is not None:
                raise ValueError(
                    f"strategy='batched' cannot serve this model ({problem}); use strategy='auto' (exact fallbacks)"
                )
            return "batched"
        hooked = backward_hook_owners(self.model)
        if self.strategy == "vmap" and hooked:
            raise ValueError(
                f"strategy='vmap' cannot run the model's backward hooks (on {', '.join(hooked[:3])}): torch.func does "
                "not support them. Use strategy='auto' or 'loop', or remove the hooks"
            )
        if self.strategy != "auto":
            return self.strategy
        if coverage_problem(self.model, names) is None:
            return "batched"
        return "loop" if hooked else "vmap"

    def _compute(self, x: Tensor, y: Tensor, create_graph: bool = False) -> Tensor:
        """Profiles ``(N, F)`` of the prepared batch (differentiable in ``x`` with ``create_graph``)."""
        sel, fixed = self._fn.tensors()
        self._check_model_unchanged(sel)
        dtype = next(iter(sel.values())).dtype
        if x.shape[0] == 0:
            return torch.zeros(0, self.num_features, device=x.device, dtype=dtype)
        engine = self.resolve_strategy()
        if engine == "batched":
            try:
                return self._batched(x, y, create_graph)
            except NotCovered as exc:
                if self.strategy == "batched":
                    raise ValueError(
                        f"strategy='batched' cannot serve this model ({exc}); use strategy='auto' (exact fallbacks)"
                    ) from None
                engine = "loop" if backward_hook_owners(self.model) else "vmap"
        self._check_classes(sel, fixed, x, y)
        if engine == "loop":
            return self._loop(sel, fixed, x, y, create_graph)
        fn = self._per_sample_fn(sel, fixed)
        if create_graph:
            return vmap(fn, chunk_size=self.chunk_size)(x, y)
        return vmap(fn, chunk_size=self.chunk_size)(x, y).detach()

    def _check_classes(self, sel: Dict[str, Tensor], fixed: Dict[str, Tensor], x: Tensor, y: Tensor) -> None:
        """Targets within the model's classes (checked on one sample's output: vmap cannot check values)."""
        with torch.no_grad():
            self._fn.check_outputs(self._fn.outputs(sel, fixed, x[:1]), y)

    def _batched(self, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
        entries = {e.name: e for e in self._entries}
        dtype = self.model.get_parameter(self._entries[0].name).dtype
        out = torch.zeros(x.shape[0], self.num_features, dtype=dtype, device=x.device)

        def consume(name: str, g: Tensor, samples: slice, rows: slice) -> None:
            e = entries[name]
            per_row = 1 if self.aggregation == "filter" else (e.count // (e.shape[0] if e.shape else 1))
            start = e.offset + rows.start * per_row
            out[samples, start : start + (rows.stop - rows.start) * per_row] = self._entry_profile(e, g, owned=True)

        per_sample_grads(
            self.model,
            x,
            lambda o: self._fn.batch_losses(o, y),
            list(entries),
            consume,
            chunk_size=self.chunk_size,
            create_graph=create_graph,
        )
        return out if create_graph else out.detach()

    def _loop(
        self, sel: Dict[str, Tensor], fixed: Dict[str, Tensor], x: Tensor, y: Tensor, create_graph: bool
    ) -> Tensor:
        """One batch-1 pass per sample with plain autograd (any module, the model's own hooks)."""
        rows = []
        for i in range(x.shape[0]):
            g, _ = sample_param_grads(
                functools.partial(self._fn.sample_loss, fixed=fixed, x=x[i], y=y[i]), sel, create_graph
            )
            rows.append(torch.cat([self._entry_profile(e, g[e.name].unsqueeze(0)) for e in self._entries], dim=1))
        out = torch.cat(rows)
        return out if create_graph else out.detach()

    def profiles(self, inputs: Tensor, target: Any) -> Tensor:
        r"""
        Naive per-sample profiles ``s`` (mean ``|dl/dW_j|`` per filter, or ``|dl/dw|`` per weight).

        Args:

            inputs (Tensor): Batch ``(N, ...)`` of inputs of the model.
            target (int, list[int] or Tensor): True class of each sample (shape ``(N,)``) or one
                        class for all.

        Returns:
            *Tensor*: ``(N, num_features)``, detached, in the parameters' dtype and device.
        """
        x, y = self._prepare(inputs, target)
        return self._compute(x, y)

    # ------------------------------------------------------------------ statistics
    @property
    def statistics(self) -> Optional[WelfordState]:
        """The reference statistics (:class:`WelfordState`), None before :meth:`fit`/:meth:`load`."""
        return self._stats

    @statistics.setter
    def statistics(self, state: Optional[WelfordState]) -> None:
        if state is not None:
            if not isinstance(state, WelfordState):
                raise TypeError(f"statistics must be a WelfordState, got {type(state).__name__}")
            if state.num_features != self.num_features:
                raise ValueError(
                    f"statistics have {state.num_features} features but this model's profile has "
                    f"{self.num_features}; they were computed for a different model or aggregation"
                )
        self._stats = state

    @property
    def is_fitted(self) -> bool:
        return self._stats is not None and self._stats.count >= 2

    def reset_statistics(self) -> "ParameterSaliency":
        self._stats = None
        self.reference_profiles = None
        return self

    def update_statistics(self, inputs: Tensor, target: Any) -> Tensor:
        """Add a batch to the reference statistics; returns its naive profiles."""
        prof = self.profiles(inputs, target)
        if self._stats is None:
            self._stats = WelfordState(self.num_features)
        self._stats.update(prof)
        return prof

    def fit(
        self,
        dataloader: Iterable[Any],
        max_batches: Optional[int] = None,
        progress: bool = True,
        keep_profiles: bool = False,
    ) -> "ParameterSaliency":
        r"""
        Compute the reference statistics (per-feature mean and unbiased std) over a dataset.

        Args:

            dataloader (Iterable): Yields batches ``(inputs, targets, ...)`` (extra items are
                        ignored; dicts with ``inputs``/``targets`` or ``image``/``label`` work too).
            max_batches (int, optional): Stop after this many batches.
                        Default: None (the whole loader)
            progress (bool, optional): Show a tqdm progress bar (samples/s).
                        Default: True
            keep_profiles (bool, optional): Also keep the reference set's naive profiles in
                        :attr:`reference_profiles` (CPU, ``(N, num_features)``), e.g. to fit a
                        :class:`~captum_normgrad.parameter_saliency.POTScorer`.
                        Default: False

        Returns:
            *ParameterSaliency*: ``self``, fitted. Previous statistics are replaced.
        """
        from tqdm.auto import tqdm

        if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
        ):
            raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
        try:
            total_batches = len(dataloader)  # type: ignore[arg-type]
        except TypeError:
            total_batches = None
        if max_batches is not None and total_batches is not None:
            total_batches = min(total_batches, max_batches)
        state = WelfordState(self.num_features)
        kept: List[Tensor] = []
        bar = tqdm(total=total_batches, desc="parameter saliency statistics", unit="batch", disable=not progress)
        try:
            for i, batch in enumerate(dataloader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _unpack_batch(batch)
                prof = self.profiles(x, y)
                state.update(prof)
                if keep_profiles:
                    kept.append(prof.cpu())
                bar.update(1)
                bar.set_postfix(samples=state.count)
        finally:
            bar.close()
        if state.count < 2:
            raise ValueError(
                f"the reference set gave {state.count} sample(s); the unbiased standard deviation needs at least 2"
            )
        self._stats = state
        self.reference_profiles = torch.cat(kept) if keep_profiles else None
        return self

    # ------------------------------------------------------------------ saliency
    def standardize(self, profiles: Tensor, mode: Optional[str] = None) -> Tensor:
        """Turn naive profiles ``(N, F)`` into saliency in ``mode`` (differentiable in ``profiles``)."""
        mode = self.mode if mode is None else mode
        _check_choice("mode", mode, MODES)
        if not isinstance(profiles, Tensor) or profiles.shape[-1] != self.num_features:
            raise ValueError(
                f"profiles must be a tensor with last dim {self.num_features}, got "
                f"{tuple(profiles.shape) if isinstance(profiles, Tensor) else type(profiles).__name__}"
            )
        if mode == "naive":
            return profiles
        if not self.is_fitted:
            raise ValueError(
                f"mode={mode!r} needs reference statistics: call fit(reference_loader) or load(path) first, "
                "or use mode='naive'"
            )
        assert self._stats is not None
        if mode == "standardized":
            mu = self._stats.mean.to(device=profiles.device)
            sd = self._stats.std().to(device=profiles.device)
            return ((profiles.to(torch.float64) - mu) / sd).to(profiles.dtype)
        mu = self._stats.mean.to(device=profiles.device)
        mu = torch.where(mu <= SIGMA_FLOOR, torch.ones_like(mu), mu)
        return (profiles.to(torch.float64) / mu).to(profiles.dtype)

    def saliency(self, inputs: Tensor, target: Any, mode: Optional[str] = None) -> Tensor:
        r"""
        Per-sample parameter saliency ``(N, num_features)``.

        Args:

            inputs (Tensor): Batch ``(N, ...)``.
            target (int, list[int] or Tensor): True class of each sample.
            mode (str, optional): ``"standardized"``, ``"naive"`` or ``"norm"``.
                        Default: None (the object's :attr:`mode`)

        Returns:
            *Tensor*: saliency, detached.
        """
        mode = self.mode if mode is None else mode
        _check_choice("mode", mode, MODES)
        if mode != "naive" and not self.is_fitted:
            self.standardize(torch.zeros(1, self.num_features), mode)  # raises the explanatory error
        return self.standardize(self.profiles(inputs, target), mode)

    @staticmethod
    def rank(saliency: Tensor, k: Optional[int] = None, by: str = "value") -> Tensor:
        r"""
        Filter indices sorted by saliency, most salient first.

        Args:

            saliency (Tensor): ``(N, F)`` or ``(F,)``.
            k (int, optional): Keep the first ``k``. Default: None (all)
            by (str, optional): ``"value"`` (descending saliency) or ``"abs"`` (descending
                        absolute saliency). Ties keep index order. Default: ``"value"``

        Returns:
            *Tensor*: long indices, shape ``(N, k)`` (or ``(k,)``).
        """
        _check_choice("by", by, ("value", "abs"))
        if not isinstance(saliency, Tensor) or saliency.dim() not in (1, 2):
            raise ValueError("saliency must be a (N, F) or (F,) tensor")
        key = saliency.abs() if by == "abs" else saliency
        order = torch.argsort(key, dim=-1, descending=True, stable=True)
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"k must be a positive int, got {k!r}")
            order = order[..., :k]
        return order

    def top_filters(
        self, inputs: Tensor, target: Any, k: int = 10, mode: Optional[str] = None, by: str = "value"
    ) -> List[List[FilterRef]]:
        """The ``k`` most salient filters of each sample, as :class:`FilterRef` s."""
        order = self.rank(self.saliency(inputs, target, mode), k=k, by=by)
        return [[self.locate(int(i)) for i in row] for row in order]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> Dict[str, Any]:
        """The statistics with the identity (names, shapes, aggregation) of what they belong to."""
        if self._stats is None:
            raise ValueError("no statistics to save: call fit(reference_loader) first")
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "aggregation": self.aggregation,
            "identity": [[n, list(s)] for n, s in self.identity()],
            "welford": self._stats.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> "ParameterSaliency":
        """Load statistics after checking they belong to this model (names/shapes) and aggregation."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not parameter-saliency statistics (written by ParameterSaliency.save)")
        if int(state.get("version", -1)) > _FORMAT_VERSION:
            raise ValueError(f"statistics format version {state.get('version')} is newer than this library's")
        if state["aggregation"] != self.aggregation:
            raise ValueError(
                f"statistics were computed with aggregation={state['aggregation']!r}, this object uses "
                f"{self.aggregation!r}"
            )
        theirs = [(str(n), tuple(int(v) for v in s)) for n, s in state["identity"]]
        mine = self.identity()
        if theirs != mine:
            for i, (a, b) in enumerate(itertools.zip_longest(theirs, mine)):
                if a != b:
                    raise ValueError(
                        "statistics belong to a different model: profiled parameter "
                        f"#{i} is {a!r} in the statistics but {b!r} in this model. Fit statistics for this "
                        "model (ParameterSaliency(model).fit(loader))"
                    )
        stats = WelfordState.from_state_dict(state["welford"])
        self.statistics = stats
        return self

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Save the statistics (``torch.save``) with the names/shapes of the profiled parameters."""
        torch.save(self.state_dict(), path)

    def load(self, path: Union[str, os.PathLike]) -> "ParameterSaliency":
        """Load statistics written by :meth:`save`; raises ``ValueError`` if they belong to another model."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        return self.load_state_dict(state)

    def __repr__(self) -> str:
        fitted = f"fitted on {self._stats.count} samples" if self._stats is not None else "not fitted"
        return (
            f"ParameterSaliency({type(self.model).__name__}, mode={self.mode!r}, aggregation={self.aggregation!r}, "
            f"{len(self._entries)} parameters, {self.num_features} features, {fitted})"
        )
