"""Deprecated location: ``captum_normgrad.quantus_bridge`` moved to ``captum_normgrad.evaluation.quantus_bridge`` (this shim goes in the next release)."""

import importlib
import warnings
from typing import Any, List

warnings.warn(
    "captum_normgrad.quantus_bridge moved to captum_normgrad.evaluation.quantus_bridge; import from there (this alias goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)

_SOURCES = ['captum_normgrad.evaluation.quantus_bridge']


def __getattr__(name: str) -> Any:
    for src in _SOURCES:
        mod = importlib.import_module(src)
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__: List[str] = sorted({n for src in _SOURCES for n in getattr(importlib.import_module(src), "__all__", [])})
