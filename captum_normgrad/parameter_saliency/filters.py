"""The index of a model's filters: which feature of a profile is which output channel of which weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["FilterRef"]


# --------------------------------------------------------------------------- index of filters


@dataclass(frozen=True)
class FilterRef:
    """Where entry ``index`` of a saliency profile lives in the model.

    Attributes:
        index (int): position in the profile.
        parameter (str): the parameter's name in ``model.named_parameters()``
                    (e.g. ``"layer1.0.conv1.weight"``).
        module (str): the owning module's name (e.g. ``"layer1.0.conv1"``; ``""`` for the root).
        channel (int): the output channel (filter) inside the parameter (dim 0).
        element (tuple[int, ...] or None): with ``aggregation="parameter"``, the position of the
                    weight inside its filter (the remaining dims); None for filter-wise profiles.
    """

    index: int
    parameter: str
    module: str
    channel: int
    element: Optional[Tuple[int, ...]] = None

    @property
    def layer(self) -> str:
        """Alias of :attr:`module` (the layer name)."""
        return self.module

    def __str__(self) -> str:
        where = f"{self.module or '<root>'}[{self.channel}]"
        if self.element is not None:
            where += "[" + ", ".join(str(i) for i in self.element) + "]"
        return where


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: Tuple[int, ...]
    offset: int
    count: int


def _module_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""
