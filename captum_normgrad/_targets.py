r"""Captum's target forms, validated and normalised once.

Captum accepts a ``target`` as ``None``, an int, a tuple (an index into an output with more than 2
dims), a list with one int or tuple per example, or a tensor (one element for every example, or one
per example). Python-style **negative indices** count from the end (``target=-1`` is the last
class), and a **1-tuple** on a 2-D output is the same as its int. Every front end of the package
(order 0, order 1, the metrics, the sanity checks, parameter saliency) validates and normalises
targets here, so they all accept exactly the same forms and reject the same mistakes with the same
messages.

* :func:`check_target` validates a target against an output shape (clear ``TypeError`` /
  ``ValueError`` naming the fix).
* :func:`normalize_target` turns a valid target into Captum's form with non-negative indices
  (safe for :func:`captum._utils.common._select_targets`, whose tensor path cannot gather negative
  indices).
* :func:`class_indices` gives the ``(N,)`` long tensor of class indices that a per-sample loss such
  as cross-entropy takes, for the class-index forms on 2-D outputs.
* :func:`per_sample_rows` splits a target into one row per example (for per-sample engines).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "check_target",
    "normalize_target",
    "class_indices",
    "class_index_vector",
    "per_sample_rows",
    "is_class_index_target",
]

Index = Union[int, Tuple[int, ...]]


def _as_int(v: Any, where: str) -> int:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"target{where} holds a tensor of shape {tuple(v.shape)}; expected one integer index")
        if v.dtype == torch.bool or v.is_floating_point() or v.is_complex():
            raise TypeError(f"target{where} must contain integers, got a tensor of dtype {v.dtype}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"target{where} must contain integers, got {v!r} of type {type(v).__name__}")
    return int(v)


def _check_index(idx: Any, shape: Sequence[int], where: str) -> Index:
    """Validate one index (int or tuple) against the per-example output dims; return it non-negative."""
    dims = list(shape[1:])
    idx_t = idx if isinstance(idx, tuple) else (idx,)
    if len(idx_t) == 0:
        raise ValueError(f"target{where} is an empty tuple; give one index per output dim")
    if len(idx_t) > len(dims):
        raise ValueError(
            f"target{where} {idx!r} has {len(idx_t)} indices but the output {tuple(shape)} has only "
            f"{len(dims)} dims per example"
        )
    out = []
    for d, v in enumerate(idx_t):
        v = _as_int(v, where)
        size = dims[d]
        if not -size <= v < size:
            raise ValueError(
                f"target{where} index {v} is out of range for output dim {1 + d} of size {size} "
                f"(output shape {tuple(shape)}); valid indices are 0..{size - 1} (or -{size}..-1 from the end)"
            )
        out.append(v % size)
    return tuple(out) if isinstance(idx, tuple) else out[0]


def _tensor_target(target: Tensor, n: int) -> Tensor:
    if target.dtype == torch.bool:
        raise TypeError(
            "a target tensor must hold integer class indices, got dtype torch.bool (a mask?); "
            "convert with target.long() if you mean the indices 0/1, or pass target.nonzero()"
        )
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"a target tensor must hold integer class indices, got dtype {target.dtype}")
    if target.numel() != 1 and not (target.dim() == 1 and target.numel() == n):
        raise ValueError(
            f"a target tensor must have 1 element or one per example ({n}); got shape {tuple(target.shape)}"
        )
    return target


def check_target(shape: Sequence[int], target: Any) -> None:
    """Raise a clear error unless ``target`` is a valid Captum target for outputs of ``shape``.

    Args:
        shape (sequence of int): the output shape, batch first.
        target: the target as given by the caller.
    """
    normalize_target(shape, target)


def normalize_target(shape: Sequence[int], target: Any) -> Any:
    """Validate ``target`` against an output ``shape`` and return it with non-negative indices.

    The returned target has Captum's form (None, int, tuple, list, or tensor), with a 1-tuple on a
    2-D output turned into its int, so that Captum's own ``_select_targets`` selects exactly the
    values the caller meant.

    Args:
        shape (sequence of int): the output shape, batch first.
        target: the target as given by the caller.

    Returns:
        The normalised target.
    """
    shape = tuple(int(s) for s in shape)
    n = shape[0] if shape else 0
    per_sample = 1
    for s in shape[1:]:
        per_sample *= s
    if target is None:
        if per_sample != 1:
            raise ValueError(
                f"target is required: the model returns {per_sample} values per example "
                f"(output shape {shape}); pass target=<class index>, a list/tensor of one index per "
                "example, or a tuple index for outputs with more than 2 dims"
            )
        return None
    if len(shape) < 2:
        raise ValueError(
            f"target={target!r} given but the model returns one value per example (output shape {shape}); "
            "use target=None"
        )
    if isinstance(target, Tensor):
        t = _tensor_target(target, n)
        if t.numel() == 1:
            return torch.tensor(_check_index(int(t.item()), shape, ""), dtype=torch.long, device=t.device).reshape(
                t.shape
            )
        if len(shape) > 2:
            raise ValueError(
                f"a 1-D target tensor indexes dim 1 only, but the output {shape} has {len(shape) - 1} dims per "
                "example; give a list of tuples, one per example"
            )
        size = shape[1]
        lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
        if lo < -size or hi >= size:
            pos = int(((t < -size) | (t >= size)).nonzero()[0, 0])
            bad = int(t[pos])
            raise ValueError(
                f"target[{pos}] index {bad} is out of range for output dim 1 of size {size} (output shape {shape}); "
                f"valid indices are 0..{size - 1} (or -{size}..-1 from the end)"
            )
        return t % size if lo < 0 else t
    if isinstance(target, list):
        if len(target) != n:
            raise ValueError(f"target list has {len(target)} entries but the batch has {n} examples")
        rows = [_check_index(v, shape, f"[{i}]") for i, v in enumerate(target)]
        if len(shape) == 2:
            rows = [r[0] if isinstance(r, tuple) else r for r in rows]
        return rows
    if isinstance(target, bool):
        raise TypeError("target must be an int, a tuple, a list or a tensor (Captum's target forms), not a bool")
    if isinstance(target, (int, tuple)):
        idx = _check_index(target, shape, "")
        if isinstance(idx, tuple) and len(shape) == 2:
            return idx[0]
        return idx
    raise TypeError(
        f"target must be None, an int, a tuple, a list or a tensor (Captum's target forms), got {type(target).__name__}"
    )


def is_class_index_target(target: Any) -> bool:
    """Whether ``target`` has a class-index form (int, 1-tuple, list of ints/1-tuples, integer tensor)."""
    if isinstance(target, bool):
        return False
    if isinstance(target, int):
        return True
    if isinstance(target, tuple):
        return len(target) == 1 and isinstance(target[0], int) and not isinstance(target[0], bool)
    if isinstance(target, list):
        return all(is_class_index_target(v) and not isinstance(v, list) for v in target)
    if isinstance(target, Tensor):
        return (
            not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool) and target.dim() <= 1
        )
    return False


def class_indices(shape: Sequence[int], target: Any, device: Optional[torch.device] = None) -> Tensor:
    """The ``(N,)`` long tensor of class indices for a class-index target on a 2-D output.

    An int (or one-element tensor, or 1-tuple) applies to every example; a list or 1-D tensor has
    one index per example. Negative indices count from the end.

    Raises:
        ValueError: the output is not 2-D or the target is not a class-index form (tuple targets
            on outputs with more than 2 dims need a ``loss_fn`` that understands them).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or not is_class_index_target(target):
        raise ValueError(
            f"a class-index loss (cross-entropy) needs 2-D outputs (N, classes) and one class index per "
            f"example; got output shape {shape} and target {target!r}. Give a loss_fn that takes this target"
        )
    t = normalize_target(shape, target)
    n = shape[0]
    if isinstance(t, Tensor):
        t = t.to(device=device, dtype=torch.long)
        return t.reshape(1).expand(n).clone() if t.numel() == 1 else t.reshape(n)
    if isinstance(t, list):
        return torch.tensor(t, dtype=torch.long, device=device)
    return torch.full((n,), int(t), dtype=torch.long, device=device)


