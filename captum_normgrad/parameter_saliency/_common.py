"""Constants and argument checks shared by the parameter-saliency modules."""

from __future__ import annotations

from typing import Any, Sequence, Tuple

__all__ = ["MODES", "AGGREGATIONS", "ENGINES", "SIGMA_FLOOR"]

#: Saliency modes: standardised ``(s - mu) / sigma``, raw ``s``, and ``s / mu``.
MODES: Tuple[str, ...] = ("standardized", "naive", "norm")
#: Aggregations: one value per filter (output channel) or one value per individual weight.
AGGREGATIONS: Tuple[str, ...] = ("filter", "parameter")
#: Per-sample gradient engines (see :class:`~captum_normgrad.parameter_saliency.ParameterSaliency`).
ENGINES: Tuple[str, ...] = ("auto", "batched", "vmap", "loop")
#: Standard deviations (and, in ``"norm"`` mode, means) at or below this are replaced by 1.
SIGMA_FLOOR: float = 1e-14


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
