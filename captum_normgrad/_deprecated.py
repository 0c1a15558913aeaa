"""Deprecation aliases for moved public modules (kept for one release)."""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any, List, Sequence


def alias_module(name: str, new: str, sources: Sequence[str], extra_names: Sequence[str] = ()) -> None:
    """Turn module ``name`` into an alias that warns once on import and forwards every attribute.

    Args:
        name (str): the old module's ``__name__``.
        new (str): where its contents went (for the warning).
        sources (sequence of str): modules searched, in order, for an attribute.
        extra_names (sequence of str): names offered by ``from old import *`` besides the first
                    source's ``__all__``.
    """
    warnings.warn(
        f"{name} moved to {new}; import from there (this alias goes in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    module = sys.modules[name]

    def __getattr__(attr: str) -> Any:
        for src in sources:
            mod = importlib.import_module(src)
            if hasattr(mod, attr):
                return getattr(mod, attr)
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    exported: List[str] = list(getattr(importlib.import_module(sources[0]), "__all__", []))
    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.__all__ = sorted(set(exported) | set(extra_names))  # type: ignore[attr-defined]
