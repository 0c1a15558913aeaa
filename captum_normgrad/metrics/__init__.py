"""Deprecated location: ``captum_normgrad.metrics`` moved to ``captum_normgrad.evaluation (metrics) and captum_normgrad.wrappers (LayerNoiseTunnel, as_input_attribution)`` (this shim goes in the next release)."""

import importlib
import warnings
from typing import Any, List

warnings.warn(
    "captum_normgrad.metrics moved to captum_normgrad.evaluation (metrics) and captum_normgrad.wrappers (LayerNoiseTunnel, as_input_attribution); import from there (this alias goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)

_SOURCES = ['captum_normgrad.evaluation', 'captum_normgrad.wrappers', 'captum_normgrad._maps', 'captum_normgrad._layers']


def __getattr__(name: str) -> Any:
    for src in _SOURCES:
        mod = importlib.import_module(src)
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__: List[str] = sorted(
    {n for src in _SOURCES[:2] for n in getattr(importlib.import_module(src), "__all__", [])}
    | {"module_by_name", "reduce_map_channels", "resize_maps"}
)