def per_sample_rows(target: Any, n: int) -> List[Any]:
    """One target per example (``None`` rows for ``target=None``): for per-sample engines."""
    if target is None or isinstance(target, (int, tuple)):
        return [target] * n
    if isinstance(target, list):
        return list(target)
    if isinstance(target, Tensor):
        if target.numel() == 1:
            return [target.reshape(())] * n
        return [target[i] for i in range(n)]
    raise TypeError(f"unsupported target type {type(target).__name__}")


def class_index_vector(target: Any, n: int, device: Optional[torch.device] = None) -> Tensor:
    """The ``(n,)`` long tensor of class indices of a class-index target, before the output shape
    is known (e.g. the true labels of parameter saliency).

    Accepts the class-index forms of :func:`class_indices` (an int, a 1-tuple, a list of ints or
    1-tuples, a 0-d / 1-element / ``(n,)`` integer tensor) and NumPy integer arrays. Negative
    indices need the number of classes: resolve them with :func:`class_indices` once the output
    shape is known; here they are refused.
    """
    if target is not None and type(target).__module__ == "numpy" and hasattr(target, "shape"):
        target = torch.as_tensor(target)
    if isinstance(target, list):
        target = [v[0] if isinstance(v, tuple) and len(v) == 1 else v for v in target]
        for i, v in enumerate(target):
            if type(v).__module__ == "numpy":
                target[i] = int(v)
    if isinstance(target, tuple) and len(target) == 1:
        target = target[0]
    if isinstance(target, Tensor):
        _tensor_target(target, n)
        t = target.detach().reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
    elif isinstance(target, bool) or not (isinstance(target, int) or isinstance(target, list)):
        raise TypeError(
            f"target must be an int, a list of ints or a 1-D tensor of class indices, got {type(target).__name__}"
        )
    elif isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long)
    else:
        if len(target) != n:
            raise ValueError(f"target has {len(target)} entries but the batch has {n} examples")
        t = torch.tensor([_as_int(v, f"[{i}]") for i, v in enumerate(target)], dtype=torch.long)
    if t.numel() != n:
        raise ValueError(f"target must have one class index per sample (shape ({n},)), got {t.numel()}")
    if n and int(t.min()) < 0:
        raise ValueError("target holds negative class indices; give the labels as indices 0..classes-1 here")
    return t.to(device=device, dtype=torch.long)
