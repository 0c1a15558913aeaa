"""captum-normgrad: NormGrad and its relatives as first-class Captum attribution methods.

Public names are imported lazily (PEP 562), so ``import captum_normgrad`` and the command line's
``--help`` do not pay for importing torch and captum until a method is actually used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: Dict[str, str] = {
    "LayerNormGrad": ".normgrad",
    "LayerNormGradOrder1": ".normgrad_order1",
    "per_sample_cross_entropy": ".normgrad_order1",
    "fuse_maps": "._maps",
    "normalize_maps": "._maps",
    "LayerNoiseTunnel": ".wrappers",
    "as_input_attribution": ".wrappers",
    "pointing_game": ".evaluation",
    "energy_pointing_game": ".evaluation",
    "deletion_curve": ".evaluation",
    "insertion_curve": ".evaluation",
    "model_parameter_randomization": ".evaluation",
    "class_sensitivity": ".evaluation",
    "ParameterSaliency": ".parameter_saliency",
    "InputSpaceSaliency": ".parameter_saliency",
    "POTScorer": ".parameter_saliency",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'captum_normgrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._maps import fuse_maps, normalize_maps
    from .evaluation import (
        class_sensitivity,
        deletion_curve,
        energy_pointing_game,
        insertion_curve,
        model_parameter_randomization,
        pointing_game,
    )
    from .normgrad import LayerNormGrad
    from .normgrad_order1 import LayerNormGradOrder1, per_sample_cross_entropy
    from .parameter_saliency import InputSpaceSaliency, ParameterSaliency, POTScorer
    from .wrappers import LayerNoiseTunnel, as_input_attribution
